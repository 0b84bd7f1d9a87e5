"""The adapter layer base class: all per-layer bookkeeping, written once.

A method's layer subclasses :class:`AdapterLayer` and supplies only its math:

* ``adapter_layer_names`` / ``other_param_names`` — where its per-adapter state lives
  (ModuleDicts / ParameterDicts / plain dicts keyed by adapter name);
* ``update_layer(adapter_name, config=..., **kw)`` — create one adapter's parameters;
* ``adapter_forward(x, result, adapter_name)`` — apply one adapter to a base result;
* ``delta_weight(adapter_name)`` — the additive weight delta, for merging (or override
  ``merge_weight`` / ``unmerge_weight`` for non-additive methods);
* optionally ``forward_active(x, adapter_names)`` — for methods that change the base
  layer's input rather than add to its output.

The kernel handles active / merged / disabled state, several adapters, deletion,
mixed-batch routing, device and dtype placement, quantized bases, and safe merging.
"""

from __future__ import annotations

import collections
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as _module_hooks

from . import distributed, quant
from .errors import MergeNotSupportedError, PeftWarning

BASE_ADAPTER = "__base__"
#: what :attr:`AdapterLayer.call_state` is outside a call that routes per-call values
NO_CALL_STATE: Mapping[str, Any] = MappingProxyType({})


def unwrap_base_layer(module: nn.Module) -> nn.Module:
    while isinstance(module, AdapterLayer):
        module = module.base_layer
    return module


_IMMUTABLE = (type(None), bool, int, float, str)
_CONTAINERS = (dict, collections.OrderedDict, set)
#: per class: (immutable attributes, [(name, empty container type)]), or None
_EMPTY_STATES: dict[type, tuple[dict, list] | None] = {}


def empty_module(cls: type[nn.Module]) -> nn.Module:
    """``cls()`` for a module class built without arguments (an empty ModuleDict,
    ParameterDict, nn.Identity, ...), made from the state of one instance built normally:
    about twice as fast as running nn.Module.__init__ again. Classes whose fresh state holds
    anything but empty dicts/sets and immutable values are simply constructed."""
    if cls not in _EMPTY_STATES:
        state = cls().__dict__
        fixed = {k: v for k, v in state.items() if isinstance(v, _IMMUTABLE)}
        empty = [(k, type(v)) for k, v in state.items() if type(v) in _CONTAINERS and not v]
        _EMPTY_STATES[cls] = (fixed, empty) if len(fixed) + len(empty) == len(state) else None
    layout = _EMPTY_STATES[cls]
    if layout is None:
        return cls()
    module = cls.__new__(cls)
    attributes = module.__dict__
    attributes.update(layout[0])
    for name, container in layout[1]:
        attributes[name] = container()
    return module


def bare_module(cls: type[nn.Module]) -> nn.Module:
    """An instance of ``cls`` with only nn.Module's own state set up: ``cls.__init__`` is
    not run, the caller sets the rest (for layers whose constructor does throw-away work)."""
    module = cls.__new__(cls)
    module.__dict__.update(empty_module(nn.Module).__dict__)
    return module


# torch's global module hooks, registered and removed in place in these dicts
_GLOBAL_HOOKS = (_module_hooks._global_forward_hooks, _module_hooks._global_forward_pre_hooks,
                 _module_hooks._global_backward_hooks, _module_hooks._global_backward_pre_hooks)


def plain_call(module: nn.Module) -> bool:
    """Whether ``module(x)`` would run nothing but its class's ``forward``: no hooks of its
    own or global ones (the test nn.Module.__call__ makes) and no forward replaced on the
    instance, as accelerate's hooks do. Hot paths then skip the call machinery."""
    forward_hooks, forward_pre_hooks, backward_hooks, backward_pre_hooks = _GLOBAL_HOOKS
    return not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or "forward" in module.__dict__
                or forward_hooks or forward_pre_hooks or backward_hooks or backward_pre_hooks)


def _tensors_of(item: nn.Module | torch.Tensor, buffers: bool = False) -> list[torch.Tensor]:
    """The parameters (and buffers) of an adapter container's item, or the item itself.
    Factor layers have no submodules; for them this skips nn.Module's recursive walk."""
    if not isinstance(item, nn.Module):
        return [item]
    if item._modules:
        return list(item.parameters()) + (list(item.buffers()) if buffers else [])
    tensors = list(item._parameters.values()) + (list(item._buffers.values()) if buffers else [])
    return [t for t in tensors if t is not None]


