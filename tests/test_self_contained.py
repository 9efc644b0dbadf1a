"""A fresh clone with nothing beside it passes: the data the suite reads is in the repository, and the session
fails when any test opens a file beside the checkout (conftest.OutsideReads, an audit hook on every open)."""

from __future__ import annotations

import subprocess

from conftest import OUTSIDE_READS, ROOT, SPEC_BENCH, OutsideReads


def test_reads_beside_the_checkout_are_caught(tmp_path):
    root = tmp_path / "checkout"
    reads = OutsideReads(root)
    reads.allowed = []  # tmp_path lies under the temporary directory, which is otherwise allowed
    reads("open", (str(root / "data" / "x.jsonl"), "r", 0))
    assert reads.seen == []
    reads("open", (str(tmp_path / "shared" / "data" / "dev.jsonl"), "r", 0))
    reads("open", (str(root / ".." / "shared" / "x"), "r", 0))
    assert len(reads.seen) == 2


def test_the_session_hook_is_installed_and_has_seen_nothing_so_far():
    assert OUTSIDE_READS.root == ROOT and OUTSIDE_READS.seen == []


def test_the_dev_split_is_in_the_repository_and_tracked():
    assert SPEC_BENCH.is_relative_to(ROOT) and len(SPEC_BENCH.read_text().splitlines()) == 240
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", str(SPEC_BENCH)], cwd=ROOT,
                             capture_output=True, text=True)
    assert tracked.returncode == 0 or not (ROOT / ".git").exists(), tracked.stderr


def test_no_tracked_file_points_beside_the_checkout():
    beside = ("..", "shared")  # joined below, so that this file does not name the path itself
    needles = ("/".join(beside), 'parent / "' + beside[1] + '"', 'parents[2] / "' + beside[1] + '"')
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    code = [f for f in files if f.endswith((".py", ".sh", ".toml")) or f in ("Makefile", ".ci/run")]
    offenders = [f for f in code if any(needle in (ROOT / f).read_text(errors="ignore") for needle in needles)]
    assert offenders == []
