"""Metrics for the classify and segment stages, with bootstrap confidence intervals."""
