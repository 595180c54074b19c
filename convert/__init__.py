"""Checkpoint conversion: `python -m glm4_jax.convert SRC DST` turns a GLM-4-9B or GLM-4-0414 PyTorch
checkpoint (THUDM, transformers GlmForCausalLM or Glm4ForCausalLM layout; safetensors or .bin) into a glm4-jax
checkpoint (Orbax arrays, config, manifest, tokenizer).

    from glm4_jax.convert import convert
    convert("THUDM/glm-4-9b-chat", "ckpt/glm-4-9b-chat", dtype="bfloat16")

Modules: `readers` (finding and checking source files, reading tensor blocks), `table` (the name table and its
transforms), `pipeline` (the atomic, streaming conversion), `__main__` (the command line).
"""

__all__ = ["ConvertError", "convert"]

_LAZY = {"convert": "glm4_jax.convert.pipeline", "ConvertError": "glm4_jax.convert.readers"}


def __getattr__(name):
    # Lazy, so that `python -m glm4_jax.convert --help` (which runs this file first) answers at once.
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'glm4_jax.convert' has no attribute {name!r}")
