"""Benchmarks: speed, memory and accuracy figures recorded in BENCHMARKS.md."""
