"""An ensemble of classifiers that averages their class probabilities.

``Ensemble`` returns the log of the members' mean softmax, so a softmax of its output is exactly
that mean: every caller that applies ``softmax`` to a model's logits works on an ensemble unchanged.
The cross-validation ensemble of ``pipeline.train.classify`` (``classify.folds``) is one of these,
saved and loaded as a single state_dict.

Example:
    >>> members = [nn.Linear(4, 2), nn.Linear(4, 2)]
    >>> x = torch.randn(3, 4)
    >>> mean = (members[0](x).softmax(1) + members[1](x).softmax(1)) / 2
    >>> torch.allclose(Ensemble(members)(x).softmax(1), mean)
    True
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["Ensemble"]


class Ensemble(nn.Module):
    """Members applied to the same input; the output is log(mean of their softmax probabilities)."""

    def __init__(self, members: Iterable[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        if not len(self.members):
            raise ValueError("an ensemble needs at least one member")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        log_probs = torch.stack([torch.log_softmax(m(x), dim=1) for m in self.members])
        return torch.logsumexp(log_probs, dim=0) - math.log(len(self.members))
