"""Input pipelines. `build(config)` returns the pipeline that `config.data.name` names."""

from selfperc_jax.data.pipeline import Pipeline, build, image_shape

__all__ = ["Pipeline", "build", "image_shape"]
