#!/usr/bin/env bash
# One command for a lent CUDA GPU (CI never has one): the model zoo on CUDA, Spec-Bench for SmolLM2 and
# Qwen2.5-0.5B in float32 and bfloat16 (one prompt per category: plain, transformers' prompt lookup, ar, pld, auto),
# and the flat-curve run, with every table written to one markdown file. Meant to finish in under 8 minutes on an
# H100; CUDA timings are synchronised by the benchmarks themselves.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]          # default: results/gpu (or $OUT where the device tool sets it)
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_ARGS="--max-new-tokens 4" PYTHON=.venv/bin/python \
#     bash benchmarks/gpu_check.sh /tmp/dry         # a dry run of the plumbing here, on the CPU
#
# A GPU machine here reaches no registry: `python benchmarks/gpu_stage.py` stages the models and the wheels our
# dependencies need there into .gpu/ and prints the device calls that carry them (the models do not fit one call);
# this script unpacks whatever arrived (`gpu_stage.py --unpack`) and checks the models that did. Without .gpu/ it
# takes the models as installed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-results/gpu}}"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
read -r -a EXTRA <<< "${GPU_CHECK_ARGS:-}"
mkdir -p "$OUT_DIR"
REPORT="$OUT_DIR/gpu_check.md"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD:$PWD/benchmarks:${PYTHONPATH:-}"
MODELS="smollm2-135m qwen2.5-0.5b"
if [ -f .gpu/manifest.json ]; then
  SITE="${GPU_CHECK_SITE:-/tmp/site}"
  MODELS="$("$PY" benchmarks/gpu_stage.py --unpack "$SITE" 2> "$OUT_DIR/unpack.log" | tr '\n' ' ')" || MODELS=""
  export PYTHONPATH="$SITE:$PYTHONPATH"
fi
{
  echo "# GPU check, $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo
  "$PY" -c "import torch; print('device:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA',
'· torch', torch.__version__)"
  echo "models: ${MODELS:-none} $(cat "$OUT_DIR/unpack.log" 2>/dev/null)"
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
timeout 120 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_model_zoo.py 2>&1 | tail -3 >> "$REPORT"
echo >> "$REPORT"
# The most telling tables first (the report grows section by section, so a run cut short still says something):
# SmolLM2 in float32, then its flat-curve run, then bfloat16, then Qwen. Each model is converted to a checkpoint
# once, before its sections and outside their time limits.
for model in $MODELS; do
  timeout 300 "$PY" -c "from retrieval_spec.models import load_model; load_model('$model')" > "$OUT_DIR/last.log" 2>&1 \
    || { echo "loading $model FAILED:" >> "$REPORT"; tail -5 "$OUT_DIR/last.log" | sed 's/^/    /' >> "$REPORT"; }
  for dtype in float32 bfloat16; do
    section "$model $dtype" "$PY" benchmarks/spec_bench.py --model "$model" --device "$DEVICE" --dtype "$dtype" \
      --limit 1 --methods ar,pld,auto "${EXTRA[@]}" --out "$OUT_DIR/spec_bench_${model}_${dtype}.json"
    if [ "$model $dtype" = "smollm2-135m float32" ]; then
      section "SmolLM2, flat curve, 64 nodes" "$PY" benchmarks/spec_bench.py --device "$DEVICE" --limit 1 \
        --methods auto --cost flat --budget 64 "${EXTRA[@]}" --out "$OUT_DIR/spec_bench_flat.json"
    fi
  done
done
cat "$REPORT"
