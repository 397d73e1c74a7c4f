"""`python -m benchmarks.bench`: see `benchmarks.bench.cli`."""

from benchmarks.bench.cli import main

if __name__ == "__main__":
    main()
