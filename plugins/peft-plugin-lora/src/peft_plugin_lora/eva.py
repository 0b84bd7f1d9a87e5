"""EVA: explained variance adaptation (Paischer et al., 2024, arXiv:2410.07170).

A data-driven init for LoRA's A: the top right-singular vectors of each layer's *inputs*
(the directions in which the activations vary most), found by incremental PCA over a
dataloader. Every layer may take up to ``round(rho · r)`` components; the total rank budget
(the sum of the configured ranks) is then handed out across all layers by explained
variance ratio, so informative layers get more rank and others less (possibly none).
B starts at zero, so the model's output is unchanged.

    model = get_peft_model(base, LoraConfig(init_lora_weights="eva", eva_config=EvaConfig(rho=2.0), ...))
    initialize_lora_eva_weights(model, dataloader)

Procedure, per layer: every batch's inputs feed an incremental PCA (Ross et al., 2008, the
variant scikit-learn implements: running mean and variance, previous components weighted by
their singular values, a mean-correction row; each step a randomized SVD with 4 subspace
iterations over 2·k columns from a fixed seed, signs fixed so that each component's largest
entry is positive). A layer stops once the components it needs have a cosine similarity of
at least ``tau`` with those of the previous step; layers that receive identical inputs (q, k
and v projections) share one PCA. The dataloader is cycled until every layer has converged.
The ranks and adjusted alphas are written into the adapter's ``rank_pattern`` and
``alpha_pattern``, so a saved EVA adapter loads anywhere.
"""

from __future__ import annotations

import copy
import itertools
import math
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn

from peft_kernel import PeftWarning
from peft_kernel.layer import base_layer_device
from peft_kernel.targeting import compress_targets, get_pattern_key

from .layer import Linear, LoraLayer
from .model import linear_targets

_PEFT_PREFIX = "base_model.model."
_SEED = 42           # randomized SVD seed: the same data gives the same components
_SUBSPACE_ITERS = 4
_MAX_PASSES = 20     # passes over the data before giving up on convergence
#: from this many targets on, the target list is shortened to the suffixes that select them
_COMPRESS_TARGETS_FROM = 20


# -- inputs -------------------------------------------------------------------------------


def forward_fn_dict(model, inputs):
    """Call the model with a batch that is a dict of keyword arguments."""
    return model(**inputs)


def prepare_model_inputs_fn_language_modeling(model_input, peft_config):
    """The (batch, position) indices of the tokens to learn from: attended positions whose
    label (when the batch has labels and ``use_label_mask``) is not the ignored value."""
    if not isinstance(model_input, dict):
        raise TypeError("prepare_model_inputs_fn_language_modeling needs batches that are dicts with 'input_ids'")
    mask = model_input.get("attention_mask", torch.ones_like(model_input["input_ids"])).bool()
    eva = peft_config.eva_config
    if eva.use_label_mask and "labels" in model_input:
        mask = mask & (model_input["labels"] != eva.label_mask_value)
    return mask.nonzero()


def prepare_layer_inputs_fn_language_modeling(layer_input, model_input, layer_name) -> torch.Tensor:
    """The layer's input rows at the token positions chosen by
    :func:`prepare_model_inputs_fn_language_modeling`."""
    layer_input = _first_tensor(layer_input, layer_name)
    return layer_input[model_input.T.unbind()]


def _first_tensor(layer_input, layer_name) -> torch.Tensor:
    if isinstance(layer_input, torch.Tensor):
        return layer_input
    if isinstance(layer_input, (tuple, list)) and layer_input and isinstance(layer_input[0], torch.Tensor):
        return layer_input[0]
    raise TypeError(
        f"EVA cannot read the input of layer {layer_name!r} ({type(layer_input).__name__}); pass a "
        "prepare_layer_inputs_fn that returns a 2-D tensor for it."
    )


