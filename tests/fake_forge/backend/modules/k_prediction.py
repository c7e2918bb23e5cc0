"""Fake of ``backend/modules/k_prediction.py``: eps (SD) and flow (Flux) parameterisations.

``calculate_denoised`` turns the network output into the x0 estimate every Forge hook
sees (``k_prediction.py:81-92``).
"""

from __future__ import annotations

import torch


class PredictionEps:
    prediction_type = "epsilon"

    def __init__(self, sigma_min=0.03, sigma_max=14.6):
        self.sigmas = torch.exp(torch.linspace(float(torch.log(torch.tensor(sigma_max))),
                                               float(torch.log(torch.tensor(sigma_min))), 1000))

    def calculate_input(self, sigma, noise):
        return noise / (sigma.view(-1, 1, 1, 1) ** 2 + 1.0) ** 0.5

    def timestep(self, sigma):
        return sigma.log() * 50 + 500  # any monotonic map: the net only embeds it

    def calculate_denoised(self, sigma, model_output, model_input):
        return model_input - model_output * sigma.view(-1, 1, 1, 1)

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        return latent_image + noise * sigma


class PredictionFlux:
    """Flow matching: the DiT predicts v = noise - x0; x = sigma * noise + (1 - sigma) * x0."""

    prediction_type = "const"

    def calculate_input(self, sigma, noise):
        return noise

    def timestep(self, sigma):
        return sigma

    def calculate_denoised(self, sigma, model_output, model_input):
        return model_input - model_output * sigma.view(-1, 1, 1, 1)

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        return sigma * noise + (1.0 - sigma) * latent_image
