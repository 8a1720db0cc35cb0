"""Benchmarks of ntfast against Neural Tangents (pytest-benchmark); see ``bench/README.md``."""
