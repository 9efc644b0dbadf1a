"""What a caller asks of one generation: limits, stop conditions and sampling, with the defaults every face reads.

Pure Python: the CLI, the library and the integrations take their defaults from :class:`GenerationConfig`'s
fields rather than restating them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import InputError

Seed = int | tuple[int, ...]


@dataclass(frozen=True)
class GenerationConfig:
    """What to generate and how large a tree may grow.

    Attributes:
        max_new_tokens: stop after this many new tokens.
        tree_budget: most drafted nodes verified in one step; the cost curve usually picks fewer.
        stop_strings: stop once the output contains one of these (the token completing it is kept). A token is
            checked against the text of the output's last ``len(stop) + 8`` tokens up to it, the same whether a
            step gains one token or many.
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
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise InputError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0 or not 0 < self.top_p <= 1 or not 0 <= self.min_p < 1:
            raise InputError(f"need top_k >= 0, 0 < top_p <= 1 and 0 <= min_p < 1, got {self.top_k}, "
                             f"{self.top_p}, {self.min_p}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise InputError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}")
        if self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.tree_budget < 0:
            raise InputError(f"tree_budget must be >= 0, got {self.tree_budget}")
        if any(not stop for stop in self.stop_strings):
            raise InputError("a stop string must not be empty")
