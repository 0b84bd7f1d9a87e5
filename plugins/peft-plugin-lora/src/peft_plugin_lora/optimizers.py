"""Optimizers made for LoRA's two factors.

* **LoRA+** (Hayou et al., 2024, arXiv:2402.12354): B learns ``loraplus_lr_ratio`` times
  faster than A. :func:`create_loraplus_optimizer` builds any torch optimizer with four
  parameter groups (A; LoRA embeddings; B and other vectors with weight decay; the same
  without) — the grouping HF PEFT uses, so the learning rates and decays are the same.
* **LoRA-FA** (Zhang et al., 2023, arXiv:2308.03303): A is frozen, so activations need only
  be kept at rank r, and B's gradient is projected so that the step on ``s·BA`` is the best
  rank-r approximation of the full fine-tuning step: ``g_B ← (1/s²) · g_B · (A Aᵀ)⁻¹``.
  :class:`LoraFAOptimizer` is AdamW (transformers' flavour: bias correction, decoupled
  weight decay applied after the step) with that projection.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.optim import Optimizer

from .layer import Embedding, LoraLayer

_EIGHT_BIT_OPTIMIZERS = ("Adam8bit", "AdamW8bit", "PagedAdam8bit", "PagedAdamW8bit")


def _decay_exempt_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Names of the LayerNorm submodules: their parameters are never decayed."""
    return tuple(f"{name}." for name, module in model.named_modules() if name and isinstance(module, nn.LayerNorm))


def create_loraplus_optimizer(model: nn.Module, optimizer_cls: type[Optimizer], *, lr: float,
                              loraplus_lr_ratio: float, **kwargs) -> Optimizer:
    """``optimizer_cls`` over the trainable parameters of ``model`` with LoRA+ learning rates.

    Groups, in order: A and other matrices (``lr``); parameters of LoRA embedding layers
    (``loraplus_lr_embedding``, default 1e-6); B and every vector, i.e. biases and
    norms (``lr · loraplus_lr_ratio``) — decayed by ``loraplus_weight_decay`` (default 0)
    unless they are biases or live in a LayerNorm. Other ``kwargs`` go to ``optimizer_cls``.
    """
    weight_decay = kwargs.pop("loraplus_weight_decay", 0.0)
    lr_embedding = kwargs.pop("loraplus_lr_embedding", 1e-6)
    exempt = _decay_exempt_prefixes(model)
    groups: dict[str, list[nn.Parameter]] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    owners = dict(model.named_modules())
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # a LoRA tensor is <layer>.<container>.<adapter>[.weight]: its layer is two levels up
        layer = owners.get(name.rsplit(".", 2)[0]) if name.count(".") >= 2 else None
        if isinstance(layer, Embedding):
            groups["embedding"].append(param)
        elif "lora_B" in name or param.ndim == 1:
            decayed = "bias" not in name and not name.startswith(exempt)
            groups["B" if decayed else "B_no_decay"].append(param)
        else:
            groups["A"].append(param)
    optimizer = optimizer_cls([
        {"params": groups["A"], "weight_decay": weight_decay, "lr": lr},
        {"params": groups["embedding"], "weight_decay": weight_decay, "lr": lr_embedding},
        {"params": groups["B"], "weight_decay": weight_decay, "lr": lr * loraplus_lr_ratio},
        {"params": groups["B_no_decay"], "weight_decay": 0.0, "lr": lr * loraplus_lr_ratio},
    ], lr=lr, **kwargs)
    if optimizer_cls.__name__ in _EIGHT_BIT_OPTIMIZERS:
        import bitsandbytes  # the optimizer is bitsandbytes', so the library is there

        manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
        for module in model.modules():
            if isinstance(module, nn.Embedding):  # embeddings stay 32-bit, as bitsandbytes recommends
                manager.register_module_override(module, "weight", {"optim_bits": 32})
    return optimizer


