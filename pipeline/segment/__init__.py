"""Lung segmentation building blocks.

- ``pipeline.segment.slices``: axial-slice preprocessing shared by training and inference, and its
  inverse (scores back onto the scan's own slice grid);
- ``pipeline.segment.postprocess``: mask clean-up, right/left labelling and lung volumes in mL.

The stages that use them are ``pipeline.train.segment``, ``pipeline.infer.segment`` and
``pipeline.evaluate.segmentation``.
"""

__all__: list[str] = []
