# The three commands of the README, plus the benchmarks.
.PHONY: setup run test bench bench-reference bench-scale flower-venv lint matrix

VENV := .venv/bin
export PATH := $(CURDIR)/.venv/bin:$(PATH)

setup:
	bash scripts/setup.sh

run:
	$(VENV)/python -m flows.pipeline

test:
	$(VENV)/python -m pytest

bench:
	$(VENV)/python -m benchmarks.pipeline

# shared/BENCHMARKS.md's workload: this project beside a bare PyTorch loop and Flower (needs flower-venv)
bench-reference:
	$(VENV)/python -m benchmarks.reference

# cross-device scale: 100 vs 10,000 registered clients, 10 and 50 sampled per round
bench-scale:
	$(VENV)/python -m benchmarks.client_scale --scheme cross_device --algorithm fedavg --clients 100,10000 \
		--sampled 10,50 --rounds 5 --holdout 0 --width 16 --depth 4 --out benchmarks/results/cross_device.json

# a benchmark matrix, a DVC project of its own: make matrix M=robustness (M: robustness, personalisation, fassl,
# modality, earlyexit; hours for the whole matrix, a stale cell at a time)
matrix:
	@test -n "$(M)" -a -f benchmarks/$(M)/dvc.yaml || { echo "usage: make matrix M=<benchmarks/ folder with a dvc.yaml>"; exit 2; }
	cd benchmarks/$(M) && dvc repro

# Flower's simulation engine in its own environment (its pins conflict with Prefect's)
flower-venv:
	bash benchmarks/flower/setup.sh

lint:
	$(VENV)/ruff check fedcore tasks flows tests benchmarks
