"""The workload benchmarks' data: builders deterministic, splits stable and disjoint, the committed files whole
and consistent with the builders' rules; nothing here needs a source outside the checkout."""

from __future__ import annotations

import ast
import json
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import DATA, read_jsonl, split_of, take  # noqa: E402
from retrieval_spec.chat import parse_messages  # noqa: E402
from workload_data import (  # noqa: E402
    EDIT_KINDS, agent_chats, code_edit_items, functions, long_docs_items, repeated_items,
)

MODULE = '''
import os

def _helper(path):
    return path


def join_all(parts, sep="/"):
    """Join parts with sep.

    Every part is stripped of its own separators first.
    """
    cleaned = [p.strip(sep) for p in parts]
    joined = sep.join(cleaned)
    print(joined)
    return _helper(joined)


def count_words(s):
    words = s.split()
    total = 0
    for word in words:
        total += 1
    print(total)
    return total


@decorated
def skipped(x):
    return x
'''

FILES = {
    "code_edits": ("prompts.jsonl", lambda row: row["id"]),
    "multi_turn": ("question.jsonl", lambda row: f"mt_bench:{row['question_id']}"),
    "repeated": ("traffic.jsonl", lambda row: row["group"]),
    "long_docs": ("questions.jsonl", lambda row: row["id"]),
}


def candidates(source: str = MODULE):
    return [(f"fixture:{name}", "fixture.py", code, node) for name, code, node in functions(source, "fixture.py")]


def test_a_split_depends_on_its_key_alone_and_holds_about_a_quarter():
    keys = [f"item:{i}" for i in range(2000)]
    splits = [split_of(key) for key in keys]
    assert splits == [split_of(key) for key in keys]
    assert set(splits) == {"tune", "measure"} and 0.2 < splits.count("tune") / len(keys) < 0.3


def test_functions_are_the_undecorated_top_level_ones_of_the_allowed_length():
    assert [name for name, _, _ in functions(MODULE, "fixture.py")] == ["join_all", "count_words"]


def test_code_edit_items_are_deterministic_balanced_and_hold_their_edit():
    items = code_edit_items(candidates(), 10)
    assert items == code_edit_items(list(reversed(candidates())), 10)  # the sample is by id, not input order
    assert len({item["edit"] for item in items}) == len(items) == 2  # two functions, two different kinds
    for item in items:
        assert item["edit"] in EDIT_KINDS and item["split"] == split_of(item["id"])
        assert f"```python\n{item['code']}\n```" in item["prompt"] and item["instruction"] in item["prompt"]
        ast.parse(item["code"])  # what the model is given is valid Python


@pytest.mark.parametrize("kind, expected", [
    ("rename", "Rename the parameter `sep` of `join_all` to `sep_value`"),  # `parts` is used once only
    ("docstring", "Add a docstring to `join_all`"),
    ("type_hints", "Add type hints to every parameter of `join_all`"),
    ("api", "moving from `print` to `logger.info`"),
])
def test_each_edit_kind_says_what_to_change_and_gives_the_code_to_change(kind: str, expected: str):
    from workload_data import edit

    (_, code, node), = [f for f in functions(MODULE, "fixture.py") if f[0] == "join_all"]
    given, instruction = edit(code, node, kind)
    assert instruction.startswith(expected) or expected in instruction
    assert ('"""Join parts' in given) == (kind != "docstring")  # the docstring to write is taken out


def test_repeated_traffic_holds_both_passes_of_every_group_in_one_split_with_other_traffic_between():
    questions = [{"question_id": i, "turns": [f"Question {i}?"]} for i in range(3)]
    documents = [(f"doc{i}", f"def f{i}(x):\n    \"\"\"Doc {i}.\"\"\"") for i in range(4)]
    lines = [f"line {n}" for n in range(1, 40)]
    tasks = [{"task_name": f"t{i}", "origin": "Lib/x.py", "source_lines": lines, "line": 3 + i, "end": 9 + i,
              "tree_hits": [f"Lib/x.py:{3 + i}:def t{i}():"]} for i in range(2)]
    items = repeated_items(questions, documents, tasks)
    assert items == repeated_items(questions, documents, tasks)
    groups = defaultdict(list)
    for item in items:
        groups[item["group"]].append(item)
        assert item["split"] == split_of(item["group"])
        assert parse_messages(item["messages"], item["id"])[-1]["role"] == "user"
    assert all({item["pass"] for item in group} == {1, 2} for group in groups.values())
    passes = [item["pass"] for item in items]
    assert passes == sorted(passes)  # every pass-1 request before pass 2
    assert [item["set"] for item in items[:3]] == ["questions", "extraction", "agent"]  # the sets take turns
    first, second = (next(i for i in items if i["set"] == "questions" and i["pass"] == p) for p in (1, 2))
    assert first["messages"] == second["messages"]  # asked again word for word
    extraction = [i["messages"][0]["content"] for i in items if i["set"] == "extraction"]
    assert len(set(extraction)) == len(extraction) == 4  # one template, other documents


