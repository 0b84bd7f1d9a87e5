"""Converting adapters to plain LoRA.

* :func:`convert_to_lora` / :func:`save_as_lora` — any adapter whose update is a weight delta
  ΔW on linear layers (VeRA, LoHa, LoRA itself, a third-party method's layers, ...) becomes a LoRA
  adapter by a truncated SVD of ΔW: B = U_k·S_k, A = V_kᵀ, with ``r = lora_alpha = k`` so the
  scaling is 1. A fixed rank (int) or an energy threshold (float in (0, 1]: the smallest k
  whose singular values hold that share of Σσ²) chooses k per layer.
* :func:`relative_to_initial` — ``save_pretrained(..., path_initial_model_for_weight_conversion=)``:
  an adapter whose initialisation moved part of the base weight into the adapter (PiSSA, OLoRA)
  saved so that it applies to the *original* base: ΔW = s·(BA − B₀A₀) = s·[B | −B₀]·[A ; A₀],
  a LoRA of rank 2r with the same scaling.
"""

from __future__ import annotations

import copy
import os
import warnings

import torch
from torch import nn

from peft_kernel import AdapterLayer, ModulesToSaveWrapper, PeftWarning, WeightDeltaLayer, get_peft_model_state_dict
from peft_kernel.dispatch import is_linear_like, stores_weight_transposed

from .config import LoraConfig

_PEFT_PREFIX = "base_model.model."


def supports_lora_conversion(layer: AdapterLayer, adapter_name: str) -> bool:
    """Whether ``layer``'s adapter is exactly a weight delta. A layer answers itself through a
    ``supports_lora_conversion(adapter_name)`` method (HF PEFT's name); otherwise an additive
    ``WeightDeltaLayer`` is, and so is a layer whose ``merge_weight`` is the kernel's additive
    default and that implements ``delta_weight``."""
    own = getattr(layer, "supports_lora_conversion", None)
    if callable(own):
        return bool(own(adapter_name))
    if isinstance(layer, WeightDeltaLayer):
        return not layer.transforms_weight
    additive = type(layer).merge_weight is AdapterLayer.merge_weight
    return additive and type(layer).delta_weight is not AdapterLayer.delta_weight


def _rank_for(singular_values: torch.Tensor, rank: int | float) -> int:
    if isinstance(rank, int):
        return rank
    energy = torch.cumsum(singular_values.double() ** 2, dim=0)
    return int(torch.searchsorted(energy, rank * energy[-1]).item()) + 1


@torch.no_grad()
def _factorise(layer: AdapterLayer, adapter_name: str, rank: int | float) -> tuple[torch.Tensor, torch.Tensor, int]:
    delta = layer.delta_weight(adapter_name)
    dtype = delta.dtype
    transposed = stores_weight_transposed(layer.get_base_layer())
    matrix = (delta.T if transposed else delta).float()  # (out, in)
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    k = _rank_for(S, rank)
    if k > S.shape[0]:
        raise ValueError(f"The chosen rank {k} is larger than the weight allows ({S.shape[0]}); choose a lower rank")
    B, A = U[:, :k] * S[:k], Vh[:k]
    return A.to(dtype).contiguous(), B.to(dtype).contiguous(), k


