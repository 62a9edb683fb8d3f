"""``python -m benchmarks.modality``: the matrix's stages (run from benchmarks/modality/)."""

from benchmarks.modality.driver import main

if __name__ == "__main__":
    raise SystemExit(main())
