#!/usr/bin/env bash
# One command for a lent CUDA GPU (CI never has one): the model zoo on CUDA, Spec-Bench for SmolLM2 and
# Qwen2.5-0.5B in float32 and bfloat16 (one prompt per category: plain, transformers' prompt lookup, ar, pld, auto),
# and the flat-curve run, with every table written to one markdown file. Meant to finish in under 8 minutes on an
# H100; CUDA timings are synchronised by the benchmarks themselves.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]          # default: results/gpu (or $OUT where the device tool sets it)
#
# What it needs there: a python3 whose torch sees CUDA, this checkout installed without dependencies, and the
# packages our requirements name that the machine lacks (carried as wheels in .whl/, see the device README), and
# the converted models in the disk cache (RETRIEVAL_SPEC_CACHE), since a GPU machine here reaches no registry.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-results/gpu}}"
mkdir -p "$OUT_DIR"
REPORT="$OUT_DIR/gpu_check.md"
PY="${PYTHON:-python3}"
if [ -d .whl ]; then
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:$PWD/benchmarks:${PYTHONPATH:-}"
{
  echo "# GPU check, $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo
  "$PY" -c "import torch; print('device:', torch.cuda.get_device_name(0), '· torch', torch.__version__)"
  echo
} > "$REPORT"

section() {  # section TITLE COMMAND...: run a command with a time limit, its table (or its failure) into the report
  local title="$1"; shift
  echo "## $title" >> "$REPORT"
  echo '```' >> "$REPORT"; echo "$*" >> "$REPORT"; echo '```' >> "$REPORT"
  if timeout 150 "$@" > "$OUT_DIR/last.log" 2>&1; then
    sed -n '/^| category/,/^$/p' "$OUT_DIR/last.log" >> "$REPORT"
  else
    echo "FAILED (exit $?):" >> "$REPORT"; tail -5 "$OUT_DIR/last.log" | sed 's/^/    /' >> "$REPORT"
  fi
  echo >> "$REPORT"
}

echo "## Model zoo on CUDA" >> "$REPORT"
timeout 120 "$PY" -m pytest -q -m cuda tests/test_model_zoo.py 2>&1 | tail -3 >> "$REPORT"
echo >> "$REPORT"
for model in smollm2-135m qwen2.5-0.5b; do
  for dtype in float32 bfloat16; do
    section "$model $dtype" "$PY" benchmarks/spec_bench.py --model "$model" --device cuda --dtype "$dtype" --limit 1 \
      --methods ar,pld,auto --out "$OUT_DIR/spec_bench_${model}_${dtype}.json"
  done
done
section "SmolLM2, flat curve, 64 nodes" "$PY" benchmarks/spec_bench.py --device cuda --limit 1 --methods auto \
  --cost flat --budget 64 --out "$OUT_DIR/spec_bench_flat.json"
cat "$REPORT"
