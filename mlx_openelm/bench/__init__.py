"""Benchmarks: throughput of ours vs mlx-lm on the same weights, and the RMSNorm study."""
