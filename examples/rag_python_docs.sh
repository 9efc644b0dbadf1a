#!/usr/bin/env bash
# RAG over the Python 3.11 documentation: build a token datastore plus dense passages (--dense) from the tutorial
# and the built-in functions page, then answer a question from the retrieved passages, citing them as [id].
# The answer is decoded losslessly, drafting from the retrieved passages (LLMA) and the corpus (REST).
#
#   examples/rag_python_docs.sh ["your question"]        # needs: apt install python3.11-doc; about 2 minutes
set -euo pipefail
cd "$(dirname "$0")/.."
SOURCES=${PYTHON_DOCS:-/usr/share/doc/python3.11/html/_sources}
INDEX=${INDEX:-indexes/python-docs}
QUESTION=${1:-"How do I give a function argument a default value?"}
export HF_HUB_OFFLINE=1

test -d "$SOURCES" || { echo "no Python docs at $SOURCES (apt install python3.11-doc or set PYTHON_DOCS)" >&2; exit 1; }
if [ ! -f "$INDEX/manifest.json" ]; then  # built once; an index already there (yours, via INDEX) is used as it is
    .venv/bin/retrieval-spec build-index "$SOURCES/tutorial" "$SOURCES/library/functions.rst.txt" \
        -o "$INDEX" --dense
fi
.venv/bin/retrieval-spec generate --rag --index "$INDEX" --question "$QUESTION" --passages 4 --max-new-tokens 128
