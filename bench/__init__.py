"""Benchmarks: each script prints a table, writes JSON (and a PNG where useful) under
bench/results/, and compares ours with the baseline side by side in the same run."""
