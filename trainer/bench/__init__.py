"""Benchmarks: the QPS price of balancing, and the regression gate."""
