"""Stable Diffusion's VAE (AutoencoderKL, "kl-f8") in Flax, and a converter for diffusers' weights of it.

`model.AutoencoderKL` is the network (`encode(images) -> (mean, logvar)`, `decode(latents) -> images`, NHWC, images
in [-1, 1]), `model.SD` / `model.SDXL` its full-size configs (scaling factors 0.18215 / 0.13025), and
`convert.load_variables(path)` turns the user's own `diffusion_pytorch_model.safetensors` (or an original CompVis /
LDM checkpoint) into the Flax variables, with numpy alone. Nothing here downloads anything; README.md says where the
weights come from. Nothing is imported here, so importing the package stays cheap.
"""
