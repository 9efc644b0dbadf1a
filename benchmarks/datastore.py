"""Datastore benchmark: build throughput, peak memory, size on disk, open time and lookup latency.

Each size is built from synthetic tokens (Zipf-distributed ids over a 49,152-token vocabulary, documents of
200-2,000 tokens) in a fresh child process, so that its peak RSS is its own; lookups are then timed on the
warm index. With ``--tokenizer DIR`` a real tokenizer also indexes Python's standard library sources, to
measure the throughput of a build that tokenizes.

Two sections for corpora past one machine:

- ``--workers 1,2`` (``--ray`` adds Ray tasks on a local Ray of that many CPUs): the same corpus
  (``--build-size`` synthetic tokens in 8 shards, and with ``--tokenizer`` the stdlib sources cut into 16
  slices) built by each backend and number of workers in a fresh child, with build tokens/s; every build
  must give the same shard files (sha256), else the script fails.
- ``--shards 1,8,64``: one corpus of ``--shards-size`` tokens split into that many shards; longest-match
  latency of the reader against the baseline that asks every shard at every length of its binary search
  (the reader before issue 16), interleaved query by query, on random corpus windows (copy), novel text,
  and decoding sequences (1-3 tokens a step, the drafter's bounds) of novel text and of corpus text with one
  token in 20 changed; REST propose latency; the n-gram merge the reader does once.

    nice -n 10 python benchmarks/datastore.py --sizes 1e6,1e7 --tokenizer /path/to/tokenizer
    python benchmarks/datastore.py --sizes '' --workers 1,2 --ray --build-size 1e7 --shards 1,8,64

Writes JSON to ``--out`` and a markdown table next to it (``.md``) and on stdout.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import pickle
import platform
import resource
import sysconfig
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
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
        drafter.start(0, context)
        drafter.propose(0, context, 32)

    # A decoding-like sequence: a novel text revealed 1-3 tokens a step, so the drafter's match bound applies.
    text = np.concatenate(list(synthetic_documents(3 * QUERIES + 64, seed=7))).astype(np.int32)
    ends = 32 + np.cumsum(rng.integers(1, 4, size=QUERIES))
    drafter.start(0, text[:32])

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
            lambda end: drafter.propose(0, text[:end], 32), ends.tolist(), warm_up=0
        ),
    }


def measure_tokenized_build(tokenizer_path: str, workdir: str, megabytes: float) -> dict[str, Any]:
    """Index Python's standard library with a real tokenizer; runs in a child process."""
    from transformers import AutoTokenizer

    from retrieval_spec.builders.build import build_index

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    files, size = stdlib_files(megabytes)
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
    # Not a multiprocessing.Pool: its daemonic worker could not start the build's own workers.
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *arguments).result()


def stdlib_files(megabytes: float) -> tuple[list[Path], int]:
    """The first ``megabytes`` of Python's standard library sources, in name order, and their size."""
    files, size = [], 0
    for file in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if size >= megabytes * 2**20:
            break
        files.append(file)
        size += file.stat().st_size
    return files, size


def shard_hashes(index: Path) -> list[str]:
    manifest = json.loads((index / "manifest.json").read_text())
    return [json.dumps(entry["files"], sort_keys=True) for entry in manifest["shards"]]


