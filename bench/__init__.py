"""Benchmarks: `make bench` (bench/run.py) measures each part of the product against its limit, interleaved."""
