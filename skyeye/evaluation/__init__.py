"""Evaluation on the 8 benchmarks: metrics with the paper's conventions, baselines, the MLflow report."""
