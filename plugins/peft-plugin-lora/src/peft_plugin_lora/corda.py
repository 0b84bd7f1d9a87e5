"""CorDA: context-oriented decomposition (Yang et al., 2024, arXiv:2406.05223).

For a linear layer with weight W (out × in) and C the (uncentred) covariance of its inputs
on sample data, decompose the covariance-weighted weight

    W C = U diag(S) Vhᵀ        and set    V = (Vh C⁻¹)ᵀ,    so that    W = U diag(S) Vᵀ.

The adapter starts as r of these components and the base keeps the others:

* ``ipm`` (instruction-previewed mode) takes the r *largest* — the directions the task's
  data uses most, for the fastest fine-tuning;
* ``kpm`` (knowledge-preserved mode) takes the r *smallest* — the directions the data
  (e.g. world-knowledge questions) barely uses, so training them disturbs that knowledge
  least.

``preprocess_corda(model, lora_config, run_model)`` collects C with forward hooks while
``run_model()`` runs the sample data, decomposes every targeted layer and leaves the result
on the layer; ``get_peft_model(model, LoraConfig(init_lora_weights="corda", ...))`` then
builds the adapters from it. The covariances and the decompositions can be cached in files
(``CordaConfig.covariance_file`` / ``cache_file``), HF PEFT's layout, written with
``torch.save`` and read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from peft_kernel.dispatch import stores_weight_transposed
from peft_kernel.targeting import get_pattern_key

from .model import data_init_targets, linear_targets

#: attribute of a base layer that holds its decomposition until the adapter is built
EIGENS_ATTR = "corda_eigens"
_MAX_DAMPING_STEPS = 60


@dataclass
class CordaEigens:
    """One layer's decomposition, cropped to the adapter's r components: ``U`` (out × r),
    ``S`` (r,), ``V`` (in × r) with ``U diag(S) Vᵀ`` the part the adapter takes."""

    S: torch.Tensor
    U: torch.Tensor
    V: torch.Tensor


def _out_in_weight(module: nn.Module) -> torch.Tensor:
    weight = module.weight.detach().float()
    return weight.T if stores_weight_transposed(module) else weight


def _rank(config, name: str) -> int:
    return config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), name), config.r)


def _load(path: str, device) -> dict:
    return torch.load(path, map_location=device, weights_only=True)


def _save(obj: dict, path: str) -> None:
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    torch.save(obj, path)


def _usable(path: str | None) -> bool:
    return path is not None and os.path.isfile(path) and os.path.getsize(path) > 0


def _model_device(model: nn.Module) -> torch.device:
    return next(iter(model.parameters())).device


@torch.no_grad()
def collect_covariances(model: nn.Module, config, run_model: Callable[[], None],
                        hooked_model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """``{layer name: C}`` for the targets of ``config``: the mean over forward calls of
    ``XᵀX``, X a call's inputs (tokens × in) divided by their largest value."""
    keep_dtype = config.corda_config.use_float16_for_covariance
    hooked = model if hooked_model is None else hooked_model
    sums: dict[str, torch.Tensor] = {}
    calls: dict[str, int] = {}

    def hook_for(name):
        def hook(module, args, output):
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1])
            if not keep_dtype:
                x = x.float()
            x = x / torch.max(x).abs()
            if not torch.isfinite(x).all():
                raise ValueError(f"CorDA: the inputs of {name!r} contain NaN/inf (or are all zero); check the data")
            sums[name] = sums[name] + x.T @ x if name in sums else x.T @ x
            calls[name] = calls.get(name, 0) + 1
        return hook

    was_training = hooked.training
    hooked.eval()
    handles = [module.register_forward_hook(hook_for(name)) for name, module in linear_targets(hooked, config)]
    try:
        run_model()
    finally:
        for handle in handles:
            handle.remove()
        hooked.train(was_training)
    missing = [name for name, _ in linear_targets(model, config) if name not in sums]
    if missing:
        raise ValueError(f"CorDA: run_model() never called the target layer(s) {missing}; check run_model and targets")
    return {name: sums[name] / calls[name] for name, _ in linear_targets(model, config)}


