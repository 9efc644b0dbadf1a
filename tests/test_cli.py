"""The command line: every user error is one line on stderr naming the file or option, exit code 2, no traceback;
refusals come before any model loads where they can; the multi-sample and --state-dir paths end to end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result

from retrieval_spec import files as files_module
from retrieval_spec import models
from retrieval_spec.builders.build import build_index_from_tokens
from retrieval_spec.cli import demo, generate, main
from retrieval_spec.config import GenerationConfig
from retrieval_spec.datastore.manifest import MANIFEST, NGRAMS, SUFFIX_ARRAY, TOKENS, FileEntry, TokenizerFingerprint
from retrieval_spec.datastore.suffix_array import build_suffix_array
from retrieval_spec.errors import OutputError
from retrieval_spec.files import check_output_file


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def refused(result: Result, *fragments: str) -> str:
    """Assert a one-line refusal with exit code 2 and no traceback; return the line."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_options_left_out_decode_with_the_library_s_defaults():
    defaults = {field.name: field.default for field in fields(GenerationConfig)}
    for command in (generate, demo):
        parsed = command.make_context(command.name, []).params
        given = {name: value for name, value in parsed.items() if name in defaults}
        assert given == {name: defaults[name] for name in given}, command.name
    assert set(generate.make_context("generate", []).params) >= {"max_new_tokens", "tree_budget", "temperature",
                                                                 "top_k", "top_p", "seed", "stop_strings"}


@pytest.mark.parametrize("args,message", [
    (["--prompt", "hi", "--num-samples", "4"], "needs --temperature > 0"),
    (["--prompt", "hi", "--num-samples", "0"], "not in the range 1<=x<=256"),
    (["--rag", "--question", "q", "--num-samples", "2", "--temperature", "1"], "goes with plain prompts"),
])
def test_bad_combinations_are_refused_in_one_line(args, message):
    refused(run("generate", *args), message)


@pytest.mark.parametrize("option, value", [
    ("--threads", "-1"), ("--threads", "0"), ("--threads", "1000"),
    ("--temperature", "nan"), ("--temperature", "inf"), ("--temperature", "-1"), ("--temperature", "1e-9"),
    ("--temperature", "1e300"),
    ("--top-p", "0"), ("--top-p", "1.5"), ("--top-p", "nan"), ("--top-k", "-1"),
    ("--num-samples", "10000"), ("--max-new-tokens", "0"), ("--max-new-tokens", "99999999999"),
    ("--tree-budget", "-1"), ("--tree-budget", "100000"), ("--passages", "0"), ("--seed", "-1"),
    ("--stop", ""),
])
def test_option_values_are_checked_when_parsed(option: str, value: str):
    refused(run("generate", "--prompt", "hi", option, value), f"Invalid value for '{option}'", "--help")


@pytest.mark.parametrize("args", [
    ["demo", "--threads", "0"], ["demo", "--max-new-tokens", "-5"],
    ["build-index", ".", "-o", "x", "--shard-tokens", "0"], ["build-index", ".", "-o", "x", "--text-field", ""],
])
def test_other_commands_check_their_options_too(args: list[str]):
    refused(run(*args), "Invalid value for")


@pytest.mark.parametrize("option", ["--prompt", "--stop"])
def test_text_that_is_not_utf8_is_refused_naming_the_option(option: str):
    args = ["--prompt", "caf\udce9"] if option == "--prompt" else ["--prompt", "hi", "--stop", "\udcff"]
    refused(run("generate", *args), f"'{option}'", "not valid UTF-8 text (byte 0x")


