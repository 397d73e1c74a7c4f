"""Benchmarks of vishwam: `python -m benchmarks.bench` (the step vs PyTorch + transformers) and
`python -m benchmarks.bench_teacher` (teacher loading modes), run from the repository root. torch and
transformers are imported only here, never by the library. `benchmarks.common` holds what the scripts share
(logging, timing, child processes, machine and commit, mean ± sd, markdown and JSON output)."""
