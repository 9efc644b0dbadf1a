#!/usr/bin/env bash
# Edit code with the model: the reply rewrites the whole function, most of it copied from the prompt, so `auto`
# verifies long copies in one step each and picks a copy up again right after an edited token. The output is
# exactly plain greedy decoding's; --json-stats prints the tokens per step and the sources that supplied them.
#
#   examples/code_edit.sh [FILE] [INSTRUCTION]    # default: the demo's bundled function, asking for type hints
#   MAX_NEW_TOKENS=64 examples/code_edit.sh       # a shorter run
set -euo pipefail
cd "$(dirname "$0")/.."
FILE=${1:-retrieval_spec/data/locale_group.py}
INSTRUCTION=${2:-"Add type hints to this function's parameters and return value."}
PROMPT="$INSTRUCTION

\`\`\`python
$(cat "$FILE")
\`\`\`

Reply with the whole function after the edit."
.venv/bin/retrieval-spec generate --prompt "$PROMPT" --max-new-tokens "${MAX_NEW_TOKENS:-256}" --json-stats
