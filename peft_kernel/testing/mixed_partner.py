"""A partner method for the conformance kit's mixed-model check.

A method registered with ``is_mixed_compatible=True`` must work in a mixed model next to
layers of any other method. The kit checks that against this partner: a rank-one weight
delta ``ΔW = u vᵀ`` (zero at creation) on every linear, convolution and embedding base, the
kind of layer a third party writes on :class:`~peft_kernel.WeightDeltaLayer`. It is a plugin
object, registered only while a check runs (:func:`partner_method`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..config import TunerConfig
from ..delta import WeightDeltaLayer, base_kind
from ..dispatch import base_of
from ..plugins import hookimpl, manager
from ..tuner import BaseTuner

PARTNER = "KIT_PARTNER"


@dataclass
class PartnerConfig(TunerConfig):
    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PARTNER


class PartnerLayer(WeightDeltaLayer):
    """``ΔW = u vᵀ`` with ``u`` over the output features and ``v`` over the rest of ``delta_shape``."""

    adapter_layer_names = ("kit_partner_u", "kit_partner_v")

    def update_layer(self, adapter_name: str, config=None, **kwargs) -> None:
        out, *rest = self.delta_shape
        self.kit_partner_u[adapter_name] = nn.Parameter(torch.zeros(out))
        self.kit_partner_v[adapter_name] = nn.Parameter(torch.zeros(math.prod(rest)))

    def get_delta(self, adapter_name: str) -> torch.Tensor:
        return torch.outer(self.kit_partner_u[adapter_name], self.kit_partner_v[adapter_name])


class PartnerModel(BaseTuner):
    prefix = "kit_partner_"
    layer_cls = PartnerLayer


class _PartnerPlugin:
    @hookimpl
    def peft_kernel_register_methods(self, register):
        register(name=PARTNER.lower(), config_cls=PartnerConfig, model_cls=PartnerModel, is_mixed_compatible=True)

    @hookimpl(trylast=True)
    def peft_kernel_dispatch_layer(self, target, target_name, adapter_name, config):
        if config.peft_type == PARTNER and base_kind(base_of(target)) is not None:
            return PartnerLayer(target, adapter_name, config=config)
        return None


def can_partner(module: nn.Module) -> bool:
    """Whether the partner adapts ``module`` (its innermost base is linear, a convolution or an embedding)."""
    return base_kind(base_of(module)) is not None


@contextmanager
def partner_method() -> Iterator[type[PartnerConfig]]:
    """The partner method registered for the duration of the block; yields its config class."""
    name = manager().register(_PartnerPlugin(), name="peft-kernel-kit-partner")
    try:
        yield PartnerConfig
    finally:
        manager().unregister(name)