def base_layer_device(module: nn.Module) -> torch.device | None:
    """Device of a (possibly quantized) layer's weight; ``None`` on meta or without weights."""
    module = unwrap_base_layer(module)
    for name in ("qweight", "W_q", "weight", "in_proj_weight"):
        tensor = getattr(module, name, None)
        if isinstance(tensor, torch.Tensor):
            return None if tensor.device.type == "meta" else tensor.device
    for tensor in module.parameters():
        return None if tensor.device.type == "meta" else tensor.device
    return None


def base_layer_dtype(module: nn.Module) -> torch.dtype | None:
    module = unwrap_base_layer(module)
    backend = quant.find_backend(module)
    if backend is not None:
        return backend.compute_dtype(module)
    for name in ("weight", "in_proj_weight"):
        tensor = getattr(module, name, None)
        if isinstance(tensor, torch.Tensor):
            return tensor.dtype
    return None


class AdapterLayer(nn.Module):
    """Base of every adapter layer (see the module docstring for the contract)."""

    #: names of per-adapter containers holding trainable tensors (saved in checkpoints)
    adapter_layer_names: tuple[str, ...] = ()
    #: names of per-adapter dicts holding settings or buffers (not trainable)
    other_param_names: tuple[str, ...] = ()
    #: dimension of the batch in this layer's input, for mixed-batch routing
    batch_dim: int = 0
    #: whether ``adapter_forward`` can run on a sub-batch (mixed adapter batches)
    supports_mixed_batch: bool = True

    def __init__(self, base_layer: nn.Module, adapter_name: str | None = None, **kwargs: Any) -> None:
        """Wrap ``base_layer``; with ``adapter_name`` that adapter starts active (the layer's
        constructor then creates it with :meth:`update_layer`)."""
        nn.Module.__init__(self)
        self.base_layer = base_layer
        base = unwrap_base_layer(base_layer)
        in_features, out_features = quant.layer_shape(base) or _infer_features(base)
        self.set_plain_attributes(
            _active_adapter=[] if adapter_name is None else [adapter_name], merged_adapters=[],
            _disable_adapters=False, _batch_names=None, _batch_rows=None, _call_state=None, kwargs=kwargs,
            in_features=in_features, out_features=out_features,
        )

    # Layers are built by the thousand per model; nn.Module.__setattr__'s checks were a
    # tenth of that time. These two skip them for attributes set once in __init__.

    def set_plain_attributes(self, **attributes: Any) -> None:
        """Set attributes that hold no tensor and no module."""
        self.__dict__.update(attributes)

    def register_containers(self, *names: str, container: type[nn.Module] = nn.ModuleDict) -> None:
        """Register an empty ``container`` submodule under each of ``names`` (new names only)."""
        taken = [n for n in names if n in self.__dict__ or n in self._modules or n in self._parameters]
        if taken:
            raise AttributeError(f"{type(self).__name__} already has attributes {taken}")
        self._modules.update({name: empty_module(container) for name in names})

    # -- introspection ----------------------------------------------------------------

    def get_base_layer(self) -> nn.Module:
        return unwrap_base_layer(self)

    @property
    def weight(self) -> torch.Tensor:
        base = self.get_base_layer()
        return base.qweight if hasattr(base, "qweight") else base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.get_base_layer(), "bias", None)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    @property
    def active_adapter(self) -> str | list[str]:
        return self._active_adapter[0] if len(self._active_adapter) == 1 else list(self._active_adapter)

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapter)

    def _container(self, name: str) -> Any:
        """The per-adapter container ``name`` (a submodule, or a plain dict of settings)."""
        container = self._modules.get(name)  # skips nn.Module.__getattr__ for submodules
        return container if container is not None else getattr(self, name, None)

    def has_adapter(self, adapter_name: str) -> bool:
        present = self.__dict__.get("_present")
        if present is None:  # cached: forward asks this for every layer on every call
            present = set()
            for name in self.adapter_layer_names:
                container = self._container(name)
                if container is not None:
                    present.update(container.keys())
            self.__dict__["_present"] = present
        return adapter_name in present

    def has_adapter_any(self, adapter_names: Iterable[str]) -> bool:
        return any(self.has_adapter(name) for name in adapter_names)

    def _all_available_adapter_names(self) -> list[str]:
        names: set[str] = set()
        for attr in self.adapter_layer_names + self.other_param_names:
            container = self._container(attr)
            if hasattr(container, "keys"):
                names.update(container.keys())
        return sorted(names)

    # -- state changes ----------------------------------------------------------------

    def update_layer(self, adapter_name: str, **kwargs: Any) -> None:
        raise NotImplementedError

    def enable_adapters(self, enabled: bool) -> None:
        """Turn all adapters of this layer on or off (off also freezes them)."""
        if enabled:
            self.set_adapter(self.active_adapters)
            self._disable_adapters = False
        else:
            for name in self.adapter_layer_names:
                getattr(self, name).requires_grad_(False)
            self._disable_adapters = True
        self.adapter_state_changed()

    def set_adapter(self, adapter_names: str | Iterable[str], inference_mode: bool = False) -> None:
        """Activate ``adapter_names``; they become trainable unless ``inference_mode``."""
        if isinstance(adapter_names, str):
            adapter_names = [adapter_names]
        adapter_names = list(adapter_names)
        for attr in self.adapter_layer_names:
            container = self._container(attr)
            for key, value in container.items():
                trainable = key in adapter_names and not inference_mode
                for tensor in _tensors_of(value):
                    tensor.requires_grad_(trainable)
        self._active_adapter = adapter_names
        self.adapter_state_changed()

    def delete_adapter(self, adapter_name: str) -> None:
        for attr in self.adapter_layer_names + self.other_param_names:
            container = self._container(attr)
            if container is not None and adapter_name in container:
                del container[adapter_name]
        if adapter_name in self.merged_adapters:
            self.merged_adapters.remove(adapter_name)
        if adapter_name in self._active_adapter:
            remaining_active = [a for a in self._active_adapter if a != adapter_name]
            if remaining_active:
                self.set_adapter(remaining_active)
            else:
                remaining = self._all_available_adapter_names()
                self.set_adapter(remaining[:1])
        self.adapter_state_changed()

    def adapter_state_changed(self) -> None:
        """Drop everything cached for the current adapter state.

        The kernel calls it after every state change it makes: an adapter created
        (after ``update_layer``), deleted, (de)activated, enabled or disabled, merged or
        unmerged, and when a mixed batch starts or ends. A layer calls it itself after
        changing state outside those operations (e.g. LoRA's ``set_scale``). Subclasses
        that cache anything derived from their adapters (a specialised forward's plan, a
        normalisation) drop it here and call ``super()``. It is cheap: call it when in doubt.
        """
        for cached in ("_present", "_specialised", "forward"):
            self.__dict__.pop(cached, None)

    @property
    def batch_adapter_names(self) -> list[str] | None:
        """Per-sample adapter names of the running mixed batch (``adapter_names=``), else ``None``."""
        return self._batch_names

    @property
    def batch_rows(self) -> torch.Tensor | None:
        """While ``adapter_forward`` runs on one adapter's sub-batch of a mixed batch: the
        indices of those rows in the full batch (to pick per-row values from
        :attr:`call_state`); else ``None``."""
        return self._batch_rows

    @property
    def call_state(self) -> Mapping[str, Any]:
        """Per-call values of the running ``PeftModel`` call (forward or generate), computed by
        the tuner's :meth:`~peft_kernel.BaseTuner.per_call_state` before every forward of the
        base model; empty outside such a call. Read-only."""
        return self._call_state or NO_CALL_STATE

    def _set_batch_adapter_names(self, names: list[str] | None) -> None:
        self.__dict__["_batch_names"] = names
        self.adapter_state_changed()

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str) -> None:
        """Put one adapter's tensors on the base layer's device (other adapters stay)."""
        device = base_layer_device(self)
        if device is None:
            return
        for attr in self.adapter_layer_names + self.other_param_names:
            container = self._modules.get(attr)
            is_container = isinstance(container, (nn.ModuleDict, nn.ParameterDict, BufferDict))
            if not is_container or adapter_name not in container:
                continue
            item = container[adapter_name]
            if isinstance(item, nn.Module):
                tensors = _tensors_of(item, buffers=True)
                if any(t.device.type == "meta" for t in tensors) or all(t.device == device for t in tensors):
                    continue
                container[adapter_name] = item.to(device)
            elif item.device.type != "meta" and item.device != device:
                if isinstance(item, nn.Parameter):
                    container[adapter_name] = nn.Parameter(item.data.to(device), requires_grad=item.requires_grad)
                else:
                    container[adapter_name] = item.to(device)

    def _cast_adapter_dtype(self, adapter_name: str, autocast: bool = True) -> None:
        """Keep adapters in fp32 on half-precision bases (HF PEFT's autocast_adapter_dtype)."""
        if not autocast:
            return
        for attr in self.adapter_layer_names:
            container = self._container(attr)
            if container is None or adapter_name not in container:
                continue
            item = container[adapter_name]
            tensors = _tensors_of(item)
            for tensor in tensors:
                if tensor.dtype in (torch.float16, torch.bfloat16):
                    tensor.data = tensor.data.float()

    # -- forward ----------------------------------------------------------------------

    def adapter_forward(
        self, x: torch.Tensor, result: torch.Tensor, adapter_name: str, *args, **kwargs
    ) -> torch.Tensor:
        """Return ``result`` (the base layer's output for ``x``) with one adapter applied."""
        raise NotImplementedError

    # forward() is the general path. Its first call after a state change may install a
    # specialised forward for that state as an instance attribute, which nn.Module.__call__
    # finds first: a direct call of the base layer when merged, else what
    # specialised_forward() returns. Each re-checks its preconditions on every call and
    # falls back to forward(); every state change drops it (adapter_state_changed).

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            adapter_names = self._batch_names
        if self._disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        if "_specialised" not in self.__dict__:
            self._specialise()
        if self.merged_adapters:
            return self.base_layer(x, *args, **kwargs)
        names = [name for name in self._active_adapter if self.has_adapter(name)]
        return self.forward_active(x, names, *args, **kwargs)

    def specialised_forward(self) -> Callable[..., Any] | None:
        """A faster equivalent of :meth:`forward` for the current unmerged state (a bound
        method, so that deep copies follow the copy), or ``None``. It must call
        ``type(self).forward`` itself whenever its preconditions no longer hold."""
        return None

    def _specialise(self) -> None:
        self.__dict__["_specialised"] = True
        fn = self._forward_merged if self.merged_adapters else self.specialised_forward()
        if fn is not None:
            self.__dict__["forward"] = fn

    def _forward_merged(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if kwargs or not self.merged_adapters or self._disable_adapters or self._batch_names is not None:
            return type(self).forward(self, x, *args, **kwargs)
        base = self._modules["base_layer"]
        return base.forward(x, *args) if plain_call(base) else base(x, *args)

    def forward_active(self, x: torch.Tensor, adapter_names: list[str], *args: Any, **kwargs: Any) -> Any:
        """The output for ``x`` with ``adapter_names`` (active, present, unmerged) applied.

        The default runs the base layer once and folds ``adapter_forward`` over the
        adapters. Override it when an adapter changes what goes *into* the base layer
        (e.g. input scaling), so the base layer still runs once per call.
        """
        result = self.base_layer(x, *args, **kwargs)
        for name in adapter_names:
            result = self.adapter_forward(x, result, name, *args, **kwargs)
        return result

    def _mixed_batch_forward(self, x, *args, adapter_names, **kwargs):
        """Each sample gets the adapter named for it (``"__base__"``: none)."""
        result = self.base_layer(x, *args, **kwargs)
        batch = x.shape[self.batch_dim]
        names = list(adapter_names)
        if len(names) != batch:
            raise ValueError(f"adapter_names has {len(adapter_names)} entries but the batch has {batch} samples")
        self._check_single_batched_input(batch, args, kwargs)
        result = result.clone()
        for name in dict.fromkeys(names):
            if name == BASE_ADAPTER or not self.has_adapter(name):
                continue
            index = torch.tensor([i for i, n in enumerate(names) if n == name], device=result.device)
            sub_x = x.index_select(self.batch_dim, index.to(x.device))
            sub_result = result.index_select(self.batch_dim, index)
            self.__dict__["_batch_rows"] = index
            try:
                with self._inner_layers_see(index.tolist(), names):
                    updated = self.adapter_forward(sub_x, sub_result, name, *args, **kwargs)
            finally:
                self.__dict__["_batch_rows"] = None
            result = result.index_copy(self.batch_dim, index, updated.to(result.dtype))
        return result

    @contextmanager
    def _inner_layers_see(self, rows: list[int], names: list[str]) -> Iterator[None]:
        """While an adapter runs ``base_layer`` on a sub-batch (e.g. on a transformed input), an
        adapter layer of another method inside (a mixed model) routes the names of those rows."""
        inner = self._modules["base_layer"]
        if not isinstance(inner, AdapterLayer) or inner._batch_names is None:
            yield
            return
        full = inner._batch_names
        inner._set_batch_adapter_names([names[i] for i in rows])
        try:
            yield
        finally:
            inner._set_batch_adapter_names(full)

    def _check_single_batched_input(self, batch: int, args: tuple, kwargs: dict) -> None:
        """Mixed-batch routing splits only ``x``; a further input with the batch's samples would
        reach each adapter whole (and fail with a shape error deep in torch, or mix samples)."""
        dim = self.batch_dim
        batched = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.dim() > dim
                   and a.shape[dim] == batch]
        if batched:
            raise TypeError(
                f"{type(self).__name__} was called with {len(batched) + 1} inputs holding the batch's {batch} samples, "
                "but mixed adapter batches (adapter_names=) route only the first input to each adapter. Set "
                "supports_mixed_batch = False on the layer class (the batch is then refused up front), or route "
                "mixed batches in the layer's forward (batch_adapter_names holds the per-sample names)."
            )

    # -- merging ----------------------------------------------------------------------

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The additive change to the base weight, in the base weight's layout."""
        raise NotImplementedError(f"{type(self).__name__} cannot be merged")

    def merge_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        return weight + self.delta_weight(adapter_name).to(weight.dtype)

    def unmerge_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        return weight - self.delta_weight(adapter_name).to(weight.dtype)

    def merge_bias(self, adapter_name: str, sign: int) -> None:
        """Fold an adapter's bias contribution into the base bias (optional)."""

    def nesting_blocker(self) -> str | None:
        """Why this layer cannot run around an adapter layer of another method, its
        ``base_layer`` in a mixed model (``None`` when it can). A layer whose forward goes
        through ``base_layer`` can; one that reads the base weight and bypasses
        ``base_layer`` would skip the layers inside it. Checked when the layer is created."""
        return None

    def merge_blocker(self) -> str | None:
        """Why this layer cannot merge (``None`` when it can); checked before any change."""
        return distributed.merge_blocker(self) or quant.merge_blocker(self.get_base_layer())

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold adapters (default: the active ones) into the base weight.

        Already merged adapters are skipped with a warning. With ``safe_merge`` the
        result is checked for NaN/inf before the base is changed.
        """
        names = self.adapters_to_merge(adapter_names)
        if not names:
            return
        blocker = self.merge_blocker()
        if blocker:
            raise MergeNotSupportedError(f"Cannot merge into {type(self.get_base_layer()).__name__}: {blocker}")
        for name in names:
            if not self.has_adapter(name):
                continue
            weight = self._merge_target().detach()
            merged = self.merge_weight(weight.clone() if safe_merge else weight, name)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs or infs detected when merging adapter {name!r}; the base was left unchanged")
            self._set_merge_target(merged)
            self.merge_bias(name, +1)
            self.merged_adapters.append(name)
        self.adapter_state_changed()

    def unmerge(self) -> None:
        """Undo all merges, most recent first."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", PeftWarning, stacklevel=2)
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if not self.has_adapter(name):
                continue
            weight = self._merge_target().detach()
            self._set_merge_target(self.unmerge_weight(weight, name))
            self.merge_bias(name, -1)
        self.adapter_state_changed()

    def _merge_target(self) -> torch.Tensor:
        """The tensor adapters are merged into: the (dequantized) base weight."""
        return quant.base_weight(self.get_base_layer())

    def _set_merge_target(self, weight: torch.Tensor) -> None:
        quant.set_base_weight(self.get_base_layer(), weight)

    def merge_parameters(self) -> list[nn.Parameter]:
        """The base parameters a merge writes into (the kernel refuses to merge when two
        adapter layers would write into the same one, e.g. layers that share weights)."""
        return [p for p in (getattr(self.get_base_layer(), "weight", None),) if isinstance(p, nn.Parameter)]

    def adapters_to_merge(self, adapter_names: list[str] | None) -> list[str]:
        if adapter_names is None:
            adapter_names = self.active_adapters
        if isinstance(adapter_names, str):
            adapter_names = [adapter_names]
        already = [n for n in adapter_names if n in self.merged_adapters]
        if already:
            warnings.warn(
                f"Adapters {already} are already merged and are skipped; merged now: {self.merged_adapters}.",
                PeftWarning,
                stacklevel=3,
            )
        return [n for n in adapter_names if n not in self.merged_adapters]

    def extra_repr(self) -> str:
        return f"adapters={self._all_available_adapter_names()}, active={self.active_adapters}"



