"""Stable Diffusion's U-Net (diffusers' UNet2DConditionModel layout, SD 1.x / 2.x) in Flax, and a converter for its
weights.

`model.UNet2DConditionModel` is the network (`(x, t, context) -> prediction`, NHWC latents; `taps=('mid',)` for the
encoder / mid-block features only), `model.SD2` / `model.SD1` its full-size configs, and `convert.load_variables(path)`
turns the user's own `unet/diffusion_pytorch_model.safetensors` (+ `config.json`) into the Flax variables, with numpy
alone. Nothing here downloads anything; README.md says where the weights come from. Nothing is imported here, so
importing the package stays cheap.
"""
