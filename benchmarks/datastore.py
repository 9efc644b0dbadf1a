"""Datastore benchmark: build throughput, peak memory, size on disk, open time and lookup latency.

Each size is built from synthetic tokens (Zipf-distributed ids over a 49,152-token vocabulary, documents of
200-2,000 tokens) in a fresh child process, so that its peak RSS is its own; lookups are then timed on the
warm index. With ``--tokenizer DIR`` a real tokenizer also indexes Python's standard library sources, to
measure the throughput of a build that tokenizes.

    nice -n 10 python benchmarks/datastore.py --sizes 1e6,1e7 --tokenizer /path/to/tokenizer

Writes JSON to ``--out`` and a markdown table next to it (``.md``) and on stdout.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

VOCAB_SIZE = 49_152
QUERIES = 2_000
TARGETS = {"lookup_p50_us_at_100M": 100, "bytes_per_token_below_2**31": 8.5, "open_ms": 50}


def synthetic_documents(num_tokens: int, seed: int) -> Iterator[np.ndarray]:
    """Documents of Zipf(1.2) token ids totalling about ``num_tokens``."""
    rng = np.random.default_rng(seed)
    made = 0
    while made < num_tokens:
        length = int(min(rng.integers(200, 2_000), num_tokens - made))
        made += length
        yield np.minimum(rng.zipf(1.2, size=length) - 1, VOCAB_SIZE - 1).astype(np.uint16)


def percentiles(seconds: list[float]) -> dict[str, float]:
    micros = np.array(seconds) * 1e6
    return {"p50": round(float(np.percentile(micros, 50)), 1), "p99": round(float(np.percentile(micros, 99)), 1)}


def time_calls(call, arguments: list, warm_up: int = 50) -> dict[str, float]:
    for argument in arguments[:warm_up]:
        call(argument)
    seconds = []
    for argument in arguments:
        started = time.perf_counter()
        call(argument)
        seconds.append(time.perf_counter() - started)
    return percentiles(seconds)


def measure_size(num_tokens: int, workdir: str, shard_tokens: int) -> dict[str, Any]:
    """Build one synthetic index and time it; runs in a child process."""
    from retrieval_spec.builders.build import build_index_from_tokens
    from retrieval_spec.datastore.manifest import TokenizerFingerprint
    from retrieval_spec.datastore.reader import Datastore, describe
    from retrieval_spec.drafters.rest import RestDrafter

    path = Path(workdir) / f"synthetic-{num_tokens}"
    fingerprint = TokenizerFingerprint(name="synthetic-zipf", vocab_size=VOCAB_SIZE, sha256="0" * 64)
    summary = build_index_from_tokens(
        synthetic_documents(num_tokens, seed=0), path, fingerprint, shard_tokens=shard_tokens, force=True,
        progress=False,
    )
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    open_seconds = []
    for _ in range(5):
        started = time.perf_counter()
        datastore = Datastore.open(path, expected_fingerprint=fingerprint)
        open_seconds.append(time.perf_counter() - started)
    info = describe(path)

    rng = np.random.default_rng(1)
    tokens = datastore.shards[0].index.tokens
    windows = []
    while len(windows) < QUERIES:
        start = int(rng.integers(0, len(tokens) - 32))
        window = tokens[start : start + 32].astype(np.int32)
        if not np.any(window == datastore.separator):
            windows.append(window)
    novel = [np.concatenate(list(synthetic_documents(32, seed=1000 + i)))[:32].astype(np.int32) for i in range(QUERIES)]
    drafter = RestDrafter(datastore)

    def propose(context: np.ndarray) -> None:
        drafter.start(context)
        drafter.propose(context, 32)

    # A decoding-like sequence: a novel text revealed 1-3 tokens a step, so the drafter's match bound applies.
    text = np.concatenate(list(synthetic_documents(3 * QUERIES + 64, seed=7))).astype(np.int32)
    ends = 32 + np.cumsum(rng.integers(1, 4, size=QUERIES))
    drafter.start(text[:32])

    return {
        "tokens": summary.tokens,
        "documents": summary.documents,
        "shards": summary.shards,
        "build_seconds": round(summary.seconds, 2),
        "build_tokens_per_s": round(summary.tokens / summary.seconds),
        "peak_rss_mib": round(peak_rss_mib),
        "bytes_on_disk": info["bytes_on_disk"],
        "bytes_per_token": round(info["bytes_per_token"], 3),
        "open_ms": round(float(np.median(open_seconds)) * 1e3, 2),
        "find_4_tokens_us": time_calls(lambda w: datastore.find(w[-4:], 256), windows),
        "longest_match_copy_us": time_calls(lambda w: datastore.longest_match(w, 16), windows),
        "longest_match_novel_us": time_calls(lambda w: datastore.longest_match(w, 16), novel),
        "novel_match_length_mean": round(float(np.mean([datastore.longest_match(w, 16).length for w in novel])), 2),
        "rest_propose_copy_us": time_calls(propose, windows),
        "rest_propose_novel_us": time_calls(propose, novel),
        "rest_propose_decoding_us": time_calls(
            lambda end: drafter.propose(text[:end], 32), ends.tolist(), warm_up=0
        ),
    }


def measure_tokenized_build(tokenizer_path: str, workdir: str, megabytes: float) -> dict[str, Any]:
    """Index Python's standard library with a real tokenizer; runs in a child process."""
    from transformers import AutoTokenizer

    from retrieval_spec.builders.build import build_index

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    files, size = [], 0
    for file in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if size >= megabytes * 2**20:
            break
        files.append(file)
        size += file.stat().st_size
    texts = [file.read_text(encoding="utf-8", errors="replace") for file in files]
    started = time.perf_counter()
    num_tokens = sum(map(len, tokenizer(texts, add_special_tokens=False)["input_ids"]))
    tokenize_seconds = time.perf_counter() - started
    summary = build_index(files, Path(workdir) / "tokenized", tokenizer, force=True, progress=False)
    return {
        "tokenizer": tokenizer.name_or_path,
        "corpus": f"{len(files)} files of the Python standard library, {size / 2**20:.1f} MiB",
        "tokens": summary.tokens,
        "tokenize_only_tokens_per_s": round(num_tokens / tokenize_seconds),
        "build_seconds": round(summary.seconds, 2),
        "build_tokens_per_s": round(summary.tokens / summary.seconds),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def in_child(function, *arguments) -> dict[str, Any]:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, arguments)


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "| tokens | build tok/s | peak RSS MiB | bytes/token | open ms | find p50/p99 µs | longest match copy "
        "p50/p99 µs | longest match novel p50/p99 µs | REST propose novel p50/p99 µs | REST propose decoding "
        "p50/p99 µs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["sizes"]:
        pair = lambda key: f"{row[key]['p50']:.0f} / {row[key]['p99']:.0f}"  # noqa: E731
        lines.append(
            f"| {row['tokens']:,} | {row['build_tokens_per_s']:,} | {row['peak_rss_mib']:,} | {row['bytes_per_token']} "
            f"| {row['open_ms']} | {pair('find_4_tokens_us')} | {pair('longest_match_copy_us')} "
            f"| {pair('longest_match_novel_us')} | {pair('rest_propose_novel_us')} "
            f"| {pair('rest_propose_decoding_us')} |"
        )
    tokenized = results.get("tokenized_build")
    if tokenized:
        lines.append(
            f"\nWith tokenization ({tokenized['tokenizer']}, {tokenized['corpus']}): {tokenized['tokens']:,} tokens, "
            f"build {tokenized['build_tokens_per_s']:,} tok/s, "
            f"tokenizer alone {tokenized['tokenize_only_tokens_per_s']:,} tok/s."
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/datastore.json"))
    parser.add_argument("--sizes", default="1e6,1e7,1e8", help="comma-separated token counts")
    parser.add_argument("--tokenizer", help="a tokenizer directory; without it the tokenizing build is skipped")
    parser.add_argument("--tokenize-mib", type=float, default=8.0, help="MiB of stdlib sources to tokenize")
    parser.add_argument("--shard-tokens", type=int, default=None, help="default: the builder's")
    parser.add_argument("--workdir", help="where indexes are built (default: a temporary directory)")
    args = parser.parse_args()

    from retrieval_spec.builders.build import DEFAULT_SHARD_TOKENS

    shard_tokens = args.shard_tokens or DEFAULT_SHARD_TOKENS
    results: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "synthetic": {"vocab_size": VOCAB_SIZE, "distribution": "zipf(1.2)", "document_tokens": "200-2000"},
        "targets": TARGETS,
        "sizes": [],
    }
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        for size in (int(float(text)) for text in args.sizes.split(",")):
            results["sizes"].append(in_child(measure_size, size, workdir, shard_tokens))
            print(json.dumps(results["sizes"][-1]), flush=True)
        if args.tokenizer:
            results["tokenized_build"] = in_child(measure_tokenized_build, args.tokenizer, workdir, args.tokenize_mib)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    table = markdown(results)
    args.out.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
