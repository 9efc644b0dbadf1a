"""The embedded demo: a code edit of a bundled function, decoded by transformers' plain ``generate()`` and by
``auto`` (every drafting source fused into one tree), in one process."""

from __future__ import annotations

import time
from importlib import resources

import numpy as np
import torch

from .config import GenerationConfig
from .costs import synchronize
from .drafters.registry import make_drafters
from .generate import SpeculativeGenerator, encode
from .models import chat_prompt, load_model

FILE = "data/locale_group.py"  # a function of CPython's Lib/locale.py (data/SOURCES.md)
EDIT = "Rename the parameter `s` of `_group` to `text`, everywhere in the function."


def run_demo(model_name: str = "smollm2-135m", max_new_tokens: int = GenerationConfig.max_new_tokens) -> dict:
    """Ask for the bundled function back with a parameter renamed: copy-heavy work. Decode it with plain greedy
    ``model.generate()`` and with ``auto``; report both, their ratio, whether the tokens are identical, and the
    drafted tokens each source got accepted (``auto``'s stats: ``accepted_by_source``)."""
    model, tokenizer = load_model(model_name)
    code = resources.files("retrieval_spec").joinpath(FILE).read_text(encoding="utf-8")
    ids = encode(tokenizer, chat_prompt(
        tokenizer, f"{EDIT}\n\n```python\n{code}```\n\nReply with the whole function after the edit."))
    speculative = SpeculativeGenerator(model, tokenizer, make_drafters("auto", model.config.vocab_size))
    warm_up = encode(tokenizer, chat_prompt(tokenizer, "Say hello."))  # not the edit: its tokens join the history
    plain_generate(model, warm_up, 8)
    speculative.generate(warm_up, GenerationConfig(max_new_tokens=8))
    plain_tokens, plain_seconds = plain_generate(model, ids, max_new_tokens)
    result = speculative.generate(ids, GenerationConfig(max_new_tokens=max_new_tokens))
    return {
        "model": model_name,
        "edit": EDIT,
        "text": result.text,
        "identical": bool(np.array_equal(plain_tokens, result.tokens)),
        "speedup": plain_seconds / (result.stats.total_ms / 1e3),
        "plain": {"new_tokens": len(plain_tokens), "tokens_per_second": round(len(plain_tokens) / plain_seconds, 3)},
        "auto": result.stats.to_dict(),
    }


def plain_generate(model, ids: np.ndarray, max_new_tokens: int, **kwargs) -> tuple[np.ndarray, float]:
    """(n,) new token ids of transformers' ``generate()`` (greedy unless ``kwargs`` say otherwise: they are
    ``generate()``'s) and its wall seconds, CUDA synchronised. The benchmarks' baseline too."""
    tensor = torch.as_tensor(ids[None], dtype=torch.long, device=model.device)
    kwargs.setdefault("do_sample", False)
    synchronize(model.device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(tensor, attention_mask=torch.ones_like(tensor), max_new_tokens=max_new_tokens, **kwargs)
    synchronize(model.device)
    return out[0, len(ids):].cpu().numpy(), time.perf_counter() - start
