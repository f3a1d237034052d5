"""Input pipelines. `build(config)` returns the pipeline that `config.data.name` names."""

from selfperc_jax.data.pipeline import Pipeline, build

__all__ = ["Pipeline", "build"]
