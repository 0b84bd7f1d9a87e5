"""Lazy module attributes (PEP 562), for packages whose import must stay torch-free.

The kernel's ``__init__`` and every plugin's entry-point module use this: plugin discovery
imports them, and it must not pull in torch. Names are imported on first access and then
stored in the module, so later lookups cost nothing.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any


def lazy_attributes(module_name: str, attributes: Mapping[str, str],
                    computed: Mapping[str, Callable[[], Any]] | None = None,
                    submodules: Iterable[str] = ()) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for the module ``module_name``.

    ``attributes`` maps a public name to the module that defines it (``".layer"`` is
    relative to ``module_name``; ``".layer:Other"`` imports a different name);
    ``computed`` maps a name to a function building its value; ``submodules`` are
    submodules reachable as attributes without importing them first.
    """
    namespace = sys.modules[module_name].__dict__
    computed = dict(computed or {})
    submodules = frozenset(submodules)

    def __getattr__(name: str) -> Any:
        if name in attributes:
            module, _, attr = attributes[name].partition(":")
            value = getattr(importlib.import_module(module, module_name), attr or name)
        elif name in computed:
            value = computed[name]()
        elif name in submodules:
            value = importlib.import_module(f".{name}", module_name)
        else:
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(namespace.get("__all__", ())) | set(computed) | submodules)

    return __getattr__, __dir__
