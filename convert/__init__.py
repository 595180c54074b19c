"""Checkpoint conversion: `python -m glm4_jax.convert SRC DST`."""
