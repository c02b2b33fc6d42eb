"""Benchmarks that `coe bench …` and the thin scripts in bench/ run."""
