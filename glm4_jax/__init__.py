"""glm4-jax: GLM-4-9B and GLM-4-0414 in JAX and Flax NNX.

    import glm4_jax
    chat = glm4_jax.GLM4Chat.from_checkpoint("out/glm-4-9b-chat", mesh="tensor=8")
    for piece in chat.chat("What is JAX?", stream=True):
        print(piece, end="", flush=True)

The names below are imported on first use, so that `python -m glm4_jax.generate` (and the other command modules)
do not import themselves twice.
"""

import importlib

from glm4_jax.runtime import configure_xla_flags

configure_xla_flags()

__version__ = "0.1.0"

_EXPORTS = {
    "Config": "glm4_jax.config",
    "ConfigError": "glm4_jax.config",
    "preset": "glm4_jax.config",
    "GLM4": "glm4_jax.model",
    "KVCache": "glm4_jax.model",
    "Tokenizer": "glm4_jax.tokenizer",
    "load": "glm4_jax.checkpoint",
    "GLM4Chat": "glm4_jax.api",
    "Generator": "glm4_jax.engine",
    "GenerationResult": "glm4_jax.engine",
    "Engine": "glm4_jax.batching",
    "Request": "glm4_jax.batching",
    "SamplingParams": "glm4_jax.sampling",
    # a model on a device mesh (glm4_jax.sharding has the meshes and rules)
    **dict.fromkeys(
        (
            "abstract_cache",
            "abstract_params",
            "cache_shardings",
            "global_input",
            "init_cache",
            "init_sharded_model",
            "random_model",
            "jit_forward",
            "param_shardings",
            "param_tree",
            "shard_model",
        ),
        "glm4_jax.placement",
    ),
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'glm4_jax' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