def convert_to_lora(model: nn.Module, rank: int | float, adapter_name: str = "default", progressbar: bool = False,
                    compile_kwargs: dict | None = None) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The LoRA config and checkpoint tensors that approximate ``adapter_name`` of ``model`` (a
    ``PeftModel`` or a model with injected adapters). ``rank``: an int, or a float in (0, 1] as an
    energy threshold (ranks then differ per layer and go into ``rank_pattern``). Its
    ``modules_to_save`` copies are taken over as they are. ``compile_kwargs`` compiles the
    per-layer factorisation with ``torch.compile``."""
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise ValueError(f"rank must be an int or a float threshold in (0, 1], got {rank!r}")
    if isinstance(rank, float) and not 0 < rank <= 1:
        raise ValueError(f"A float rank is an energy threshold and must be in (0, 1], got {rank}")
    if rank <= 0:
        raise ValueError(f"rank must be positive, got {rank}")
    layers = [(name, module) for name, module in model.named_modules()
              if isinstance(module, AdapterLayer) and module.has_adapter(adapter_name)]
    unsupported = sorted({type(m).__qualname__ for _, m in layers if not supports_lora_conversion(m, adapter_name)})
    if unsupported:
        raise TypeError(f"Some layers cannot be converted to LoRA (their update is not a weight delta): "
                        f"{', '.join(unsupported)}")
    not_linear = sorted({type(m.get_base_layer()).__qualname__ for _, m in layers
                         if not is_linear_like(m.get_base_layer())})
    if not_linear:
        raise TypeError(f"Only adapters on linear layers can be converted to LoRA, not on {', '.join(not_linear)}")
    if not layers:
        raise TypeError(f"No adapter layer of {adapter_name!r} that could be converted to LoRA was found")
    config = getattr(model, "peft_config", {}).get(adapter_name)
    if config is not None and config.peft_type == "LORA":
        warnings.warn("The adapter is already a LoRA adapter; converting it only changes its rank.", PeftWarning,
                      stacklevel=2)
    bias = getattr(config, "bias", "none")
    if bias != "none":
        raise ValueError(f"The adapter trains biases (bias={bias!r}), which LoRA cannot express; convert an adapter "
                         "with bias='none'")
    kwargs = {"rank_pattern": {}, "alpha_pattern": {}, "exclude_modules": set()}
    if config is not None:
        kwargs.update(target_modules=copy.copy(config.target_modules) or set(),
                      base_model_name_or_path=config.base_model_name_or_path,
                      layers_pattern=config.layers_pattern, layers_to_transform=config.layers_to_transform)
    else:
        kwargs["target_modules"] = set()
    lora_config = LoraConfig(r=rank if isinstance(rank, int) else 1, lora_alpha=rank if isinstance(rank, int) else 1,
                             **kwargs)
    factorise = torch.compile(_factorise, **compile_kwargs) if compile_kwargs is not None else _factorise
    if progressbar:
        from tqdm import tqdm

        layers = tqdm(layers, desc="Converting to LoRA")
    state: dict[str, torch.Tensor] = {}
    for name, layer in layers:
        A, B, k = factorise(layer, adapter_name, rank)
        short = name.removeprefix(_PEFT_PREFIX)
        if k != rank or isinstance(lora_config.target_modules, str):
            lora_config.rank_pattern[short] = k
            lora_config.alpha_pattern[short] = k
        else:
            lora_config.target_modules.add(short)
        state[f"{name}.lora_A.weight"] = A
        state[f"{name}.lora_B.weight"] = B
    if config is not None and getattr(config, "modules_to_save", None):
        lora_config.modules_to_save = copy.copy(config.modules_to_save)
        for name, wrapper in model.named_modules():
            if isinstance(wrapper, ModulesToSaveWrapper) and adapter_name in wrapper.modules_to_save:
                for param_name, param in wrapper.modules_to_save[adapter_name].named_parameters():
                    state[f"{name}.{param_name}"] = param.detach()
    return lora_config, state


def save_as_lora(path: str | os.PathLike, model: nn.Module, rank: int | float, adapter_name: str = "default",
                 progressbar: bool = False, compile_kwargs: dict | None = None) -> None:
    """:func:`convert_to_lora`, written to ``path`` as a LoRA adapter (``adapter_config.json``
    and ``adapter_model.safetensors``) that ``PeftModel.from_pretrained`` loads."""
    from safetensors.torch import save_file

    config, state = convert_to_lora(model, rank, adapter_name=adapter_name, progressbar=progressbar,
                                    compile_kwargs=compile_kwargs)
    state = {(key if key.startswith(_PEFT_PREFIX) else _PEFT_PREFIX + key): value.detach().cpu().contiguous()
             for key, value in state.items()}
    os.makedirs(path, exist_ok=True)
    save_file(state, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(os.fspath(path))


def relative_to_initial(peft_model, adapter_name: str, config: LoraConfig, state: dict[str, torch.Tensor],
                        initial_path: str) -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """See the module docstring; ``initial_path`` holds the adapter as saved right after its
    initialisation (it is loaded next to the others for a moment and deleted again)."""
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ValueError("path_initial_model_for_weight_conversion cannot be combined with use_rslora and a "
                         "rank_pattern / alpha_pattern: the doubled ranks would change the scaling per layer")
    if config.use_dora:
        raise ValueError("path_initial_model_for_weight_conversion cannot convert a DoRA adapter: its magnitude "
                         "rescales the whole weight, which no LoRA on the original base expresses")
    init = str(config.init_lora_weights).lower()
    if not init.startswith(("pissa", "olora", "corda", "lora_ga", "true")):
        warnings.warn("path_initial_model_for_weight_conversion is meant for adapters whose initialisation changed "
                      "the base weights (PiSSA, OLoRA, CorDA, LoRA-GA); "
                      f"init_lora_weights={config.init_lora_weights!r}", PeftWarning, stacklevel=3)
    # the initial adapter is loaded with a plain init, so that loading does not decompose the base again
    initial_config = copy.deepcopy(config)
    initial_config.init_lora_weights = True
    initial_config.save_pretrained(initial_path)
    initial_name = "initial-" + adapter_name
    while initial_name in peft_model.peft_config:
        initial_name += "_"
    modes = [(module, module.training) for module in peft_model.modules()]  # loading switches to eval mode
    peft_model.load_adapter(os.path.dirname(os.path.abspath(initial_path)), initial_name,
                            subfolder=os.path.basename(os.path.abspath(initial_path)))
    try:
        initial = get_peft_model_state_dict(peft_model, adapter_name=initial_name)
    finally:
        peft_model.delete_adapter(initial_name)
        for module, mode in modes:
            module.training = mode
    converted = dict(state)
    for key, value in state.items():
        # lora_A / lora_embedding_A: rank on dim 0; lora_B / lora_embedding_B: rank on dim 1
        if ".lora_A." in key or ".lora_embedding_A" in key:
            converted[key] = torch.cat([value, initial[key].to(value.dtype)], dim=0)
        elif ".lora_B.weight" in key or ".lora_embedding_B" in key:
            converted[key] = torch.cat([value, -initial[key].to(value.dtype)], dim=1)
    config = copy.deepcopy(config)
    config.init_lora_weights = True
    config.r *= 2
    config.lora_alpha *= 2 if not config.use_rslora else 2**0.5  # same scaling with twice the rank
    config.rank_pattern = {key: 2 * value for key, value in config.rank_pattern.items()}
    config.alpha_pattern = {key: 2 * value for key, value in config.alpha_pattern.items()}
    return converted, config
