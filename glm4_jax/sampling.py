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

import jax
import jax.numpy as jnp

from glm4_jax.options import CHAT_DEFAULTS, SamplingError, SamplingParams

Array = jax.Array

__all__ = [
    "CHAT_DEFAULTS",
    "SamplingError",
    "SamplingParams",
    "apply_repetition_penalty",
    "candidates",
    "filter_logits",
    "mask_vocab",
    "sample",
    "scaled_logits",
]

_MAX_SCALE = float(jnp.finfo(jnp.float32).max)
TINY_TEMPERATURE = 1e-30  # below it, dividing float32 logits by the temperature may overflow


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
    masked = mask_vocab(logits, n_vocab)
    t = params.temperature
    if t == 0:
        return masked
    # The mask is applied after the division: -inf / inf would be NaN. Below TINY_TEMPERATURE a logit divided by
    # the temperature could overflow float32 to +inf (and a denormal temperature flushes to 0), so the logits are
    # shifted by their row maximum first and multiplied by a capped 1 / t: the same distribution, the best ids at
    # 0 and no NaN. An infinite temperature gives all zeros: a uniform draw over the real ids.
    if t >= TINY_TEMPERATURE:
        scaled = logits / t
    else:
        best = jnp.max(masked, axis=-1, keepdims=True)
        scaled = (logits - best) * min(1.0 / t, _MAX_SCALE)
    return jnp.where(jnp.isneginf(masked), -jnp.inf, scaled)


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
