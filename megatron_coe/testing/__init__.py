"""Helpers for CPU tests and benchmarks: forked gloo workers and tiny CoE configs."""