def _flatten_inputs(layer_input, model_input, layer_name) -> torch.Tensor:
    x = _first_tensor(layer_input, layer_name)
    return x.reshape(-1, x.shape[-1]) if x.dim() > 2 else x


def _gather(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` from every process (sizes may differ), in rank order."""
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
    sizes = [int(s) for s in sizes]
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])


def _to_device(inputs, device):
    if device is None:
        return inputs
    if hasattr(inputs, "to"):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return type(inputs)({k: _to_device(v, device) for k, v in inputs.items()})
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_to_device(v, device) for v in inputs)
    return inputs


# -- incremental PCA ----------------------------------------------------------------------


class IncrementalPCA:
    """The top ``n_components`` principal directions of rows seen batch by batch.

    Statistics are accumulated in float64; after the first batch the stacked matrix is
    float64 too. ``components`` (k × features) are unit rows, ``singular_values`` their
    weights, ``explained_variance_ratio`` their share of the total variance."""

    def __init__(self, n_components: int) -> None:
        self.n_components = n_components
        self.seen = 0
        self.mean = self.var = self.components = self.singular_values = self.explained_variance_ratio = None

    def partial_fit(self, X: torch.Tensor) -> None:
        n = X.shape[0]
        total = self.seen + n
        batch_sum = X.sum(dim=0, dtype=torch.float64)
        previous_sum = 0.0 if self.mean is None else self.mean * self.seen
        mean = (previous_sum + batch_sum) / total
        deviation = X - batch_sum / n
        batch_var_sum = deviation.square().sum(dim=0, dtype=torch.float64)
        batch_var_sum = batch_var_sum - deviation.sum(dim=0, dtype=torch.float64).square() / n
        if self.var is None:
            var = batch_var_sum / total
            stacked = (X - mean).float()
        else:
            ratio = self.seen / n
            var_sum = self.var * self.seen + batch_var_sum + ratio / total * (previous_sum / ratio - batch_sum).square()
            var = var_sum / total
            batch_mean = X.mean(dim=0)
            correction = math.sqrt(self.seen / total * n) * (self.mean - batch_mean)
            stacked = torch.vstack((self.singular_values[:, None] * self.components, X - batch_mean, correction))
        with torch.random.fork_rng(devices=[stacked.device] if stacked.device.type == "cuda" else []):
            torch.manual_seed(_SEED)
            _, S, V = torch.svd_lowrank(stacked, q=2 * self.n_components, niter=_SUBSPACE_ITERS)
        Vh = V.mH
        # deterministic signs: the largest entry of each component is positive
        signs = torch.sign(Vh[torch.arange(Vh.shape[0]), Vh.abs().argmax(dim=1)])
        Vh = Vh * signs[:, None]
        k = self.n_components
        self.components, self.singular_values = Vh[:k], S[:k]
        self.explained_variance_ratio = (S.square() / torch.sum(var * total))[:k]
        self.seen, self.mean, self.var = total, mean, var


class _LayerPCA:
    """The PCA of one layer (or one group of layers with identical inputs) and whether
    its leading components have settled."""

    def __init__(self, name: str, n_components: int, tau: float, prepare: Callable, gather: bool) -> None:
        self.name, self.tau, self.prepare, self.gather = name, tau, prepare, gather
        self.pca = IncrementalPCA(n_components)
        self.converged = torch.zeros(n_components, dtype=torch.bool)
        self.model_input = None
        self.handle = None

    @torch.no_grad()
    def __call__(self, module, args, output) -> None:
        x = self.prepare(args, self.model_input, self.name)
        if self.gather and dist.is_initialized():
            x = _gather(x)
        if x.shape[0] < self.pca.n_components:
            return  # too few rows for this many components: wait for a larger batch
        previous = None if self.pca.components is None else self.pca.components.clone()
        self.pca.partial_fit(x.float())
        if previous is not None:
            similarity = nn.functional.cosine_similarity(self.pca.components, previous)
            self.converged = similarity >= self.tau

    def settled(self, rank: int) -> bool:
        return bool(torch.all(self.converged[:rank]))


# -- get_eva_state_dict -------------------------------------------------------------------


def _eva_targets(model: nn.Module, config, is_peft_model: bool) -> list[tuple[str, nn.Module]]:
    if is_peft_model:
        return [(name, m) for name, m in model.named_modules() if isinstance(m, Linear)]
    return linear_targets(model, config)


def _layer_preparers(names: list[str], prepare_layer_inputs_fn) -> dict[str, Callable]:
    if not isinstance(prepare_layer_inputs_fn, Mapping):
        return dict.fromkeys(names, prepare_layer_inputs_fn or _flatten_inputs)
    unknown = sorted(set(prepare_layer_inputs_fn) - set(names))
    if unknown:
        raise ValueError(f"prepare_layer_inputs_fn names layers that EVA does not initialise: {unknown}")
    return {name: prepare_layer_inputs_fn.get(name) or _flatten_inputs for name in names}


def _group_equal_inputs(model, targets, preparers, batch, model_input, forward_fn) -> dict[str, str]:
    """``{layer: the first layer with the same input}`` for layers whose inputs on
    ``batch`` are identical (only the first of each group needs a PCA)."""
    seen: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(module, args, output):
            seen[name] = preparers[name](args, model_input, name).detach()
        return hook

    handles = [module.register_forward_hook(record(name)) for name, module in targets]
    try:
        forward_fn(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    never = [name for name, _ in targets if name not in seen]
    if never:
        raise ValueError(f"EVA: the forward pass never called layer(s) {never}; they cannot be initialised from data")
    groups: dict[str, list[str]] = {}  # representative -> the later layers with its input
    for name, _ in targets:
        x = seen[name]
        match = next((rep for rep in groups if seen[rep].shape == x.shape and torch.equal(seen[rep], x)), None)
        if match is None:
            groups[name] = []
        else:
            groups[match].append(name)
    return {member: rep for rep, members in groups.items() for member in members}


def _distribute_ranks(layer_to_pca: dict[str, str], pcas: dict[str, _LayerPCA], max_components: dict[str, int],
                      budget: int, same_as: dict[str, str]) -> dict[str, int]:
    """Give the ``budget`` components with the highest explained variance ratio, over all
    layers, to their layers; within a group of identical inputs the first layer gets the
    largest rank (its PCA serves the others)."""
    owners, ratios = [], []
    for layer, rep in layer_to_pca.items():
        values = pcas[rep].pca.explained_variance_ratio[: max_components[rep]]
        owners += [layer] * len(values)
        ratios.append(values)
    order = torch.cat(ratios).argsort(descending=True)
    counts = Counter(owners[i] for i in order[:budget].tolist())
    ranks = {layer: counts.get(layer, 0) for layer in layer_to_pca}
    for layer, rep in same_as.items():
        if ranks[rep] < ranks[layer]:
            ranks[rep], ranks[layer] = ranks[layer], ranks[rep]
    return ranks


@torch.no_grad()
def get_eva_state_dict(
    model: nn.Module,
    dataloader: Iterable,
    peft_config=None,
    forward_fn: Callable | None = forward_fn_dict,
    prepare_model_inputs_fn: Callable | None = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: Callable | Mapping[str, Callable] | None = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
) -> dict[str, torch.Tensor]:
    """``{layer name: A}`` — EVA's initial A (rank × in) for every layer, ranks already
    redistributed (a rank of 0 means the layer gets no adapter).

    ``model`` is either the PEFT model (its LoRA linear layers of ``adapter_name``, run with
    adapters disabled; names as in ``model.named_modules()``) or the plain base model with
    ``peft_config`` (its nn.Linear / Conv1D targets). Each batch goes through
    ``forward_fn(model, batch)``; ``prepare_model_inputs_fn(batch, config)`` (default: the
    token mask for language models) is handed to ``prepare_layer_inputs_fn(layer_input,
    model_input, layer_name)``, which returns the 2-D rows to learn from (a callable, or a
    dict of callables by layer name; ``None`` flattens all but the last dimension). With
    torch.distributed initialised and ``gather_distributed_inputs``, the rows of all
    processes are used.
    """
    is_peft_model = hasattr(model, "peft_config")
    if peft_config is None:
        if not is_peft_model:
            raise ValueError("get_eva_state_dict needs peft_config when model is not a PEFT model")
        peft_config = model.peft_config[adapter_name]
    if peft_config.eva_config is None:
        raise ValueError("get_eva_state_dict needs a LoraConfig with eva_config (init_lora_weights='eva')")
    if len(dataloader) == 0:
        raise ValueError("get_eva_state_dict: the dataloader is empty")
    if dist.is_initialized() and gather_distributed_inputs:
        warnings.warn("EVA gathers every layer's inputs from all processes (gather_distributed_inputs=True); make "
                      "sure the processes see different data.", PeftWarning, stacklevel=2)
    with model.disable_adapter() if is_peft_model else nullcontext():
        return _compute_eva_state_dict(model, dataloader, peft_config, forward_fn, prepare_model_inputs_fn,
                                       prepare_layer_inputs_fn, gather_distributed_inputs, show_progress_bar,
                                       is_peft_model)


def _model_device(model: nn.Module):
    devices = {p.device for p in model.parameters() if p.device.type != "meta"}
    return next(iter(devices)) if len(devices) == 1 else None


def _compute_eva_state_dict(model, dataloader, config, forward_fn, prepare_model_inputs_fn, prepare_layer_inputs_fn,
                            gather, show_progress_bar, is_peft_model):
    eva = config.eva_config
    targets = _eva_targets(model, config, is_peft_model)
    if not targets:
        raise ValueError("EVA found no linear layer to initialise; check target_modules")
    names = [name for name, _ in targets]
    modules = dict(targets)
    preparers = _layer_preparers(names, prepare_layer_inputs_fn)
    rho = eva.rho
    if rho > 1000:  # effectively unbounded: cap at what the largest weight could use
        rho = min(rho, max(max(p.shape) for p in model.parameters()) // config.r)
    ranks = {name: config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), name), config.r)
             for name in names}
    max_components = {name: min(round(ranks[name] * rho), _in_features(modules[name])) for name in names}
    budget = sum(ranks.values())
    device = _model_device(model)

    def model_input_for(batch):
        if prepare_model_inputs_fn is None:
            return copy.deepcopy(batch)
        return prepare_model_inputs_fn(batch, config)

    was_training = model.training
    model.eval()
    try:
        first = _to_device(next(iter(dataloader)), device)
        same_as = _group_equal_inputs(model, targets, preparers, first, model_input_for(first), forward_fn)
        for group_rep in set(same_as.values()):
            group = [group_rep] + [n for n, rep in same_as.items() if rep == group_rep]
            largest = max(max_components[n] for n in group)
            for n in group:
                max_components[n] = largest
        pcas = {name: _LayerPCA(name, max_components[name], eva.tau, preparers[name], gather)
                for name in names if name not in same_as}
        layer_to_pca = {**{name: name for name in pcas}, **same_as}
        ranks_now = dict(max_components)
        try:
            ranks_now = _run_until_converged(model, dataloader, pcas, layer_to_pca, modules, max_components, budget,
                                             same_as, ranks_now, forward_fn, model_input_for, device, show_progress_bar)
        finally:
            for layer in pcas.values():
                if layer.handle is not None:
                    layer.handle.remove()
                    layer.handle = None
    finally:
        model.train(was_training)

    state_dict = {}
    for name, rank in ranks_now.items():
        layer = pcas[layer_to_pca[name]]
        components = layer.pca.components[:rank]
        if eva.whiten:
            components = components / layer.pca.singular_values[:rank].sqrt()[:, None]
        state_dict[name] = components if device is None else components.to(device)
    return state_dict


def _in_features(module: nn.Module) -> int:
    return module.in_features if hasattr(module, "in_features") else module.weight.shape[0]  # Conv1D: (in, out)


def _run_until_converged(model, dataloader, pcas, layer_to_pca, modules, max_components, budget, same_as, ranks,
                         forward_fn, model_input_for, device, show_progress_bar):
    for name, layer in pcas.items():
        layer.handle = modules[name].register_forward_hook(layer)
    done = dict.fromkeys(pcas, False)
    batches = itertools.cycle(dataloader)
    progress = _progress(show_progress_bar, len(pcas))
    limit = _MAX_PASSES * len(dataloader)
    for step, batch in enumerate(batches):
        batch = _to_device(batch, device)
        model_input = model_input_for(batch)
        for name, layer in pcas.items():
            settled = layer.settled(ranks[name])
            if settled and not done[name]:
                layer.handle.remove()
                layer.handle = None
                done[name] = True
                continue
            if done[name] and not settled:  # the redistribution asked this layer for more components
                layer.handle = modules[name].register_forward_hook(layer)
                done[name] = False
            layer.model_input = model_input
        if progress is not None:
            progress.update(sum(done.values()) - progress.n)
        if all(done.values()):
            break
        if step == limit:
            raise RuntimeError(
                f"EVA: layers {[n for n, d in done.items() if not d]} did not converge in {_MAX_PASSES} passes over "
                "the data; lower EvaConfig.tau or use more (varied) data."
            )
        forward_fn(model, batch)
        if step + 1 == len(dataloader):
            starved = [name for name, layer in pcas.items() if layer.pca.components is None]
            if starved:
                raise ValueError(
                    f"EVA: layers {starved} never saw a batch with at least as many rows as components they may take "
                    "(round(rho * r)); use larger batches, fewer masked tokens or a smaller rho."
                )
        if all(layer.pca.components is not None for layer in pcas.values()):
            ranks = _distribute_ranks(layer_to_pca, pcas, max_components, budget, same_as)
    if progress is not None:
        progress.close()
    return ranks


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="EVA: layers converged", leave=False)


# -- initialize_lora_eva_weights ----------------------------------------------------------


@torch.no_grad()
def initialize_lora_eva_weights(
    model: nn.Module,
    dataloader: Iterable | None = None,
    eva_state_dict: dict | None = None,
    forward_fn: Callable | None = forward_fn_dict,
    prepare_model_inputs_fn: Callable | None = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: Callable | Mapping[str, Callable] | None = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
):
    """Initialise the EVA adapter ``adapter_name`` of a PEFT model from data (``dataloader``)
    or from a precomputed ``eva_state_dict`` (from :func:`get_eva_state_dict`, on this PEFT
    model or on its base model: names are accepted with or without the ``base_model.model.``
    prefix). Layers whose new rank is 0 lose their adapter; layers without an entry (or not
    linear) keep the default init, with a warning. Returns ``model``."""
    if not hasattr(model, "peft_config"):
        raise ValueError("initialize_lora_eva_weights needs a PEFT model built with init_lora_weights='eva'")
    if len(model.active_adapters) > 1:
        raise ValueError("initialize_lora_eva_weights works with one active adapter; set_adapter() to the EVA one")
    config = model.peft_config.get(adapter_name)
    if config is None or config.init_lora_weights != "eva":
        raise ValueError(f"adapter {adapter_name!r} was not created with init_lora_weights='eva'")
    if eva_state_dict is None:
        if dataloader is None:
            raise ValueError("initialize_lora_eva_weights needs a dataloader or an eva_state_dict")
        eva_state_dict = get_eva_state_dict(model, dataloader, forward_fn=forward_fn,
                                            prepare_model_inputs_fn=prepare_model_inputs_fn,
                                            prepare_layer_inputs_fn=prepare_layer_inputs_fn, adapter_name=adapter_name,
                                            gather_distributed_inputs=gather_distributed_inputs,
                                            show_progress_bar=show_progress_bar)
    _load_eva_state_dict(model, eva_state_dict, adapter_name)
    return model


def _relative(name: str) -> str:
    return name.removeprefix(_PEFT_PREFIX)


def _adapter_parameters(layer: LoraLayer, adapter_name: str) -> dict[str, torch.Tensor]:
    return {n: p for n, p in layer.named_parameters() if adapter_name in n.split(".")}


def _rebuild(layer: LoraLayer, adapter_name: str, r: int, alpha: float, config) -> None:
    """Recreate one adapter of ``layer`` with another rank/alpha/init, on the device and in
    the dtype the old one had (the base layer's device when it was on the meta device)."""
    base_device = base_layer_device(layer.get_base_layer())
    placement = {n: (base_device if p.device.type == "meta" else p.device, p.dtype)
                 for n, p in _adapter_parameters(layer, adapter_name).items()}
    layer.update_layer(adapter_name, r=r, lora_alpha=alpha, config=config)
    for n, p in _adapter_parameters(layer, adapter_name).items():
        device, dtype = placement.get(n, (base_device, p.dtype))
        p.data = p.data.to(device=device, dtype=dtype)


def _load_eva_state_dict(model: nn.Module, eva_state_dict: dict, adapter_name: str) -> None:
    config = model.peft_config[adapter_name]
    pending = {_relative(k): v for k, v in eva_state_dict.items()}
    eva_config = copy.copy(config)
    eva_config.init_lora_weights = "eva"
    default_config = copy.copy(config)
    default_config.init_lora_weights = True
    targets, missing, others = [], [], []
    rank_pattern, alpha_pattern = {}, {}
    for name, module in list(model.named_modules()):
        relative = _relative(name)
        if not isinstance(module, LoraLayer) or adapter_name not in module.r:
            others.append(relative)
            continue
        kwargs = config.layer_kwargs(relative)
        r, alpha = kwargs["r"], kwargs["lora_alpha"]
        components = pending.pop(relative, None)
        if components is None or not isinstance(module, Linear):
            _rebuild(module, adapter_name, r, alpha, default_config)
            missing.append(relative)
            new_rank = r
        else:
            new_rank = components.shape[0]
            if new_rank == 0:
                _drop_adapter(model, name, module, adapter_name)
                continue
            if new_rank != r and config.eva_config.adjust_scaling_factors:
                alpha = alpha * (new_rank / r)
            if new_rank != r or module.lora_A[adapter_name].weight.device.type == "meta":
                _rebuild(module, adapter_name, new_rank, alpha, eva_config)
            module.lora_A[adapter_name].weight.copy_(components)
            targets.append(relative)
        if new_rank != config.r:
            rank_pattern[relative] = new_rank
        if alpha != config.lora_alpha:
            alpha_pattern[relative] = alpha
    if pending:
        warnings.warn(f"eva_state_dict has entries for layers without a LoRA adapter {adapter_name!r}: "
                      f"{sorted(pending)}; they were ignored.", PeftWarning, stacklevel=3)
    new_targets = set(targets + missing)
    if len(new_targets) >= _COMPRESS_TARGETS_FROM:
        new_targets = compress_targets(new_targets, [n for n in others + targets + missing if n])
    config.target_modules = new_targets
    config.rank_pattern = rank_pattern
    config.alpha_pattern = alpha_pattern
    if missing:
        warnings.warn(f"EVA did not initialise {missing} (no entry in the EVA state dict, or not a linear layer); "
                      "they keep init_lora_weights=True.", PeftWarning, stacklevel=3)


def _drop_adapter(model: nn.Module, name: str, layer: LoraLayer, adapter_name: str) -> None:
    """EVA gave this layer no rank: remove its adapter (and the wrapper when it was the only one)."""
    if len(layer.r) > 1:
        layer.delete_adapter(adapter_name)
        return
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, layer.get_base_layer())
