# The two commands of the README. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch==2.13.0 is the CPU build that lies on this machine's disk; a plain `torch` would pull a
# multi-GB CUDA build, so it is installed first and only when the venv has no torch yet.
TORCH := torch==2.13.0

.PHONY: demo test test-gguf venv lint clean

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
	$(BIN)/python -m pip install -e ".[test,plot,parquet,qlora,serve,tensorboard,gguf]"
	touch $@ $(VENV)/.installed

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/minilora train

test: $(VENV)/.installed-test
	$(BIN)/ruff check minilora tests benchmarks recipes
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest

# llama.cpp itself checks the exported GGUF files (tokenization, logits, greedy tokens, LoRA
# adapter, chat stop). llama-cpp-python has no wheel: pip builds it from source (CPU only; 36
# minutes measured on 2 cores shared with other jobs; pip caches the built wheel).
$(VENV)/.installed-llama: $(VENV)/.installed-test
	CMAKE_ARGS="-DGGML_CUDA=OFF -DGGML_BLAS=OFF -DLLAMA_CURL=OFF -DGGML_OPENMP=OFF" \
	    CMAKE_BUILD_PARALLEL_LEVEL=2 $(BIN)/python -m pip install -e ".[llama]"
	touch $@

test-gguf: $(VENV)/.installed-llama
	$(BIN)/python -m pytest tests/export -p no:cacheprovider

lint: $(VENV)/.installed-test
	$(BIN)/ruff check minilora tests benchmarks recipes
	$(BIN)/python -m mypy

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache
