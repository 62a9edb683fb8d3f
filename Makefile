# The README's commands (run and test set up on first use), plus the benchmarks.
.PHONY: setup run test bench bench-reference bench-scale flower-venv lint matrix screenshots

VENV := .venv/bin
export PATH := $(CURDIR)/.venv/bin:$(PATH)

# The set-up (scripts/setup.sh: .venv from requirements.lock, the project installed, the git + DVC repository) is a
# prerequisite of run and test, redone only when the lock, pyproject.toml or the script is newer than its stamp, or
# the environment or the DVC repository is missing. `make setup` runs it unconditionally.
SETUP_STAMP := .venv/.fedaudio-setup
SETUP_FORCE := $(if $(and $(wildcard .venv/bin/python),$(wildcard .dvc/config)),,FORCE)

setup:
	bash scripts/setup.sh
	@touch $(SETUP_STAMP)

$(SETUP_STAMP): requirements.lock pyproject.toml scripts/setup.sh $(SETUP_FORCE)
	bash scripts/setup.sh
	@touch $@

.PHONY: FORCE
FORCE:

run: $(SETUP_STAMP)
	$(VENV)/python -m flows.pipeline

# Two test workers (pytest-xdist), each taking whole files so a file's shared fixtures are built once.
TEST_WORKERS ?= 2
test: $(SETUP_STAMP)
	$(VENV)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

bench: $(SETUP_STAMP)
	$(VENV)/python -m benchmarks.pipeline

# shared/BENCHMARKS.md's workload: this project beside a bare PyTorch loop and Flower (needs flower-venv)
bench-reference: $(SETUP_STAMP)
	$(VENV)/python -m benchmarks.reference

# cross-device scale: 100 vs 10,000 registered clients, 10 and 50 sampled per round
bench-scale: $(SETUP_STAMP)
	$(VENV)/python -m benchmarks.client_scale --scheme cross_device --algorithm fedavg --clients 100,10000 \
		--sampled 10,50 --rounds 5 --holdout 0 --width 16 --depth 4 --out benchmarks/results/cross_device.json

# a benchmark matrix, a DVC project of its own: make matrix M=robustness (M: robustness, personalisation, fassl,
# modality, earlyexit; hours for the whole matrix, a stale cell at a time)
matrix: $(SETUP_STAMP)
	@test -n "$(M)" -a -f benchmarks/$(M)/dvc.yaml || { echo "usage: make matrix M=<benchmarks/ folder with a dvc.yaml>"; exit 2; }
	cd benchmarks/$(M) && dvc repro

# Flower's simulation engine in its own environment (its pins conflict with Prefect's)
flower-venv:
	bash benchmarks/flower/setup.sh

# docs/img: MLflow's and Prefect's UIs after a run of the default study in a fresh clone (headless Chromium driven
# by Playwright, in .venv-screenshots; Chromium from the system: apt-get install chromium). S="-S federation.rounds=10"
screenshots: $(SETUP_STAMP)
	test -x .venv-screenshots/bin/python || { python3 -m venv .venv-screenshots && .venv-screenshots/bin/pip install -q playwright==1.65.3; }
	.venv-screenshots/bin/python scripts/screenshots.py $(S)

lint: $(SETUP_STAMP)
	$(VENV)/ruff check fedcore tasks flows tests benchmarks scripts
