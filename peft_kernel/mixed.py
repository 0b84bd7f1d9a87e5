"""Mixed adapter types: adapters of several methods on one model, active together.

``get_peft_model(model, config, mixed=True)`` returns a :class:`PeftMixedModel`. Its tuner,
:class:`MixedTuner`, holds one ``peft_config`` per adapter, of any method whose plugin
registered it with ``is_mixed_compatible=True``, and hands each adapter's injection to a
tuner of that adapter's own method (one per method, :attr:`BaseTuner.mixed_member` set), so
every method keeps its own targeting, dispatch and layer classes. Nothing here names a
method.

Where two methods adapt the same module, their layers nest: the new method's layer wraps
the layer already there (``lin.base_layer`` is then the other method's layer); a further
adapter of the method of the outermost layer joins that layer. Each layer runs its adapters
on what its ``base_layer`` returns, so active adapters of every method apply together, in
the order the layers nest; merging folds the innermost layer's adapters into the weight
first. Everything else is the kernel's usual per-layer bookkeeping (activation, disabling,
deletion, merging, unloading), which reaches nested layers like any others, and checkpoints
leave out the steps through other methods' layers, so each adapter is saved in its own
method's format, loadable by a single-method :class:`~peft_kernel.PeftModel` as well.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, MutableMapping
from typing import Any

from torch import nn

from .config import PeftConfig
from .peft_model import PeftModel, _check_adapter_name
from .plugins import MethodSpec, manager
from .tuner import BaseTuner, adapter_modules


def mixed_compatible_methods() -> list[str]:
    """The installed methods that can join a mixed model (``is_mixed_compatible=True``)."""
    return sorted(t for t, spec in manager().methods().items() if spec.is_mixed_compatible)


def check_mixed_compatible(config: PeftConfig) -> MethodSpec:
    """The method of ``config`` if an adapter of it can join a mixed model; else ``ValueError``."""
    if not isinstance(config, PeftConfig):
        raise TypeError(f"Expected a PeftConfig, got {type(config).__name__}")
    spec = manager().method(config.peft_type)
    compatible = ", ".join(mixed_compatible_methods()) or "none installed"
    if spec.is_prompt_learning or not spec.is_mixed_compatible:
        kind = "a prompt-learning method" if spec.is_prompt_learning else "not registered as mixed-compatible"
        raise ValueError(
            f"{config.peft_type} adapters cannot join a mixed model: {config.peft_type} is {kind}. Mixed models hold "
            f"adapters of the methods whose plugin registers them with is_mixed_compatible=True ({compatible}); "
            "use a PeftModel of its own for this adapter."
        )
    if getattr(config, "target_parameters", None):
        raise ValueError(f"{config.peft_type} adapters with target_parameters cannot join a mixed model; target "
                         "modules instead, or use a PeftModel of their own method")
    shared = spec.model_cls.shared_buffer_names
    if shared:
        raise ValueError(f"{config.peft_type} keeps tensors shared by all its layers ({', '.join(shared)}), which "
                         "mixed models do not hold; use a PeftModel of its own method")
    return spec


class _ConfigsOfMethod(MutableMapping):
    """The configs of one method's adapters, a live view of the mixed tuner's ``peft_config``
    (what that method's tuner sees as its own ``peft_config``); writes go to the mixed tuner."""

    def __init__(self, owner: MixedTuner, peft_type: str) -> None:
        self._owner, self._peft_type = owner, peft_type

    def _all(self) -> dict[str, PeftConfig]:
        return self._owner.peft_config

    def __getitem__(self, name: str) -> PeftConfig:
        config = self._all()[name]
        if config.peft_type != self._peft_type:
            raise KeyError(name)
        return config

    def __setitem__(self, name: str, config: PeftConfig) -> None:
        if config.peft_type != self._peft_type:
            raise ValueError(f"{config.peft_type} config stored among the {self._peft_type} adapters")
        self._all()[name] = config

    def __delitem__(self, name: str) -> None:
        if name not in self:
            raise KeyError(name)
        del self._all()[name]

    def __iter__(self) -> Iterator[str]:
        return iter([name for name, config in self._all().items() if config.peft_type == self._peft_type])

    def __len__(self) -> int:
        return sum(1 for _ in self)


class MixedTuner(BaseTuner):
    """The tuner of a :class:`PeftMixedModel`: adapters of several methods on one model.

    ``peft_config`` maps every adapter to its own config. Injection goes to a tuner of the
    adapter's method (built on first use, sharing the model); activation, trainability,
    merging, unloading and deletion are the kernel's, across all methods at once.
    """

    def __init__(self, model: nn.Module, peft_config, adapter_name: str = "default", **kwargs: Any) -> None:
        self.__dict__["_method_tuners"] = {}  # peft_type -> tuner; plain dict: not submodules
        super().__init__(model, peft_config, adapter_name, **kwargs)

    def method_tuner(self, peft_type: str) -> BaseTuner:
        """The tuner of one method inside this model: it injects that method's adapters and
        offers the method's own model-level calls; its ``peft_config`` lists that method's
        adapters only."""
        tuner = self._method_tuners.get(peft_type)
        if tuner is None:
            tuner = manager().method(peft_type).model_cls(self.model, {}, adapter_name=None)
            tuner.mixed_member = True
            tuner.peft_config = _ConfigsOfMethod(self, peft_type)
            self._method_tuners[peft_type] = tuner
        return tuner

    # -- what the methods' tuners contribute ---------------------------------------------

    @property
    def adapter_prefixes(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p for tuner in self._method_tuners.values() for p in tuner.adapter_prefixes))

    @property
    def special_forward_args(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(a for tuner in self._method_tuners.values() for a in tuner.special_forward_args))

    def per_call_state(self, args: tuple, kwargs: dict[str, Any], *, generating: bool) -> Callable[..., dict] | None:
        steps = [step for tuner in self._method_tuners.values()
                 if (step := tuner.per_call_state(args, kwargs, generating=generating)) is not None]
        if len(steps) <= 1:
            return steps[0] if steps else None

        def every_step(step_args, step_kwargs):
            state: dict = {}
            for step in steps:
                state.update(step(step_args, step_kwargs))
            return state

        return every_step

    # -- injection --------------------------------------------------------------------

    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict: dict | None = None) -> None:
        config = self.peft_config[adapter_name]
        tuner = self.method_tuner(check_mixed_compatible(config).peft_type)
        tuner.inject_adapter(model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                             low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)
        names = [n for t in self._method_tuners.values() for n in t.targeted_module_names]
        self.targeted_module_names = list(dict.fromkeys(self.targeted_module_names + names))
        self._activate_injected(model, adapter_name, self.peft_config[adapter_name])

    # -- adapter management -----------------------------------------------------------

    def delete_adapter(self, adapter_name: str | Iterable[str]) -> None:
        """Delete one adapter or several (a list); a merged adapter must be unmerged first."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"Adapter(s) {unknown} do not exist; available: {sorted(self.peft_config)}")
        merged = sorted({n for _, m in adapter_modules(self.model) for n in m.merged_adapters if n in names})
        if merged:
            raise ValueError(f"Cannot delete adapter(s) {merged} while they are merged; unmerge_adapter() first")
        targeted = self.targeted_module_names
        for name in names:
            super().delete_adapter(name)
        held = self._adapters_by_module()
        self.targeted_module_names = [n for n in targeted if held.get(n)]
        for tuner in self._method_tuners.values():
            tuner.targeted_module_names = [n for n in tuner.targeted_module_names
                                           if held.get(n, set()) & set(tuner.peft_config)]

    def _adapters_by_module(self) -> dict[str, set[str]]:
        """``{module name: adapters its layers hold}``, nested layers counted for the module."""
        held: dict[str, set[str]] = {}
        outermost: dict[str, str] = {}
        for name, module in adapter_modules(self.model):
            head = outermost.get(name, name)
            outermost[f"{name}.base_layer"] = head
            held.setdefault(head, set()).update(module._all_available_adapter_names())
        return held

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(
            "add_weighted_adapter is not available on mixed models: a combination is an adapter of one method. "
            "Combine the adapters in a PeftModel of their method, then load the result here."
        )


class PeftMixedModel(PeftModel):
    """A base model with adapters of several methods (HF PEFT's ``PeftMixedModel``).

    Built by ``get_peft_model(model, config, mixed=True)`` or :meth:`from_pretrained`; further
    adapters come with :meth:`add_adapter` / :meth:`load_adapter`, of any method registered
    with ``is_mixed_compatible=True``. ``set_adapter`` takes one name or several; the active
    adapters of all methods apply together. Each adapter is saved in its own method's format
    (``save_pretrained``), so a single-method :class:`~peft_kernel.PeftModel` loads it too.
    """

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False) -> None:
        check_mixed_compatible(peft_config)
        _check_adapter_name(adapter_name, peft_config)
        nn.Module.__init__(self)
        self.peft_type = None  # several methods: each adapter's config names its own
        self._is_prompt_learning = False
        self._peft_config = None
        self.base_model = MixedTuner(model, {adapter_name: peft_config}, adapter_name,
                                     low_cpu_mem_usage=low_cpu_mem_usage, autocast_adapter_dtype=autocast_adapter_dtype)
        self.special_peft_forward_args: set[str] = set()
        self._note_forward_args()
        if getattr(model, "name_or_path", None) and peft_config.base_model_name_or_path is None:
            peft_config.base_model_name_or_path = model.name_or_path
        if hasattr(self.base_model, "config") and hasattr(self.base_model.config, "pretraining_tp"):
            self.base_model.config.pretraining_tp = 1

    def _note_forward_args(self) -> None:
        self.special_peft_forward_args |= {"adapter_names", *self.base_model.special_forward_args}

    @property
    def active_adapter(self) -> str | list[str]:
        return self.base_model.active_adapter

    @active_adapter.setter
    def active_adapter(self, value: str | list[str]) -> None:
        self.base_model.active_adapter = value

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: bool = True) -> None:
        """Add a new (inactive) adapter of any mixed-compatible method; rolled back on failure,
        layers it had wrapped included."""
        super().add_adapter(adapter_name, peft_config, low_cpu_mem_usage=low_cpu_mem_usage,
                            autocast_adapter_dtype=autocast_adapter_dtype)
        self._note_forward_args()

    def _check_method_of(self, peft_config: PeftConfig) -> None:
        check_mixed_compatible(peft_config)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool | None = None) -> None:
        """Activate one adapter or several, of any methods; all others are inactive.

        The active adapters become trainable unless ``inference_mode`` (default: frozen when
        every one of them was loaded for inference, as ``PeftModel.set_adapter`` does). They
        apply in the order their layers nest, which is the order they were added in (a
        further adapter of the method of a module's outermost layer joins that layer).
        """
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if inference_mode is None:  # (unknown names: the tuner's error)
            inference_mode = all(self.peft_config[n].inference_mode for n in names if n in self.peft_config)
        self.base_model.set_adapter(names, inference_mode=inference_mode)

    def delete_adapter(self, adapter_name: str | list[str]) -> None:
        """Delete one adapter or several (a list)."""
        self.base_model.delete_adapter(adapter_name)

    def method_tuner(self, peft_type: str) -> BaseTuner:
        """See :meth:`MixedTuner.method_tuner`."""
        return self.base_model.method_tuner(peft_type)
