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
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any

import torch
from torch import nn
from torch.compiler import is_dynamo_compiling
from torch.nn.modules import module as _module_hooks

from . import distributed, quant
from .errors import MergeNotSupportedError, PeftWarning

BASE_ADAPTER = "__base__"
_UNSPECIALISED = object()  # no specialised forward asked for since the last state change
#: what :attr:`AdapterLayer.call_state` is outside a call that routes per-call values
NO_CALL_STATE: Mapping[str, Any] = MappingProxyType({})

class PerCall:
    """A value that belongs to the running call, never to the shared modules: a ``ContextVar``,
    so threads and asyncio tasks running calls through one model each see their own.

    torch.compile cannot trace a ``ContextVar``. In code it traces, a value bound there lives in
    a plain slot instead (tracing is single-threaded, and the compiled graph keeps the value it
    was traced with: its guards on the call's arguments, e.g. ``adapter_names``, tell calls
    apart). A value bound by eager code around traced code (a compiled inner model called by an
    eager ``PeftModel``) is read outside the graph (a graph break), never assumed absent."""

    def __init__(self, name: str) -> None:
        self._var: ContextVar[Any] = ContextVar(name, default=None)
        self._traced: Any = None
        self._eager_bindings = 0  # bindings eager code has made and not yet left, in any thread
        self._lock = threading.Lock()

    def get(self) -> Any:
        if not is_dynamo_compiling():
            return self._var.get()
        if self._traced is not None or not self._eager_bindings:
            return self._traced
        return _read_eagerly(self._var)

    @contextmanager
    def bound(self, value: Any) -> Iterator[None]:
        """``get()`` returns ``value`` inside the block."""
        if is_dynamo_compiling():
            outer, self._traced = self._traced, value
            try:
                yield
            finally:
                self._traced = outer
            return
        token = self._var.set(value)
        with self._lock:
            self._eager_bindings += 1
        try:
            yield
        finally:
            with self._lock:
                self._eager_bindings -= 1
            self._var.reset(token)


@torch.compiler.disable
def _read_eagerly(var: ContextVar) -> Any:
    return var.get()


#: the running mixed batch: (ids of the modules it routes, per-sample names)
_MIXED_BATCH = PerCall("peft_kernel_mixed_batch")
#: (ids of the layers, read-only per-call values) of the running PeftModel call; see call_state
_CALL_STATE = PerCall("peft_kernel_call_state")
#: (id of the layer, row indices) while a layer's adapter_forward runs on a mixed-batch sub-batch
_BATCH_ROWS = PerCall("peft_kernel_batch_rows")


def mixed_batch(modules: Iterable[nn.Module], adapter_names: list[str]) -> AbstractContextManager:
    """Route ``adapter_names`` (one per sample) to ``modules`` for the calls inside the block."""
    return _MIXED_BATCH.bound((frozenset(map(id, modules)), list(adapter_names)))


def with_call_state(layers: Iterable[nn.Module], state: Mapping[str, Any]) -> AbstractContextManager:
    """Show ``state`` to ``layers`` as their :attr:`AdapterLayer.call_state` inside the block."""
    return _CALL_STATE.bound((frozenset(map(id, layers)), state))


