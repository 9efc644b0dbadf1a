"""Long documents with a corpus: questions answered from passages retrieved from the Python documentation, and
summaries of whole pages, with the documentation as the corpus of REST too.

    make workloads                                                    # once: the docs corpus (Debian python3.11-doc)
    python benchmarks/long_docs.py                                    # the held-out items, ar,pld,rest,auto
    python benchmarks/long_docs.py --model qwen2.5-0.5b
    python benchmarks/long_docs.py --limit 1 --max-new-tokens 16 --index indexes/python-docs-tutorial \\
        --index-from data/long_docs/python3.11-doc/_sources/tutorial  # a smoke run on a small index

The corpus is the Python 3.11 documentation's reST sources (``make workloads`` unpacks them into
``data/long_docs/python3.11-doc``; ``SOURCES.md``). Its index (``--index``, default
``indexes/python-docs_<model>``) is built on first use from the whole documentation (``--index-from``) by
``retrieval-spec build-index CORPUS -o INDEX --dense``: a token datastore for REST (``rest``, and ``auto``'s
corpus source) and dense passages for retrieval.
Two categories: ``questions`` (``data/long_docs/questions.jsonl``: "what does module.function() do ...",
answered from the ``--passages`` passages the dense index retrieves, in ``retrieval_spec.rag``'s prompt, the
passages also given to our methods as references) and ``summaries`` (``pages.jsonl``: whole pages of 1,000-3,000
tokens, in ``rag.summarize_prompt``, the page also a reference).

Per item, plain ``generate()``, transformers' prompt lookup and our methods run in rotating order in one process
(``harness.py``); in float32 every output of ours must equal plain greedy or the script exits non-zero. Writes
JSON (``--out``, default ``results/long_docs_<model>.json``), a markdown table and a PNG chart beside it.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
from pathlib import Path

from common import DATA, ROOT, read_jsonl
from harness import Case, Harness, default_out, harness_arguments, run_cases, select, workload_arguments
from retrieval_spec.datastore.manifest import MANIFEST
from retrieval_spec.generate import encode
from retrieval_spec.rag import DenseIndex, rag_prompt, summarize_prompt

CORPUS = DATA / "long_docs" / "python3.11-doc" / "_sources"
QUESTIONS = DATA / "long_docs" / "questions.jsonl"
PAGES = DATA / "long_docs" / "pages.jsonl"
PASSAGES = 5  # passages retrieved into a question's prompt


def default_index(model: str) -> Path:
    """Where the docs' datastore and dense passages for ``model``'s tokenizer live by default."""
    return ROOT / "indexes" / f"python-docs_{Path(model).name}"


def no_docs(missing: Path) -> str:
    """What to run when the docs are not at ``missing``."""
    return (f"no Python docs at {missing}. Run `make workloads` (apt-get download python3.11-doc, unpacked into the "
            "checkout without root); without apt, unpack any python3.11-doc .deb with `dpkg-deb -x` and move "
            f"usr/share/doc/python3.11/html/_sources to {CORPUS}.")


def ensure_index(corpus: Path, index: Path, model: str) -> None:
    """Build the corpus's token datastore and dense passages at ``index`` unless one is there (minutes, once;
    an index built without ``--dense`` is refused by :meth:`DenseIndex.open`, naming the rebuild)."""
    if (index / MANIFEST).is_file():
        return
    print(f"building {index} from {corpus} (once)", file=sys.stderr)
    command = Path(sys.executable).parent / "retrieval-spec"
    subprocess.run([str(command), "build-index", str(corpus), "-o", str(index), "--dense", "--model", model, "--force"],
                   check=True)


def cases(tokenizer, dense: DenseIndex, corpus: Path, questions: list[dict], pages: list[dict],
          passages: int) -> list[Case]:
    """The questions with their retrieved passages, then the pages to summarise (``examples/vllm_serve.py
    --workload long_docs`` serves the same prompts)."""
    out = []
    for question in questions:
        found = dense.search(question["question"], passages)
        prompt = rag_prompt(tokenizer, question["question"], found)
        out.append(Case(question["id"], "questions", encode(tokenizer, prompt), tuple(p.text for p in found)))
    for page in pages:
        text = (corpus / page["path"]).read_text(encoding="utf-8")
        if hashlib.sha256(text.encode()).hexdigest() != page["sha256"]:
            print(f"warning: {page['path']} differs from the page pages.jsonl was built from (another "
                  "python3.11-doc version)", file=sys.stderr)
        out.append(Case(page["id"], "summaries", encode(tokenizer, summarize_prompt(tokenizer, text)), (text,)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness_arguments(parser, methods="ar,pld,rest,auto")
    workload_arguments(parser, "items")
    parser.add_argument("--index-from", type=Path, default=CORPUS,
                        help="what a missing --index is built from (default: the whole documentation)")
    parser.add_argument("--passages", type=int, default=PASSAGES, help="passages retrieved into a question's prompt")
    args = parser.parse_args()
    if not CORPUS.is_dir() or not args.index_from.is_dir():
        print(f"long_docs skipped: {no_docs(CORPUS if not CORPUS.is_dir() else args.index_from)}", file=sys.stderr)
        return
    args.index = args.index or default_index(args.model)
    ensure_index(args.index_from, args.index, args.model)
    bench = Harness(args)
    questions = select(read_jsonl(QUESTIONS), args, category=lambda row: "questions")
    pages = select(read_jsonl(PAGES), args, category=lambda row: "summaries")
    run_cases(bench, cases(bench.tokenizer, DenseIndex.open(args.index), CORPUS, questions, pages, args.passages),
              "long documents")
    report = bench.report(workload="long_docs", split=args.split, limit_per_category=args.limit,
                          passages=args.passages)
    bench.finish(report, default_out(args, "long_docs"), f"Python docs: questions and summaries ({args.split})")


if __name__ == "__main__":
    main()
