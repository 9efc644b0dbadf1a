"""The interleaved runner every model benchmark shares: plain ``generate()``, transformers' prompt lookup and our
methods on one model, case by case, in one process.

Per case every method runs once, in rotating order (interleaved, so drift in machine speed hits all alike).
Baselines: ``plain`` is ``model.generate(do_sample=False)``; ``hf_pld`` is the same with
``prompt_lookup_num_tokens=10``. In float32 our methods must reproduce ``plain`` token for token; a mismatch is
recorded and makes the script exit non-zero (:meth:`Harness.finish`). In bfloat16/float16 tree and plain forwards
round differently, so the report counts how often each method's output equals plain decoding's in the same dtype
(``agreement``) and how many leading tokens agree. Each script writes JSON, a markdown table (speedup over plain
and over ``ar``, our loop drafting nothing; tokens per step; draft and verify ms per step) and a PNG chart.

Imports torch (the model); :mod:`common` stays torch-free for the model-free replay.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from common import ROOT, SPLITS, read_curve, take, write_chart, write_json
from record_plain import plain_recording
from retrieval_spec.chat import render_messages
from retrieval_spec.config import GenerationConfig
from retrieval_spec.costs import CostProbe, cached_cost_curve, measure_cost_curve, store_cost_curve
from retrieval_spec.datastore.manifest import tokenizer_fingerprint
from retrieval_spec.demo import plain_generate as hf_generate
from retrieval_spec.datastore.reader import Datastore
from retrieval_spec.drafters.base import Drafter
from retrieval_spec.drafters.registry import make_drafters
from retrieval_spec.generate import SpeculativeGenerator, encode
from retrieval_spec.linear_forms import cpu_name
from retrieval_spec.models import load_model
from retrieval_spec.sizing import CostCurve


@dataclass(frozen=True)
class Case:
    """One prompt every method decodes.

    Attributes:
        id: names the case in mismatches.
        category: the row of the table it counts in (and ``overall``).
        ids: (p,) int32 prompt token ids, chat template included.
        references: documents our methods may copy from besides the prompt (retrieved passages, the page to
            summarise); they change no output, so the baselines decode the prompt alone.
    """

    id: str
    category: str
    ids: np.ndarray
    references: tuple[str, ...] = ()


WARM_UP_PROMPT = "Name three colours."  # in no benchmark's data


def chat_ids(tokenizer, messages: str | Sequence[dict]) -> np.ndarray:
    """(p,) int32 ids of one user message (a string) or a chat (``{"role", "content"}`` dicts) in the template."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    return encode(tokenizer, render_messages(tokenizer, messages))


def harness_arguments(parser: argparse.ArgumentParser, methods: str = "ar,pld,auto") -> None:
    """The options every interleaved benchmark takes: model, methods, limits, device, cost curve, output."""
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", default=methods,
                        help="comma-separated methods of ours (retrieval_spec.drafters.registry.METHODS; `ar` is our "
                             "loop drafting nothing); NAME@2 runs a second, independent instance of NAME: how far two "
                             "identical methods differ per category is the noise floor of any per-category comparison")
    parser.add_argument("--max-new-tokens", type=int, default=GenerationConfig.max_new_tokens)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--no-hf-pld", action="store_true", help="skip transformers' prompt lookup baseline")
    parser.add_argument("--index", type=Path, help="corpus datastore for `rest` and `auto` (built by build-index)")
    parser.add_argument("--budget", type=int, default=GenerationConfig.tree_budget,
                        help="most draft nodes per step (GenerationConfig.tree_budget)")
    parser.add_argument("--cost", default="learned",
                        help="learned: the cached or probed curve, then learned from real steps (the default engine); "
                             "flat: verification as cheap at 64 nodes as at 1 (a GPU-like curve), fixed; "
                             "a JSON file {sizes, ms}: that curve, fixed")
    parser.add_argument("--fresh-curve", action="store_true", help="probe the cost curve anew before the run")
    parser.add_argument("--poison-curve", help="start the learned curve from a wrong cached one: flat, spike "
                                               "(one size 10x dearer), slow (everything 1.5x) or a JSON file")
    parser.add_argument("--out", type=Path, help="JSON path (default results/<benchmark>_<model>.json)")
    parser.add_argument("--record", type=Path, metavar="JSONL",
                        help="also append each case's plain greedy output, the target's top 8 at every position and "
                             "the references' ids to JSONL (an extra, untimed decode per case), for the model-free "
                             "replay of benchmarks/simulate.py --records; run it on --split tune")


def linear_forms(verifier) -> dict[int, dict[str, int]]:
    """How many of the model's linear layers run each form (``linear_forms.py``) at 2, 4, 8, 16 and 64 rows a
    forward: where a gain comes from the machine's kernels."""
    return {rows: verifier.forms.forms(rows) for rows in (2, 4, 8, 16, 64)}


def agreeing_prefix(ours: np.ndarray, plain: np.ndarray) -> int:
    """How many leading tokens two outputs share."""
    n = min(len(ours), len(plain))
    differ = np.flatnonzero(ours[:n] != plain[:n])
    return int(differ[0]) if len(differ) else n


def table(report: dict, methods: list[str]) -> str:
    """What the run measured on (device, CPU, threads, the cost curve every learning method started from, how many
    linear layers run each form at a few tree sizes), then per category: prompts, and per method its speedup over
    plain (and over ``ar`` when it ran), tokens per step and draft + verify ms per step."""
    curve = report.get("starting_cost_curve")
    lines = [f"{report['model']} {report['dtype']} on {report['device']} ({report['cpu']}, "
             f"{report['torch_threads']} threads); cost curve at the start (nodes: ms): "
             + (", ".join(f"{k}: {v:.0f}" for k, v in zip(curve["sizes"], curve["ms"])) if curve else report["cost"])
             + ("; linear layers by form at (rows): " + ", ".join(
                 f"({rows}) " + " ".join(f"{form} {n}" for form, n in counts.items() if n)
                 for rows, counts in report["linear_forms"].items()) if report.get("linear_forms") else ""),
             "", "| category | prompts | " + " | ".join(methods) + " |", "|---" * (len(methods) + 2) + "|"]
    for category, row in report["categories"].items():
        cells = []
        for method in methods:
            r = row[method]
            cell = f"{r['speedup']:.2f}x"
            if "speedup_over_ar" in r and method != "ar":
                cell += f" ({r['speedup_over_ar']:.2f}x ar)"
            if "mean_accepted" in r:
                cell += f" · {r['mean_accepted']:.2f} tok/step · {r['draft_ms_per_step']:.1f}+{r['verify_ms_per_step']:.0f} ms"
            cells.append(cell)
        lines.append(f"| {category} | {row['plain']['prompts']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def forced_cost_curve(args) -> CostCurve | None:
    """The fixed curve of ``--cost`` (None: the engine's learned curve)."""
    return None if args.cost == "learned" else read_curve(args.cost)


def starting_cost_curve(verifier, args) -> CostCurve:
    """The cached curve every learning generator starts from: the fresh probe of ``--fresh-curve``, the wrong one
    of ``--poison-curve``, or the one cached. It is stored again before each generator's first call, since each
    stores what it learned: else only the first generator would start from it, and the others from what the
    first learned."""
    probe = CostProbe()
    start = measure_cost_curve(verifier, probe) if args.fresh_curve else cached_cost_curve(verifier, probe)
    if args.poison_curve:
        true = start
        poisons = {
            "flat": CostCurve(sizes=true.sizes, ms=np.full(len(true.sizes), true.ms[0])),
            "spike": CostCurve(sizes=true.sizes, ms=np.where(true.sizes == 8, 10 * true.ms, true.ms)),
            "slow": CostCurve(sizes=true.sizes, ms=1.5 * true.ms),
        }
        start = poisons[args.poison_curve] if args.poison_curve in poisons else read_curve(args.poison_curve)
    return start


class Harness:
    """Plain ``generate()``, transformers' prompt lookup and our methods on one model, case by case.

    Every method of ours has its own generator (and drafters: ``drafters[method]``), so what one learns never
    helps another; each starts from the same cached cost curve (:func:`starting_cost_curve`).

    Args:
        args: the options of :func:`harness_arguments`.
        temperature: > 0 samples (top_k=0, top_p=1) in every method; outputs are then not compared.
    """

    def __init__(self, args, temperature: float = 0.0) -> None:
        torch.set_num_threads(args.threads)
        self.args = args
        self.model, self.tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
        self.exact = args.dtype == "float32" and not temperature
        self.temperature = temperature
        self.ours = args.methods.split(",")
        self.datastore = (Datastore.open(args.index, tokenizer_fingerprint(self.tokenizer)) if args.index else None)
        self.fixed_curve = forced_cost_curve(args)
        self.drafters: dict[str, list[Drafter]] = {}
        self.generators = {method: self.new_generator(method) for method in self.ours}
        verifier = next(iter(self.generators.values())).verifier  # every generator's verifier runs the same model
        self.start_curve = None if self.fixed_curve is not None else starting_cost_curve(verifier, args)
        self.linear_forms = linear_forms(verifier)
        self.methods = ["plain"] + ([] if args.no_hf_pld else ["hf_pld"]) + self.ours
        self.config = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=temperature, seed=0,
                                       tree_budget=args.budget)
        self.sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature else {}
        self.mismatches: list[dict] = []
        self.agreement = defaultdict(lambda: {"identical": 0, "prompts": 0, "prefix": 0, "tokens": 0})
        self.totals: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(float)))
        self.cases = 0

    def new_generator(self, method: str, drafters: list[Drafter] | None = None) -> SpeculativeGenerator:
        """A generator of ``method`` (``NAME@2``: another instance of NAME), with fresh drafters unless given."""
        if drafters is None:
            drafters = make_drafters(method.split("@")[0], self.model.config.vocab_size, self.datastore)
        self.drafters[method] = drafters
        return SpeculativeGenerator(self.model, self.tokenizer, drafters, cost_curve=self.fixed_curve)

    def warm_up(self) -> None:
        """Eight tokens of every method on a prompt no benchmark measures (a measured one would leave eight tokens
        of its answer in the output history a method drafts from): lazy initialisation, and each generator's cost
        model learned from the same starting curve."""
        ids = chat_ids(self.tokenizer, WARM_UP_PROMPT)
        hf_generate(self.model, ids, 8)
        for generator in self.generators.values():
            if self.start_curve is not None:
                store_cost_curve(generator.verifier, CostProbe(), self.start_curve)
            generator.generate(ids, GenerationConfig(max_new_tokens=8))

    def run(self, case: Case) -> dict[str, np.ndarray]:
        """Decode ``case`` with every method in this case's turn of the rotation; add its times and steps to the
        totals of its category and ``overall``; record a mismatch with plain greedy. Returns the outputs."""
        methods = self.methods[self.cases % len(self.methods):] + self.methods[: self.cases % len(self.methods)]
        self.cases += 1
        outputs = {}
        for method in methods:
            if method == "plain":
                tokens, seconds = hf_generate(self.model, case.ids, self.config.max_new_tokens, **self.sampling)
                stats = None
            elif method == "hf_pld":
                tokens, seconds = hf_generate(self.model, case.ids, self.config.max_new_tokens,
                                              prompt_lookup_num_tokens=10, **self.sampling)
                stats = None
            else:
                result = self.generators[method].generate(case.ids, self.config, references=case.references)
                tokens, seconds, stats = result.tokens, result.stats.total_ms / 1e3, result.stats
            outputs[method] = tokens
            for bucket in (self.totals[case.category][method], self.totals["overall"][method]):
                count(bucket, len(tokens), seconds, [] if stats is None else [stats])
        for method in self.ours if not self.temperature else ():
            same = np.array_equal(outputs[method], outputs["plain"])
            if not same and self.exact:
                self.mismatches.append({"id": case.id, "category": case.category, "method": method})
            counts = self.agreement[method]
            counts["identical"] += same
            counts["prompts"] += 1
            counts["prefix"] += agreeing_prefix(outputs[method], outputs["plain"])
            counts["tokens"] += len(outputs["plain"])
        if self.args.record:
            self.record(case)
        return outputs

    def record(self, case: Case) -> None:
        """Append ``case``'s recording (:func:`record_plain.plain_recording`, its id, category and references'
        ids) to ``--record``."""
        line = {"question_id": case.id, "category": case.category,
                **plain_recording(self.model, case.ids, self.config.max_new_tokens, top_k=8),
                "references": [encode(self.tokenizer, text).tolist() for text in case.references]}
        self.args.record.parent.mkdir(parents=True, exist_ok=True)
        with open(self.args.record, "a") as f:
            f.write(json.dumps(line) + "\n")

    def take_totals(self) -> dict:
        """The totals so far, which start again from zero (a benchmark of several passes reports each)."""
        totals, self.totals = self.totals, defaultdict(lambda: defaultdict(lambda: defaultdict(float)))
        return totals

    def report(self, **fields) -> dict:
        """The run's settings, ``fields`` (the benchmark's own), mismatches, agreement, what each generator
        learned, and per category and method :func:`summarize` of the totals."""
        args = self.args
        curve = self.start_curve
        report = {"model": args.model, "device": str(self.model.device), "cpu": cpu_name(), "dtype": args.dtype,
                  "torch_threads": torch.get_num_threads(), "threads": args.threads,
                  "starting_cost_curve": None if curve is None else {
                      "sizes": curve.sizes.tolist(), "ms": [round(float(m), 2) for m in curve.ms]},
                  "linear_forms": self.linear_forms,
                  "index": str(args.index) if args.index else None, "max_new_tokens": args.max_new_tokens,
                  "budget": args.budget, "cost": args.cost, "fresh_curve": args.fresh_curve,
                  "poison_curve": args.poison_curve, **fields,
                  "mismatches": self.mismatches,
                  "agreement_with_plain": {m: {"identical_outputs": f"{c['identical']}/{c['prompts']}",
                                               "agreeing_prefix_share": round(c["prefix"] / max(c["tokens"], 1), 4)}
                                           for m, c in self.agreement.items()},
                  "tuning": {m: g.tuning_report() for m, g in self.generators.items()}}
        report["categories"] = summarize(self.totals, self.methods)
        return report

    def finish(self, report: dict, out: Path, title: str) -> None:
        """:func:`write_report`, after the agreement with plain decoding where outputs need not be identical."""
        if not self.exact and not self.temperature:
            print(f"agreement with plain decoding in {self.args.dtype}: {json.dumps(report['agreement_with_plain'])}")
        write_report(out, report, self.methods, f"{title}, {self.args.model}, {self.args.dtype}")


def write_report(out: Path, report: dict, methods: list[str], title: str) -> None:
    """Write the JSON, the markdown table and the chart beside it; print the table; exit 1 if ``report`` lists
    mismatches with plain greedy."""
    write_json(out, report)
    markdown = table(report, methods)
    out.with_suffix(".md").write_text(markdown + "\n")
    write_chart(out.with_suffix(".png"), report, methods, title)
    print(markdown)
    if report.get("mismatches"):
        print(f"MISMATCHES against plain greedy: {report['mismatches']}", file=sys.stderr)
        sys.exit(1)


def count(bucket: dict, tokens: int, seconds: float, stats: Sequence) -> None:
    """Add one decoding to a totals bucket: its tokens and seconds, and the step counters of its rows' stats
    (none for a baseline; a batch's rows each count their own steps)."""
    bucket["prompts"] += 1
    bucket["seconds"] += seconds
    bucket["tokens"] += tokens
    for row in stats:
        bucket["steps"] += row.steps
        bucket["draft_ms"] += row.draft_ms
        bucket["verify_ms"] += row.verify_ms
        bucket["observe_ms"] += row.observe_ms
        for phase, ms in row.phase_ms.items():
            bucket["phase_" + phase] += ms
        bucket["paused_steps"] += row.paused_steps
        for source, accepted in row.accepted_by_source.items():
            bucket["accepted_" + source] += accepted
        for source, drafted in row.drafted_by_source.items():
            bucket["drafted_" + source] += drafted


def workload_arguments(parser: argparse.ArgumentParser, items: str) -> None:
    """``--split`` and ``--limit`` of a workload benchmark whose data holds ``items``."""
    parser.add_argument("--split", choices=SPLITS, default="measure",
                        help="measure: the held-out items, what the tables report; tune: the quarter kept for tuning "
                             "(data/<workload>/SOURCES.md)")
    parser.add_argument("--limit", type=int, help=f"at most this many {items} per category (default: all)")
    parser.add_argument("--categories", help="comma-separated subset of the categories (default: all)")


def select(rows: Iterable[dict], args, category: Callable[[dict], str] = lambda row: row["category"]) -> list[dict]:
    """The rows of ``--split`` and ``--categories``, at most ``--limit`` per category, in file order."""
    wanted = set(args.categories.split(",")) if args.categories else None
    return take((row for row in rows if wanted is None or category(row) in wanted), args.split, args.limit, category)


def run_cases(bench: Harness, cases: Iterable[Case], desc: str, total: int | None = None, warm: bool = True) -> None:
    """Warm every method up before the first case (unless ``warm`` is false), then run them all (cases may be made as
    they are asked for)."""
    for i, case in enumerate(tqdm(cases, desc=desc, total=total)):
        if i == 0 and warm:
            bench.warm_up()
        bench.run(case)


