"""Command line: parses options, calls the library, prints. No decoding logic lives here."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import click

from .errors import InputError, RetrievalSpecError


class _Group(click.Group):
    """Turns user errors into one line on stderr and exit code 2; bugs keep their traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except RetrievalSpecError as error:
            click.echo(f"error: {error}", err=True)
            ctx.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="retrieval-spec")
def main() -> None:
    """Lossless speculative decoding that drafts from text that already exists.

    Every method produces exactly the tokens plain decoding would; drafts only change how many tokens one
    forward pass of the model confirms.

    \b
    Quick start:
      retrieval-spec demo                                  # plain vs prompt lookup on a bundled article
      retrieval-spec generate --prompt "Summarize: ..."    # print a continuation
      retrieval-spec generate --input prompts.jsonl --output out.jsonl --json-stats
    """


def _setup_threads(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)


def _read_prompts(path: Path, fields: tuple[str, ...] = ("prompt", "text", "turns")) -> list[tuple[str, str]]:
    """(id, text) pairs from JSONL: each line an object with the first of ``fields`` it has ("turns": first turn)."""
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise InputError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            prompt = next((value for value in map(record.get, fields) if value), None)
            if isinstance(prompt, list):
                prompt = prompt[0]
            if not isinstance(prompt, str) or not prompt:
                names = ", ".join(f'"{field}"' for field in fields)
                raise InputError(f"{path}:{lineno}: needs a non-empty field among {names}")
            records.append((str(record.get("id", record.get("question_id", lineno))), prompt))
    if not records:
        raise InputError(f"{path}: no prompts found")
    return records


@main.command()
@click.option("--model", "model_name", default="smollm2-135m", show_default=True,
              help="Embedded model name (smollm2-135m, qwen2.5-0.5b) or a Hugging Face checkpoint directory.")
@click.option("--prompt", help="One prompt; the continuation is printed on stdout.")
@click.option("--input", "input_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help='JSONL of prompts ("prompt", "text" or "turns" per line), of documents with --task summarize '
                   '("text"), or of questions with --rag ("question", "prompt", ...); one JSON object per line out.')
@click.option("--output", "output_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write results here as JSONL (one object per prompt) instead of text on stdout.")
@click.option("--task", type=click.Choice(["complete", "rag", "summarize"]), default="complete", show_default=True,
              help="complete: continue each prompt; rag: answer --question from passages retrieved from --index "
                   "(built with --dense); summarize: summarise each --input document, copying from it.")
@click.option("--rag", is_flag=True, help="Shorthand for --task rag.")
@click.option("--question", help="With --rag: the question to answer from the index's passages.")
@click.option("--passages", "num_passages", default=5, show_default=True,
              help="With --rag: passages retrieved into the prompt (--top-k is the sampler's).")
@click.option("--method", type=click.Choice(["ar", "pld", "rest", "recycle", "lookahead", "auto"]), default="auto",
              show_default=True,
              help="ar: plain decoding; pld: copy from prompt, references and output (prompt lookup / LLMA); "
                   "rest: copy from a corpus datastore (--index); recycle: the model's own earlier top-k "
                   "predictions; lookahead: n-grams from a Jacobi window run in the same forward; "
                   "auto: every available source fused in one tree.")
