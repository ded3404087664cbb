"""Training: the shared loop (``loop.fit``) and the per-task stages (``classify``, ``segment``)."""

from pipeline.train.loop import FitResult, LoopSettings, fit

__all__ = ["FitResult", "LoopSettings", "fit"]
