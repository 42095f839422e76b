# minir1ci: two commands to a working checkout.
#   make install   create .venv and install the project (editable) with its dev extra
#   make test      run the CPU test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# On a machine without an NVIDIA GPU, pin the CPU build of torch so pip never pulls a CUDA build.
TORCH_CPU := torch==2.13.0

.PHONY: install test test-slow test-gpu bench demo ablations clean

install:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		echo "GPU found: installing torch from the index"; $(BIN)/pip install -q -e '.[dev,gym]'; \
	else \
		echo "no GPU: installing the CPU build $(TORCH_CPU)"; $(BIN)/pip install -q '$(TORCH_CPU)' && \
		$(BIN)/pip install -q -e '.[dev,gym]' '$(TORCH_CPU)'; \
	fi

test:
	$(BIN)/python -m pytest -q

test-slow:  # pytest exits 5 when no test carries the mark; that is not a failure
	$(BIN)/python -m pytest -q -m slow || { rc=$$?; [ $$rc -eq 5 ] && echo "no tests are marked slow"; [ $$rc -eq 5 ]; }

test-gpu:
	$(BIN)/python -m pytest -q -m gpu

bench:
	$(BIN)/python bench/sandbox.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/sampler.py --reps 1

demo:
	$(BIN)/python demo.py

ablations:  # after `make demo`: reuses its pretrain, SFT, GRPO and PPO runs
	$(BIN)/python demo.py --ablations

clean:
	rm -rf $(VENV) runs *.egg-info