def measure_parallel_build(
    kind: str, workers: int, backend: str, workdir: str, build_size: int, tokenizer_path: str | None, megabytes: float
) -> dict[str, Any]:
    """One build by ``backend`` (local or ray) with ``workers``; runs in a child process.

    ``kind`` is ``ids`` (synthetic token ids, 8 shards: the map without tokenization) or ``text`` (the stdlib
    sources in 16 slices and about 5 shards, tokenized by the workers). A Ray build starts Ray first, outside
    the time measured.
    """
    from retrieval_spec.builders.build import build_index, build_index_from_tokens
    from retrieval_spec.datastore.manifest import TokenizerFingerprint

    ray_address = None
    if backend == "ray":
        import ray

        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        ray_address = "local"
    path = Path(workdir) / f"build-{kind}-{backend}-{workers}"
    if kind == "ids":
        fingerprint = TokenizerFingerprint(name="synthetic-zipf", vocab_size=VOCAB_SIZE, sha256="0" * 64)
        summary = build_index_from_tokens(
            synthetic_documents(build_size, seed=0), path, fingerprint, shard_tokens=-(-build_size // 8), force=True,
            progress=False, workers=workers, ray_address=ray_address,
        )
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        files, size = stdlib_files(megabytes)
        summary = build_index(
            files, path, tokenizer, shard_tokens=1 << 19, slice_bytes=-(-size // 16), force=True, progress=False,
            workers=workers, ray_address=ray_address,
        )
    if backend == "ray":
        ray.shutdown()
    result = {
        "kind": kind,
        "backend": summary.backend,
        "workers": workers,
        "tokens": summary.tokens,
        "shards": summary.shards,
        "build_seconds": round(summary.seconds, 2),
        "build_tokens_per_s": round(summary.tokens / summary.seconds),
        "driver_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "shard_files": shard_hashes(path),
    }
    if backend == "local" and workers > 1:
        result["worker_peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
    return result


def measure_tokenizer_shipping(tokenizer_path: str) -> dict[str, Any]:
    """What every worker pays to receive the tokenizer: its pickle, unpickled in a fresh process and again."""
    from transformers import AutoTokenizer

    blob = pickle.dumps(AutoTokenizer.from_pretrained(tokenizer_path))
    return {"pickle_mib": round(len(blob) / 2**20, 2), **in_child(_unpickle_twice, blob)}


def _unpickle_twice(blob: bytes) -> dict[str, float]:
    started = time.perf_counter()
    pickle.loads(blob)
    first = time.perf_counter() - started
    started = time.perf_counter()
    pickle.loads(blob)
    return {"first_unpickle_s": round(first, 3), "next_unpickle_s": round(time.perf_counter() - started, 3)}


def longest_match_every_shard(datastore, context: np.ndarray, max_len: int, min_len: int = 1):
    """Baseline: the reader before issue 16, which asked every shard at every length of its binary search."""
    from retrieval_spec.datastore.reader import Match

    tail = np.asarray(context)[max(len(context) - max_len, 0) :]
    encoded, width = tail.astype(datastore.token_dtype).tobytes(), datastore.token_dtype.itemsize

    def lower_bounds(length: int) -> list[int] | None:
        pattern = encoded[len(encoded) - length * width :]
        ranks = [shard.index.lower_bound(pattern) for shard in datastore.shards]
        hit = any(shard.index.starts_with(rank, pattern) for shard, rank in zip(datastore.shards, ranks))
        return ranks if hit else None

    longest = len(tail)
    ranks = lower_bounds(longest)
    if ranks is None:
        shortest, longest = min_len - 1, longest - 1
        while shortest < longest:
            middle = (shortest + longest + 1) // 2
            found = lower_bounds(middle)
            if found is None:
                longest = middle - 1
            else:
                shortest, ranks = middle, found
        if shortest < min_len:
            return Match(length=0, count=0, intervals=())
    pattern = encoded[len(encoded) - longest * width :]
    intervals = tuple(
        (rank, shard.index.upper_bound(pattern, rank) if shard.index.starts_with(rank, pattern) else rank)
        for shard, rank in zip(datastore.shards, ranks)
    )
    return Match(length=longest, count=sum(hi - lo for lo, hi in intervals), intervals=intervals)


def measure_shards(num_shards: int, num_tokens: int, workdir: str) -> dict[str, Any]:
    """Lookups over one corpus split into ``num_shards`` shards; runs in a child process."""
    from retrieval_spec.builders.build import build_index_from_tokens
    from retrieval_spec.datastore.manifest import TokenizerFingerprint
    from retrieval_spec.datastore.reader import Datastore
    from retrieval_spec.drafters.rest import RestDrafter

    path = Path(workdir) / f"shards-{num_shards}"
    fingerprint = TokenizerFingerprint(name="synthetic-zipf", vocab_size=VOCAB_SIZE, sha256="0" * 64)
    summary = build_index_from_tokens(
        synthetic_documents(num_tokens, seed=0), path, fingerprint, shard_tokens=-(-num_tokens // num_shards),
        force=True, progress=False, workers=None,
    )
    datastore = Datastore.open(path)
    rng = np.random.default_rng(1)
    text = np.concatenate(list(synthetic_documents(num_tokens, seed=0))).astype(np.int32)
    windows = [text[start : start + 32] for start in rng.integers(0, len(text) - 32, size=QUERIES).tolist()]
    novel = [np.concatenate(list(synthetic_documents(32, seed=1000 + i)))[:32].astype(np.int32) for i in range(QUERIES)]
    decoding = np.concatenate(list(synthetic_documents(3 * QUERIES + 64, seed=7))).astype(np.int32)
    ends = (32 + np.cumsum(rng.integers(1, 4, size=QUERIES))).tolist()
    # Decoding that copies the corpus: a stretch of it with one token in 20 changed, as REST is meant for.
    start = int(rng.integers(0, len(text) - len(decoding)))
    copying = text[start : start + len(decoding)].copy()
    edits = rng.random(len(copying)) < 0.05
    copying[edits] = rng.integers(0, VOCAB_SIZE, size=int(edits.sum()))

    def interleaved(contexts: list[np.ndarray], bounds: list[int]) -> dict[str, dict[str, float]]:
        """Reader and baseline on each query in turn (order alternating), equal answers checked."""
        seconds: dict[str, list[float]] = {"reader": [], "every_shard": []}
        calls = [("reader", datastore.longest_match), ("every_shard", lambda *a: longest_match_every_shard(datastore, *a))]
        for number, (context, bound) in enumerate(zip(contexts, bounds)):
            answers = []
            for name, call in calls[:: 1 if number % 2 else -1]:
                started = time.perf_counter()
                match = call(context, bound)
                seconds[name].append(time.perf_counter() - started)
                answers.append((match.length, match.count))
            assert answers[0] == answers[1], f"{num_shards} shards: the reader and the baseline disagree"
        return {name: percentiles(values) for name, values in seconds.items()}

    def drafter_bounds(sequence: np.ndarray) -> list[int]:
        """The bounds the REST drafter derives: the previous match plus the tokens since."""
        bounds, previous = [], None
        for end in ends:
            bounds.append(16 if previous is None else min(16, previous[1] + end - previous[0]))
            previous = (end, datastore.longest_match(sequence[:end], bounds[-1]).length)
        return bounds

    drafter = RestDrafter(datastore)

    def propose(context: np.ndarray) -> None:
        drafter.start(0, context)
        drafter.propose(0, context, 32)

    rest = {}
    for name, sequence in (("decoding", decoding), ("copying", copying)):
        drafter.start(0, sequence[:32])
        rest[name] = time_calls(lambda end: drafter.propose(0, sequence[:end], 32), ends, warm_up=0)
    started = time.perf_counter()
    datastore.top_next_tokens(8)
    merge_ms = (time.perf_counter() - started) * 1e3
    return {
        "shards": summary.shards,
        "tokens": summary.tokens,
        "longest_match_copy_us": interleaved(windows, [16] * QUERIES),
        "longest_match_novel_us": interleaved(novel, [16] * QUERIES),
        "longest_match_decoding_us": interleaved([decoding[:end] for end in ends], drafter_bounds(decoding)),
        "longest_match_copying_us": interleaved([copying[:end] for end in ends], drafter_bounds(copying)),
        "rest_propose_novel_us": time_calls(propose, novel),
        "rest_propose_decoding_us": rest["decoding"],
        "rest_propose_copying_us": rest["copying"],
        "ngram_merge_top_next_ms": round(merge_ms, 1),
    }


def markdown(results: dict[str, Any]) -> str:
    lines = [] if not results["sizes"] else [
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
    builds = results.get("parallel_builds")
    if builds:
        lines += [
            "\n| corpus | backend | workers | tokens | shards | seconds | build tok/s | vs 1 worker |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in builds:
            one = next(r for r in builds if r["kind"] == row["kind"] and r["workers"] == 1)
            lines.append(
                f"| {row['kind']} | {row['backend']} | {row['workers']} | {row['tokens']:,} | {row['shards']} "
                f"| {row['build_seconds']} | {row['build_tokens_per_s']:,} "
                f"| {row['build_tokens_per_s'] / one['build_tokens_per_s']:.2f}x |"
            )
        lines.append("\nEvery build gave the same shard files (sha256).")
    shipping = results.get("tokenizer_shipping")
    if shipping:
        lines.append(
            f"Tokenizer sent to each worker: {shipping['pickle_mib']} MiB pickled, unpickled in "
            f"{shipping['first_unpickle_s']} s in a fresh process (imports included), {shipping['next_unpickle_s']} s after."
        )
    shards = results.get("shards")
    if shards:
        lines += [
            "\n| shards | longest match p50/p99 µs (every shard): copy | novel | decoding | decoding, copying "
            "| REST propose p50/p99 µs: novel | decoding | decoding, copying | n-gram merge ms |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in shards:
            both = lambda key: (  # noqa: E731
                f"{row[key]['reader']['p50']:.0f} / {row[key]['reader']['p99']:.0f} "
                f"({row[key]['every_shard']['p50']:.0f} / {row[key]['every_shard']['p99']:.0f})"
            )
            pair = lambda key: f"{row[key]['p50']:.0f} / {row[key]['p99']:.0f}"  # noqa: E731
            lines.append(
                f"| {row['shards']} | {both('longest_match_copy_us')} | {both('longest_match_novel_us')} "
                f"| {both('longest_match_decoding_us')} | {both('longest_match_copying_us')} "
                f"| {pair('rest_propose_novel_us')} | {pair('rest_propose_decoding_us')} "
                f"| {pair('rest_propose_copying_us')} | {row['ngram_merge_top_next_ms']} |"
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
    parser.add_argument("--workers", default="", help="comma-separated worker counts for the parallel builds")
    parser.add_argument("--ray", action="store_true", help="also build with Ray tasks (pip install ray)")
    parser.add_argument("--build-size", type=float, default=1e7, help="synthetic tokens of the parallel builds")
    parser.add_argument("--shards", default="", help="comma-separated shard counts for the lookup fan-out")
    parser.add_argument("--shards-size", type=float, default=1e7, help="tokens split into --shards shards")
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
        for size in (int(float(text)) for text in args.sizes.split(",") if text):
            results["sizes"].append(in_child(measure_size, size, workdir, shard_tokens))
            print(json.dumps(results["sizes"][-1]), flush=True)
        if args.tokenizer and args.sizes:
            results["tokenized_build"] = in_child(measure_tokenized_build, args.tokenizer, workdir, args.tokenize_mib)
        if args.workers:
            results["parallel_builds"] = []
            kinds = ["ids"] + (["text"] if args.tokenizer else [])
            backends = ["local"] + (["ray"] if args.ray else [])
            for kind in kinds:
                for backend in backends:
                    for workers in (int(text) for text in args.workers.split(",")):
                        row = in_child(measure_parallel_build, kind, workers, backend, workdir, int(args.build_size),
                                       args.tokenizer, args.tokenize_mib)
                        print(json.dumps({k: v for k, v in row.items() if k != "shard_files"}), flush=True)
                        results["parallel_builds"].append(row)
                files = [row.pop("shard_files") for row in results["parallel_builds"] if row["kind"] == kind]
                if any(other != files[0] for other in files):
                    raise SystemExit(f"{kind}: builds with different workers or backends gave different shard files")
            if args.tokenizer:
                results["tokenizer_shipping"] = measure_tokenizer_shipping(args.tokenizer)
        if args.shards:
            results["shards"] = []
            for num_shards in (int(text) for text in args.shards.split(",")):
                results["shards"].append(in_child(measure_shards, num_shards, int(args.shards_size), workdir))
                print(json.dumps(results["shards"][-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    table = markdown(results)
    args.out.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
