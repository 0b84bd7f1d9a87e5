"""Arrow: token-wise routing over a library of LoRA experts (Ostapenko et al., 2024), with
GenKnowSub (general-knowledge subtraction) as an optional first step.

In every layer the router adapter (a LoRA adapter whose config has an ``arrow_config``) sees
the layer's other LoRAs as experts e = 1..E. Each expert's prototype p_e is the top right
singular vector of its B_e·A_e (sign is irrelevant). A token x is routed to the ``top_k``
experts with the largest |x·p_e|, weighted by c = softmax(|x·p_e| / temperature) over them:

    h = W₀x + dropout( Σ_e c_e · s_e · B_e A_e x )

The prototypes are exact (an SVD of the small r×r core, not a power iteration), computed on
first use and again whenever an expert's factors change. With GenKnowSub, before the first
routed forward every expert's A and B become A - mean(A_g), B - mean(B_g) over the general
adapters g (experts added later get the same treatment on their first routed forward).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

#: adapter names create_arrow_model gives the experts, the general LoRAs and the router
TASK_PREFIX, GENERAL_PREFIX, ROUTER_NAME = "task_", "gks_", "arrow_router"


def prototype(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Top right singular vector of B·A ((out, r) @ (r, in)) without forming it: with A = Rᵀ Qᵀ
    (QR of Aᵀ), B·A = (B Rᵀ) Qᵀ, so it is Q times the top right singular vector of B Rᵀ."""
    A32, B32 = A.detach().float().reshape(A.shape[0], -1), B.detach().float().reshape(B.shape[0], -1)
    Q, R = torch.linalg.qr(A32.T)  # (in, r), (r, r)
    _, _, Vh = torch.linalg.svd(B32 @ R.T, full_matrices=False)
    return Q @ Vh[0]


def route(x: torch.Tensor, prototypes: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scalings: torch.Tensor,
          top_k: int, temperature: float) -> torch.Tensor:
    """Σ_e c_e s_e B_e A_e x for every token of ``x`` (…, in). ``A``: (E, r, in), ``B``: (E, out, r)."""
    tokens = x.reshape(-1, x.shape[-1])
    similarity = (tokens @ prototypes.T).abs()  # (t, E)
    top, index = similarity.topk(min(top_k, similarity.shape[1]), dim=1)
    scores = torch.full_like(similarity, float("-inf")).scatter(1, index, top)
    weights = torch.softmax(scores / temperature, dim=1) * scalings  # (t, E)
    low = torch.einsum("ti,eri->ter", tokens, A)
    out = torch.einsum("ter,eor,te->to", low, B, weights)
    return out.reshape(*x.shape[:-1], out.shape[-1])


class ArrowState:
    """What a layer keeps per router: the experts already purified by GenKnowSub, and the
    prototypes with the factor versions they were computed from."""

    def __init__(self) -> None:
        self.purified: set[str] = set()
        self.key: tuple | None = None
        self.prototypes: torch.Tensor | None = None


def _versions(factors: list[tuple[str, nn.Module, nn.Module]]) -> tuple:
    return tuple((name, id(A.weight), A.weight._version, id(B.weight), B.weight._version) for name, A, B in factors)


def router_delta(layer, router: str, x: torch.Tensor) -> torch.Tensor:
    """The router's contribution to ``layer``'s output for ``x`` (a LoRA Linear layer)."""
    config = layer.arrow_config[router]
    state = layer.arrow_state.setdefault(router, ArrowState())
    general = set(config.gks_adapter_names or ())
    experts = [n for n in layer.lora_A if n not in layer.arrow_config and n not in general]
    if not experts:
        raise ValueError(f"Arrow router {router!r} has no expert LoRA in this layer to route to")
    if config.use_gks:
        _subtract_general(layer, state, experts, [n for n in general if n in layer.lora_A])
    factors = [(n, layer.lora_A[n], layer.lora_B[n]) for n in experts]
    key = _versions(factors)
    if state.key != key:
        state.prototypes = torch.stack([prototype(A.weight, B.weight) for _, A, B in factors])
        state.key = key
    dtype = layer.lora_A[experts[0]].weight.dtype
    x = x if x.dtype == dtype else x.to(dtype)
    A = torch.stack([a.weight for _, a, _ in factors])
    B = torch.stack([b.weight for _, _, b in factors])
    scalings = torch.tensor([float(layer.scaling[n]) for n in experts], device=x.device, dtype=x.dtype)
    delta = route(x, state.prototypes.to(x.device, x.dtype), A, B, scalings, config.top_k, config.router_temperature)
    return layer.lora_dropout[router](delta)


