"""Benchmarks: step time, kernels, memory, compile time, scaling over devices."""
