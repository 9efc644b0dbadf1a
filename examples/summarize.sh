#!/usr/bin/env bash
# Summarise documents from JSONL ("text" per line), decoding with each document as the copy source: the output
# is exactly plain greedy decoding's, in fewer model steps. The documents are three Spec-Bench news articles.
#
#   examples/summarize.sh [docs.jsonl] [out.jsonl]        # a few minutes on the default smollm2-135m
set -euo pipefail
cd "$(dirname "$0")/.."
DOCS=${1:-}
OUT=${2:-results/summaries.jsonl}
SPEC_BENCH=${SPEC_BENCH:-data/spec_bench/dev.jsonl}
mkdir -p "$(dirname "$OUT")"

if [ -z "$DOCS" ]; then
    DOCS=$(mktemp --suffix=.jsonl)
    trap 'rm -f "$DOCS"' EXIT
    .venv/bin/python - "$SPEC_BENCH" "$DOCS" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1], encoding="utf-8")]
articles = [r for r in rows if r["category"] == "summarization"][:3]
with open(sys.argv[2], "w", encoding="utf-8") as f:
    for r in articles:
        f.write(json.dumps({"id": r["question_id"], "text": r["turns"][0].removeprefix("Summarize: ")}) + "\n")
PY
fi
.venv/bin/retrieval-spec generate --task summarize --input "$DOCS" --output "$OUT" --method pld --max-new-tokens 128
.venv/bin/python - "$OUT" <<'PY'
import json, sys
for line in open(sys.argv[1], encoding="utf-8"):
    row = json.loads(line)
    s = row["stats"]
    print(f"--- {row['id']}: {s['new_tokens']} tokens in {s['steps']} steps ({s['mean_accepted']:.2f} tokens/step)")
    print(row["text"].strip())
PY