@torch.no_grad()
def _subtract_general(layer, state: ArrowState, experts: list[str], general: list[str]) -> None:
    todo = [n for n in experts if n not in state.purified]
    if not todo:
        return
    if not general:
        raise ValueError("ArrowConfig.use_gks needs general adapters (gks_adapter_names) in every routed layer")
    mean_A = torch.stack([layer.lora_A[n].weight for n in general]).mean(0)
    mean_B = torch.stack([layer.lora_B[n].weight for n in general]).mean(0)
    for name in todo:
        layer.lora_A[name].weight.sub_(mean_A)
        layer.lora_B[name].weight.sub_(mean_B)
        state.purified.add(name)


# -- building an Arrow model ---------------------------------------------------------------


def create_arrow_model(base_model: nn.Module, task_specific_adapter_paths: list[str], arrow_config,
                       general_adapter_paths: list[str] | None = None, **adapter_kwargs: Any):
    """Load task LoRAs (``task_0``, ``task_1``, ...) and, with ``arrow_config.use_gks``, general
    LoRAs (``gks_0``, ...) onto ``base_model`` and add the router adapter ``arrow_router``
    (active) over the same modules. Every adapter must be a LoRA on linear layers with one
    rank and the same targets. ``adapter_kwargs`` go to ``PeftModel.from_pretrained`` /
    ``load_adapter``. Returns the ``PeftModel``."""
    from peft_kernel import PeftModel

    from .config import LoraConfig

    if not task_specific_adapter_paths:
        raise ValueError("create_arrow_model needs at least one task-specific adapter path")
    if arrow_config.use_gks and not general_adapter_paths:
        raise ValueError("ArrowConfig(use_gks=True) needs general_adapter_paths (the general LoRAs to subtract)")
    for path in list(task_specific_adapter_paths) + list(general_adapter_paths or ()):
        if not os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise ValueError(f"{path!r} is not a local adapter directory (no adapter_config.json in it)")
    tasks = [f"{TASK_PREFIX}{i}" for i in range(len(task_specific_adapter_paths))]
    general = [f"{GENERAL_PREFIX}{i}" for i in range(len(general_adapter_paths or ()))] if arrow_config.use_gks else []
    model = PeftModel.from_pretrained(base_model, task_specific_adapter_paths[0], adapter_name=tasks[0],
                                      **adapter_kwargs)
    for name, path in zip(tasks[1:], task_specific_adapter_paths[1:], strict=True):
        model.load_adapter(path, adapter_name=name, **adapter_kwargs)
    for name, path in zip(general, general_adapter_paths or (), strict=True):
        model.load_adapter(path, adapter_name=name, **adapter_kwargs)
    arrow_config.task_adapter_names = tasks
    arrow_config.gks_adapter_names = general
    targets, rank = _common_targets(model, tasks + general)
    router = LoraConfig(arrow_config=arrow_config, target_modules=targets, r=rank)
    model.add_adapter(ROUTER_NAME, router)
    model.set_adapter(ROUTER_NAME)
    return model


def _common_targets(model, adapters: list[str]) -> tuple[list[str], int]:
    """The module names (last segment) and the rank every adapter shares; raises otherwise."""
    from .layer import Linear

    seen = {}
    for adapter in adapters:
        modules, shapes = set(), set()
        for name, module in model.named_modules():
            if not hasattr(module, "lora_A") or adapter not in module.lora_A:
                continue
            if not isinstance(module, Linear):
                raise TypeError(f"Arrow routes over LoRAs on linear layers only; adapter {adapter!r} adapts "
                                f"{name!r} ({type(module.get_base_layer()).__name__})")
            modules.add(name.rsplit(".", 1)[-1])
            shapes.add(module.r[adapter])
        seen[adapter] = (frozenset(modules), frozenset(shapes))
    reference = seen[adapters[0]]
    for adapter, value in seen.items():
        if value[0] != reference[0]:
            raise ValueError(f"Arrow adapters must target the same modules: {adapters[0]!r} adapts "
                             f"{sorted(reference[0])} but {adapter!r} adapts {sorted(value[0])}")
        if len(value[1]) != 1 or value[1] != reference[1]:
            raise ValueError(f"Arrow adapters must all have one and the same rank: {adapters[0]!r} has "
                             f"{sorted(reference[1])}, {adapter!r} has {sorted(value[1])}")
    return sorted(reference[0]), next(iter(reference[1]))
