"""Quantized base layers, seen through one interface.

A quantization backend plugin registers a :class:`QuantBackend`. Method layers never
touch a quantized layer's internals: they call :func:`base_weight`,
:func:`set_base_weight`, :func:`layer_shape` and :func:`merge_blocker`, which pick the
backend that recognises the layer (or treat it as a plain float layer).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: backend plugins register without it
    import torch
    from torch import nn


class QuantBackend:
    """What the kernel needs to know about one family of quantized layers.

    Subclass it in a backend plugin and register an instance through
    ``peft_kernel_register_quant_backends``. Only :meth:`matches` and
    :meth:`get_weight` are required; the defaults describe a forward-only backend.
    """

    #: short identifier shown in listings and errors, e.g. ``"bnb-4bit"``
    name: str = "unnamed"

    def available(self) -> tuple[bool, str]:
        """``(True, "")`` when the backend library can be used, else ``(False, reason)``."""
        return True, ""

    def matches(self, module: nn.Module) -> bool:
        """Whether ``module`` is a layer of this backend. Must not import heavy packages
        unless they are already imported (check ``sys.modules``)."""
        raise NotImplementedError

    def layer_shape(self, module: nn.Module) -> tuple[int, int]:
        """``(in_features, out_features)`` of the quantized linear layer."""
        return module.in_features, module.out_features

    def get_weight(self, module: nn.Module) -> torch.Tensor:
        """The dequantized weight, shape ``(out_features, in_features)``, as a float
        tensor on the layer's device (never moved to an accelerator that is absent).
        It is the stored weight: ``set_weight(m, get_weight(m))`` must leave the layer's
        behaviour unchanged, so merge followed by unmerge round-trips."""
        raise NotImplementedError

    def compute_dtype(self, module: nn.Module) -> torch.dtype:
        """The dtype the layer computes its output in (reported in layer status; adapter
        outputs are always cast to the base result's dtype before they are added)."""
        return self.get_weight(module).dtype

    def merge_blocker(self, module: nn.Module) -> str | None:
        """``None`` when :meth:`set_weight` works for ``module``, else the reason why
        merging into it is impossible (shown to the user before anything changes)."""
        return f"the {self.name} backend supports forward only; save the adapter separately instead of merging"

    def set_weight(self, module: nn.Module, weight: torch.Tensor) -> None:
        """Requantize ``weight`` (float, ``(out, in)``) into ``module`` in place, keeping
        its quantization settings."""
        raise NotImplementedError(self.merge_blocker(module) or "set_weight not implemented")


def library_installed(*import_names: str) -> bool:
    """Whether any of the named modules is imported or importable (without importing it)."""
    import importlib.util
    import sys

    for name in import_names:
        if name in sys.modules:
            return True
        try:
            if importlib.util.find_spec(name) is not None:
                return True
        except (ImportError, ValueError):  # a missing parent package
            continue
    return False


_backends: list[QuantBackend] | None = None


def _all() -> list[QuantBackend]:
    global _backends
    if _backends is None:
        from .plugins import manager

        _backends = manager().quant_backends()
    return _backends


def _reset() -> None:
    global _backends
    _backends = None


_warned: set[str] = set()


def find_backend(module: nn.Module) -> QuantBackend | None:
    """The registered backend that recognises ``module``, or ``None`` for plain layers."""
    if _is_plain_torch_layer(module):
        return None
    for backend in _all():
        try:
            if backend.matches(module):
                return backend
        except Exception as exc:  # a broken backend must not break dispatch for everyone
            if backend.name not in _warned:
                _warned.add(backend.name)
                import warnings

                from .errors import PeftWarning

                warnings.warn(f"quantization backend {backend.name!r} failed to inspect a layer and is skipped: "
                              f"{type(exc).__name__}: {exc}", PeftWarning, stacklevel=2)
    return None


_plain_types: tuple[tuple[type, ...], type] | None = None


def _is_plain_torch_layer(module: nn.Module) -> bool:
    """A torch layer (exactly nn.Linear, nn.Embedding or nn.ConvNd) whose weight is an
    ordinary parameter (no tensor subclass): no backend can hold quantized data there, so
    none is asked. Asking would cost time on every forward, and torch.compile would guard on
    what the backends inspect (``sys.modules``) and recompile whenever that changes."""
    global _plain_types
    if _plain_types is None:
        from torch import nn

        _plain_types = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d), nn.Parameter
    layers, parameter = _plain_types
    return type(module) in layers and type(module._parameters.get("weight")) is parameter


def is_quantized(module: nn.Module) -> bool:
    return find_backend(module) is not None


def layer_shape(module: nn.Module) -> tuple[int, int] | None:
    """``(in, out)`` of a quantized linear layer, ``None`` for plain layers."""
    backend = find_backend(module)
    return None if backend is None else backend.layer_shape(module)


def base_weight(module: nn.Module) -> torch.Tensor:
    """The weight of ``module`` as a float tensor (dequantized when quantized)."""
    backend = find_backend(module)
    if backend is None:
        return module.weight
    return backend.get_weight(module)


def merge_blocker(module: nn.Module) -> str | None:
    """Why merging into ``module`` is impossible, or ``None`` when it is possible."""
    backend = find_backend(module)
    return None if backend is None else backend.merge_blocker(module)


def set_base_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Write ``weight`` back into ``module`` (requantizing when quantized)."""
    backend = find_backend(module)
    if backend is None:
        import torch

        with torch.no_grad():
            module.weight.data = weight.to(module.weight.dtype)
        return
    blocker = backend.merge_blocker(module)
    if blocker:
        raise ValueError(blocker)
    backend.set_weight(module, weight)
