"""Files of ours against a hostile directory: no link followed, nothing overwritten or deleted that a build did not
write, no result written over what the run reads or writes. Every refusal is one line, exit code 2, and leaves
every file as it was (checksums of the whole tree before and after)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import Result

from retrieval_spec import models
from retrieval_spec.builders.build import build_index_from_tokens
from retrieval_spec.builders.publish import LOCK
from retrieval_spec.datastore.manifest import MANIFEST, TokenizerFingerprint
from retrieval_spec.datastore.reader import Datastore
from test_builders import CharTokenizer
from test_cli import refused, run

pytestmark = pytest.mark.usefixtures("no_fsync")  # conftest: durability is not under test here

FINGERPRINT = TokenizerFingerprint("fake/char", 40, "0" * 64)


def checksums(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (links not followed): a file's sha256, a link's target, or "folder"."""
    found = {}
    for folder, folders, files in os.walk(root):
        for name in folders + files:
            path = Path(folder, name)
            relative = str(path.relative_to(root))
            if path.is_symlink():
                found[relative] = "link to " + os.readlink(path)
            elif path.is_dir():
                found[relative] = "folder"
            else:
                found[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


@pytest.fixture
def tokenizer(monkeypatch: pytest.MonkeyPatch) -> CharTokenizer:
    """build-index's tokenizer, without a model."""
    monkeypatch.setattr(models, "load_tokenizer", lambda name: CharTokenizer())
    return CharTokenizer()


def build_cli(corpus: Path, out: Path, *extra: str) -> Result:
    return run("build-index", str(corpus), "-o", str(out), "--quiet", "--workers", "1", *extra)


@pytest.mark.parametrize("existing_index", [False, True])
def test_a_build_lock_that_is_a_link_is_refused_and_its_target_kept(tmp_path: Path, tokenizer, existing_index: bool):
    (tmp_path / "c.txt").write_text("hi")
    index = tmp_path / "idx"
    if existing_index:
        assert build_cli(tmp_path / "c.txt", index).exit_code == 0
    else:
        index.mkdir()
    (tmp_path / "victim").write_text("precious")
    (index / LOCK).symlink_to(tmp_path / "victim")
    before = checksums(tmp_path)
    refused(build_cli(tmp_path / "c.txt", index, *(["--force"] if existing_index else [])),
            f"{index / LOCK}: a symbolic link, not a build lock")
    assert checksums(tmp_path) == before and (tmp_path / "victim").read_text() == "precious"


def test_a_build_lock_of_the_user_s_is_kept_when_the_build_is_refused(tmp_path: Path, tokenizer):
    (tmp_path / "c.txt").write_text("hi")
    project = tmp_path / "proj"
    project.mkdir()
    (project / LOCK).write_text("notes")
    (project / "Makefile").write_text("all:")
    before = checksums(tmp_path)
    refused(build_cli(tmp_path / "c.txt", project), f"{project / LOCK}: holds something that is not a build lock")
    assert checksums(tmp_path) == before
    (project / LOCK).unlink()
    refused(build_cli(tmp_path / "c.txt", project), "holds no index (it holds 'Makefile')")


def test_force_deletes_only_what_a_build_s_own_marker_names(tmp_path: Path, tokenizer):
    """A manifest edited to name a folder of the user's, or a copy of a generation under another name, does not
    get them deleted: only the previous generation, whose marker names it, goes."""
    (tmp_path / "c.txt").write_text("hi")
    index = tmp_path / "idx"
    assert build_cli(tmp_path / "c.txt", index).exit_code == 0
    previous = next(index.glob("gen-*"))
    (index / "gen-photos").mkdir()
    (index / "gen-photos" / "x.jpg").write_bytes(b"\xff\xd8 a photo")
    shutil.copytree(previous, index / "gen-backup")
    manifest = json.loads((index / MANIFEST).read_text())
    manifest["shards"][0]["path"] = "gen-photos/x"
    (index / MANIFEST).write_text(json.dumps(manifest))
    kept = {name: digest for name, digest in checksums(tmp_path).items()
            if name.startswith(("idx/gen-photos", "idx/gen-backup", "c.txt"))}
    result = build_cli(tmp_path / "c.txt", index, "--force")
    assert result.exit_code == 0, result.output
    after = checksums(tmp_path)
    assert {name: after.get(name) for name in kept} == kept
    assert not previous.exists() and Datastore.open(index).num_tokens == 2


@pytest.fixture
def places(tmp_path: Path) -> dict[str, Path]:
    """An index, a state directory and a model directory that a run reads or writes."""
    index = tmp_path / "idx"
    build_index_from_tokens([np.arange(50) % 7], index, FINGERPRINT, progress=False)
    state = tmp_path / "st"
    state.mkdir()
    (state / "recycling.npz").write_bytes(b"state")
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    (model / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "hi"}\n')
    return {"index": index, "state": state, "model": model, "cache": tmp_path / "cache"}


@pytest.mark.parametrize("target, named", [
    ("idx/manifest.json", "the index"),
    ("idx/gen-*/shard-00000/tokens.bin", "the index"),
    ("idx/new/out.jsonl", "the index"),
    ("st/recycling.npz", "the state directory"),
    ("m/config.json", "the model directory"),
    ("m/model.safetensors", "the model directory"),
    ("cache/costs/x.json", "the cache"),
    ("link-to-idx/manifest.json", "the index"),
    ("hard-link-of-tokens.bin", "the index"),
    ("link-to-st", "the state directory"),
])
def test_an_output_in_what_the_run_reads_or_writes_is_refused(
    tmp_path: Path, places: dict[str, Path], monkeypatch: pytest.MonkeyPatch, target: str, named: str
):
    monkeypatch.setenv("RETRIEVAL_SPEC_CACHE", str(places["cache"]))
    (places["cache"] / "costs").mkdir(parents=True)
    (places["cache"] / "costs" / "x.json").write_text("{}")
    (tmp_path / "link-to-idx").symlink_to(places["index"])
    (tmp_path / "link-to-st").symlink_to(places["state"] / "recycling.npz")
    os.link(next(places["index"].glob("gen-*/shard-00000/tokens.bin")), tmp_path / "hard-link-of-tokens.bin")
    output = next(tmp_path.glob(target)) if "*" in target else tmp_path / target
    before = checksums(tmp_path)
    for input_option in (["--prompt", "hi"], ["--input", str(tmp_path / "prompts.jsonl")]):
        refused(run("generate", *input_option, "--method", "rest", "--index", str(places["index"]), "--state-dir",
                    str(places["state"]), "--model", str(places["model"]), "--output", str(output)),
                f"--output {output} lies in {named}", "write them outside it")
    assert checksums(tmp_path) == before


KILLED_SAVE = """
import sys
from pathlib import Path
from retrieval_spec.drafters.lookahead import LookaheadDrafter

print("saving", flush=True)
LookaheadDrafter().save(Path(sys.argv[1]), "0" * 64)  # held before its rename by RETRIEVAL_SPEC_COMMIT_DELAY
"""


def test_temporaries_of_a_save_killed_before_its_rename_go_with_the_next_save(tmp_path: Path):
    from retrieval_spec.drafters.lookahead import LookaheadDrafter

    environment = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
                   "RETRIEVAL_SPEC_COMMIT_DELAY": "60"}
    saving = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(tmp_path)], env=environment,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert saving.stdout.readline() == "saving\n"
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(".lookahead_pool.npz.*.tmp")):
            assert time.monotonic() < deadline and saving.poll() is None
            time.sleep(0.05)
    finally:
        saving.kill()  # kill -9 between writing the temporary file and renaming it
        saving.wait()
    abandoned = next(tmp_path.glob(".lookahead_pool.npz.*.tmp"))
    alive = tmp_path / f".lookahead_pool.npz.{os.getppid()}.4567cdef.tmp"  # a writer still running
    other = tmp_path / f".recycling.npz.{saving.pid}.89abcdef.tmp"  # another file's: its own save removes it
    for path in (alive, other):
        path.write_bytes(b"half")
    LookaheadDrafter().save(tmp_path, "0" * 64)
    assert not abandoned.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, other.name, "lookahead_pool.npz"])
