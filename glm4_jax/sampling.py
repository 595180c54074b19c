"""Choosing the next token from the logits: greedy, temperature, top-k, top-p and repetition penalty.

The order is the usual one: repetition penalty on the raw logits, the padded vocabulary rows masked out, then
temperature, top-k, top-p, and a draw from what is left. Everything here is jittable. `SamplingParams` is one
request's (frozen) setting; `RowSampling` holds the settings of a batch as [B] arrays, and `sample_rows` is the one
sampling function every generation path calls (a draw is the argmax of the filtered logits plus Gumbel noise from
the row's own key).

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
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from glm4_jax.options import CHAT_DEFAULTS, SamplingError, SamplingParams  # noqa: F401  (re-exported)

Array = jax.Array


# below it, dividing float32 logits by the temperature may overflow (and a denormal temperature flushes to 0)
TINY_TEMPERATURE = 1e-30
_MAX_SCALE = float(jnp.finfo(jnp.float32).max)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RowSampling:
    """The sampling settings of each row as arrays, so that rows with different settings share one compiled step
    (the continuous-batching engine, glm4_jax.batching). `SamplingParams.rows(B)` broadcasts one setting."""

    temperature: Array  # [B] float32; 0: greedy
    top_k: Array  # [B] int32; 0: off
    top_p: Array  # [B] float32; 1: off
    repetition_penalty: Array  # [B] float32; 1: off

    @classmethod
    def of(cls, params: Sequence[SamplingParams]) -> RowSampling:
        """Host (numpy) arrays of the settings of each row."""
        with np.errstate(over="ignore"):  # a temperature beyond float32's range is inf: a uniform draw
            temperature = np.asarray([p.temperature for p in params], np.float32)
        return cls(
            temperature=temperature,
            top_k=np.asarray([p.top_k for p in params], np.int32),
            top_p=np.asarray([p.top_p for p in params], np.float32),
            repetition_penalty=np.asarray([p.repetition_penalty for p in params], np.float32),
        )


def _rows(params: SamplingParams, batch: int) -> RowSampling:
    return RowSampling.of([params] * batch)


def apply_repetition_penalty(logits: Array, seen: Array, penalty) -> Array:
    """logits [B, V]; seen [B, V] bool (ids in the prompt or generated so far); penalty a float or [B]."""
    penalty = jnp.asarray(penalty, jnp.float32)
    if penalty.ndim == 1:
        penalty = penalty[:, None]
    penalized = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(seen, penalized, logits)


def mask_vocab(logits: Array, n_vocab: int | None) -> Array:
    """Sets the logits of ids >= n_vocab to -inf."""
    V = logits.shape[-1]
    if n_vocab is None or n_vocab >= V:
        return logits
    return jnp.where(jnp.arange(V) < n_vocab, logits, -jnp.inf)


def _penalized(logits: Array, rows: RowSampling, n_vocab: int | None, seen: Array | None) -> Array:
    """Repetition penalty (where `seen` is given) and vocabulary mask: [B, V] float32, the logits greedy uses."""
    logits = logits.astype(jnp.float32)
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, rows.repetition_penalty)
    return mask_vocab(logits, n_vocab)


def _tempered(penalized: Array, rows: RowSampling) -> Array:
    """The penalized logits divided by each row's temperature (greedy rows unchanged), -inf kept where the mask or
    the penalty put it: -inf / inf would be NaN. Below TINY_TEMPERATURE a logit divided by the temperature could
    overflow float32 (a denormal temperature even flushes to 0), so such a row is shifted by its maximum first and
    multiplied by a capped 1 / t: the same distribution, its best ids at 0. An infinite temperature gives zeros on
    every real id: a uniform draw over them."""
    t = rows.temperature[:, None]
    safe = jnp.where(t > 0, t, 1.0)
    divided = penalized / safe
    best = jnp.max(penalized, axis=-1, keepdims=True)
    shifted = (penalized - best) * jnp.minimum(1.0 / safe, _MAX_SCALE)
    scaled = jnp.where(jnp.isneginf(penalized), -jnp.inf, jnp.where(t < TINY_TEMPERATURE, shifted, divided))
    return jnp.where(t > 0, scaled, penalized)


def _sorted_candidates(scaled: Array, rows: RowSampling) -> tuple[Array, Array]:
    """Top-k and top-p on tempered logits [B, V]: (logits [B, V] sorted by decreasing value with -inf where a
    filter removed the id, ids [B, V] int32). Ties are broken by lower id first."""
    V = scaled.shape[-1]
    ids = jnp.argsort(-scaled, axis=-1, stable=True).astype(jnp.int32)  # [B, V]
    vals = jnp.take_along_axis(scaled, ids, axis=-1)
    rank = jnp.arange(V)[None, :]
    k = rows.top_k[:, None]
    vals = jnp.where((k <= 0) | (rank < k), vals, -jnp.inf)
    probs = jax.nn.softmax(vals, axis=-1)
    above = jnp.cumsum(probs, axis=-1) - probs  # probability of the candidates ranked above each one
    p = rows.top_p[:, None]
    keep = (above < p) | (p >= 1.0) | (rank == 0)
    return jnp.where(keep, vals, -jnp.inf), ids


def _filtered(scaled: Array, rows: RowSampling) -> Array:
    """The tempered logits [B, V] in id order, -inf where top-k or top-p removed an id."""
    vals, ids = _sorted_candidates(scaled, rows)
    b = jnp.arange(scaled.shape[0])[:, None]
    return jnp.full(scaled.shape, -jnp.inf, jnp.float32).at[b, ids].set(vals)


def sample_rows(
    logits: Array, keys: Array, rows: RowSampling, *, n_vocab: int | None = None, seen: Array | None = None
) -> Array:
    """Picks one token per row, each row with its own settings and its own key: THE sampling code of every path
    (the static-batch `Generator`, the continuous-batching engine and `sample`).

    A row's token depends on its own logits, settings, `seen` row and key only, never on the other rows (the sort
    is skipped when no row filters, and greedy rows never draw), so a request gets the same tokens alone or in
    any batch.

    Args:
      logits: [B, V] float (the model's last-position logits).
      keys: [B] PRNG keys (unused by greedy rows).
      rows: the settings of each row ([B] arrays).
      n_vocab: ids >= n_vocab are never picked; None means all ids may be.
      seen: [B, V] bool, ids seen in the prompt or generated so far; None applies no repetition penalty.
    Returns:
      [B] int32 token ids.
    """
    penalized = _penalized(logits, rows, n_vocab, seen)
    greedy = jnp.argmax(penalized, axis=-1).astype(jnp.int32)

    def draw():
        scaled = _tempered(penalized, rows)
        filters = jnp.any((rows.temperature > 0) & ((rows.top_k > 0) | (rows.top_p < 1.0)))
        scaled = jax.lax.cond(filters, lambda x: _filtered(x, rows), lambda x: x, scaled)
        V = logits.shape[-1]
        gumbel = jax.vmap(lambda k: jax.random.gumbel(k, (V,), jnp.float32))(keys)  # [B, V]
        drawn = jnp.argmax(scaled + gumbel, axis=-1).astype(jnp.int32)
        return jnp.where(rows.temperature > 0, drawn, greedy)

    return jax.lax.cond(jnp.any(rows.temperature > 0), draw, lambda: greedy)


# ---- one setting for the whole batch (the filters' definitions, tested in tests/test_sampling.py) --------------


def scaled_logits(
    logits: Array, params: SamplingParams, *, n_vocab: int | None = None, seen: Array | None = None
) -> Array:
    """Repetition penalty, vocabulary mask and temperature: [B, V] float32 logits in id order."""
    if params.uses_penalty and seen is None:
        raise ValueError("a repetition penalty needs the `seen` mask")
    rows = _rows(params, logits.shape[0])
    return _tempered(_penalized(logits, rows, n_vocab, seen if params.uses_penalty else None), rows)


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
    scaled = scaled_logits(logits, params, n_vocab=n_vocab, seen=seen)
    V = scaled.shape[-1]
    k = params.top_k if 0 < params.top_k < V else V
    vals, ids = _sorted_candidates(scaled, _rows(params, scaled.shape[0]))
    return vals[:, :k], ids[:, :k]


def filter_logits(
    logits: Array, params: SamplingParams, *, n_vocab: int | None = None, seen: Array | None = None
) -> Array:
    """The full [B, V] logits a draw uses: scaled by the temperature, -inf where a filter removed an id."""
    scaled = scaled_logits(logits, params, n_vocab=n_vocab, seen=seen)
    return _filtered(scaled, _rows(params, scaled.shape[0]))


def sample(
    logits: Array,
    key: Array,
    params: SamplingParams,
    *,
    n_vocab: int | None = None,
    seen: Array | None = None,
) -> Array:
    """Picks one token per row with one setting for the batch: `sample_rows` with row b drawing with
    `fold_in(key, b)`.

    Args:
      logits: [B, V] float (the model's last-position logits).
      key: a PRNG key (unused when greedy).
      params: the sampling settings.
      n_vocab: ids >= n_vocab are never picked; None means all ids may be.
      seen: [B, V] bool, ids seen in the prompt or generated so far; required when params.uses_penalty.
    Returns:
      [B] int32 token ids.
    """
    if params.uses_penalty and seen is None:
        raise ValueError("a repetition penalty needs the `seen` mask")
    B = logits.shape[0]
    keys = row_keys(key, B)
    return sample_rows(logits, keys, _rows(params, B), n_vocab=n_vocab, seen=seen if params.uses_penalty else None)


def row_keys(key: Array, batch: int) -> Array:
    """[batch] keys, `fold_in(key, b)` for row b."""
    return jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(batch))