@pytest.mark.parametrize("content, message", [
    (b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n', ":2: not UTF-8 text"),
    (b'{"prompt": "ok"}\n' + b"[" * 100_000 + b"]" * 100_000 + b"\n", ":2: not usable JSON (nested too deeply)"),
    (b'{"prompt": ' + b"1" * 5000 + b"}\n", ":1: not usable JSON"),
    (b"{oops\n", ":1: not valid JSON"),
    (b'{"prompt": ""}\n', ':1: needs a non-empty field among "prompt"'),
])
def test_a_bad_input_line_is_named_by_file_and_line(tmp_path: Path, content: bytes, message: str):
    (tmp_path / "in.jsonl").write_bytes(content)
    refused(run("generate", "--input", str(tmp_path / "in.jsonl")), f"in.jsonl{message}")


def test_an_input_or_reference_that_is_a_fifo_is_refused_not_read(tmp_path: Path):
    os.mkfifo(tmp_path / "pipe")
    refused(run("generate", "--input", str(tmp_path / "pipe")), "--input", "pipe: a FIFO (named pipe), expected a "
                                                                "regular file")
    refused(run("generate", "--prompt", "hi", "--reference", str(tmp_path / "pipe")), "--reference")


def test_a_binary_reference_is_refused_naming_it(tmp_path: Path):
    (tmp_path / "blob.bin").write_bytes(b"\x00\xff\xfe binary")
    refused(run("generate", "--prompt", "hi", "--reference", str(tmp_path / "blob.bin")),
            "--reference", "blob.bin: not UTF-8 text (invalid start byte at byte 1)")


@pytest.mark.parametrize("link", ["same", "symlink", "hardlink"])
def test_an_output_that_is_the_input_is_refused_and_the_input_kept(tmp_path: Path, link: str):
    source = tmp_path / "prompts.jsonl"
    source.write_text('{"prompt": "one"}\n{"prompt": "two"}\n')
    output = source if link == "same" else tmp_path / "out.jsonl"
    if link == "symlink":
        output.symlink_to(source)
    elif link == "hardlink":
        os.link(source, output)
    refused(run("generate", "--input", str(source), "--output", str(output)), "is the input file",
            "write the results to another file")
    assert source.read_text() == '{"prompt": "one"}\n{"prompt": "two"}\n'
    passage = tmp_path / "passage.txt"
    passage.write_text("a passage")
    refused(run("generate", "--prompt", "hi", "--reference", str(passage), "--output", str(passage)),
            "is the input file")


def test_output_paths_are_checked_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "file").write_text("x")
    under_file = str(tmp_path / "file" / "out.jsonl")
    refused(run("generate", "--prompt", "hi", "--output", under_file), "--output", "file is not a directory")
    refused(run("generate", "--prompt", "hi", "--output", str(tmp_path)), "--output", "is a directory")
    refused(run("generate", "--prompt", "hi", "--state-dir", under_file), "--state-dir", "cannot be created")
    refused(run("build-index", str(tmp_path / "file"), "-o", under_file), "-o/--output", "cannot be created")
    # Root writes anywhere, so a read-only directory is what os.access says it is.
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == locked else real_access(path, mode))
    for args in (["generate", "--prompt", "hi", "--output", str(locked / "out.jsonl")],
                 ["generate", "--prompt", "hi", "--state-dir", str(locked / "state")],
                 ["build-index", str(tmp_path / "file"), "-o", str(locked / "index")]):
        refused(run(*args), f"directory {locked} is not writable")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "locked"] and not any(locked.iterdir())


CONSOLE = "from retrieval_spec.cli import main; main(prog_name='retrieval-spec')"


