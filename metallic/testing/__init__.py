"""Inputs that tests and benchmarks build on the fly instead of downloading (synthetic.py)."""
