"""``modules_to_save``: fully trained copies of whole modules, one per adapter."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .layer import BASE_ADAPTER, AdapterLayer, batch_adapter_names_of


class ModulesToSaveWrapper(nn.Module):
    """Holds the original module and one trainable copy per adapter that lists it.

    Forward runs the active adapter's copy, or the original when no adapter that owns a
    copy is active. Attribute reads fall through to the module in use.
    """

    def __init__(self, module_to_save: nn.Module, adapter_name: str, tied_weight: nn.Parameter | None = None) -> None:
        super().__init__()
        if isinstance(module_to_save, (nn.ModuleDict, nn.ModuleList, nn.ParameterDict, nn.ParameterList)):
            raise TypeError(
                f"modules_to_save cannot hold a {type(module_to_save).__name__} (a container without a forward); "
                "name its submodules, or the module that uses it, instead"
            )
        if isinstance(module_to_save, AdapterLayer):
            cls = type(module_to_save)
            raise TypeError(
                f"modules_to_save cannot target an adapter layer ({cls.__module__}.{cls.__qualname__}); "
                "remove it from modules_to_save or from target_modules"
            )
        self.original_module = module_to_save
        self.modules_to_save = nn.ModuleDict({})
        self._active_adapter: list[str] = []
        self._disable_adapters = False
        self.update(adapter_name, tied_weight=tied_weight)

    def update(self, adapter_name: str, tied_weight: nn.Parameter | None = None) -> None:
        """Add ``adapter_name``'s copy; with ``tied_weight`` the copy's ``weight`` is that very
        parameter (a module tied to the embeddings, ``ensure_weight_tying``)."""
        if adapter_name not in self.modules_to_save:
            memo = {} if tied_weight is None else {id(self.original_module.weight): tied_weight}
            self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module, memo)
        self.original_module.requires_grad_(False)

    def adapter_state_dict_load_map(self, adapter_name: str) -> dict[str, str]:
        """``{checkpoint key: key in this wrapper}`` for the copy of ``adapter_name``: checkpoints
        hold the copy under the wrapped module's own names. transformers' ``load_adapter`` renames
        keys with it (HF PEFT's name)."""
        return {key: f"modules_to_save.{adapter_name}.{key}" for key in self.modules_to_save[adapter_name].state_dict()}

    @property
    def active_adapters(self) -> list[str]:
        """The active adapters that have a copy here (at most one)."""
        return [name for name in self._active_adapter if name in self.modules_to_save]

    @property
    def batch_adapter_names(self) -> list[str] | None:
        """Per-sample adapter names of the mixed batch the current call runs, else ``None``."""
        return batch_adapter_names_of(self)

    @property
    def active_adapter(self) -> str | list[str]:
        active = self.active_adapters
        return active[0] if len(active) == 1 else active

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    @property
    def merged_adapters(self) -> list[str]:
        return []

    def _all_available_adapter_names(self) -> list[str]:
        return sorted(self.modules_to_save.keys())

    def _active_copy(self) -> nn.Module:
        if self._disable_adapters:
            return self.original_module
        for name in self._active_adapter:
            if name in self.modules_to_save:
                return self.modules_to_save[name]
        return self.original_module

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        modules = self.__dict__["_modules"]
        if "original_module" not in modules:
            raise AttributeError(name)
        return getattr(self._active_copy(), name)

    def set_adapter(self, adapter_names: str | Iterable[str], inference_mode: bool = False) -> None:
        if isinstance(adapter_names, str):
            adapter_names = [adapter_names]
        adapter_names = list(adapter_names)
        owned = [n for n in adapter_names if n in self.modules_to_save]
        if len(owned) > 1:
            raise ValueError(
                f"Adapters {owned} each have a modules_to_save copy of the same module; only one can be active"
            )
        self.original_module.requires_grad_(False)
        for name, module in self.modules_to_save.items():
            module.requires_grad_(name in owned and not inference_mode)
        self._active_adapter = adapter_names

    def enable_adapters(self, enabled: bool) -> None:
        self._disable_adapters = not enabled
        if not enabled:
            self.modules_to_save.requires_grad_(False)
        else:
            self.set_adapter(self._active_adapter)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        if adapter_name in self._active_adapter:
            self._active_adapter = [a for a in self._active_adapter if a != adapter_name]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        names = kwargs.pop("adapter_names", None) or batch_adapter_names_of(self)
        if names is None or self._disable_adapters:
            return self._active_copy()(*args, **kwargs)
        if not args:  # the batch is the first keyword input
            key = next(k for k, v in kwargs.items() if isinstance(v, torch.Tensor))
            x = kwargs.pop(key)
            return self._mixed_batch_forward(x, names=names, key=key, **kwargs)
        return self._mixed_batch_forward(*args, names=names, **kwargs)

    def _mixed_batch_forward(self, x, *args, names, key: str | None = None, **kwargs):
        """Each sample through its adapter's copy; ``key`` names ``x`` when it came by keyword."""
        names = list(names)
        if x.shape[0] != len(names):
            raise ValueError(f"adapter_names has {len(names)} entries but the batch has {x.shape[0]} samples")
        outputs = []
        groups = {}
        for i, name in enumerate(names):
            groups.setdefault(name if name in self.modules_to_save else BASE_ADAPTER, []).append(i)
        order = []
        for name, idx in groups.items():
            module = self.original_module if name == BASE_ADAPTER else self.modules_to_save[name]
            rows = x[idx]
            outputs.append(module(rows, *args, **kwargs) if key is None else module(*args, **{key: rows}, **kwargs))
            order.extend(idx)
        result = torch.cat(outputs, dim=0)
        inverse = torch.empty(len(order), dtype=torch.long, device=result.device)
        inverse[torch.tensor(order, device=result.device)] = torch.arange(len(order), device=result.device)
        return result[inverse]