def test_an_agent_step_shows_the_scripted_calls_and_the_real_tool_results_so_far():
    lines = [f"source line {n}" for n in range(1, 30)]
    chats = agent_chats("f", "Lib/m.py", lines, line=5, end=8, tree_hits=["Lib/m.py:5:def f():"])
    assert [len(chat) for chat in chats] == [2, 4, 6]
    assert chats[1][-1]["content"] == "Observation:\nLib/m.py:5:def f():"
    assert chats[2][-1]["content"].splitlines()[1:] == [f"{n:5d}  source line {n}" for n in range(5, 9)]
    assert all("Plan: 1) find the definition" in m["content"] for m in chats[2] if m["role"] == "assistant")


def test_long_docs_questions_name_documented_functions_and_pages_fit_the_size():
    pages = {"library/m.rst.txt": ".. module:: m\n\n.. function:: spam(a, b=1)\n\n   Spam.\n"
                                  ".. function:: eggs()\n",
             "tutorial/big.rst.txt": "word " * 1000, "tutorial/small.rst.txt": "tiny"}
    questions, summaries = long_docs_items(pages)
    assert [q["question"] for q in questions] == ["What does `m.eggs()` do, and what arguments does it take?",
                                                  "What does `m.spam()` do, and what arguments does it take?"]
    assert [s["path"] for s in summaries] == ["tutorial/big.rst.txt"]
    assert (questions, summaries) == long_docs_items(dict(reversed(pages.items())))


@pytest.mark.parametrize("workload", sorted(FILES))
def test_the_committed_data_is_whole_with_disjoint_stable_splits_and_sources(workload: str):
    name, key = FILES[workload]
    rows = read_jsonl(DATA / workload / name)
    ids = [row.get("id", row.get("question_id")) for row in rows]
    assert len(set(ids)) == len(ids)
    assert all(row["split"] == split_of(key(row)) for row in rows)
    tune = take(rows, "tune", category=lambda row: "all")
    measure = take(rows, "measure", category=lambda row: "all")
    assert tune and measure and len(tune) + len(measure) == len(rows)
    assert not {json.dumps(r, sort_keys=True) for r in tune} & {json.dumps(r, sort_keys=True) for r in measure}
    assert "Licence" in (DATA / workload / "SOURCES.md").read_text()


def test_the_committed_sets_have_the_documented_sizes():
    assert len(read_jsonl(DATA / "code_edits" / "prompts.jsonl")) == 100
    questions = read_jsonl(DATA / "multi_turn" / "question.jsonl")
    assert len(questions) == 80 and all(len(q["turns"]) == 2 for q in questions)
    traffic = read_jsonl(DATA / "repeated" / "traffic.jsonl")
    assert {s: len({r["group"] for r in traffic if r["set"] == s}) for s in ("questions", "extraction", "agent")} \
        == {"questions": 24, "extraction": 24, "agent": 12}
    assert len(read_jsonl(DATA / "long_docs" / "pages.jsonl")) == 24


def test_take_limits_each_category_in_file_order():
    rows = [{"category": c, "split": "measure", "n": i} for i, c in enumerate("aabab")]
    assert [r["n"] for r in take(rows, "measure", limit=1)] == [0, 2]
    with pytest.raises(ValueError):
        take(rows, "train")


# --- The benchmark scripts' own logic (no model) -----------------------------------------------------------------


def options(split: str = "measure", limit: int | None = None, categories: str | None = None):
    from argparse import Namespace

    return Namespace(split=split, limit=limit, categories=categories)


def test_select_keeps_the_split_the_categories_and_a_limit_per_category():
    from harness import select

    rows = [{"id": i, "category": c, "split": s} for i, (c, s) in enumerate(
        [("a", "measure"), ("a", "tune"), ("b", "measure"), ("a", "measure"), ("c", "measure"), ("b", "measure")])]
    assert [r["id"] for r in select(rows, options())] == [0, 2, 3, 4, 5]
    assert [r["id"] for r in select(rows, options(limit=1))] == [0, 2, 4]
    assert [r["id"] for r in select(rows, options(categories="b,c"))] == [2, 4, 5]
    assert [r["id"] for r in select(rows, options(split="tune"))] == [1]


