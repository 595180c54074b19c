"""Choosing the next token from the logits: greedy, temperature, top-k, top-p and repetition penalty.

The order is the usual one: repetition penalty on the raw logits, the padded vocabulary rows masked out, then
temperature, top-k, top-p, and a draw from what is left. Everything here is jittable; `SamplingParams` is frozen
(hashable), so it is a static argument of the compiled decode loop.

Definitions:
  * repetition penalty p: for every id seen in the prompt or generated so far, a positive logit is divided by p
    and a negative one multiplied by p (p > 1 discourages repeats);
  * temperature 0 means greedy (argmax), with the penalty and the vocabulary mask still applied;
  * top-k keeps exactly k candidates (ties are broken by id order), 0 turns it off;
  * top-p keeps the smallest set of most probable candidates whose probability adds up to at least p (the most
    probable one is always kept), 1 turns it off. It runs after top-k, over the k candidates when k > 0;
  * ids >= n_vocab (rows 151343..151551 of GLM-4's embedding, which no tokenizer id maps to) are never chosen.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

Array = jax.Array


class SamplingError(ValueError):
    """A sampling setting out of range; `field` names it ("temperature", "top_p", ...)."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field} {message}")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    repetition_penalty: float = 1.0  # 1: off

    def __post_init__(self):
        # Normalize so that equal settings hash equally (an int 1 and a float 1.0 would compile twice).
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_k", int(self.top_k))
        object.__setattr__(self, "top_p", float(self.top_p))
        object.__setattr__(self, "repetition_penalty", float(self.repetition_penalty))
        self.validate()

    def validate(self) -> None:
        """Raises SamplingError (a ValueError) naming the offending setting."""
        if not self.temperature >= 0:  # also catches NaN
            raise SamplingError("temperature", f"must be >= 0 (0 means greedy), got {self.temperature}")
        if self.top_k < 0:
            raise SamplingError("top_k", f"must be >= 0 (0 turns it off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise SamplingError("top_p", f"must be in (0, 1] (1 turns it off), got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise SamplingError("repetition_penalty", f"must be > 0 (1 turns it off), got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_penalty(self) -> bool:
        return self.repetition_penalty != 1.0


# The official GLM-4-9B-chat demos sample with temperature 0.8 (0.6 in some) and top_p 0.8.
CHAT_DEFAULTS = SamplingParams(temperature=0.8, top_p=0.8)


def apply_repetition_penalty(logits: Array, seen: Array, penalty: float) -> Array:
    """logits [B, V]; seen [B, V] bool (ids in the prompt or generated so far)."""
    penalized = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(seen, penalized, logits)


def mask_vocab(logits: Array, n_vocab: int | None) -> Array:
    """Sets the logits of ids >= n_vocab to -inf."""
    V = logits.shape[-1]
    if n_vocab is None or n_vocab >= V:
        return logits
    return jnp.where(jnp.arange(V) < n_vocab, logits, -jnp.inf)


def scaled_logits(
    logits: Array, params: SamplingParams, *, n_vocab: int | None = None, seen: Array | None = None
) -> Array:
    """Repetition penalty, vocabulary mask and temperature: [B, V] float32 logits in id order."""
    logits = logits.astype(jnp.float32)
    if params.uses_penalty:
        if seen is None:
            raise ValueError("a repetition penalty needs the `seen` mask")
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    logits = mask_vocab(logits, n_vocab)
    return logits / params.temperature if params.temperature > 0 else logits


def candidates(
    logits: Array, params: SamplingParams, *, n_vocab: int | None = None, seen: Array | None = None
) -> tuple[Array, Array]:
    """The tokens a draw chooses from, most probable first.

    Args:
      logits: [B, V] float.
      params: the sampling settings.
      n_vocab: ids >= n_vocab are excluded; None excludes nothing.
      seen: [B, V] bool, required when params.uses_penalty.
    Returns:
      (scaled logits [B, C], token ids [B, C] int32) sorted by decreasing logit; filtered-out candidates have
      logit -inf. C is top_k when top-k is on, else V.
    """
    logits = scaled_logits(logits, params, n_vocab=n_vocab, seen=seen)
    V = logits.shape[-1]
    k = params.top_k if 0 < params.top_k < V else V
    vals, ids = jax.lax.top_k(logits, k)  # [B, C]: sorted, ties broken by lower id first
    if params.top_p < 1.0:
        probs = jax.nn.softmax(vals, axis=-1)
        above = jnp.cumsum(probs, axis=-1) - probs  # probability of the candidates ranked above each one
        keep = (above < params.top_p).at[:, 0].set(True)
        vals = jnp.where(keep, vals, -jnp.inf)
    return vals, ids.astype(jnp.int32)


def filter_logits(
    logits: Array, params: SamplingParams, *, n_vocab: int | None = None, seen: Array | None = None
) -> Array:
    """The full [B, V] logits a draw uses: scaled by the temperature, -inf where a filter removed an id."""
    vals, ids = candidates(logits, params, n_vocab=n_vocab, seen=seen)
    rows = jnp.arange(logits.shape[0])[:, None]
    return jnp.full(logits.shape, -jnp.inf, jnp.float32).at[rows, ids].set(vals)


def sample(
    logits: Array,
    key: Array,
    params: SamplingParams,
    *,
    n_vocab: int | None = None,
    seen: Array | None = None,
) -> Array:
    """Picks one token per row.

    Args:
      logits: [B, V] float (the model's last-position logits).
      key: a PRNG key (unused when greedy).
      params: the sampling settings.
      n_vocab: ids >= n_vocab are never picked; None means all ids may be.
      seen: [B, V] bool, ids seen in the prompt or generated so far; required when params.uses_penalty.
    Returns:
      [B] int32 token ids.
    """
    if params.greedy:
        return jnp.argmax(scaled_logits(logits, params, n_vocab=n_vocab, seen=seen), axis=-1).astype(jnp.int32)
    if params.top_k == 0 and params.top_p == 1.0:  # nothing to sort
        scaled = scaled_logits(logits, params, n_vocab=n_vocab, seen=seen)
        return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
    vals, ids = candidates(logits, params, n_vocab=n_vocab, seen=seen)
    choice = jax.random.categorical(key, vals, axis=-1)  # [B]: an index into the candidates
    return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0]
