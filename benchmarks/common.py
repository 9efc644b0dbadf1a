"""Helpers shared by the benchmark scripts: Spec-Bench rows, prompt rendering, JSON output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SPEC_BENCH = ROOT / "data" / "spec_bench" / "dev.jsonl"


def spec_bench(limit: int | None = None, categories: list[str] | None = None, path: Path = SPEC_BENCH) -> list[dict]:
    """Rows of the Spec-Bench dev split, at most ``limit`` per category, in file order."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    counts: dict[str, int] = {}
    picked = []
    for row in rows:
        category = row["category"]
        if categories and category not in categories:
            continue
        if limit is not None and counts.get(category, 0) >= limit:
            continue
        counts[category] = counts.get(category, 0) + 1
        picked.append(row)
    return picked


def prompt_ids(tokenizer, row: dict) -> np.ndarray:
    """The first turn of a row, in the model's chat template, as int32 token ids."""
    from retrieval_spec.models import chat_prompt

    text = chat_prompt(tokenizer, row["turns"][0])
    return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int32)


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
