"""``python -m benchmarks.earlyexit``: the matrix's stages (run from benchmarks/earlyexit/)."""

from benchmarks.earlyexit.driver import main

if __name__ == "__main__":
    raise SystemExit(main())
