"""Side-by-side performance measurements; `python benchmarks/run.py` regenerates RESULTS.md."""
