"""Benchmark and check scripts of the repository (run as ``python -m benchmarks.<name>``)."""
