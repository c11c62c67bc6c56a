"""Metrics of synthetic data against real data, each with its N, seed and, where an estimate, a CI."""
