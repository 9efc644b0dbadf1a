"""Command line: parses and validates options, calls the library, prints. No decoding logic lives here.

Every option is checked by click when it is parsed (ranges a machine can hold, finite numbers, UTF-8 text),
every path before any work starts (:mod:`retrieval_spec.files`). One place, :class:`_Group`, turns what a user
can get wrong into one line on stderr and exit code 2.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
import traceback
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import click
from tqdm import tqdm

from . import strict_json
from .chat import parse_messages, render_messages
from .config import GenerationConfig
from .drafters.registry import METHODS, load_state, make_drafters, save_state
from .errors import InputError, OutputError, RetrievalSpecError
from .files import (
    JsonlWriter,
    check_input_file,
    check_output_directory,
    check_output_file,
    disk_cache_dir,
    read_text,
)

# Bounds of options, each one a machine can hold.
MAX_THREADS = os.cpu_count() or 1  # more threads than cores only slows torch down (1000 did not finish in 300 s)
MAX_NUM_SAMPLES = 256  # samples are rows of one batch: 10,000 took 6 GiB
MAX_TREE_BUDGET = 1024  # the verified tree is cut to what pays off, far below this
MAX_NEW_TOKENS = 1 << 20  # the model's context bounds it further, checked once the model is loaded
# Below 1e-3 sampling is greedy decoding in all but name, and near 1e-37 logits / temperature overflow float32.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 100.0
MAX_SHARD_TOKENS = 1 << 30  # a shard's suffix sort peaks near 20 bytes a token: 20 GiB
# An option left out decodes as the library does: GenerationConfig's defaults, never restated here.
DEFAULTS = {field.name: field.default for field in fields(GenerationConfig)}


class _Group(click.Group):
    """Turns user errors into one line on stderr and exit code 2; bugs keep their traceback.

    User errors: :class:`RetrievalSpecError`, OS errors (a full disk, a permission) and options click refuses
    (a subcommand parses its options inside :meth:`invoke`). Notes added to an error (``__notes__``: how many
    results were written before it) follow its message on the same line.
    """

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.UsageError as error:
            command = error.ctx.command_path if error.ctx is not None else ctx.command_path
            _fail(ctx, f"{error.format_message()} (see {command} --help)")
        except RetrievalSpecError as error:
            _fail(ctx, str(error), error)
        except OSError as error:
            _fail(ctx, _os_error(error), error)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception:  # noqa: BLE001 -- anything else is a bug: keep its traceback, and say so
            traceback.print_exc()
            click.echo("error: the traceback above is a bug in retrieval-spec, not a problem with the input; "
                       "please report it", err=True)
            ctx.exit(1)


def _fail(ctx: click.Context, message: str, error: BaseException | None = None) -> None:
    notes = getattr(error, "__notes__", [])
    line = re.sub(r"\s*\n\s*", " ", "; ".join([message, *notes])).strip()
    click.echo(f"error: {line}", err=True)
    ctx.exit(2)


def _note(error: BaseException, note: str) -> None:
    """Add a note to an error on its way to :class:`_Group` (``add_note`` exists from Python 3.11 only)."""
    error.__notes__ = [*getattr(error, "__notes__", []), note]


def _os_error(error: OSError) -> str:
    names = [str(name) for name in (error.filename, error.filename2) if name is not None]
    reason = error.strerror or str(error)
    return f"{' -> '.join(names)}: {reason}" if names else reason


class _Finite(click.FloatRange):
    """A float range that refuses nan and infinities too (a plain FloatRange lets nan through)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return super().convert(number, param, ctx)


