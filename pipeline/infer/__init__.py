"""Inference stages: ``classify`` and ``segment`` predictions on new scans."""
