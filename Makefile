# The two commands of the README. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch==2.13.0 is the CPU build that lies on this machine's disk; a plain `torch` would pull a
# multi-GB CUDA build, so it is installed first and only when the venv has no torch yet.
TORCH := torch==2.13.0

.PHONY: demo test venv lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip >/dev/null

$(VENV)/.torch: $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install $(TORCH)
	touch $@

# the plot extra (matplotlib) too: the demo's run folder has a loss.png to look at
$(VENV)/.installed: $(VENV)/.torch pyproject.toml
	$(BIN)/python -m pip install -e ".[plot]"
	touch $@

$(VENV)/.installed-test: $(VENV)/.torch pyproject.toml
	$(BIN)/python -m pip install -e ".[test,plot,parquet,qlora,serve,tensorboard]"
	touch $@ $(VENV)/.installed

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/minilora train

test: $(VENV)/.installed-test
	$(BIN)/ruff check minilora tests benchmarks recipes
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest

lint: $(VENV)/.installed-test
	$(BIN)/ruff check minilora tests benchmarks recipes
	$(BIN)/python -m mypy

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache
