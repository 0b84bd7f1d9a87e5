"""MonteCLoRA, Monte Carlo low-rank adaptation (``monteclora_config``).

In training, A is replaced by a weighted mixture of N = ``num_samples`` noisy copies:

    A_eff = Σₙ wₙ (A + εₙᵀ)          εₙ (in × r) with rows ~ 𝒩(0, c² Σ),  w = softmax(ℓ)

Σ (r × r, diagonal) is drawn from a Wishart with scale diag(exp(σ))² and r degrees of freedom,
ℓ from a Gaussian (Laplace) approximation of a Dirichlet with concentrations exp(π); σ
(``std_prior``) and π (``expert_weights_prior``) are trainable, c is ``sample_scaler``. The
standard-normal and Wishart draws behind each step are made ``buffer_size`` steps at a time.
Outside training the adapter is plain LoRA, and so is its merged weight.
``LoraModel._get_monteclora_loss`` gives the variational loss: the KL divergences of the
three distributions from their priors (weighted by ``kl_loss_weight``) plus, with
``use_entropy``, Σ w².
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from peft_kernel import PeftWarning

from . import LoraVariant

_EPS = 1e-3  # floor of the drawn variances


def _wishart_identity(p: int, device) -> torch.Tensor:
    """One draw of a p × p Wishart with identity scale and p degrees of freedom, by Bartlett's
    construction L Lᵀ: L lower-triangular, L_ii = √χ²(p − i), L_ij ~ 𝒩(0, 1) below the diagonal.
    (torch's ``Wishart.rsample`` draws twice per sample in torch 2.13: it takes every valid
    sample for a singular one and redraws it.)"""
    chi2 = torch.distributions.Chi2(torch.arange(p, 0, -1, dtype=torch.float32, device=device))
    factor = torch.diag(chi2.rsample().sqrt().clamp_min(torch.finfo(torch.float32).eps))
    below = torch.tril_indices(p, p, offset=-1, device=device)
    factor[below[0], below[1]] = torch.randn(p * (p - 1) // 2, device=device)
    return factor @ factor.T


class MonteCarloSampler(nn.Module):
    """One adapter's variational parameters, and the noise draws made ahead of use.

    ``gaussian_var_prior`` and ``expert_weights`` are buffers holding the latest drawn noise
    covariance Σ and mixture weights w (HF PEFT's checkpoint keys; the loss reads Σ)."""

    def __init__(self, in_features: int, rank: int, settings, device=None, dtype=None) -> None:
        super().__init__()
        self.in_features, self.rank, self.settings = in_features, rank, settings
        samples = settings.num_samples
        meta = device is not None and torch.device(device).type == "meta"
        draw = torch.empty if meta else torch.rand
        self.std_prior = nn.Parameter(draw(rank, device=device, dtype=dtype))
        self.expert_weights_prior = nn.Parameter(draw(samples, device=device, dtype=dtype))
        self.register_buffer("gaussian_var_prior", torch.eye(rank, device=device, dtype=dtype))
        self.register_buffer("expert_weights", torch.full((samples,), 1 / samples, device=device, dtype=dtype))
        self._draws: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._next = 0
        if not meta:
            self._refill()

    def _refill(self) -> None:
        """``buffer_size`` draws of (ε noise, Wishart factor, Dirichlet noise), made together."""
        count, samples = self.settings.buffer_size, self.settings.num_samples
        device, dtype = self.std_prior.device, self.std_prior.dtype
        with torch.no_grad():
            gaussian = torch.randn(count, samples, self.in_features, self.rank, device=device, dtype=dtype)
            dirichlet = torch.randn(count, samples, device=device, dtype=dtype)
            self._draws = [(gaussian[i], _wishart_identity(self.rank, device).to(dtype), dirichlet[i])
                           for i in range(count)]
        self._next = 0

    def next_draw(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._next >= len(self._draws):
            self._refill()
        self._next += 1
        return self._draws[self._next - 1]

    def forward(self, draw) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ε (N × in × r), w (N,))`` from one draw (:meth:`next_draw`): a differentiable
        function of the priors."""
        gaussian, wishart, dirichlet = (t.to(self.std_prior) for t in draw)
        std = torch.exp(self.std_prior)
        variances = torch.clamp(std * wishart.diagonal() * std, min=_EPS)  # the diagonal of S W S
        noise = torch.nan_to_num(gaussian * variances.sqrt(), nan=_EPS) * self.settings.sample_scaler  # rows ~ 𝒩(0, Σ)
        covariance = torch.diag(variances)
        logits = self._dirichlet_logits(torch.exp(self.expert_weights_prior), dirichlet)
        self.gaussian_var_prior = covariance
        self.expert_weights = torch.softmax(logits, dim=-1)
        return noise, self.expert_weights

    def _dirichlet_logits(self, alpha: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Logits of Dir(α) through its Laplace approximation in the softmax basis:
        mean log α − mean(log α), diagonal variance (1 − 2/N)/α + Σ(1/α)/N²."""
        samples = alpha.shape[0]
        alpha = alpha.clamp_min(1e-6)
        mean = alpha.log() - alpha.log().mean()
        variance = (1 / alpha * (1 - 2 / samples) + (1 / alpha).sum() / samples**2).clamp_min(1e-6) + 1e-6
        return variance.sqrt() * z + mean

    def variational_loss(self) -> torch.Tensor | float:
        """``kl_loss_weight`` · (KL of the Dirichlet, Wishart and Gaussian from their priors)
        (+ Σ w² with ``use_entropy``); 0.0 outside training."""
        if not self.training:
            return 0.0
        settings, rank, samples = self.settings, self.rank, self.settings.num_samples
        alpha = torch.exp(self.expert_weights_prior)
        prior = torch.full_like(alpha, settings.dirichlet_prior)
        kl_dirichlet = torch.distributions.kl_divergence(torch.distributions.Dirichlet(alpha),
                                                         torch.distributions.Dirichlet(prior))
        variance = torch.exp(self.std_prior) ** 2
        kl_wishart = 0.5 * rank * (variance.sum() - variance.log().sum() - rank)
        drawn = self.gaussian_var_prior.diagonal().clamp_min(1e-6)
        kl_gaussian = 0.5 * samples * (drawn.sum() - drawn.log().sum() - rank)
        loss = settings.kl_loss_weight * (kl_dirichlet + kl_wishart + kl_gaussian)
        return loss + self.expert_weights.square().sum() if settings.use_entropy else loss


class Monteclora(LoraVariant):
    field = "monteclora_config"
    title = "MonteCLoRA"
    containers = {"lora_monteclora_sampler": (nn.ModuleDict, True)}

    def init(self, layer, adapter_name: str, config, **kwargs: Any) -> None:
        A = layer.lora_A[adapter_name].weight
        layer.lora_monteclora_sampler[adapter_name] = MonteCarloSampler(
            layer.in_features, layer.r[adapter_name], config.monteclora_config, device=A.device, dtype=A.dtype)

    def forward(self, layer, x, result, adapter_name):
        if not layer.training:
            return super().forward(layer, x, result, adapter_name)
        A, B = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        x = layer.lora_dropout[adapter_name](layer._cast(x, A.weight))
        sampler = layer.lora_monteclora_sampler[adapter_name]
        noise, weights = sampler(sampler.next_draw())
        weight = A.weight
        if torch.isnan(noise).any() or torch.isnan(weights).any():
            warnings.warn("MonteCLoRA drew NaNs in this step; it used lora_A without noise", PeftWarning,
                          stacklevel=2)
        else:
            weight = torch.einsum("n,nio->io", weights, A.weight.T + noise).T
        out = B(torch.nn.functional.linear(x, weight)) * layer.scaling[adapter_name]
        return result + out.to(result.dtype)
