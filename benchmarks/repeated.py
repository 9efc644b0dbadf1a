"""Repeated traffic: requests that recur, decoded in two passes with what the drafters learned saved between them.

    python benchmarks/repeated.py                                     # the held-out groups, ar,pld,auto
    python benchmarks/repeated.py --model qwen2.5-0.5b
    python benchmarks/repeated.py --state-dir results/repeated_state  # keep the state to look at
    python benchmarks/repeated.py --limit 1 --max-new-tokens 16       # a smoke run: one group per set

The traffic (``data/repeated/traffic.jsonl``, ``SOURCES.md``), three sets taking turns within a pass:
``questions`` asked again word for word in pass 2, ``extraction`` (one JSON-schema template over other documents
in pass 2) and ``agent`` (a three-step tool loop whose plans and tool results repeat; pass 2 runs it for another
function). Pass 1 runs every request; then each method of ours saves its drafters' state (recycling table,
lookahead pool, output history: what ``--state-dir`` keeps) into ``STATE/<method>`` and starts pass 2 as a new
process would: fresh drafters loaded from there. The table reports pass 2 (the categories without a prefix) and
pass 1 (``first pass, ...``).

Per request, plain ``generate()``, transformers' prompt lookup and our methods run in rotating order in one
process (``harness.py``); in float32 every output of ours must equal plain greedy or the script exits non-zero.
Writes JSON (``--out``, default ``results/repeated_<model>.json``), a markdown table and a PNG chart beside it.
"""

from __future__ import annotations

import argparse
import tempfile
from collections import defaultdict
from pathlib import Path

from common import DATA, read_jsonl
from harness import (
    Case, Harness, chat_ids, default_out, harness_arguments, run_cases, select, summarize, workload_arguments,
)
from retrieval_spec.datastore.manifest import tokenizer_fingerprint
from retrieval_spec.drafters.registry import load_state, make_drafters, save_state

TRAFFIC = DATA / "repeated" / "traffic.jsonl"


def groups(rows: list[dict], args) -> list[dict]:
    """Every request of the groups ``--split``, ``--categories`` (sets) and ``--limit`` (groups per set) keep."""
    firsts = {}
    for row in rows:
        firsts.setdefault(row["group"], row)
    kept = {row["group"] for row in select(firsts.values(), args, category=lambda row: row["set"])}
    return [row for row in rows if row["group"] in kept]


def restart_from_state(bench: Harness, directory: Path) -> list[str]:
    """Save each method's drafter state into ``directory/<method>``, then give the method a new generator whose
    fresh drafters load it, as the next process of a ``--state-dir`` run does. Returns the files loaded."""
    sha256 = tokenizer_fingerprint(bench.tokenizer).sha256
    vocab = bench.model.config.vocab_size
    loaded = []
    for method in bench.ours:
        folder = directory / method
        folder.mkdir(parents=True, exist_ok=True)
        save_state(bench.drafters[method], folder, sha256)
        drafters = make_drafters(method.split("@")[0], vocab, bench.datastore)
        loaded += [f"{method}/{name}" for name in load_state(drafters, folder, sha256, vocab)]
        bench.generators[method] = bench.new_generator(method, drafters)
    return loaded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness_arguments(parser)
    workload_arguments(parser, "groups")
    parser.add_argument("--state-dir", type=Path,
                        help="where each method's drafter state goes between the passes (default: a temporary folder)")
    args = parser.parse_args()
    bench = Harness(args)
    requests = groups(read_jsonl(TRAFFIC), args)
    cases = defaultdict(list)
    for row in requests:
        cases[row["pass"]].append(Case(row["id"], row["set"], chat_ids(bench.tokenizer, row["messages"])))
    run_cases(bench, cases[1], "first pass")
    first = summarize(bench.take_totals(), bench.methods)
    with tempfile.TemporaryDirectory(prefix="repeated-state-") as scratch:
        loaded = restart_from_state(bench, args.state_dir or Path(scratch))
        run_cases(bench, cases[2], "second pass", warm=False)  # a warm-up's tokens would join the history
    report = bench.report(workload="repeated", split=args.split, limit_per_category=args.limit,
                          state_files_loaded=loaded)
    report["categories"] = {**{f"first pass, {name}": row for name, row in first.items()}, **report["categories"]}
    bench.finish(report, default_out(args, "repeated"), f"Repeated traffic, second pass ({args.split})")


if __name__ == "__main__":
    main()