def test_the_console_script_prints_one_line_and_exits_2_without_reading_a_fifo(tmp_path: Path):
    """As a real process: nothing waits on the FIFO, and stderr holds exactly the error line."""
    os.mkfifo(tmp_path / "pipe")
    environment = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for args, fragment in ((["generate", "--threads", "-1"], "Invalid value for '--threads'"),
                           (["generate", "--input", str(tmp_path / "pipe")], "a FIFO (named pipe)")):
        result = subprocess.run([sys.executable, "-c", CONSOLE, *args], env=environment, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 2 and result.stdout == ""
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and fragment in result.stderr


def test_an_output_in_a_missing_directory_is_created_when_written(tmp_path: Path):
    target = tmp_path / "new" / "dir" / "out.jsonl"
    check_output_file(target, "--output")
    assert not (tmp_path / "new").exists()  # checking creates nothing
    with files_module.JsonlWriter(target) as writer:
        writer.write({"id": 1})
    assert json.loads(target.read_text()) == {"id": 1}


def test_the_jsonl_writer_keeps_complete_lines_only(tmp_path: Path):
    class FullDisk:
        """A file that takes 10 bytes of the next write and then reports a full disk."""

        def __init__(self, real):
            self.real, self.failing = real, False

        def write(self, data):
            if self.failing:
                self.real.write(bytes(data[:10]))
                raise OSError(28, "No space left on device")
            return self.real.write(data)

        def fileno(self):
            return self.real.fileno()

        def close(self):
            self.real.close()

    with pytest.raises(OutputError, match=r"--output .*out\.jsonl: No space left on device after 2 complete line"):
        with files_module.JsonlWriter(tmp_path / "sub" / "out.jsonl") as writer:
            writer._file = FullDisk(writer._file)
            writer.write({"n": 1})
            writer.write({"n": 2})
            writer._file.failing = True
            writer.write({"n": 3, "text": "a longer line"})
    lines = (tmp_path / "sub" / "out.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"n": 1}, {"n": 2}]


def test_a_model_directory_with_a_bad_config_is_refused_naming_it(tmp_path: Path):
    (tmp_path / "config.json").write_text('{"model_type": "llama", "vocab_size": ')
    refused(run("generate", "--model", str(tmp_path), "--prompt", "hi"), str(tmp_path), "config.json")
    refused(run("build-index", str(tmp_path / "config.json"), "-o", str(tmp_path / "index"), "--model",
                str(tmp_path)), "cannot load the tokenizer")


def test_index_info_names_every_damaged_file_and_a_bad_manifest_field(tmp_path: Path):
    index = tmp_path / "index"
    build_index_from_tokens([np.arange(2000) % 7], index, TokenizerFingerprint("t", 7, "0" * 64), progress=False)
    assert run("index-info", str(index), "--verify").exit_code == 0
    for name in (TOKENS, NGRAMS):
        path = next(index.glob(f"gen-*/shard-00000/{name}"))
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    refused(run("index-info", str(index), "--verify"), "2 damaged file(s)", TOKENS, NGRAMS)
    manifest = json.loads((index / MANIFEST).read_text())
    (index / MANIFEST).write_text(json.dumps({**manifest, "num_tokens": "lots"}))
    refused(run("index-info", str(index)), "manifest.json: num_tokens is 'lots', expected an integer")


def test_os_errors_are_one_line_and_bugs_keep_their_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from retrieval_spec.datastore import reader

    def denied(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(reader, "describe", denied)
    refused(run("index-info", str(tmp_path)), f"error: {tmp_path}: Permission denied")

    def bug(path):
        return 1 / 0

    monkeypatch.setattr(reader, "describe", bug)
    result = run("index-info", str(tmp_path))
    assert result.exit_code == 1
    assert "Traceback" in result.stderr and "ZeroDivisionError" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: the traceback above is a bug in retrieval-spec")


# --- With the real model (loaded once per session; the CLI's load_model is pointed at it) ---------------------


@pytest.fixture
def model(smollm2, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(models, "load_model", lambda name, *args, **kwargs: smollm2)
    return smollm2


@pytest.mark.real_model
def test_num_samples_prints_every_sample_as_json(model):
    result = run("generate", "--prompt", "Name a colour.", "--num-samples", "3", "--temperature", "1", "--seed", "5",
                 "--max-new-tokens", "8")
    assert result.exit_code == 0, result.output
    row = json.loads(result.output)
    assert len(row["texts"]) == 3 and row["stats"]["rows"] == 3 and len(row["stats"]["per_row"]) == 3


@pytest.mark.real_model
def test_state_dir_carries_what_drafters_learned_to_the_next_run(model, tmp_path: Path):
    args = ["generate", "--prompt", "List three uses of Python.", "--max-new-tokens", "24", "--json-stats",
            "--state-dir", str(tmp_path)]
    first = run(*args)
    assert first.exit_code == 0, first.output
    assert {p.name for p in tmp_path.iterdir()} == {"recycling.npz", "lookahead_pool.npz", "output_history.npz"}
    second = run(*args)
    stats = json.loads(second.output.strip().splitlines()[-1])
    assert stats["accepted_by_source"].get("history", 0) > 0  # the first run's output was copied
    (tmp_path / "recycling.npz").write_bytes(b"garbage")
    refused(run(*args), "recycling.npz")


@pytest.mark.real_model
@pytest.mark.parametrize("damage, message", [
    ("empty", "not a drafter state file (not an .npz archive)"),
    ("truncated", "not a drafter state file (not an .npz archive)"),
    ("garbage", "not a drafter state file (not an .npz archive)"),
    ("out of vocabulary", "array 'table' holds token id 520128418, outside the vocabulary [0, 49152)"),
    ("float", "array 'table' is float32, expected integers or booleans"),
    ("shape", "array 'table' has shape (10, 8), expected (49152, 8)"),
])
def test_a_damaged_state_file_is_refused_naming_it(model, tmp_path: Path, damage: str, message: str):
    from retrieval_spec.datastore.manifest import tokenizer_fingerprint
    from retrieval_spec.drafters.recycling import RecyclingDrafter
    from retrieval_spec.drafters.state import write_state

    sha = tokenizer_fingerprint(model[1]).sha256
    path = tmp_path / "recycling.npz"
    drafter = RecyclingDrafter(model[0].config.vocab_size)
    drafter.save(tmp_path, sha)
    table = drafter.table
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "garbage":
        path.write_bytes(os.urandom(5000))
    else:
        table = {"out of vocabulary": np.where(np.arange(table.size).reshape(table.shape) == 7, 520_128_418, table),
                 "float": table.astype(np.float32), "shape": table[:10]}[damage]
        write_state(path, {"table": table, "known": drafter.known}, 1, sha, k=8)
    refused(run("generate", "--prompt", "hi", "--max-new-tokens", "2", "--state-dir", str(tmp_path)),
            "recycling.npz", message)


@pytest.mark.real_model
def test_a_prompt_too_long_is_named_by_line_before_any_prompt_runs(model, tmp_path: Path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": text}) + "\n" for text in ["short", "short", "word " * 9000]))
    refused(run("generate", "--input", str(prompts), "--output", str(tmp_path / "out.jsonl"), "--max-new-tokens",
                "4"), "prompts.jsonl:3: prompt of", "exceeds the model's context")
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.real_model
def test_an_output_that_fails_midway_keeps_the_finished_lines(model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Count to {n}."}) + "\n" for n in range(3)))
    out = tmp_path / "out.jsonl"
    real_write = files_module.JsonlWriter.write

    def write(self, row):
        if self.written == 2:  # from here on, the disk is full
            full = os.open("/dev/full", os.O_WRONLY)
            os.dup2(full, self._file.fileno())
            os.close(full)
        real_write(self, row)

    monkeypatch.setattr(files_module.JsonlWriter, "write", write)
    args = ["generate", "--input", str(prompts), "--output", str(out), "--max-new-tokens", "3", "--method", "pld"]
    refused(run(*args), f"--output {out}: No space left on device after 2 complete line(s), which are kept")
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["1", "2"]
    monkeypatch.undo()
    monkeypatch.setattr(models, "load_model", lambda name, *args, **kwargs: model)
    refused(run("generate", "--prompt", "hi", "--max-new-tokens", "2", "--output", "/dev/full"),
            "--output /dev/full: No space left on device after 0 complete line(s)")


@pytest.mark.real_model
def test_a_failure_while_processing_says_where_and_how_many_results_were_kept(
    model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from retrieval_spec.errors import DatastoreFormatError
    from retrieval_spec.generate import SpeculativeGenerator

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Count to {n}."}) + "\n" for n in range(3)))
    real_generate = SpeculativeGenerator.generate
    calls = []

    def generate(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise DatastoreFormatError("tokens.bin: damaged")
        return real_generate(self, *args, **kwargs)

    monkeypatch.setattr(SpeculativeGenerator, "generate", generate)
    out = tmp_path / "out.jsonl"
    refused(run("generate", "--input", str(prompts), "--output", str(out), "--max-new-tokens", "3"),
            "tokens.bin: damaged; while processing", "prompts.jsonl:3; 2 of 3 results were written to")
    assert len(out.read_text().splitlines()) == 2


# --- A tampered index with the real model: refused naming the file, or output exactly the plain one ------------

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def plain_and_index(smollm2, tmp_path_factory) -> tuple[str, Path]:
    """Plain greedy output of PROMPT, and an index whose one document is PROMPT's tokens then that output (so REST
    matches the prompt at the first step and drafts the output), plus filler documents."""
    from retrieval_spec.datastore.manifest import tokenizer_fingerprint

    model, tokenizer = smollm2
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(models, "load_model", lambda name, *args, **kwargs: smollm2)
        result = run("generate", "--prompt", PROMPT, "--no-chat", "--method", "ar", "--max-new-tokens", "12")
    assert result.exit_code == 0, result.output
    prompt_ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    output_ids = tokenizer(result.stdout.rstrip("\n"), add_special_tokens=False)["input_ids"]
    rng = np.random.default_rng(0)
    # Fillers make the token stream larger than what open samples (its first and last 64 KiB).
    documents = [np.array(prompt_ids + output_ids)] + [rng.integers(0, 1000, 4000) for _ in range(20)]
    index = tmp_path_factory.mktemp("tampered") / "index"
    build_index_from_tokens(documents, index, tokenizer_fingerprint(tokenizer), progress=False)
    return result.stdout, index, len(prompt_ids)


def reseal(index: Path, *names: str) -> None:
    manifest = json.loads((index / MANIFEST).read_text())
    for name in names:
        manifest["shards"][0]["files"][name] = asdict(FileEntry.of(next(index.glob(f"gen-*/shard-00000/{name}"))))
    (index / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.real_model
@pytest.mark.parametrize("method", ["rest", "auto"])
@pytest.mark.parametrize("damage", ["id outside the vocabulary", "id inside the vocabulary", "byte flips",
                                    "n-gram table"])
def test_a_tampered_index_is_refused_or_decodes_exactly_the_plain_output(
    model, plain_and_index, tmp_path: Path, method: str, damage: str
):
    plain, original, prompt_length = plain_and_index
    index = tmp_path / "index"
    shutil.copytree(original, index)
    tokens_path = next(index.glob(f"gen-*/shard-00000/{TOKENS}"))
    stream = np.fromfile(tokens_path, dtype=">u2")
    if damage in ("id outside the vocabulary", "id inside the vocabulary"):
        # What REST drafts at its first step (the second: the prefill gives the first token), made hostile; the
        # suffix array is rebuilt and the manifest resealed, so nothing but the id itself is wrong.
        stream[2 + prompt_length] = 60_000 if damage == "id outside the vocabulary" else 17
        stream.tofile(tokens_path)
        build_suffix_array(stream).tofile(tokens_path.with_name(SUFFIX_ARRAY))
        reseal(index, TOKENS, SUFFIX_ARRAY)
    elif damage == "byte flips":  # in the middle, where open does not sample
        data = bytearray(tokens_path.read_bytes())
        for offset in range(len(data) // 2 - 40, len(data) // 2 + 40, 7):
            data[offset] ^= 0xA5
        tokens_path.write_bytes(bytes(data))
    else:
        path = tokens_path.with_name(NGRAMS)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        reseal(index, NGRAMS)  # past the open-time sample: only the page checksums can tell
    result = run("generate", "--prompt", PROMPT, "--no-chat", "--method", method, "--index", str(index),
                 "--max-new-tokens", "12")
    if damage == "id outside the vocabulary" or (damage == "n-gram table" and method == "auto"):
        refused(result, NGRAMS if damage == "n-gram table" else TOKENS, "damaged")
    elif result.exit_code == 2:  # a flip made an id outside the vocabulary where REST read
        refused(result, TOKENS, "outside the vocabulary")
    else:
        assert result.exit_code == 0, result.output
        assert result.stdout == plain


@pytest.mark.real_model
def test_a_prompt_streams_its_text_as_steps_are_accepted(model, monkeypatch: pytest.MonkeyPatch):
    """The text printed is the whole output, and it reached stdout in more than one piece, before the run ended."""
    from transformers import TextStreamer

    pieces: list[str] = []
    original = TextStreamer.on_finalized_text

    def record(self, text: str, stream_end: bool = False) -> None:
        pieces.append(text)
        original(self, text, stream_end)

    monkeypatch.setattr(TextStreamer, "on_finalized_text", record)
    result = run("generate", "--prompt", "List three uses of Python.", "--max-new-tokens", "32", "--json-stats")
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stderr.strip().splitlines()[-1])
    assert len([piece for piece in pieces if piece]) > 2
    assert result.stdout.strip() == "".join(pieces).strip() and stats["new_tokens"] == 32


@pytest.mark.real_model
def test_input_shows_a_progress_bar_on_a_terminal_unless_quiet(model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import click.testing

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Count to {n}."}) + "\n" for n in (2, 3)))
    args = ("generate", "--input", str(prompts), "--max-new-tokens", "6", "--method", "pld")
    piped = run(*args)
    assert piped.exit_code == 0 and piped.stderr == "", piped.output
    monkeypatch.setattr(click.testing._NamedTextIOWrapper, "isatty", lambda self: True, raising=False)
    shown = run(*args)
    assert shown.exit_code == 0, shown.output
    assert "2/2" in shown.stderr and "tok/s" in shown.stderr
    assert [json.loads(line)["id"] for line in shown.stdout.splitlines()] == ["1", "2"]
    quiet = run(*args, "--quiet")
    assert quiet.exit_code == 0 and quiet.stderr == ""