def batch_adapter_names_of(module: nn.Module) -> list[str] | None:
    """The per-sample adapter names of the running mixed batch if it routes ``module``."""
    batch = _MIXED_BATCH.get()
    if batch is None or id(module) not in batch[0]:
        return None
    return batch[1]


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
        if in_features is None and out_features is None and not isinstance(self, ParameterLayer):
            warnings.warn(f"Unsupported layer type {type(base).__qualname__}: its input and output sizes are unknown "
                          "(no in_features / out_features); the custom layer must not rely on them.", PeftWarning,
                          stacklevel=3)
        self.set_plain_attributes(
            _active_adapter=[] if adapter_name is None else [adapter_name], merged_adapters=[],
            _disable_adapters=False, kwargs=kwargs, in_features=in_features, out_features=out_features,
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
        # cached: forward asks this for every layer on every call (not while torch.compile
        # traces: see forward)
        present = None if is_dynamo_compiling() else self.__dict__.get("_present")
        if present is None:
            present = set()
            for name in self.adapter_layer_names:
                container = self._container(name)
                if container is not None:
                    present.update(container.keys())
            if not is_dynamo_compiling():
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
        unmerged. (A mixed batch is per call, not a state change: a specialised forward
        checks :attr:`batch_adapter_names` itself.) A layer calls it itself after
        changing state outside those operations (e.g. a method's own scale setter). Subclasses
        that cache anything derived from their adapters (a specialised forward's plan, a
        normalisation) drop it here and call ``super()``. It is cheap: call it when in doubt.
        """
        for cached in ("_present", "_fast_forward", "_kept"):
            self.__dict__.pop(cached, None)

    def kept(self, slot: Any, tensors: Iterable[torch.Tensor], extra: Any = None, *,
             in_training: bool = False) -> dict:
        """A dict that keeps values computed from ``tensors`` (and from the plain values
        ``extra``) under ``slot`` from one call to the next, while they stay as they are.

        It comes back empty, its old values dropped, when one of the tensors was replaced (a
        new tensor, ``.to()``, ``.data =``) or edited in place (``add_``, ``copy_``, an
        optimizer step, ``load_state_dict``), when ``extra`` differs, and after every state
        change (:meth:`adapter_state_changed`). An edit through ``.data`` bypasses torch's
        version counter: call ``adapter_state_changed()`` after one. Where nothing may be
        kept it is a new throw-away dict on every call: in training mode (unless
        ``in_training``), while torch.compile traces, and for tensor subclasses (quantized,
        sharded: their contents can change behind an unchanged version). Keep no autograd
        history in it: compute kept values under ``torch.no_grad()``."""
        if (self.training and not in_training) or is_dynamo_compiling():
            return {}
        tensors = tuple(tensors)
        key = [extra]
        for tensor in tensors:
            if type(tensor) is not nn.Parameter and type(tensor) is not torch.Tensor:
                return {}
            key.append((id(tensor), tensor.data_ptr(), tensor._version))
        store = self.__dict__.setdefault("_kept", {})
        entry = store.get(slot)
        if entry is None or entry[0] != key:
            # the tensors are held with the values, so that no new tensor can take their ids
            entry = store[slot] = (key, tensors, {})
        return entry[2]

    @property
    def batch_adapter_names(self) -> list[str] | None:
        """Per-sample adapter names of the mixed batch (``adapter_names=``) that the current
        call runs through this layer, else ``None``. Per call and per thread: concurrent calls
        with different batches each see their own."""
        return batch_adapter_names_of(self)

    @property
    def batch_rows(self) -> torch.Tensor | None:
        """While ``adapter_forward`` runs on one adapter's sub-batch of a mixed batch: the
        indices of those rows in the full batch (to pick per-row values from
        :attr:`call_state`); else ``None``. Per call, like :attr:`batch_adapter_names`."""
        rows = _BATCH_ROWS.get()
        return rows[1] if rows is not None and rows[0] == id(self) else None

    @property
    def call_state(self) -> Mapping[str, Any]:
        """Per-call values of the running ``PeftModel`` call (forward or generate), computed by
        the tuner's :meth:`~peft_kernel.BaseTuner.per_call_state` before every forward of the
        base model; empty outside such a call. Read-only; per call and per thread."""
        state = _CALL_STATE.get()
        return state[1] if state is not None and id(self) in state[0] else NO_CALL_STATE

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
        """Keep adapters in fp32 on half-precision bases (HF PEFT's autocast_adapter_dtype); with
        ``autocast=False`` they take the base layer's dtype instead."""
        dtype = None if autocast else base_layer_dtype(self)
        if not autocast and (dtype is None or not dtype.is_floating_point):
            return
        for attr in self.adapter_layer_names:
            container = self._container(attr)
            if container is None or adapter_name not in container:
                continue
            item = container[adapter_name]
            tensors = _tensors_of(item)
            for tensor in tensors:
                if not tensor.is_floating_point():
                    continue
                if autocast and tensor.dtype in (torch.float16, torch.bfloat16):
                    tensor.data = tensor.data.float()
                elif not autocast and tensor.dtype != dtype:
                    tensor.data = tensor.data.to(dtype)

    # -- forward ----------------------------------------------------------------------

    def adapter_forward(
        self, x: torch.Tensor, result: torch.Tensor, adapter_name: str, *args, **kwargs
    ) -> torch.Tensor:
        """Return ``result`` (the base layer's output for ``x``) with one adapter applied."""
        raise NotImplementedError

    # forward() dispatches; general_forward() is the general path. In eager mode the first call
    # after a state change asks for a forward specialised to that state: a direct call of the
    # base layer when merged, else what specialised_forward() returns (None: none). It is kept
    # in _fast_forward until the next state change (adapter_state_changed) and re-checks its
    # preconditions on every call, falling back to general_forward(). It is not installed as the
    # instance's `forward`: torch.compile guards on an instance forward, so each state would
    # compile twice (before and after the first eager call). Code that torch.compile traces takes
    # the general path, so its graph depends on the adapter state only, and the eager tricks
    # (in-place updates, values kept in Python between calls) stay out of it.

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not is_dynamo_compiling():
            fast = self.__dict__.get("_fast_forward", _UNSPECIALISED)
            if fast is _UNSPECIALISED:
                fast = self._specialise()
            if fast is not None:
                return fast(x, *args, **kwargs)
        return self.general_forward(x, *args, **kwargs)

    def general_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """The forward for any state: disabled, mixed batch, merged, or the active adapters
        folded over the base result (what a specialised forward falls back to)."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            adapter_names = batch_adapter_names_of(self)
        if self._disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        if self.merged_adapters:
            return self.base_layer(x, *args, **kwargs)
        names = [name for name in self._active_adapter if self.has_adapter(name)]
        return self.forward_active(x, names, *args, **kwargs)

    def specialised_forward(self) -> Callable[..., Any] | None:
        """A faster equivalent of :meth:`general_forward` for the current unmerged state (a
        bound method, so that deep copies follow the copy), or ``None``. It must call
        ``self.general_forward`` itself whenever its preconditions no longer hold. Eager
        calls only: under torch.compile the general path is traced."""
        return None

    def _specialise(self) -> Callable[..., Any] | None:
        if batch_adapter_names_of(self) is not None:  # a mixed batch is per call: ask again after it
            return None
        if self._disable_adapters:
            fn = None
        else:
            fn = self._forward_merged if self.merged_adapters else self.specialised_forward()
        self.__dict__["_fast_forward"] = fn
        return fn

    def _forward_merged(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if kwargs or not self.merged_adapters or self._disable_adapters or batch_adapter_names_of(self) is not None:
            return self.general_forward(x, *args, **kwargs)
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

    def batched_forward(self, x: torch.Tensor, row_adapter: torch.Tensor, adapter_names: tuple[str, ...],
                        *args: Any, **kwargs: Any) -> Any | None:
        """The output of a mixed batch for all its rows at once, or ``None`` to leave it to the
        kernel, which then runs :meth:`adapter_forward` once per adapter on that adapter's rows.

        ``adapter_names`` are the distinct adapters of the batch that this layer has (sorted);
        row ``i`` (along :attr:`batch_dim`) gets ``adapter_names[row_adapter[i]]``, or no
        adapter where ``row_adapter[i] == len(adapter_names)`` (``"__base__"`` and adapters
        this layer lacks). ``row_adapter`` is a long tensor on ``x``'s device. Like
        :meth:`forward_active` it runs the base layer itself. Decide whether it applies before
        running anything, from settings rather than tensor values (so that torch.compile traces
        it), and return ``None`` where it would not give the per-adapter result (dropout in
        training, variants the batched math does not cover). Per-adapter tensors stacked for it
        can be kept between calls with :meth:`kept`."""
        return None

    def _mixed_batch_forward(self, x, *args, adapter_names, **kwargs):
        """Each sample gets the adapter named for it (``"__base__"``: none): all rows at once
        where :meth:`batched_forward` takes the batch, else one sub-batch per adapter."""
        batch = x.shape[self.batch_dim]
        names = list(adapter_names)
        if len(names) != batch:
            raise ValueError(f"adapter_names has {len(adapter_names)} entries but the batch has {batch} samples")
        self._check_single_batched_input(batch, args, kwargs)
        adapters = tuple(sorted(name for name in set(names) if name != BASE_ADAPTER and self.has_adapter(name)))
        if not adapters:
            return self.base_layer(x, *args, **kwargs)
        if type(self).batched_forward is not AdapterLayer.batched_forward:
            position = {name: i for i, name in enumerate(adapters)}
            row_adapter = torch.tensor([position.get(name, len(adapters)) for name in names], device=x.device)
            result = self.batched_forward(x, row_adapter, adapters, *args, **kwargs)
            if result is not None:
                return result
        result = self.base_layer(x, *args, **kwargs)
        for name in adapters:
            index = torch.tensor([i for i, n in enumerate(names) if n == name], device=result.device)
            sub_x = x.index_select(self.batch_dim, index.to(x.device))
            sub_result = result.index_select(self.batch_dim, index)
            with _BATCH_ROWS.bound((id(self), index)), self._inner_layers_see(index.tolist(), names):
                updated = self.adapter_forward(sub_x, sub_result, name, *args, **kwargs)
            result = result.index_copy(self.batch_dim, index, updated.to(result.dtype))
        return result

    @contextmanager
    def _inner_layers_see(self, rows: list[int], names: list[str]) -> Iterator[None]:
        """While an adapter runs ``base_layer`` on a sub-batch (e.g. on a transformed input), the
        adapter layers of other methods inside it (a mixed model) route the names of those rows."""
        inner_layers = []
        inner = self._modules["base_layer"]
        while isinstance(inner, AdapterLayer):
            inner_layers.append(inner)
            inner = inner._modules["base_layer"]
        if not inner_layers or batch_adapter_names_of(inner_layers[0]) is None:
            yield
            return
        with mixed_batch(inner_layers, [names[i] for i in rows]):
            yield

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

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """HF PEFT's name for :meth:`delta_weight`."""
        return self.delta_weight(adapter_name)

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
        if safe_merge:
            self.check_safe_merge(names)
        for name in names:
            if not self.has_adapter(name):
                continue
            self._set_merge_target(self.merge_weight(self._merge_target().detach(), name))
            self.merge_bias(name, +1)
            self.merged_adapters.append(name)
        self.adapter_state_changed()

    def check_safe_merge(self, adapter_names: list[str]) -> None:
        """Raise ``ValueError`` if merging ``adapter_names`` (in order) would put NaN or inf
        into the base weight or bias. Works on a copy: nothing changes. ``merge_adapter(safe_merge=True)``
        calls it for every layer before it merges any. Layers that override :meth:`merge`
        override this too."""
        weight = self._merge_target().detach().clone()
        for name in adapter_names:
            if name in self.merged_adapters or not self.has_adapter(name):
                continue
            weight = self.merge_weight(weight, name)
            if not torch.isfinite(weight).all():
                raise ValueError(f"NaNs or infs detected when merging adapter {name!r}; nothing was merged. Check the "
                                 "adapter's weights (e.g. a diverged training run) before merging.")
        self._check_safe_bias([n for n in adapter_names if n not in self.merged_adapters])

    def _check_safe_bias(self, adapter_names: list[str]) -> None:
        """Raise ``ValueError`` if folding the adapters' bias contributions (``merge_bias``) would
        put NaN or inf into the base bias. Tried on the live bias and undone: nothing changes."""
        bias = getattr(self.get_base_layer(), "bias", None)
        if not isinstance(bias, torch.Tensor):
            return
        saved = bias.detach().clone()
        try:
            for name in adapter_names:
                if not self.has_adapter(name):
                    continue
                self.merge_bias(name, +1)
                if not torch.isfinite(bias).all():
                    raise ValueError(f"NaNs or infs detected in the bias when merging adapter {name!r}; the base was "
                                     "left unchanged. Check the adapter's weights before merging.")
        finally:
            with torch.no_grad():
                bias.copy_(saved)

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
