"""Conformance kit: the contract tests every method plugin runs against itself.

See :mod:`peft_kernel.testing.conformance`.
"""

from .conformance import Case, MethodConformance, perturb

__all__ = ["Case", "MethodConformance", "perturb"]
