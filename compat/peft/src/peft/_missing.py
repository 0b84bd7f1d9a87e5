"""Names of HF PEFT that peft-kernel, or the installed plugins, do not provide.

Libraries import some of them at module level only to test ``isinstance`` (TRL imports
``PrefixTuningConfig``, which exists when peft-plugin-prefix-tuning is installed), so they exist as
classes that nothing is an instance of and that refuse to be built, saying why.
"""

from __future__ import annotations

from typing import NoReturn


class _Unavailable:
    #: what to do instead
    remedy = "peft-kernel does not provide it yet"

    def __init__(self, *args, **kwargs) -> None:
        raise NotImplementedError(f"{type(self).__name__} is not available: {self.remedy}. (The name exists so "
                                  "that code importing it still imports.)")


class PrefixTuningConfig(_Unavailable):
    """HF PEFT's prefix tuning, when peft-plugin-prefix-tuning is not installed."""

    remedy = "pip install peft-plugin-prefix-tuning"


#: stand-ins for names that the plugin registry may not provide
PLACEHOLDERS = {"PrefixTuningConfig": PrefixTuningConfig}


def missing_name(module: str, name: str) -> NoReturn:
    raise AttributeError(
        f"module {module!r} has no attribute {name!r}: this `peft` is peft-kernel's compatibility package, which "
        "provides the names transformers, TRL and diffusers use; install the plugin that provides the method, or "
        "use HF PEFT for this feature."
    )