class LoraFAOptimizer(Optimizer):
    """AdamW whose step on each LoRA ``B`` uses the LoRA-FA projected gradient.

    A parameter group may carry ``"lora_pairs"``: ``(i, j, s)`` triples saying that
    ``params[i]`` is a frozen A and ``params[j]`` its B, with scaling s. That B is stepped
    with ``(1/s²) g_B (A Aᵀ + 10⁻⁸ I)⁺`` (conv factors flattened to matrices), everything
    else with plain AdamW. Weight decay multiplies the parameter by ``1 - lr · weight_decay``
    after the step. (Indices rather than tensors, so ``state_dict()`` round-trips.)
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, correct_bias: bool = True) -> None:
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate {lr}: must be >= 0")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Invalid betas {betas}: each must lie in [0, 1)")
        if eps < 0.0:
            raise ValueError(f"Invalid eps {eps}: must be >= 0")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "correct_bias": correct_bias,
                    "lora_pairs": []}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = group["params"]
            projected = {j: (params[i], s) for i, j, s in group["lora_pairs"]}
            for index, param in enumerate(params):
                if param.grad is None:
                    continue
                grad = param.grad
                if index in projected:
                    grad = _project(grad, *projected[index])
                self._adamw(param, grad, group)
        return loss

    def _adamw(self, param: torch.Tensor, grad: torch.Tensor, group: dict) -> None:
        state = self.state[param]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(param)
            state["exp_avg_sq"] = torch.zeros_like(param)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        step_size = group["lr"]
        if group["correct_bias"]:
            step_size *= math.sqrt(1.0 - beta2 ** state["step"]) / (1.0 - beta1 ** state["step"])
        param.addcdiv_(exp_avg, exp_avg_sq.sqrt().add_(group["eps"]), value=-step_size)
        if group["weight_decay"] > 0.0:
            param.add_(param, alpha=-group["lr"] * group["weight_decay"])


def _project(grad_B: torch.Tensor, A: torch.Tensor, scaling: float) -> torch.Tensor:
    """LoRA-FA's gradient for B: ``(1/s²) g_B (A Aᵀ + 10⁻⁸ I)⁺``, with A (r × …) and B
    (… × r) flattened to matrices; in float32, returned in the gradient's dtype."""
    r = A.shape[0]
    A = A.detach().reshape(r, -1).float()
    gram = A @ A.T + 1e-8 * torch.eye(r, device=A.device)
    grad = grad_B.float().reshape(grad_B.shape[0], r)
    return ((grad @ torch.linalg.pinv(gram)) / scaling**2).reshape(grad_B.shape).to(grad_B.dtype)


def _lora_pairs(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """``(A, B, scaling)`` of every LoRA adapter in ``model``, as ``combination_factors`` gives them."""
    pairs = []
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for adapter in module.scaling:
                factors = module.combination_factors(adapter)
                if factors is not None:
                    pairs.append((*factors, module.scaling[adapter]))
    return pairs


def create_lorafa_optimizer(model: nn.Module, r: int, lora_alpha: float, lr: float, weight_decay: float = 0.0,
                            use_rslora: bool | None = None) -> Optimizer:
    """Freeze every LoRA ``A`` of ``model`` and return a :class:`LoraFAOptimizer` over all its
    parameters (betas (0.9, 0.999), eps 1e-6).

    Each B's projection uses its own layer's scaling (rank and alpha patterns, rsLoRA
    included); ``r`` and ``lora_alpha`` are accepted for HF PEFT's signature. ``use_rslora``
    is deprecated (configure rsLoRA in ``LoraConfig``); if given it must match the active
    adapters' configs."""
    configs = getattr(model, "peft_config", {})
    active = [a for a in getattr(model, "active_adapters", []) if a in configs]
    if use_rslora is not None:
        mismatched = [a for a in active if bool(getattr(configs[a], "use_rslora", False)) != use_rslora]
        if mismatched:
            raise ValueError(
                f"create_lorafa_optimizer(use_rslora={use_rslora}) disagrees with the configs of adapters "
                f"{mismatched}; drop the argument (deprecated) and set use_rslora in LoraConfig."
            )
        warnings.warn("create_lorafa_optimizer(use_rslora=...) is deprecated: set use_rslora in LoraConfig.",
                      FutureWarning, stacklevel=2)
    params = list(model.parameters())
    index = {id(p): i for i, p in enumerate(params)}
    pairs = []
    for A, B, scaling in _lora_pairs(model):
        A.requires_grad_(False)
        pairs.append((index[id(A)], index[id(B)], scaling))
    return LoraFAOptimizer([{"params": params, "lora_pairs": pairs}], lr=lr, betas=(0.9, 0.999),
                           weight_decay=weight_decay)
