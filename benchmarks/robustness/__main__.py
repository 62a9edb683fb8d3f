"""``python -m benchmarks.robustness``: the matrix's stages (run from benchmarks/robustness/)."""

from benchmarks.robustness.driver import main

if __name__ == "__main__":
    raise SystemExit(main())
