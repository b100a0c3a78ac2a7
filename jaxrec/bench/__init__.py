"""Benchmarks that print JSON lines (never timed tests)."""
