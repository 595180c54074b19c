"""The options of a generation request and their defaults, without JAX.

`SamplingParams` (and the checks of its ranges), the chat sampling defaults, the default token budgets and cache
rounding, and `truncate_left`. They live here, apart from the jitted code of `glm4_jax.sampling` and
`glm4_jax.engine` (which re-export them), so that the command lines parse and check their arguments before JAX is
imported: `python -m glm4_jax.generate --help` and a bad flag answer in a fraction of a second.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence


class UsageError(Exception):
    """Bad input to a command line (`generate`, `serve`): printed as `error: ...` on stderr, exit code 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors raise `UsageError`: one line and exit code 2 from the CLI's main, no usage dump."""

    def error(self, message):
        raise UsageError(f"{message} (see --help)")


DEFAULT_PREFILL_CHUNK = 512
CACHE_ROUND = 128  # default cache lengths are rounded up to a multiple of this (fewer recompiles)
DEFAULT_MAX_NEW_TOKENS = 256


SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # what `jax.random.key` takes (a C long)


def check_seed(seed: int) -> int:
    """The seed, or ValueError when `jax.random.key` cannot take it."""
    if not SEED_MIN <= seed <= SEED_MAX:
        raise ValueError(f"must be in [{SEED_MIN}, {SEED_MAX}] (a 64-bit integer), got {seed}")
    return seed


def turn_seed(seed: int, turn: int) -> int:
    """The seed of turn `turn` of a chat that started with `seed`: seed + turn, wrapped into the seed range."""
    return (seed + turn - SEED_MIN) % (SEED_MAX - SEED_MIN + 1) + SEED_MIN


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
        if not 0 <= self.top_k < 2**31:  # the sampler holds it as an int32 (any k >= the vocabulary keeps all)
            raise SamplingError("top_k", f"must be in [0, {2**31 - 1}] (0 turns it off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise SamplingError("top_p", f"must be in (0, 1] (1 turns it off), got {self.top_p}")
        if not 0 < self.repetition_penalty < float("inf"):
            raise SamplingError(
                "repetition_penalty", f"must be > 0 and finite (1 turns it off), got {self.repetition_penalty}"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_penalty(self) -> bool:
        return self.repetition_penalty != 1.0


# The official GLM-4-9B-chat demos sample with temperature 0.8 (0.6 in some) and top_p 0.8.
CHAT_DEFAULTS = SamplingParams(temperature=0.8, top_p=0.8)


def truncate_left(ids: Sequence[int], keep: int, prefix: Sequence[int] = ()) -> list[int]:
    """The last `keep` ids of a prompt (at least one). A leading `prefix` (`[gMASK]<sop>`) is kept in front and
    counts towards `keep`."""
    ids = list(ids)
    if len(ids) <= keep:
        return ids
    prefix = list(prefix)
    if prefix and ids[: len(prefix)] == prefix and keep > len(prefix):
        return prefix + ids[len(ids) - (keep - len(prefix)) :]
    return ids[len(ids) - max(1, keep) :]
