"""selfperc_jax: diffusion models with the self-perceptual objective in JAX/Flax."""
