"""Benchmarks: every stage against what a user would otherwise run, side by side in one run, as JSON."""
