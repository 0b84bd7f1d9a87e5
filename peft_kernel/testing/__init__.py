"""Conformance kit: the contract tests every method plugin runs against itself.

See :mod:`peft_kernel.testing.conformance`; quantization backend plugins use
:mod:`peft_kernel.testing.quant` (imported on first use: it needs pytest).
"""

from .conformance import Case, MethodConformance, assert_gradcheck, perturb

_QUANT = ("QuantBackendConformance", "QuantCase", "QuantPluginContract", "ToyQuantConformance", "quantize_layers")

__all__ = ["Case", "MethodConformance", "assert_gradcheck", "perturb", *_QUANT]


def __getattr__(name):
    if name in _QUANT:
        from . import quant

        return getattr(quant, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