def _utf8(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """Refuse text that is not UTF-8 (the shell hands such bytes over as lone surrogates)."""
    for text in value if isinstance(value, tuple) else (value,):
        if text is None:
            continue
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            byte = ord(text[error.start]) - 0xDC00
            where = f"byte 0x{byte:02x}" if 0x80 <= byte <= 0xFF else f"character {text[error.start]!r}"
            raise click.BadParameter(f"not valid UTF-8 text ({where} at position {error.start})") from None
    return value


def _non_empty(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    for text in value if isinstance(value, tuple) else (value,):
        if text is not None and not text:
            raise click.BadParameter("must not be empty" + (
                " (an empty stop string would stop after the first token)" if param.name == "stop_strings" else ""))
    return _utf8(ctx, param, value)


def _temperature(ctx: click.Context, param: click.Parameter, value: float) -> float:
    if 0 < value < MIN_TEMPERATURE:
        raise click.BadParameter(f"0 decodes greedily; a sampling temperature is at least {MIN_TEMPERATURE}")
    return value


@dataclass(frozen=True)
class _Record:
    """One prompt, question or document to process.

    Attributes:
        id: its ``id`` (or ``question_id``) field, else its line number, else the option's name.
        text: the prompt, question or document (of a chat: its last user turn).
        where: ``file:line``, or the option it was given with; named in messages about it.
        messages: a multi-turn chat (``{"role", "content"}`` dicts, the last a user turn), rendered with the
            chat template instead of ``text``; None for a single prompt.
    """

    id: str
    text: str
    where: str
    messages: tuple[dict[str, str], ...] | None = None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="retrieval-spec")
def main() -> None:
    """Lossless speculative decoding that drafts from text that already exists.

    Every method produces exactly the tokens plain decoding would; drafts only change how many tokens one
    forward pass of the model confirms.

    \b
    Quick start:
      retrieval-spec demo                                  # plain vs auto on a code edit of a bundled file
      retrieval-spec generate --prompt "Summarize: ..."    # print a continuation
      retrieval-spec generate --input prompts.jsonl --output out.jsonl --json-stats

    \b
    Environment:
      RETRIEVAL_SPEC_CACHE=DIR              converted models, cost curves, kernel timings (~/.cache/retrieval-spec)
      RETRIEVAL_SPEC_LINEAR_FORMS=unpacked  no packed weight copies on a CPU (they take 1.3-1.75x the weights)
      RETRIEVAL_SPEC_LINEAR_FORMS=torch     torch's own linear everywhere
    """


def _setup_threads(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)


def _read_prompts(path: Path, fields: tuple[str, ...] = ("prompt", "text", "turns")) -> list[_Record]:
    """Records from JSONL: each line an object with the first of ``fields`` it has ("turns": first turn;
    "messages": a chat, checked by :func:`parse_messages`)."""
    check_input_file(path, "--input")
    records = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            record = strict_json.loads(line, where)
            if not isinstance(record, dict):
                raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
            record_id = str(record.get("id", record.get("question_id", lineno)))
            prompt = next((record[field] for field in fields if field != "messages" and record.get(field)), None)
            if prompt is None and "messages" in fields and "messages" in record:
                messages = parse_messages(record["messages"], where)
                records.append(_Record(record_id, messages[-1]["content"], where, messages))
                continue
            if isinstance(prompt, list):
                prompt = prompt[0]
            if not isinstance(prompt, str) or not prompt:
                names = ", ".join(f'"{field}"' for field in fields)
                raise InputError(f"{where}: needs a non-empty field among {names}")
            records.append(_Record(record_id, prompt, where))
    if not records:
        raise InputError(f"{path}: no prompts found")
    return records


def _check_prompts_fit(records: list[_Record], render: Callable[[_Record], str], tokenizer, model,
                       max_new_tokens: int) -> None:
    """Refuse, naming its ``file:line``, a prompt too long for the model's context before any prompt runs (and a
    model family the engine cannot verify exactly, before anything)."""
    from .families import attention_layout
    from .generate import check_fits, encode

    limit = attention_layout(model).context_limit
    for record in records:
        try:
            check_fits(limit, len(encode(tokenizer, render(record))), max_new_tokens)
        except InputError as error:
            raise InputError(f"{record.where}: {error}") from None


@main.command()
@click.option("--model", "model_name", default="smollm2-135m", show_default=True,
              help="Embedded model name (smollm2-135m, qwen2.5-0.5b) or a Hugging Face checkpoint directory.")
@click.option("--prompt", callback=_utf8, help="One prompt; the continuation is printed on stdout.")
@click.option("--input", "input_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help='JSONL of prompts ("prompt", "text" or "turns" per line, or "messages": a chat of '
                   '{"role", "content"} objects ending with a user turn), of documents with --task summarize '
                   '("text"), or of questions with --rag ("question", "prompt", ...); one JSON object per line out.')
@click.option("--output", "output_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write results here as JSONL (one object per prompt) instead of text on stdout.")
@click.option("--task", type=click.Choice(["complete", "rag", "summarize"]), default="complete", show_default=True,
              help="complete: continue each prompt; rag: answer --question from passages retrieved from --index "
                   "(built with --dense); summarize: summarise each --input document, copying from it.")
@click.option("--rag", is_flag=True, help="Shorthand for --task rag.")
@click.option("--question", callback=_utf8, help="With --rag: the question to answer from the index's passages.")
@click.option("--passages", "num_passages", default=5, show_default=True, type=click.IntRange(1, 100),
              help="With --rag: passages retrieved into the prompt (--top-k is the sampler's).")
@click.option("--method", type=click.Choice(list(METHODS)), default="auto", show_default=True,
              help="; ".join(f"{method.name}: {method.description}" for method in METHODS.values()) + ".")
@click.option("--index", "index_path", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A datastore built by `retrieval-spec build-index` with this model's tokenizer.")
@click.option("--max-new-tokens", default=DEFAULTS["max_new_tokens"], show_default=True,
              type=click.IntRange(1, MAX_NEW_TOKENS), help="Stop after this many new tokens.")
@click.option("--tree-budget", default=DEFAULTS["tree_budget"], show_default=True,
              type=click.IntRange(0, MAX_TREE_BUDGET),
              help="Most draft nodes verified per step; the measured cost curve usually picks fewer.")
@click.option("--reference", "references", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A document the output may copy from (repeatable), e.g. the retrieved passages.")
@click.option("--stop", "stop_strings", multiple=True, callback=_non_empty,
              help="Stop once the output contains this string (repeatable).")
@click.option("--chat/--no-chat", default=True, show_default=True,
              help="Wrap each prompt in the model's chat template as a user message.")
@click.option("--temperature", default=DEFAULTS["temperature"], show_default=True, type=_Finite(0, MAX_TEMPERATURE),
              callback=_temperature,
              help="0 decodes greedily; above 0 samples, with exactly the model's own distribution.")
@click.option("--top-k", default=DEFAULTS["top_k"], show_default=True, type=click.IntRange(0, 2**31 - 1),
              help="Sample among the k most likely tokens (0: all).")
@click.option("--top-p", default=DEFAULTS["top_p"], show_default=True, type=_Finite(0, 1, min_open=True),
              help="Sample from the smallest set with this probability.")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1),
              help="Seed of the sampler: the same seed gives the same output (up to floating point). Prompt i of "
                   "--input (from 0) samples with seed (S, i), sample j of it with (S, i, j); without --seed every "
                   "run draws fresh entropy (the seed used is in the stats).")
@click.option("--num-samples", default=1, show_default=True, type=click.IntRange(1, MAX_NUM_SAMPLES),
              help="Sample N continuations of each prompt together (needs --temperature > 0): one batched forward "
                   "per step, each sample drafting from the others too; prints one JSON object per prompt with "
                   "all N texts (self-consistency, best-of-N).")
@click.option("--cross-path/--no-cross-path", default=True, show_default=True,
              help="With --num-samples: let samples draft from each other's text.")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Keep what the drafters learn across runs here (recycling table, lookahead pool, earlier "
                   "outputs): loaded at start when present, saved at the end. The index directory is a good place.")
@click.option("--json-stats", is_flag=True, help="With --prompt: print the step statistics as JSON on stderr.")
@click.option("--quiet", is_flag=True, help="No progress bar for --input (it is drawn only when stderr is a terminal).")
@click.option("--threads", type=click.IntRange(1, MAX_THREADS),
              help="torch threads (default: torch's choice, usually all cores).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default="auto", show_default=True,
              help="Where the model runs: auto takes a CUDA GPU, else Apple's MPS, else the CPU.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True,
              help="Weights dtype. float32: output identical to plain decoding token for token; half precision: "
                   "faster on GPUs, and agrees with plain decoding in the same dtype almost always (README).")
def generate(model_name, prompt, input_path, output_path, task, rag, question, num_passages, method, index_path,
             max_new_tokens, tree_budget, references, stop_strings, chat, temperature, top_k, top_p, seed, num_samples,
             cross_path, state_dir, json_stats, quiet, threads, device, dtype):
    """Generate continuations exactly as plain decoding would, in fewer model steps.

    Greedy output is token-for-token that of plain greedy decoding; sampled output (--temperature > 0)
    follows exactly the model's distribution under the same temperature, top-k and top-p.

    \b
    Examples:
      retrieval-spec generate --prompt "Summarize: $(cat article.txt)" --json-stats
      retrieval-spec generate --input prompts.jsonl --output out.jsonl --method pld
      retrieval-spec generate --input chat.jsonl --output out.jsonl   # "messages": [{"role", "content"}, ...]
      retrieval-spec generate --prompt "..." --method rest --index ./index
      retrieval-spec generate --prompt "Answer from the text." --reference passage.txt
      retrieval-spec generate --rag --index ./index --question "How do I define a class?" --json-stats
      retrieval-spec generate --task summarize --input docs.jsonl --output summaries.jsonl
      retrieval-spec generate --prompt "What is 17*23?" --num-samples 8 --temperature 0.7 --seed 0
    """
    task = "rag" if rag else task
    records = _records(task, prompt, question, input_path)
    if not chat and (chat_record := next((r for r in records if r.messages), None)):
        raise InputError(f'{chat_record.where}: a "messages" chat is rendered with the chat template; drop --no-chat')
    if num_samples > 1 and task != "complete":
        raise InputError("--num-samples goes with plain prompts (--prompt or --input), not --task " + task)
    if num_samples > 1 and temperature == 0:
        raise InputError("--num-samples above 1 needs --temperature > 0: greedy samples would all be the same")
    if task == "rag" and index_path is None:
        raise InputError("--rag needs --index: a directory built with `retrieval-spec build-index --dense`")
    if output_path is not None:
        model_directory = Path(model_name) if Path(model_name).is_dir() else None  # else an embedded model's name
        check_output_file(output_path, "--output", inputs=[input_path, *references],
                          folders=[("index", index_path), ("state directory", state_dir),
                                   ("model directory", model_directory), ("cache", disk_cache_dir())])
    if state_dir is not None:
        check_output_directory(state_dir, "--state-dir")
    reference_texts = [read_text(path, "--reference") for path in references]
    _setup_threads(threads)
    from transformers import TextStreamer

    from . import rag as grounded
    from .generate import SpeculativeGenerator
    from .models import chat_prompt, load_model

    dense = grounded.DenseIndex.open(index_path) if task == "rag" else None  # refused before the model loads

    config = GenerationConfig(max_new_tokens=max_new_tokens, tree_budget=tree_budget, stop_strings=stop_strings,
                              temperature=temperature, top_k=top_k, top_p=top_p)
    model, tokenizer = load_model(model_name, dtype=dtype, device=device)
    prompt_of = (lambda text: grounded.summarize_prompt(tokenizer, text)) if task == "summarize" else (
        lambda text: chat_prompt(tokenizer, text) if chat else text)

    def render(record: _Record) -> str:
        return prompt_of(record.text) if record.messages is None else render_messages(tokenizer, record.messages)

    if task != "rag":  # a RAG prompt holds passages retrieved later; its length is checked when it is built
        _check_prompts_fit(records, render, tokenizer, model, max_new_tokens)
    datastore = None
    if index_path is not None:
        from .datastore.manifest import tokenizer_fingerprint
        from .datastore.reader import Datastore

        datastore = Datastore.open(index_path, expected_fingerprint=tokenizer_fingerprint(tokenizer))
    drafters = make_drafters(method, model.config.vocab_size, datastore)
    if state_dir is not None:
        from .datastore.manifest import tokenizer_fingerprint

        vocab_sha256 = tokenizer_fingerprint(tokenizer).sha256
        load_state(drafters, state_dir, vocab_sha256, model.config.vocab_size)
    generator = SpeculativeGenerator(model, tokenizer, drafters, cross_path=cross_path)
    as_rows = input_path is not None or output_path is not None or num_samples > 1
    # One answer on a terminal appears as it is decoded; many show a progress bar with tokens/s on stderr.
    stream = None if as_rows else TextStreamer(tokenizer, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    on_tokens = None if stream is None else lambda row, tokens: stream.put(tokens)
    # disable=None: tqdm draws only on a terminal, so scripts and logs reading stderr see errors alone.
    bar = tqdm(total=len(records), unit="prompt", disable=True if quiet or input_path is None else None,
               file=sys.stderr, dynamic_ncols=True)
    tokens = seconds = 0.0
    with JsonlWriter(output_path if as_rows else None) as out, bar:
        for number, record in enumerate(records):
            # Prompt number i of --input samples with seed (S, i): reruns reproduce, equal prompts stay independent.
            row_config = replace(config, seed=None if seed is None else (seed, number) if input_path else seed)
            with _progress(record, out, len(records)):
                extra = {}
                if num_samples > 1:
                    batch = generator.generate_batch([render(record)] * num_samples, row_config,
                                                     references=reference_texts)
                    out.write({"id": record.id, "method": method, "num_samples": num_samples, **batch.to_dict()})
                    tokens, seconds = tokens + sum(len(r.tokens) for r in batch.rows), seconds + batch.total_ms / 1e3
                    bar.set_postfix_str(f"{tokens / seconds:.1f} tok/s", refresh=False)
                    bar.update()
                    continue
                if task == "rag":
                    answer = grounded.answer(generator, dense, record.text, row_config, top_k=num_passages,
                                             references=reference_texts, on_tokens=on_tokens)
                    result = answer.result
                    extra = {"question": record.text, "cited": answer.cited,
                             "passages": [p.to_dict() for p in answer.passages]}
                elif task == "summarize":
                    result = grounded.summarize(generator, record.text, row_config, references=reference_texts)
                else:
                    result = generator.generate(render(record), row_config, references=reference_texts,
                                                on_tokens=on_tokens)
                if as_rows:
                    out.write({"id": record.id, "method": method, "task": task, "text": result.text, **extra,
                               "tokens": result.tokens.tolist(), "stats": result.stats.to_dict()})
                    tokens, seconds = tokens + len(result.tokens), seconds + result.stats.total_ms / 1e3
                    bar.set_postfix_str(f"{tokens / seconds:.1f} tok/s", refresh=False)
                    bar.update()
                    continue
                stream.end()
                if task == "rag" and not json_stats:
                    cited = {p.id: p for p in answer.passages}
                    for passage_id in answer.cited:
                        click.echo(f"[{passage_id}] {cited[passage_id].source}")
                if json_stats:
                    click.echo(json.dumps({**extra, "stats": result.stats.to_dict()} if extra else
                                          result.stats.to_dict()), err=True)
    if state_dir is not None:
        try:
            save_state(drafters, state_dir, vocab_sha256)
        except OSError as error:
            _note(error, f"every result was written; what the drafters learned was not saved to {state_dir}")
            raise


@contextlib.contextmanager
def _progress(record: _Record, out: JsonlWriter, total: int) -> Iterator[None]:
    """Name the record, and say how many results are kept, on an error while one record is processed."""
    try:
        yield
    except OutputError:
        raise  # the writer's own message says how many lines are kept
    except (RetrievalSpecError, OSError) as error:
        if not str(error).startswith(record.where):
            _note(error, f"while processing {record.where}")
        if out.path is not None or out.written:
            where = f"written to {out.path}" if out.path is not None else "printed"
            _note(error, f"{out.written} of {total} results were {where} before it")
        raise


def _records(task: str, prompt: str | None, question: str | None, input_path: Path | None) -> list[_Record]:
    """The prompts, questions (--rag) or documents (--task summarize) to process."""
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
        return [_Record(name, given, f"--{name}")]
    return _read_prompts(input_path, ("question", "prompt", "text", "turns") if task == "rag" else
                         ("prompt", "text", "turns", "messages"))


@main.command()
@click.option("--model", "model_name", default="smollm2-135m", show_default=True, help="Model to run.")
@click.option("--max-new-tokens", default=DEFAULTS["max_new_tokens"], show_default=True,
              type=click.IntRange(1, MAX_NEW_TOKENS))
@click.option("--threads", type=click.IntRange(1, MAX_THREADS), help="torch threads (default: all cores).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON instead of a report.")
def demo(model_name, max_new_tokens, threads, as_json):
    """Ask for a bundled function back with a parameter renamed, by plain generate() and by `auto`, and compare.

    Runs both in this process, checks the outputs are identical, and reports the speedup, the mean number of
    tokens each verification step gained and which drafting source supplied the accepted tokens.
    """
    _setup_threads(threads)
    from .demo import run_demo

    report = run_demo(model_name, max_new_tokens)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    auto = report["auto"]
    click.echo(f"{report['edit']}\n\n{report['text'].strip()}\n")
    click.echo(f" plain: {report['plain']['tokens_per_second']:6.1f} tok/s, {report['plain']['new_tokens']} tokens "
               "(transformers' generate)")
    click.echo(f"  auto: {auto['tokens_per_second']:6.1f} tok/s, {auto['new_tokens']} tokens, "
               f"{auto['mean_accepted']:.2f} tokens/step")
    drafted = sum(auto["accepted_by_source"].values())
    sources = ", ".join(f"{source} {count}" for source, count in
                        sorted(auto["accepted_by_source"].items(), key=lambda item: -item[1]) if count)
    click.echo(f"accepted drafted tokens by source: {sources or 'none'}; {auto['new_tokens'] - drafted} tokens "
               "from the model itself (one a step)")
    click.echo(f"speedup of auto over plain: {report['speedup']:.2f}x; identical output: {report['identical']}")
    if not report["identical"]:
        raise SystemExit(1)


@main.command("build-index")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Index directory to create (replaced only with --force).")
@click.option("--model", "model_name", default="smollm2-135m", show_default=True,
              help="Whose tokenizer to use; the index is then refused for any other tokenizer.")
@click.option("--text-field", default="text", show_default=True, callback=_non_empty,
              help="JSONL field holding each document's text.")
@click.option("--shard-tokens", default=1 << 27, show_default=True, type=click.IntRange(1, MAX_SHARD_TOKENS),
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

    check_output_directory(out, "-o/--output")
    tokenizer = load_tokenizer(model_name)
    extras = {}
    if dense:  # published with the token index in one commit
        from .rag import DENSE, dense_corpus, dense_writer

        documents = dense_corpus(out, list(inputs), tokenizer, text_field=text_field, skip_bad_lines=skip_bad_lines)
        extras[DENSE] = dense_writer(documents, kind=dense_kind, progress=not quiet)
    summary = build(list(inputs), out, tokenizer, text_field=text_field, shard_tokens=shard_tokens,
                    force=force, skip_bad_lines=skip_bad_lines, progress=not quiet, workers=workers,
                    ray_address=ray_address, extras=extras)
    report = {"path": str(summary.path), "tokens": summary.tokens, "documents": summary.documents,
              "shards": summary.shards, "seconds": round(summary.seconds, 3), "skipped_lines": summary.skipped_lines,
              "skipped_files": summary.skipped_files, "workers": summary.workers, "backend": summary.backend}
    if dense:
        report["dense"] = {key: summary.extras[DENSE][key] for key in ("model", "dim", "count", "index_kind")}
    if as_json:
        click.echo(json.dumps(report))
        return
    skipped = f", skipped {summary.skipped_lines} bad lines" if summary.skipped_lines else ""
    if summary.skipped_files:
        skipped += (f", skipped {summary.skipped_files} entries of input folders that are not readable UTF-8 "
                    "text files")
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
    from .datastore.reader import check_integrity, describe

    if full:
        check_integrity(index)
    click.echo(json.dumps(describe(index), indent=2))
