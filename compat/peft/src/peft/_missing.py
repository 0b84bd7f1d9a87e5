"""Names of HF PEFT that peft-kernel does not provide (yet).

Libraries import some of them at module level only to test ``isinstance`` (TRL imports
``PrefixTuningConfig``, transformers' Trainer ``PeftMixedModel``), so they exist as classes that
nothing is an instance of and that refuse to be built, saying why.
"""

from __future__ import annotations

from typing import NoReturn

_ISSUE = "peft-kernel does not provide {what} yet; this name exists so that code importing it still imports."


class _Unavailable:
    def __init__(self, *args, **kwargs) -> None:
        raise NotImplementedError(_ISSUE.format(what=type(self).__name__))


class PeftMixedModel(_Unavailable):
    """HF PEFT's model for adapters of several methods at once (not available)."""


class PrefixTuningConfig(_Unavailable):
    """HF PEFT's prefix tuning (not available)."""


def missing_name(module: str, name: str) -> NoReturn:
    raise AttributeError(
        f"module {module!r} has no attribute {name!r}: this `peft` is peft-kernel's compatibility package, which "
        "provides the names transformers, TRL and diffusers use; install the plugin that provides the method, or "
        "use HF PEFT for this feature."
    )
