"""Helpers shared by the benchmark scripts: Spec-Bench rows, prompt rendering, JSON output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SPEC_BENCH = ROOT / "data" / "spec_bench" / "dev.jsonl"


def spec_bench(limit: int | None = None, categories: list[str] | None = None, path: Path = SPEC_BENCH,
               skip: int = 0) -> list[dict]:
    """Rows of the Spec-Bench dev split, at most ``limit`` per category after its first ``skip``, in file order.

    The benchmarks measure the first rows of each category; tuning (``record_plain.py --skip 3``) uses later
    ones, so nothing is tuned on the prompts it is measured on.
    """
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    counts: dict[str, int] = {}
    picked = []
    for row in rows:
        category = row["category"]
        if categories and category not in categories:
            continue
        counts[category] = counts.get(category, 0) + 1
        if counts[category] <= skip or (limit is not None and counts[category] > skip + limit):
            continue
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


def write_chart(path: Path, report: dict, methods: list[str], title: str) -> None:
    """A PNG beside a benchmark's table: speedup over plain and tokens per step, per category and method.

    Needs matplotlib (``pip install matplotlib``, part of the ``bench`` extra); without it the chart is skipped.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed (pip install -e '.[bench]'): no chart at {path}")
        return
    categories = list(report["categories"])
    x = np.arange(len(categories))
    width = 0.8 / len(methods)
    figure, (speed, steps) = plt.subplots(2, 1, figsize=(max(8, len(categories) * 0.9), 7), sharex=True)
    for i, method in enumerate(methods):
        rows = [report["categories"][c][method] for c in categories]
        offset = (i - (len(methods) - 1) / 2) * width
        speed.bar(x + offset, [r["speedup"] for r in rows], width, label=method)
        steps.bar(x + offset, [r.get("mean_accepted", 1.0) for r in rows], width, label=method)
    speed.axhline(1.0, color="black", linewidth=0.8)
    speed.set_ylabel("speedup over plain")
    steps.set_ylabel("tokens per step")
    steps.set_xticks(x, categories, rotation=35, ha="right")
    speed.legend(ncol=len(methods), fontsize="small")
    speed.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
