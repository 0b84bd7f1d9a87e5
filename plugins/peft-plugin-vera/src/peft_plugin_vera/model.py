"""``VeraModel``: the VeRA tuner. It owns the shared projections ``vera_A`` / ``vera_B``
(one entry per adapter, saved as ``base_model.vera_A`` / ``base_model.vera_B``); injection
and bookkeeping are the kernel's."""

from __future__ import annotations

import copy
import sys

import torch
from torch import nn

from peft_kernel import AdapterLayer, BaseTuner, BufferDict, quant, targeting
from peft_kernel.dispatch import user_mappings

from .layer import VeraLayer

#: HF PEFT's VeRA defaults: the low-rank family's table, except that Phi adapts only q/v
DEFAULT_TARGETS = {**targeting.ATTENTION_TARGETS, "phi": ["q_proj", "v_proj"]}

_MODEL_PREFIX = "base_model.model."


def make_projections(r: int, in_features: int, out_features: int, seed: int,
                     device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared projections for one adapter: ``A`` (r × in) then ``B`` (out × r), both
    Kaiming-uniform (fan-in, ReLU gain) from one CPU generator seeded with ``seed``.

    This is the generator, order and distribution HF PEFT uses, so the same seed gives
    bit-identical tensors (on the same PyTorch CPU PRNG).
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    A = torch.empty(r, in_features, device="cpu")
    B = torch.empty(out_features, r, device="cpu")
    for tensor in (A, B):
        nn.init.kaiming_uniform_(tensor, a=0, mode="fan_in", nonlinearity="leaky_relu", generator=generator)
    if device is not None and torch.device(device).type not in ("cpu", "meta"):
        A, B = A.to(device), B.to(device)
    return A, B


def _conv1d_type():
    utils = sys.modules.get("transformers.pytorch_utils")
    return getattr(utils, "Conv1D", None) if utils is not None else None


def _layer_size(module: nn.Module, config) -> tuple[int, int] | None:
    """``(in, out)`` of a module VeRA can adapt, else ``None`` (it is then not counted)."""
    module = module.get_base_layer() if isinstance(module, AdapterLayer) else module
    conv1d = _conv1d_type()
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if conv1d is not None and isinstance(module, conv1d):
        return tuple(module.weight.shape)
    shape = quant.layer_shape(module)
    if shape is not None:
        return shape
    if any(isinstance(module, t) for t in user_mappings(config)):
        in_f, out_f = getattr(module, "in_features", None), getattr(module, "out_features", None)
        if in_f is not None and out_f is not None:
            return in_f, out_f
    return None


def _model_type(model: nn.Module) -> dict:
    config = getattr(model, "config", None)
    if config is None:
        return {"model_type": "custom"}
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return config if isinstance(config, dict) else dict(getattr(config, "__dict__", {}))


class VeraModel(BaseTuner):
    prefix = "vera_lambda_"
    layer_cls = VeraLayer
    default_target_modules = DEFAULT_TARGETS
    shared_buffer_names = ("vera_A", "vera_B")
    supported_layer_types = ("torch.nn.Linear", "transformers Conv1D")

    # -- adapters must agree ----------------------------------------------------------

    def _check_new_adapter_config(self, config) -> None:
        for name, other in self.peft_config.items():
            if other is config:
                continue
            if other.projection_prng_key != config.projection_prng_key:
                raise ValueError(
                    f"All VeRA adapters must use the same projection_prng_key: adapter {name!r} uses "
                    f"{other.projection_prng_key}, the new one {config.projection_prng_key}."
                )
            if other.save_projection != config.save_projection:
                raise ValueError(
                    f"All VeRA adapters must use the same save_projection: adapter {name!r} uses "
                    f"{other.save_projection}, the new one {config.save_projection}."
                )

    # -- shared projections -----------------------------------------------------------

    def _required_size(self, model: nn.Module, config, state_dict: dict | None) -> tuple[int, int, object]:
        """``(max_out, max_in, device)`` over the modules the adapter will adapt."""
        config = self._prepare_adapter_config(config, _model_type(model))
        if state_dict is not None:
            config = copy.copy(config)
            config.target_modules = {
                key.split("." + self.prefix)[0][len(_MODEL_PREFIX):] if key.startswith(_MODEL_PREFIX)
                else key.split("." + self.prefix)[0]
                for key in state_dict if "." + self.prefix in key
            }
        elif config.target_modules == targeting.ALL_LINEAR:
            config = copy.copy(config)
            config.target_modules = targeting.expand_all_linear(model, config, lambda m: isinstance(m, AdapterLayer))
        largest: list[int] | None = None
        device = None
        inside: list[str] = []
        for key, module in model.named_modules():
            if not key or any(key.startswith(p) for p in inside):
                continue
            if isinstance(module, AdapterLayer):
                inside.append(key + ".")
            if not targeting.is_target(config, key):
                continue
            size = _layer_size(module, config)
            if size is None:
                continue
            in_f, out_f = size
            largest = [out_f, in_f] if largest is None else [max(largest[0], out_f), max(largest[1], in_f)]
            if device is None:
                device = next((t.device for t in module.parameters() if t.device.type != "meta"), None)
        if largest is None:
            raise ValueError(
                "No layer that VeRA can adapt (torch.nn.Linear, transformers Conv1D) matches target_modules "
                f"{config.target_modules!r}; check target_modules against model.named_modules()."
            )
        return largest[0], largest[1], device

    def _add_projections(self, model: nn.Module, adapter_name: str, config, state_dict) -> bool:
        """Create (first adapter) or check and copy (later adapters) the projections for
        ``adapter_name``; returns whether an entry was added."""
        if adapter_name in getattr(self, "vera_A", ()):
            return False
        max_out, max_in, device = self._required_size(model, config, state_dict)
        existing = getattr(self, "vera_A", None)
        if existing is None or len(existing) == 0:
            if existing is None:
                self.vera_A = BufferDict({}, persistent=config.save_projection)
                self.vera_B = BufferDict({}, persistent=config.save_projection)
            A, B = make_projections(config.r, max_in, max_out, config.projection_prng_key, device)
        else:
            # the first adapter fixed the shapes; a later one must fit inside them
            A0, B0 = next(iter(self.vera_A.values())), next(iter(self.vera_B.values()))
            problems = []
            if max_in > A0.shape[1]:
                problems.append(f"its largest layer input is {max_in} but vera_A has {A0.shape[1]} columns")
            if max_out > B0.shape[0]:
                problems.append(f"its largest layer output is {max_out} but vera_B has {B0.shape[0]} rows")
            if config.r > A0.shape[0]:
                problems.append(f"its r={config.r} exceeds the projections' r={A0.shape[0]}")
            if problems:
                raise ValueError(
                    f"VeRA adapter {adapter_name!r} does not fit the shared projections sized by the first adapter: "
                    + "; ".join(problems) + ". Add the adapter with the largest layers and r first."
                )
            A, B = A0, B0  # the same key gives the same projections: one copy in memory for all adapters
        self.vera_A[adapter_name] = A
        self.vera_B[adapter_name] = B
        return True

    def _drop_projections(self, adapter_name: str) -> None:
        for name in self.shared_buffer_names:
            container = getattr(self, name, None)
            if container is not None and adapter_name in container:
                del container[adapter_name]

    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict: dict | None = None) -> None:
        config = self.peft_config[adapter_name]
        self._check_new_adapter_config(config)
        added = self._add_projections(model, adapter_name, config, state_dict)
        try:
            super().inject_adapter(model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                                   low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)
        except BaseException:
            if added:
                self._drop_projections(adapter_name)
            raise

    def _after_layer_created(self, layer: AdapterLayer, adapter_name: str, config) -> None:
        if isinstance(layer, VeraLayer):
            layer.attach_projections(self.vera_A, self.vera_B, adapter_name)
