"""Fake of ``backend/modules/k_model.py``: ``KModel.apply_model`` returns the x0 estimate.

Order as in ``k_model.py:25-46``: scale the input, append ``c_concat`` channels, map
sigma to the net's timestep, run the net, return ``predictor.calculate_denoised``.
"""

from __future__ import annotations

import torch

from .. import memory_management


class _Config:
    def __init__(self, huggingface_repo):
        self.huggingface_repo = huggingface_repo


class KModel(torch.nn.Module):
    def __init__(self, model, predictor, huggingface_repo):
        super().__init__()
        self.diffusion_model = model
        self.predictor = predictor
        self.config = _Config(huggingface_repo)
        self.storage_dtype = torch.float32
        self.computation_dtype = torch.float32
        self.calls = 0  # model calls, for tests and benchmarks that count them per step

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kwargs):
        self.calls += 1
        sigma = t
        xc = self.predictor.calculate_input(sigma, x)
        if c_concat is not None:
            xc = torch.cat([xc, c_concat], dim=1)
        out = self.diffusion_model(xc, self.predictor.timestep(t).float(), context=c_crossattn, control=control,
                                   transformer_options=transformer_options or {}, **kwargs).float()
        return self.predictor.calculate_denoised(sigma, out, x)

    def memory_required(self, input_shape):
        area = input_shape[0] * input_shape[2] * input_shape[3]
        return 1.28 * area * memory_management.dtype_size(self.computation_dtype) * 16384
