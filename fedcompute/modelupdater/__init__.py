"""Applies an aggregation job's averaged update to model version N, publishing version N + 1."""
