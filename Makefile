# video_branch: the README's commands.
PY      ?= python3
VENV    ?= .venv
VPY     := $(VENV)/bin/python
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export DS_BUILD_OPS := 0

.PHONY: setup demo test test-fast bench bench-alignment bench-alignment-quick gpu-check wheels lint clean

setup: $(STAMP)

# Torch first (the local CPU wheel here; a bare `torch` requirement would pull a CUDA build), then the project.
$(STAMP): pyproject.toml
	@test -x $(VPY) || $(PY) -m venv $(VENV)
	@$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q "$(TORCH)"
	$(VPY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

demo: setup
	$(VENV)/bin/deepspeed --num_gpus 2 --module video_branch.train --config configs/tiny/demo.yaml

test: setup
	$(VPY) -m pytest -q --durations=15 tests

test-fast: setup
	$(VPY) -m pytest -q -m "not slow" tests

bench: setup
	$(VPY) tools/bench_iteration.py --out runs/bench/iteration.json
	$(VPY) tools/bench_alignment.py --quick --out runs/bench/alignment_quick.json
	$(VPY) tools/bench_memory.py --out runs/bench/memory.json

# Method comparison: 10 presets x 3 seeds x 3 min (1 h 42 min on the 2-core machine); rerun to continue after an interruption.
bench-alignment: setup
	$(VPY) tools/bench_alignment.py --out runs/bench/alignment.json

# Its smoke run: 1 seed, a short budget per preset (under 10 min).
bench-alignment-quick: setup
	$(VPY) tools/bench_alignment.py --quick --out runs/bench/alignment_quick.json

# The prepared one-GPU check (docs/SCALING.md) and the wheel folder it installs from offline.
gpu-check: setup
	PYTHON=$(VPY) tools/gpu_check.sh

wheels: setup
	PYTHON=$(VPY) tools/gpu_check.sh --build-wheels

lint: setup
	$(VPY) -m ruff check video_branch reward_models tools tests
	$(VENV)/bin/lint-imports
	$(VPY) tools/check_import_cycles.py video_branch reward_models

clean:
	rm -rf $(VENV) .cache runs