def default_out(args, benchmark: str) -> Path:
    """``--out``, else ``results/<benchmark>_<model>.json``."""
    return args.out or ROOT / "results" / f"{benchmark}_{Path(args.model).name}.json"


def summarize(totals: dict, methods: list[str]) -> dict:
    """Per category and method: prompts, speedup over plain (and over ``ar`` when it ran), tokens/s, tokens per
    step, ms per step, accepted by source."""
    categories = {}
    for category in sorted(totals, key=lambda c: (c == "overall", c)):
        rate = {m: totals[category][m]["tokens"] / totals[category][m]["seconds"] for m in methods}
        categories[category] = {}
        for method in methods:
            t = totals[category][method]
            entry = {"prompts": int(t["prompts"]), "speedup": round(rate[method] / rate["plain"], 3),
                     "tokens_per_second": round(rate[method], 2)}
            if "ar" in rate:
                entry["speedup_over_ar"] = round(rate[method] / rate["ar"], 3)
            if t["steps"]:
                entry |= {"mean_accepted": round(t["tokens"] / t["steps"], 3),
                          "draft_ms_per_step": round(t["draft_ms"] / t["steps"], 3),
                          "verify_ms_per_step": round(t["verify_ms"] / t["steps"], 3),
                          "observe_ms_per_step": round(t["observe_ms"] / t["steps"], 4),
                          "phase_ms_per_step": {k[6:]: round(v / t["steps"], 3) for k, v in t.items()
                                                if k.startswith("phase_")},
                          "accepted_by_source": {k[9:]: int(v) for k, v in t.items() if k.startswith("accepted_")},
                          "drafted_by_source": {k[8:]: int(v) for k, v in t.items() if k.startswith("drafted_")},
                          "paused_steps": int(t["paused_steps"])}
            categories[category][method] = entry
    return categories