def test_count_adds_each_rows_step_counters_and_a_baseline_only_its_tokens_and_seconds():
    from types import SimpleNamespace

    from harness import count

    row = SimpleNamespace(steps=4, draft_ms=1.0, verify_ms=8.0, observe_ms=0.5, phase_ms={"draft": 1.0},
                          paused_steps=1, accepted_by_source={"pld": 6}, drafted_by_source={"pld": 9})
    bucket = defaultdict(float)
    count(bucket, 10, 0.5, [row, row])  # a batch of two rows
    count(bucket, 7, 0.25, [])  # a baseline
    assert dict(bucket) == {"prompts": 2, "seconds": 0.75, "tokens": 17, "steps": 8, "draft_ms": 2.0,
                            "verify_ms": 16.0, "observe_ms": 1.0, "phase_draft": 2.0, "paused_steps": 2,
                            "accepted_pld": 12, "drafted_pld": 18}


def test_repeated_traffic_keeps_or_drops_whole_groups_with_both_passes():
    from repeated import groups

    rows = read_jsonl(DATA / "repeated" / "traffic.jsonl")
    kept = groups(rows, options(limit=1))
    by_group = defaultdict(set)
    for row in kept:
        by_group[row["group"]].add((row["pass"], row["step"]))
        assert row["split"] == "measure"
    assert sorted({row["set"] for row in kept}) == ["agent", "extraction", "questions"] and len(by_group) == 3
    for group, requests in by_group.items():
        assert requests == {(row["pass"], row["step"]) for row in rows if row["group"] == group}  # every request
    assert [row["id"] for row in kept] == [row["id"] for row in rows if row["group"] in by_group]  # in send order


def test_long_docs_without_the_corpus_says_what_to_run_and_skips(monkeypatch, tmp_path, capsys):
    import long_docs

    monkeypatch.setattr(long_docs, "CORPUS", tmp_path / "missing")
    monkeypatch.setattr(sys, "argv", ["long_docs.py", "--limit", "1"])
    long_docs.main()  # returns: no model loaded, no index built
    assert "make workloads" in capsys.readouterr().err
    assert not (tmp_path / "missing").exists()


def test_the_replay_of_a_recorded_workload_copies_from_its_references(tmp_path):
    """A recording made with ``--record`` carries the case's references as token ids, and ``simulate.py`` hands them
    to the engine: an answer quoted from a reference the prompt does not hold is copied from it."""
    import numpy as np

    from retrieval_spec.replay import Recording
    from simulate import replay

    from retrieval_spec.sizing import CostCurve

    rng = np.random.default_rng(0)
    reference = rng.integers(100, 1000, 64).tolist()
    line = {"question_id": "q", "category": "questions", "prompt": [1, 2, 3] + reference[:4],
            "output": reference[4:36], "top": [[t] for t in reference[4:36]], "references": [reference]}
    path = tmp_path / "recorded.jsonl"
    path.write_text(json.dumps(line) + "\n")
    flat = CostCurve(sizes=np.array([1, 64]), ms=np.array([10.0, 10.0]))
    records = Recording.read_jsonl(path)
    with_references = replay("pld", records, flat, None, 64, 1000)["overall"]
    without = replay("pld", [({**meta, "references": []}, r) for meta, r in records], flat, None, 64, 1000)["overall"]
    assert with_references["tokens"] == without["tokens"] == 32
    assert with_references["steps"] <= 4 < without["steps"]


def test_the_ceiling_follows_the_longest_path_that_spells_the_output():
    """``ceiling.py``'s bound of a tree: the sources along its longest root path that the output goes on to take."""
    import numpy as np

    from ceiling import matched_path
    from retrieval_spec.tree import DraftTree

    # root 5 -> 1 (prompt) -> 2 (prompt) -> 3 (recycle), and 9 (recycle) beside 1 under the root.
    tree = DraftTree(np.array([5, 1, 2, 3, 9], np.int32), np.array([-1, 0, 1, 2, 0], np.int32),
                     np.ones(5, np.float32), np.array([0, 1, 1, 4, 4], np.uint8))
    assert matched_path(tree, np.array([1, 2, 3, 4])) == [1, 1, 4]
    assert matched_path(tree, np.array([1, 2, 7])) == [1, 1]
    assert matched_path(tree, np.array([9, 1])) == [4]
    assert matched_path(tree, np.array([4])) == [] and matched_path(tree, np.array([], np.int32)) == []
