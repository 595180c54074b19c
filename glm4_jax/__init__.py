"""glm4-jax: GLM-4-9B in JAX and Flax NNX."""

from glm4_jax.runtime import configure_xla_flags

configure_xla_flags()

from glm4_jax.config import Config, ConfigError, preset  # noqa: E402
from glm4_jax.model import GLM4, KVCache  # noqa: E402
from glm4_jax.tokenizer import Tokenizer  # noqa: E402

__version__ = "0.1.0"

__all__ = ["GLM4", "Config", "ConfigError", "KVCache", "Tokenizer", "__version__", "preset"]
