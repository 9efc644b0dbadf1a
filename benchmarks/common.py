"""Helpers shared by the benchmark scripts: Spec-Bench rows, the workloads' data and splits, prompt rendering,
JSON output, charts. Torch-free (the model-free replay imports it); the model runner is ``harness.py``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from retrieval_spec.sizing import CostCurve

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
SPEC_BENCH = DATA / "spec_bench" / "dev.jsonl"
SPLITS = ("tune", "measure")
TUNE_ONE_IN = 4  # a quarter of each workload is for tuning, the rest is held out and measured


def split_of(key: str) -> str:
    """``tune`` for about one key in :data:`TUNE_ONE_IN` (by its sha256), ``measure`` for the rest.

    A key's split depends on the key alone: it never moves when items are added or reordered, and items that
    share a key (one group of repeated traffic) share a split.

    >>> [split_of(f"item:{i}") for i in range(6)].count("tune") <= 6
    True
    """
    return "tune" if int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % TUNE_ONE_IN == 0 else "measure"


def read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of a UTF-8 JSONL file, blank lines skipped."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def take(rows: Iterable[dict], split: str, limit: int | None = None,
         category: Callable[[dict], str] = lambda row: row["category"]) -> list[dict]:
    """The rows of ``split`` (their ``split`` field), at most ``limit`` per category, in order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    counts: dict[str, int] = {}
    picked = []
    for row in rows:
        if row["split"] != split:
            continue
        counts[category(row)] = counts.get(category(row), 0) + 1
        if limit is None or counts[category(row)] <= limit:
            picked.append(row)
    return picked


def spec_bench(limit: int | None = None, categories: list[str] | None = None, path: Path = SPEC_BENCH,
               skip: int = 0) -> list[dict]:
    """Rows of the Spec-Bench dev split, at most ``limit`` per category after its first ``skip``, in file order.

    The benchmarks measure the first rows of each category; tuning (``record_plain.py --skip 3``) uses later
    ones, so nothing is tuned on the prompts it is measured on.
    """
    rows = read_jsonl(path)
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
    from retrieval_spec.generate import encode
    from retrieval_spec.models import chat_prompt

    return encode(tokenizer, chat_prompt(tokenizer, row["turns"][0]))


def read_curve(spec: str) -> CostCurve:
    """A cost curve named on the command line: ``flat`` (64 nodes cost one step) or a JSON file ``{sizes, ms}``."""
    if spec == "flat":
        return CostCurve.flat(64)
    data = json.loads(Path(spec).read_text())
    return CostCurve(sizes=np.array(data["sizes"]), ms=np.array(data["ms"], dtype=np.float64))


def eos_ids(model) -> set[int]:
    """The token ids that end a model's output (its generation config's ``eos_token_id``: one, several or none)."""
    eos = model.generation_config.eos_token_id
    return {eos} if isinstance(eos, int) else set(eos or ())


def until_eos(row: list[int], eos: set[int]) -> list[int]:
    """``row`` up to and with its first token in ``eos`` (what a row of a padded batch really generated)."""
    stop = next((i for i, t in enumerate(row) if t in eos), None)
    return row if stop is None else row[: stop + 1]


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """One JSON object per line (UTF-8), the folders made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


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
