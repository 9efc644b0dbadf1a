"""What a caller asks of one generation: limits, stop conditions and sampling, with the defaults every face reads.

No torch: the CLI, the library and the integrations take their defaults from :class:`GenerationConfig`'s
fields rather than restating them. Every field is checked, type and range, when a config is made, so a
mistake is an ``InputError`` naming the field rather than a TypeError deep in the loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import InputError

Seed = int | tuple[int, ...]


@dataclass(frozen=True)
class GenerationConfig:
    """What to generate and how large a tree may grow.

    Attributes:
        max_new_tokens: stop after this many new tokens.
        tree_budget: most drafted nodes verified in one step; the cost curve usually picks fewer.
        stop_strings: stop once the output contains one of these (the token completing it is kept); a single
            string is one stop string. A token is checked against the text of the output's last
            ``len(stop) + 8`` tokens up to it, the same whether a step gains one token or many.
        temperature: 0 decodes greedily; above 0 samples (losslessly) from the processed distribution.
        top_k: keep the k most likely tokens before sampling (0: all), as ``generate(top_k=...)``.
        top_p: keep the smallest set of tokens with this much probability (1.0: all), as ``generate(top_p=...)``.
        min_p: drop tokens less likely than ``min_p`` times the most likely one (0: none), as ``generate``.
        repetition_penalty: transformers' repetition penalty (1.0: none); each tree node counts its own prefix.
        seed: the sampler's seed (an int or a tuple of ints); None draws fresh entropy, reported in the stats.
            The same seed, prompt and model give the same output, whatever the drafters (up to floating point).
        eos_token_ids: tokens that end a row; None takes the model's ``generation_config.eos_token_id``.
    """

    max_new_tokens: int = 128
    tree_budget: int = 64  # upper bound only: best_size() picks the verified size from the cost curve
    stop_strings: tuple[str, ...] = ()
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: Seed | None = None
    eos_token_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        """Check every field's type and range, naming the field (``InputError``), and store it in its one form:
        ints as ``int``, numbers as ``float``, a single stop string (a ``str``) as one stop string, sequences of
        stop strings, seeds and end tokens as tuples."""
        def store(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        store("max_new_tokens", as_integer("max_new_tokens", self.max_new_tokens, low=1))
        store("tree_budget", as_integer("tree_budget", self.tree_budget, low=0))
        store("top_k", as_integer("top_k", self.top_k, low=0))
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            store(name, as_number(name, getattr(self, name)))
        if self.temperature < 0:
            raise InputError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1 or not 0 <= self.min_p < 1:
            raise InputError(f"need 0 < top_p <= 1 and 0 <= min_p < 1, got top_p={self.top_p}, min_p={self.min_p}")
        if self.repetition_penalty <= 0:
            raise InputError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}")
        stops = self.stop_strings
        stops = (stops,) if isinstance(stops, str) else as_tuple("stop_strings", stops)
        for stop in stops:
            if not isinstance(stop, str):
                raise InputError(f"stop_strings holds {stop!r}, expected strings")
            if not stop:
                raise InputError("a stop string must not be empty")
        store("stop_strings", stops)
        if self.seed is not None:
            store("seed", as_integer("seed", self.seed, low=0) if not isinstance(self.seed, (tuple, list))
                  else tuple(as_integer("seed", part, low=0) for part in self.seed))
        if self.eos_token_ids is not None:
            ids = self.eos_token_ids
            ids = (ids,) if is_integer(ids) else as_tuple("eos_token_ids", ids)
            store("eos_token_ids", tuple(as_integer("eos_token_ids", token, low=0) for token in ids))


# Checks of what a caller passes, each naming the field at fault; vLLM's settings use them too.


def is_integer(value: object) -> bool:
    """An int or a numpy integer, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def as_integer(name: str, value: object, low: int) -> int:
    """``value`` as an int of at least ``low``, or InputError naming ``name`` (bools, floats and strings refused)."""
    if not is_integer(value):
        raise InputError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if value < low:
        raise InputError(f"{name} must be at least {low}, got {value}")
    return int(value)


def as_number(name: str, value: object) -> float:
    """``value`` as a finite float, or InputError naming ``name`` (bools and strings refused)."""
    if not isinstance(value, (int, float, np.integer, np.floating)) or isinstance(value, (bool, np.bool_)):
        raise InputError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, got {value}")
    return float(value)


def as_tuple(name: str, value: object) -> tuple:
    """A list or tuple as a tuple (None: empty), or InputError naming ``name``."""
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise InputError(f"{name} must be a list or tuple, got {value!r} ({type(value).__name__})")
    return tuple(value)
