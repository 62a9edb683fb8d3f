"""``python -m benchmarks.personalisation``: the matrix's stages (run from benchmarks/personalisation/)."""

from benchmarks.personalisation.driver import main

if __name__ == "__main__":
    raise SystemExit(main())