def decompose(weight: torch.Tensor, covariance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U, S, V)`` with ``W = U diag(S) Vᵀ`` from the SVD of ``W C``.

    C is damped with a multiple of its mean diagonal (1 %, doubled until ``C C⁻¹`` is within
    0.05 of the identity in Frobenius norm) so that a rank-deficient C can be inverted."""
    covariance = covariance.float()
    eye = torch.eye(covariance.shape[0], device=covariance.device)
    damping = 0.01
    for _ in range(_MAX_DAMPING_STEPS):
        damped = covariance + eye * (torch.mean(torch.diag(covariance)) * damping)
        inverse = torch.linalg.inv(damped)
        if torch.dist(damped @ inverse, eye).item() < 0.05:
            break
        damping *= 2
    else:
        raise ValueError("CorDA: the input covariance cannot be inverted even with heavy damping; use more sample data")
    U, S, Vh = torch.linalg.svd(weight @ damped, full_matrices=False)
    return U, S, (Vh @ inverse).T


def _crop(U, S, V, rank: int, method: str) -> CordaEigens:
    keep = slice(None, rank) if method == "ipm" else slice(-rank, None)
    return CordaEigens(S=S[keep].clone(), U=U[:, keep].clone(), V=V[:, keep].clone())


@torch.no_grad()
def preprocess_corda(model: nn.Module, lora_config, run_model: Callable[[], None] | None = None,
                     hooked_model: nn.Module | None = None) -> None:
    """Prepare every target layer of ``lora_config`` (nn.Linear or transformers Conv1D) for
    ``init_lora_weights="corda"``.

    ``run_model()`` should run the model on sample data of the task (``ipm``) or of the
    knowledge to keep (``kpm``); a few hundred distinct samples of a long context are
    typical. It may be omitted when ``corda_config.cache_file`` or ``covariance_file``
    already exists. ``hooked_model`` collects the covariances on another model with the
    same layer names (rarely needed)."""
    corda = lora_config.corda_config
    if corda is None:
        raise ValueError("preprocess_corda needs lora_config.corda_config (a CordaConfig)")
    device = _model_device(model)
    targets = data_init_targets(model, lora_config, "CorDA")
    if _usable(corda.cache_file):
        cache = _load(corda.cache_file, device)
        for name, module in targets:
            try:
                eigens = CordaEigens(*(cache[f"{name}.eigens.{part}_WC"] for part in ("S", "U", "V")))
            except KeyError:
                raise ValueError(f"CorDA cache {corda.cache_file!r} has no entry for layer {name!r}; "
                                 "was it built for this model and these targets?") from None
            setattr(module, EIGENS_ATTR, eigens)
        return
    if _usable(corda.covariance_file):
        covariances = _load(corda.covariance_file, device)
    elif run_model is None:
        raise ValueError("preprocess_corda needs run_model() unless corda_config.cache_file or covariance_file "
                         "already exists")
    else:
        covariances = collect_covariances(model, lora_config, run_model, hooked_model)
        if corda.covariance_file is not None:
            _save(covariances, corda.covariance_file)
    for index, (name, module) in enumerate(targets):
        if corda.verbose:
            print(f"CorDA: decomposing {name} ({index + 1}/{len(targets)})")
        if name not in covariances:
            raise ValueError(f"no covariance for layer {name!r} (file {corda.covariance_file!r}); rebuild it")
        U, S, V = decompose(_out_in_weight(module), covariances[name].to(device))
        setattr(module, EIGENS_ATTR, _crop(U, S, V, _rank(lora_config, name), corda.corda_method))
    if not corda.prune_temporary_fields:
        for name, module in targets:
            module.corda_covariance = covariances[name]
    if corda.cache_file is not None:
        _save({f"{name}.eigens.{part}_WC": getattr(getattr(module, EIGENS_ATTR), part)
               for name, module in targets for part in ("S", "U", "V")}, corda.cache_file)


def take_eigens(base_layer: nn.Module, *, out_features: int, in_features: int, r: int):
    """``(U, S, V)`` that ``preprocess_corda`` left on ``base_layer``, checked against the
    layer's shape and rank, and removed from it."""
    eigens = getattr(base_layer, EIGENS_ATTR, None)
    if eigens is None:
        raise ValueError(
            "init_lora_weights='corda' needs preprocess_corda(model, lora_config, run_model) to run on the model "
            f"first; {type(base_layer).__name__} has no CorDA decomposition."
        )
    U, S, V = eigens.U, eigens.S, eigens.V
    expected = {"U": (out_features, r), "S": (r,), "V": (in_features, r)}
    for part, tensor in (("U", U), ("S", S), ("V", V)):
        if tuple(tensor.shape) != expected[part]:
            raise ValueError(
                f"CorDA {part} has shape {tuple(tensor.shape)} but this layer needs {expected[part]}: preprocess_corda "
                "(or its cache_file) was run with another model, target list or rank than get_peft_model."
            )
        if not torch.isfinite(tensor).all():
            raise ValueError(f"CorDA {part} of {type(base_layer).__name__} contains NaN/inf")
    delattr(base_layer, EIGENS_ATTR)
    return U.float(), S.float(), V.float()