@contextmanager
def substituted_parameter(module: nn.Module, name: str, value: torch.Tensor) -> Iterator[None]:
    """Inside the block, ``module.<name>`` reads ``value`` (any tensor, e.g. one that carries
    gradients to an adapter) instead of the registered parameter, which is put back after."""
    original = module._parameters[name]
    module._parameters[name] = value
    try:
        yield
    finally:
        module._parameters[name] = original


class ParameterLayer(AdapterLayer):
    """Base of adapter layers that adapt one bare ``nn.Parameter`` of a module instead of its
    output (a config's ``target_parameters``, e.g. the 3-D expert weights of a mixture of experts).

    The layer wraps the module holding the parameter (``base_layer``). While it runs, the
    module reads the adapted parameter ``merge_weight(W, name)`` folded over the active adapters
    (default: ``W + delta_weight(name)``), so the module's own forward does the rest and
    gradients reach the adapter. Several parameters of one module nest one layer per
    parameter, in the order the module registered them (the first innermost), which is what
    the checkpoint keys follow (``<module>.base_layer.<prefix>...`` for the inner ones). Merging
    writes into the parameter. A method implements ``update_layer`` and ``delta_weight`` in the
    parameter's own layout; its tuner names the class in ``BaseTuner.parameter_layer_cls``.
    """

    supports_mixed_batch = False

    def __init__(self, base_layer: nn.Module, parameter_name: str, adapter_name: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(base_layer, adapter_name=adapter_name, **kwargs)
        if not isinstance(self.get_base_layer()._parameters.get(parameter_name), torch.Tensor):
            raise ValueError(f"{type(self.get_base_layer()).__name__} has no parameter {parameter_name!r} to adapt")
        self.set_plain_attributes(parameter_name=parameter_name)

    def parameter(self) -> torch.Tensor:
        """The adapted parameter as registered on the innermost base module."""
        return self.get_base_layer()._parameters[self.parameter_name]

    def forward_active(self, x: torch.Tensor, adapter_names: list[str], *args: Any, **kwargs: Any) -> Any:
        if not adapter_names:
            return self.base_layer(x, *args, **kwargs)
        adapted = self.parameter()
        for name in adapter_names:
            adapted = self.merge_weight(adapted, name)
        with substituted_parameter(self.get_base_layer(), self.parameter_name, adapted):
            return self.base_layer(x, *args, **kwargs)

    def _merge_target(self) -> torch.Tensor:
        return self.parameter()

    def _set_merge_target(self, weight: torch.Tensor) -> None:
        with torch.no_grad():
            self.parameter().copy_(weight)

    def merge_parameters(self) -> list[nn.Parameter]:
        return [self.parameter()]

    def extra_repr(self) -> str:
        return f"parameter_name={self.parameter_name!r}, " + super().extra_repr()

def _infer_features(base: nn.Module) -> tuple[int | None, int | None]:
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    if isinstance(base, nn.Embedding):
        return base.num_embeddings, base.embedding_dim
    if isinstance(base, nn.modules.conv._ConvNd):
        return base.in_channels, base.out_channels
    if isinstance(base, nn.MultiheadAttention):
        return base.embed_dim, 3 * base.embed_dim
    if hasattr(base, "nf") and hasattr(base, "weight"):  # transformers Conv1D: weight is (in, out)
        return base.weight.shape[0], base.weight.shape[1]
    return getattr(base, "in_features", None), getattr(base, "out_features", None)


class BufferDict(nn.Module):
    """A dict of tensors registered as buffers (per-adapter, non-trainable state)."""

    def __init__(self, buffers: dict[str, torch.Tensor] | None = None, persistent: bool = False) -> None:
        super().__init__()
        self.persistent = persistent
        if buffers:
            self.update(buffers)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._buffers[key]

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        self.register_buffer(key, value, persistent=self.persistent)

    def __delitem__(self, key: str) -> None:
        del self._buffers[key]
        self._non_persistent_buffers_set.discard(key)

    def __contains__(self, key: object) -> bool:
        return key in self._buffers

    def __len__(self) -> int:
        return len(self._buffers)

    def __iter__(self):
        return iter(self._buffers)

    def keys(self):
        return self._buffers.keys()

    def items(self):
        return self._buffers.items()

    def values(self):
        return self._buffers.values()

    def update(self, buffers) -> None:
        items = buffers.items() if hasattr(buffers, "items") else buffers
        for key, value in items:
            self[key] = value
