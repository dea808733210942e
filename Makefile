# Two commands for a fresh machine: `make demo` (whole pipeline on generated data) and `make test`.
# Each sets up .venv first (CPU torch before the rest, so pip does not pull a multi-GB CUDA build).
PY := .venv/bin/python
ENV := DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 WANDB_MODE=disabled OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false

.PHONY: test test-full test-quick demo lint

.venv/.installed: setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# what CI runs: every test but the real-size module (multi-process layouts, faults, DeepSpeed included;
# ~17 min on 2 cores)
test: .venv/.installed
	$(ENV) $(PY) -m pytest -q -m "not realsize"

# everything, with StreetCLIP's ViT-L/14-336 through the CLIs on CPU (~10 min more, 11 GB of RAM)
test-full: .venv/.installed
	$(ENV) $(PY) -m pytest -q

# for iterating: without the tests marked slow (multi-process layouts, faults, ViT-L on CPU)
test-quick: .venv/.installed
	$(ENV) $(PY) -m pytest -q -m "not slow"

demo: .venv/.installed
	$(ENV) $(PY) -m geoloc.demo --out demo_out

lint: .venv/.installed
	$(PY) -m ruff check geoloc tests bench *.py
