"""Benchmarks: ratios measured in one run (speed, recipes, browser load), written to BENCHMARKS.md."""
