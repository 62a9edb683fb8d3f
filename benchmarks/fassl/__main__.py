"""``python -m benchmarks.fassl``: the matrix's stages (run from benchmarks/fassl/)."""

from benchmarks.fassl.driver import main

if __name__ == "__main__":
    raise SystemExit(main())
