"""Tiny configs shared by the tests (and by tests/multiprocess_worker.py, which runs as a script from tests/)."""

from glm4_jax.config import Config

# Head counts, ffn and vocab divide 8; 2 kv heads, so tensor=8 replicates them. float32 for exact comparisons.
SHARDABLE = Config(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=8,
    num_kv_heads=2,
    head_dim=16,
    max_seq_len=64,
    eos_token_ids=(1,),
    pad_token_id=0,
    dtype="float32",
)
