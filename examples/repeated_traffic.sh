#!/usr/bin/env bash
# Repeated traffic: the same requests again after a restart, with what the drafters learned kept in --state-dir
# (the earlier outputs, the recycling table, the look-ahead pool: versioned files pinned to the tokenizer). The
# second run copies its answers from the first run's and gains more tokens per model step; both runs print
# exactly what plain greedy decoding would. The requests are the first three "questions asked again" of
# data/repeated/traffic.jsonl (the repeated-traffic benchmark's, a chat file of "messages" lists).
#
#   examples/repeated_traffic.sh [STATE_DIR]      # default: a temporary folder
#   MAX_NEW_TOKENS=16 examples/repeated_traffic.sh
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
STATE=${1:-$WORK/state}
.venv/bin/python - "$WORK/requests.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open("data/repeated/traffic.jsonl", encoding="utf-8")]
asked = [r for r in rows if r["set"] == "questions" and r["pass"] == 1][:3]
with open(sys.argv[1], "w", encoding="utf-8") as f:
    for r in asked:
        f.write(json.dumps({"id": r["id"], "messages": r["messages"]}) + "\n")
PY
for run in first second; do
    .venv/bin/retrieval-spec generate --input "$WORK/requests.jsonl" --output "$WORK/$run.jsonl" --state-dir "$STATE" \
        --max-new-tokens "${MAX_NEW_TOKENS:-128}" --quiet
    .venv/bin/python - "$WORK/$run.jsonl" "$run" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1], encoding="utf-8")]
tokens = sum(r["stats"]["new_tokens"] for r in rows)
steps = sum(r["stats"]["steps"] for r in rows)
print(f"{sys.argv[2]} run: {len(rows)} requests, {tokens} tokens in {steps} model steps "
      f"({tokens / steps:.2f} tokens per step)")
PY
done
