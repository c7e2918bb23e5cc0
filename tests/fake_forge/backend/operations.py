"""Fake of ``backend/operations.py``: Forge's layer classes.

``ForgeOperations.Linear`` is a plain ``nn.Module`` holding ``weight``/``bias``
parameters (``operations.py:126-156``), not a ``torch.nn.Linear``; ``Conv2d`` subclasses
``torch.nn.Conv2d`` (``:158``).
"""

from __future__ import annotations

import torch


class ForgeOperations:
    class Linear(torch.nn.Module):
        def __init__(self, in_features, out_features, bias=True):
            super().__init__()
            self.in_features, self.out_features = in_features, out_features
            self.weight = torch.nn.Parameter(torch.randn(out_features, in_features) / in_features**0.5)
            self.bias = torch.nn.Parameter(torch.randn(out_features) * 0.1) if bias else None
            self.scale_weight = None

        def forward(self, x):
            return torch.nn.functional.linear(x, self.weight, self.bias)

    class Conv2d(torch.nn.Conv2d):
        pass


Linear = ForgeOperations.Linear
Conv2d = ForgeOperations.Conv2d
