"""The reporting stage: one HTML page a radiologist can read, with figures and the stage metrics.

``run_report(config)`` writes ``RUN/report/index.html``, ``RUN/report/metrics.json`` and
``RUN/report/figures/*.png``; see ``pipeline.report.stage``.
"""

from pipeline.report.stage import run_report

__all__ = ["run_report"]
