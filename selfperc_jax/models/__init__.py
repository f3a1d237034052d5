"""The denoisers: models/unet.py (model.arch='adm', trained here) and models/sd.py (model.arch='sd', Stable
Diffusion's U-Net read from a model folder). Both are called as model(x, t, y, train=False, taps=())."""

ARCHS = ("adm", "sd")


def from_config(config, out_channels: int, num_classes: int):
  """The config's denoiser; num_classes: conditioning.Conditioning.model_classes (ADM's class embedding)."""
  from selfperc_jax.models import unet

  if config.model.arch == "sd":
    from selfperc_jax.models import sd

    return sd.from_config(config, unet.DTYPES[config.model.dtype],
                          None if config.model.attention == "auto" else config.model.attention)
  return unet.unet_from_config(config.model, out_channels, num_classes)
