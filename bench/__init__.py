"""Benchmarks that run the real gateway and supervisor; docs/benchmarks.md has the results."""