@click.option("--index", "index_path", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A datastore built by `retrieval-spec build-index` with this model's tokenizer.")
@click.option("--max-new-tokens", default=128, show_default=True, help="Stop after this many new tokens.")
@click.option("--tree-budget", default=64, show_default=True,
              help="Most draft nodes verified per step; the measured cost curve usually picks fewer.")
@click.option("--reference", "references", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A document the output may copy from (repeatable), e.g. the retrieved passages.")
@click.option("--stop", "stop_strings", multiple=True, help="Stop once the output contains this string (repeatable).")
@click.option("--chat/--no-chat", default=True, show_default=True,
              help="Wrap each prompt in the model's chat template as a user message.")
@click.option("--temperature", default=0.0, show_default=True,
              help="0 decodes greedily; above 0 samples, with exactly the model's own distribution.")
@click.option("--top-k", default=0, show_default=True, help="Sample among the k most likely tokens (0: all).")
@click.option("--top-p", default=1.0, show_default=True, help="Sample from the smallest set with this probability.")
@click.option("--seed", type=int, help="Seed of the sampler: same seed, same output.")
@click.option("--num-samples", default=1, show_default=True,
              help="Sample N continuations of each prompt together (needs --temperature > 0): one batched forward "
                   "per step, each sample drafting from the others too; prints one JSON object per prompt with "
                   "all N texts (self-consistency, best-of-N). Sample i uses seed --seed + i.")
@click.option("--cross-path/--no-cross-path", default=True, show_default=True,
              help="With --num-samples: let samples draft from each other's text.")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Keep what the drafters learn across runs here (recycling table, lookahead pool, earlier "
                   "outputs): loaded at start when present, saved at the end. The index directory is a good place.")
@click.option("--json-stats", is_flag=True, help="With --prompt: print the step statistics as JSON on stderr.")
@click.option("--threads", type=int, help="torch threads (default: torch's choice, usually all cores).")
def generate(model_name, prompt, input_path, output_path, task, rag, question, num_passages, method, index_path,
             max_new_tokens, tree_budget, references, stop_strings, chat, temperature, top_k, top_p, seed, num_samples,
             cross_path, state_dir, json_stats, threads):
    """Generate continuations exactly as plain decoding would, in fewer model steps.

    Greedy output is token-for-token that of plain greedy decoding; sampled output (--temperature > 0)
    follows exactly the model's distribution under the same temperature, top-k and top-p.

    \b
    Examples:
      retrieval-spec generate --prompt "Summarize: $(cat article.txt)" --json-stats
      retrieval-spec generate --input prompts.jsonl --output out.jsonl --method pld
      retrieval-spec generate --prompt "..." --method rest --index ./index
      retrieval-spec generate --prompt "Answer from the text." --reference passage.txt
      retrieval-spec generate --rag --index ./index --question "How do I define a class?" --json-stats
      retrieval-spec generate --task summarize --input docs.jsonl --output summaries.jsonl
      retrieval-spec generate --prompt "What is 17*23?" --num-samples 8 --temperature 0.7 --seed 0
    """
    task = "rag" if rag else task
    records = _records(task, prompt, question, input_path)
    if num_samples < 1:
        raise InputError(f"--num-samples must be at least 1, got {num_samples}")
    if num_samples > 1 and task != "complete":
        raise InputError("--num-samples goes with plain prompts (--prompt or --input), not --task " + task)
    if num_samples > 1 and state_dir is not None:
        raise InputError("--state-dir does not go with --num-samples (samples keep no state across runs)")
    if num_samples > 1 and temperature == 0:
        raise InputError("--num-samples above 1 needs --temperature > 0: greedy samples would all be the same")
    if task == "rag" and index_path is None:
        raise InputError("--rag needs --index: a directory built with `retrieval-spec build-index --dense`")
    _setup_threads(threads)
    from . import rag as grounded
    from .api import make_drafters
    from .generate import GenerationConfig, SpeculativeGenerator
    from .models import chat_prompt, load_model

    dense = grounded.DenseIndex.open(index_path) if task == "rag" else None  # refused before the model loads

    config = GenerationConfig(max_new_tokens=max_new_tokens, tree_budget=tree_budget, stop_strings=stop_strings,
                              temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    model, tokenizer = load_model(model_name)
    datastore = None
    if index_path is not None:
        from .datastore.manifest import tokenizer_fingerprint
        from .datastore.reader import Datastore

        datastore = Datastore.open(index_path, expected_fingerprint=tokenizer_fingerprint(tokenizer))
    reference_texts = [p.read_text(encoding="utf-8") for p in references]
    if num_samples > 1:
        from .multisample import MultiSampleGenerator

        multi = MultiSampleGenerator(model, tokenizer, lambda: make_drafters(method, model.config.vocab_size, datastore),
                                     cross_path=cross_path)
        with open(output_path, "w", encoding="utf-8") if output_path else contextlib.nullcontext(sys.stdout) as out:
            for record_id, text in records:
                rendered = chat_prompt(tokenizer, text) if chat else text
                batch = multi.generate([rendered] * num_samples, config, references=reference_texts)
                out.write(json.dumps({"id": record_id, "method": method, "num_samples": num_samples,
                                      **batch.to_dict()}) + "\n")
                out.flush()
        return
    drafters = make_drafters(method, model.config.vocab_size, datastore)
    if state_dir is not None:
        from .api import load_state
        from .datastore.manifest import tokenizer_fingerprint

        vocab_sha256 = tokenizer_fingerprint(tokenizer).sha256
        load_state(drafters, state_dir, vocab_sha256)
    generator = SpeculativeGenerator(model, tokenizer, drafters)
    as_rows = input_path is not None or output_path is not None
    out = open(output_path, "w", encoding="utf-8") if output_path else sys.stdout
    try:
        for record_id, text in records:
            extra = {}
            if task == "rag":
                answer = grounded.answer(generator, dense, text, config, top_k=num_passages,
                                         references=reference_texts)
                result = answer.result
                extra = {"question": text, "cited": answer.cited, "passages": [p.to_dict() for p in answer.passages]}
            elif task == "summarize":
                result = grounded.summarize(generator, text, config, references=reference_texts)
            else:
                rendered = chat_prompt(tokenizer, text) if chat else text
                result = generator.generate(rendered, config, references=reference_texts)
            if as_rows:
                row = {"id": record_id, "method": method, "task": task, "text": result.text, **extra,
                       "tokens": result.tokens.tolist(), "stats": result.stats.to_dict()}
                out.write(json.dumps(row) + "\n")
                out.flush()
                continue
            click.echo(result.text)
            if task == "rag" and not json_stats:
                cited = {p.id: p for p in answer.passages}
                for passage_id in answer.cited:
                    click.echo(f"[{passage_id}] {cited[passage_id].source}")
            if json_stats:
                click.echo(json.dumps({**extra, "stats": result.stats.to_dict()} if extra else
                                      result.stats.to_dict()), err=True)
    finally:
        if output_path:
            out.close()
    if state_dir is not None:
        from .api import save_state

        save_state(drafters, state_dir, vocab_sha256)


def _records(task: str, prompt: str | None, question: str | None, input_path: Path | None) -> list[tuple[str, str]]:
    """(id, text) pairs to process: prompts, questions (--rag) or documents (--task summarize)."""
    if task != "complete" and prompt is not None:
        raise InputError(f"--prompt does not go with --task {task}; give "
                         + ("--question" if task == "rag" else "the documents as --input JSONL"))
    if task != "rag" and question is not None:
        raise InputError("--question goes with --rag (--task rag)")
    if task == "summarize":
        if input_path is None:
            raise InputError('--task summarize needs --input: JSONL with a "text" field per document')
        return _read_prompts(input_path, ("text", "prompt", "turns"))
    name, given = ("question", question) if task == "rag" else ("prompt", prompt)
    if (given is None) == (input_path is None):
        raise InputError(f"give exactly one of --{name} or --input")
    if given is not None:
        if not given:
            raise InputError(f"the {name} is empty")
        return [(name, given)]
    return _read_prompts(input_path, ("question", "prompt", "text", "turns") if task == "rag" else
                         ("prompt", "text", "turns"))


@main.command()
@click.option("--model", "model_name", default="smollm2-135m", show_default=True, help="Model to run.")
@click.option("--max-new-tokens", default=128, show_default=True)
@click.option("--threads", type=int, help="torch threads (default: all cores).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON instead of a report.")
def demo(model_name, max_new_tokens, threads, as_json):
    """Summarise a bundled article with plain decoding and with prompt lookup, and compare.

    Runs both in this process, checks the outputs are identical, and reports the speedup and the mean
    number of tokens each verification step gained.
    """
    _setup_threads(threads)
    from .demo import run_demo

    report = run_demo(model_name, max_new_tokens)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(report["summary"].strip())
    click.echo("")
    for name in ("plain", "pld"):
        r = report[name]
        click.echo(f"{name:>6}: {r['tokens_per_second']:6.1f} tok/s, {r['mean_accepted']:.2f} tokens/step, "
                   f"{r['new_tokens']} tokens")
    click.echo(f"speedup of pld over plain: {report['speedup']:.2f}x; identical output: {report['identical']}")


@main.command("build-index")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Index directory to create (replaced only with --force).")
@click.option("--model", "model_name", default="smollm2-135m", show_default=True,
              help="Whose tokenizer to use; the index is then refused for any other tokenizer.")
@click.option("--text-field", default="text", show_default=True, help="JSONL field holding each document's text.")
@click.option("--shard-tokens", default=1 << 27, show_default=True,
              help="Tokens per shard; a shard is written (and freed) before the next is read.")
@click.option("--force", is_flag=True, help="Replace an existing index at the output path.")
@click.option("--skip-bad-lines", is_flag=True, help="Skip malformed JSONL lines (and count them) instead of failing.")
@click.option("--dense", is_flag=True,
              help="Also cut the documents into passages and index their embeddings (all-MiniLM-L6-v2, faiss) "
                   "in OUTPUT/dense, for `generate --rag`.")
@click.option("--dense-index", "dense_kind", type=click.Choice(["auto", "flat", "hnsw"]), default="auto",
              show_default=True, help="With --dense: exact search (flat), approximate (hnsw), or by size (auto).")
@click.option("--workers", type=click.IntRange(min=1),
              help="Tokenize and build shards in this many local processes (default: one per core; 1: in this "
                   "process), or, with --ray, as this many Ray tasks at once (default: the cluster's CPUs). The "
                   "index is the same whatever the number.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", metavar="[ADDRESS]",
              help="Run the tasks on Ray: alone, on a Ray started here (or the cluster in RAY_ADDRESS); "
                   "--ray=ADDRESS joins that cluster (auto, ray://head:10001). The output must be at the same "
                   "path on every node. Needs: pip install 'retrieval-spec[ray]'.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the build summary as JSON.")
def build_index(inputs, out, model_name, text_field, shard_tokens, force, skip_bad_lines, dense, dense_kind, workers,
                ray_address, quiet, as_json):
    """Build a corpus datastore (token stream, suffix arrays, n-gram table) from JSONL, text files or folders.

    JSONL records give their text in --text-field, or chat turns in "messages" / "conversations" (ShareGPT),
    rendered with the model's chat template. Text files and every text file under a folder are one document
    each. The index appears atomically when complete: an interrupted build leaves any previous index intact.

    \b
    Examples:
      retrieval-spec build-index corpus.jsonl -o ./index
      retrieval-spec build-index docs/ notes.txt -o ./index --force
      retrieval-spec build-index a.jsonl b.jsonl -o ./index --skip-bad-lines --json
      retrieval-spec build-index docs/ -o ./index --dense      # then: generate --rag --index ./index
      retrieval-spec build-index corpus/ -o /shared/index --ray=auto   # shards built on a Ray cluster
    """
    from .builders.build import build_index as build
    from .models import load_tokenizer

    tokenizer = load_tokenizer(model_name)
    summary = build(list(inputs), out, tokenizer, text_field=text_field, shard_tokens=shard_tokens,
                    force=force, skip_bad_lines=skip_bad_lines, progress=not quiet, workers=workers,
                    ray_address=ray_address)
    report = {"path": str(summary.path), "tokens": summary.tokens, "documents": summary.documents,
              "shards": summary.shards, "seconds": round(summary.seconds, 3), "skipped_lines": summary.skipped_lines,
              "skipped_files": summary.skipped_files, "workers": summary.workers, "backend": summary.backend}
    if dense:
        from .rag import build_dense_index

        index = build_dense_index(out, list(inputs), tokenizer, text_field=text_field, skip_bad_lines=skip_bad_lines,
                                  kind=dense_kind, progress=not quiet)
        report["dense"] = {key: index.manifest[key] for key in ("model", "dim", "count", "index_kind")}
    if as_json:
        click.echo(json.dumps(report))
        return
    skipped = f", skipped {summary.skipped_lines} bad lines" if summary.skipped_lines else ""
    click.echo(f"built {summary.path}: {summary.tokens:,} tokens, {summary.documents:,} documents, "
               f"{summary.shards} shard(s) in {summary.seconds:.1f} s by {summary.workers} {summary.backend} "
               f"worker(s){skipped}")
    if dense:
        click.echo(f"dense: {report['dense']['count']:,} passages, {report['dense']['index_kind']} index of "
                   f"{report['dense']['dim']}-d {report['dense']['model']} embeddings")


@main.command("index-info")
@click.argument("index", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--verify", "full", is_flag=True, help="Also check the full sha256 of every file (reads everything).")
def index_info(index, full):
    """Print an index's manifest summary as JSON: counts, sizes, tokenizer, shards, build time."""
    from .datastore.reader import describe, verify

    if full:
        verify(index)
    click.echo(json.dumps(describe(index), indent=2))
