"""The FID Inception network (TF graph of 2015-12-05) in Flax, and a converter for its PyTorch state dict.

`model.InceptionV3` is the network, `model.preprocess` its input convention, and `convert.load_variables(path)`
turns the user's own `pt_inception-2015-12-05-*.pth` (or an `.npz` made from it by `convert.convert_to_npz`) into
the Flax variables. Nothing here downloads anything; README.md says where the weights come from. Nothing is
imported here, so importing the package stays cheap.
"""
