"""Plugin discovery and the registries built from it.

This is the only module that talks to pluggy. The rest of the kernel calls the typed
methods of :class:`PluginManager` (``method()``, ``dispatch_layer()``, ...).

Discovery is lazy and idempotent: entry points of group ``peft_kernel`` are loaded the
first time anything needs a registry. Environment variables, read at that moment:

``PEFT_KERNEL_PLUGINS``
    comma-separated entry-point or distribution names to load; all others are skipped.
    Set but empty: load no entry-point plugins at all.
``PEFT_KERNEL_DISABLE_PLUGINS``
    comma-separated entry-point or distribution names never to load.
``PEFT_KERNEL_TRACE``
    when set to ``1``, every layer dispatch decision is printed to stderr.

A plugin that fails to import or to register is reported with a :class:`PeftWarning`
and in :meth:`PluginManager.plugin_info`; everything else keeps working.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import os
import sys
import warnings
from collections.abc import Callable
from importlib import metadata
from typing import Any

import pluggy

from . import hookspecs
from .errors import PeftWarning

PROJECT = "peft_kernel"
hookimpl = pluggy.HookimplMarker(PROJECT)

ENV_SELECT = "PEFT_KERNEL_PLUGINS"
ENV_BLOCK = "PEFT_KERNEL_DISABLE_PLUGINS"
ENV_TRACE = "PEFT_KERNEL_TRACE"


class MethodSpec:
    """One registered PEFT method.

    ``config_cls`` and ``model_cls`` are registered either as classes or as lazy
    ``"package.module:QualName"`` strings. A string is imported the first time the
    attribute is read and the class is cached, so a plugin can be discovered and
    registered without importing torch. An import that fails raises ``ImportError``
    naming the method and the plugin.
    """

    def __init__(self, peft_type: str, config_cls: type | str, model_cls: type | str, prefix: str,
                 is_mixed_compatible: bool = False, source: str = "") -> None:
        self.peft_type = peft_type
        self._config_cls = config_cls
        self._model_cls = model_cls
        self.prefix = prefix
        self.is_mixed_compatible = is_mixed_compatible
        self.source = source

    @property
    def config_cls(self) -> type:
        if isinstance(self._config_cls, str):
            self._config_cls = self._resolve("config_cls", self._config_cls)
        return self._config_cls

    @property
    def model_cls(self) -> type:
        if isinstance(self._model_cls, str):
            cls = self._resolve("model_cls", self._model_cls)
            _check_prefix(self.peft_type.lower(), self.prefix, cls, self.source)
            self._model_cls = cls
        return self._model_cls

    @property
    def is_resolved(self) -> bool:
        """Whether both classes have been imported (``False`` while either is a lazy string)."""
        return not isinstance(self._config_cls, str) and not isinstance(self._model_cls, str)

    @property
    def is_prompt_learning(self) -> bool:
        return bool(getattr(self.config_cls, "is_prompt_learning", False))

    def _resolve(self, field: str, ref: str) -> type:
        try:
            return resolve_ref(ref)
        except Exception as exc:
            if self.source == "register_peft_method":
                by, hint = "with register_peft_method()", "Check the module path and class name."
            else:
                by = f"by plugin {self.source!r}"
                hint = f"Reinstall or fix that plugin, or disable it with {ENV_BLOCK}={self.source}."
            raise ImportError(
                f"{field} {ref!r} of PEFT method {self.peft_type!r} (registered {by}) cannot be imported: "
                f"{type(exc).__name__}: {exc}. {hint}"
            ) from exc

    def __repr__(self) -> str:
        def show(ref):
            if isinstance(ref, str):
                return repr(ref)
            return f"{getattr(ref, '__module__', '?')}.{getattr(ref, '__qualname__', type(ref).__name__)}"

        return (f"MethodSpec(peft_type={self.peft_type!r}, config_cls={show(self._config_cls)}, "
                f"model_cls={show(self._model_cls)}, prefix={self.prefix!r}, "
                f"is_mixed_compatible={self.is_mixed_compatible!r}, source={self.source!r})")


def resolve_ref(ref: str) -> Any:
    """Import ``"package.module:QualName"`` and return the named object."""
    module_name, _, qualname = ref.partition(":")
    obj = importlib.import_module(module_name)
    for attr in qualname.split("."):
        obj = getattr(obj, attr)
    return obj


def _is_lazy_ref(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    module_name, sep, qualname = value.partition(":")
    return bool(sep) and all(part.isidentifier() for part in module_name.split(".") + qualname.split("."))


@dataclasses.dataclass
class Combination:
    """One ``add_weighted_adapter`` combination strategy."""

    name: str
    fn: Callable[..., Any]
    svd: bool = False
    source: str = ""


@dataclasses.dataclass
class PluginRecord:
    name: str
    distribution: str | None = None
    version: str | None = None
    methods: list[str] = dataclasses.field(default_factory=list)
    backends: list[str] = dataclasses.field(default_factory=list)
    combinations: list[str] = dataclasses.field(default_factory=list)
    hooks: list[str] = dataclasses.field(default_factory=list)
    error: str | None = None


def first_party_methods() -> dict[str, list[str]]:
    """``{distribution: [peft_type, ...]}`` of the first-party method plugins (a data file of
    the kernel, ``peft_kernel/data/first_party_methods.json``)."""
    from importlib import resources

    return json.loads(resources.files("peft_kernel.data").joinpath("first_party_methods.json").read_text())


def distribution_for(peft_type: str) -> str | None:
    """The first-party distribution that provides ``peft_type``, or ``None`` when none does
    (never a guessed name: anyone could publish a package under it)."""
    for distribution, peft_types in first_party_methods().items():
        if peft_type in peft_types:
            return distribution
    return None


def _split_env(name: str) -> set[str] | None:
    value = os.environ.get(name)
    if value is None:
        return None
    return {part.strip() for part in value.split(",") if part.strip()}


class PluginManager:
    def __init__(self) -> None:
        self._pm = pluggy.PluginManager(PROJECT)
        self._pm.add_hookspecs(hookspecs)
        self._loaded = False
        self._records: dict[str, PluginRecord] = {}
        self._manual_methods: dict[str, MethodSpec] = {}
        self._methods: dict[str, MethodSpec] | None = None
        self._combinations: dict[str, Combination] | None = None
        self._backends: list | None = None
        self._trace = os.environ.get(ENV_TRACE) == "1"

    # -- discovery --------------------------------------------------------------------

    def load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        from . import builtin_plugin

        self._pm.register(builtin_plugin, name="peft_kernel.builtin")
        self._records["peft_kernel.builtin"] = PluginRecord(
            "peft_kernel.builtin", "peft-kernel", _version("peft-kernel")
        )
        selected, blocked = _split_env(ENV_SELECT), _split_env(ENV_BLOCK) or set()
        for ep in _entry_points():
            dist = ep.dist.name if getattr(ep, "dist", None) else None
            names = {ep.name, dist} - {None}
            if names & blocked or (selected is not None and not names & selected):
                continue
            record = PluginRecord(ep.name, dist, ep.dist.version if dist else None)
            self._records[ep.name] = record
            try:
                plugin = ep.load()
                self._pm.register(plugin, name=ep.name)
                self._pm.check_pending()
            except Exception as exc:  # isolate a broken plugin
                self._fail(record, f"failed to load: {type(exc).__name__}: {exc}")
                if self._pm.has_plugin(ep.name):
                    self._pm.unregister(name=ep.name)

    def register(self, plugin: object, name: str | None = None) -> str:
        """Register a plugin object at run time (tests, notebooks, out-of-tree code)."""
        self.load()
        name = self._pm.register(plugin, name=name)
        self._pm.check_pending()
        self._records[name] = PluginRecord(name)
        self._invalidate()
        return name

    def unregister(self, name: str) -> None:
        self.load()
        if self._pm.has_plugin(name):
            self._pm.unregister(name=name)
        self._records.pop(name, None)
        self._invalidate()

    def _invalidate(self) -> None:
        self._methods = self._combinations = self._backends = None
        from . import quant

        quant._reset()

    def _fail(self, record: PluginRecord, message: str) -> None:
        record.error = message
        warnings.warn(f"peft-kernel plugin {record.name!r} {message}; it is disabled.", PeftWarning, stacklevel=3)

    def _each_impl(self, hook_name: str):
        """Yield ``(record, function)`` per implementation, so failures are attributable."""
        self.load()
        for impl in getattr(self._pm.hook, hook_name).get_hookimpls():  # registration order
            name = self._pm.get_name(impl.plugin)
            record = self._records.setdefault(name, PluginRecord(name))
            if record.error is None:
                yield record, impl.function

    # -- registries -------------------------------------------------------------------

    def methods(self) -> dict[str, MethodSpec]:
        if self._methods is None:
            self._methods = {}
            for record, fn in self._each_impl("peft_kernel_register_methods"):
                added: list[MethodSpec] = []
                # bound now, not at call time: a register kept by a plugin must not reach a later plugin's list
                register = functools.partial(_register_method, added, record.name)
                try:
                    fn(register=register)
                    for spec in added:
                        _add_method(self._methods, spec)
                except Exception as exc:
                    self._fail(record, f"failed to register its methods: {type(exc).__name__}: {exc}")
                    continue
                record.methods = [s.peft_type for s in added]
            for spec in self._manual_methods.values():
                _add_method(self._methods, spec)
        return self._methods

    def add_method(self, spec: MethodSpec) -> None:
        existing = self.methods()
        _add_method(existing, spec)  # raises on duplicates before anything is stored
        self._manual_methods[spec.peft_type] = spec

    def method(self, peft_type: str) -> MethodSpec:
        methods = self.methods()
        try:
            return methods[peft_type]
        except KeyError:
            raise ValueError(self.unknown_method_message(peft_type)) from None

    def unknown_method_message(self, peft_type: str) -> str:
        known = ", ".join(sorted(self.methods())) or "none"
        broken = [r.name for r in self._records.values() if r.error]
        hint = f" Broken plugins: {', '.join(broken)} (see `peft-kernel plugins`)." if broken else ""
        return f"Unknown peft_type {peft_type!r}: {self.provider_hint(peft_type)} Installed methods: {known}.{hint}"

    def provider_hint(self, peft_type: str) -> str:
        """Where ``peft_type`` could come from: an installed plugin that is not loaded, a
        first-party distribution, or the user's own registration."""
        distribution = distribution_for(peft_type)
        for ep in _entry_points():
            ep_dist = ep.dist.name if getattr(ep, "dist", None) else None
            if ep.name != peft_type.lower() and (distribution is None or ep_dist != distribution):
                continue
            record = self._records.get(ep.name)
            if record is None:
                why = f"not loaded: ${ENV_SELECT} or ${ENV_BLOCK} leaves it out"
            elif record.error:
                why = f"broken: it {record.error}"
            else:
                continue  # loaded, and it does not provide peft_type
            return f"it is provided by plugin {ep.name!r} ({ep_dist}), which is installed but {why}."
        if distribution is not None:
            return f"it is provided by the plugin {distribution}, which is not installed: pip install {distribution}."
        return ("no loaded plugin provides it, and no known plugin does. A method of your own must be registered "
                "before it is used, in every process that builds or loads it: "
                "peft_kernel.register_peft_method(name=..., config_cls=..., model_cls=...), or a plugin package "
                "with a `peft_kernel` entry point (see docs/plugin-authors.md).")

    def combinations(self) -> dict[str, Combination]:
        if self._combinations is None:
            self._combinations = {}
            for record, fn in self._each_impl("peft_kernel_register_combinations"):
                added: list[Combination] = []
                register = functools.partial(_register_combination, added, record.name)  # bound now, as above
                try:
                    fn(register=register)
                    for combo in added:
                        if combo.name in self._combinations:
                            raise KeyError(f"combination type {combo.name!r} is already registered")
                        self._combinations[combo.name] = combo
                except Exception as exc:
                    self._fail(record, f"failed to register combinations: {type(exc).__name__}: {exc}")
                    continue
                record.combinations = [c.name for c in added]
        return self._combinations

    def quant_backends(self) -> list:
        if self._backends is None:
            self._backends = []
            for record, fn in self._each_impl("peft_kernel_register_quant_backends"):
                added: list = []
                try:
                    fn(register=added.append)
                except Exception as exc:
                    self._fail(record, f"failed to register quant backends: {type(exc).__name__}: {exc}")
                    continue
                self._backends.extend(added)
                record.backends = [_describe_backend(b) for b in added]
        return self._backends

    # -- typed hook calls -------------------------------------------------------------

    def dispatch_layer(self, target, target_name: str, adapter_name: str, config):
        self.load()
        layer = self._pm.hook.peft_kernel_dispatch_layer(
            target=target, target_name=target_name, adapter_name=adapter_name, config=config
        )
        if self._trace:
            decided = type(layer).__name__ if layer is not None else "no plugin"
            print(
                f"[peft-kernel] layer `{target_name}` ({type(target).__name__}) "
                f"-> {config.peft_type} -> {decided}",
                file=sys.stderr,
            )
        return layer

    def adapter_state_dict(self, model, config, adapter_name, state_dict) -> None:
        self.load()
        self._pm.hook.peft_kernel_adapter_state_dict(
            model=model, config=config, adapter_name=adapter_name, state_dict=state_dict
        )

    def load_state_dict(self, model, config, adapter_name, state_dict) -> None:
        self.load()
        self._pm.hook.peft_kernel_load_state_dict(
            model=model, config=config, adapter_name=adapter_name, state_dict=state_dict
        )

    # -- reporting --------------------------------------------------------------------

    def plugin_info(self) -> list[PluginRecord]:
        self.methods(), self.combinations(), self.quant_backends()
        for name, record in self._records.items():
            plugin = self._pm.get_plugin(name)
            if plugin is not None:
                record.hooks = sorted(c.name for c in self._pm.get_hookcallers(plugin) or [])
        return list(self._records.values())


def _describe_backend(backend) -> str:
    try:
        ok, reason = backend.available()
    except Exception as exc:
        ok, reason = False, f"{type(exc).__name__}: {exc}"
    return backend.name if ok else f"{backend.name} (unavailable: {reason})"


def _entry_points():
    return sorted(metadata.entry_points(group=PROJECT), key=lambda ep: ep.name)


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _make_method_spec(*, name, config_cls, model_cls, prefix=None, is_mixed_compatible=False, source=""):
    if not isinstance(name, str) or not name or name != name.lower() or name.endswith("_"):
        raise ValueError(f"method name must be a non-empty lower-case string without a trailing '_', got {name!r}")
    for field, value in (("config_cls", config_cls), ("model_cls", model_cls)):
        if isinstance(value, str) and not _is_lazy_ref(value):
            raise ValueError(f"{field} of method {name!r} must be a class or a lazy 'package.module:QualName' "
                             f"string, got {value!r}")
    prefix = prefix if prefix is not None else name + "_"
    if not isinstance(model_cls, str):  # a lazy model_cls is checked when it is first imported
        _check_prefix(name, prefix, model_cls, source)
    return MethodSpec(name.upper(), config_cls, model_cls, prefix, is_mixed_compatible, source)


def _register_method(added: list[MethodSpec], source: str, **kwargs) -> None:
    """A plugin's ``register`` for methods, with its list and name bound by ``functools.partial``."""
    added.append(_make_method_spec(source=source, **kwargs))


def _register_combination(added: list[Combination], source: str, name, fn, *, svd=False) -> None:
    """A plugin's ``register`` for combination strategies, bound like :func:`_register_method`."""
    added.append(Combination(name, fn, svd, source))


def _check_prefix(name: str, prefix: str, model_cls: type, source: str) -> None:
    model_prefix = getattr(model_cls, "prefix", None)
    if model_prefix is not None and model_prefix != prefix:
        by = "" if source in ("", "register_peft_method") else f" (registered by plugin {source!r})"
        raise ValueError(f"prefix {prefix!r} of method {name!r}{by} does not match "
                         f"{model_cls.__name__}.prefix {model_prefix!r}")


def _add_method(registry: dict[str, MethodSpec], spec: MethodSpec) -> None:
    if spec.peft_type in registry:
        raise KeyError(f"peft_type {spec.peft_type!r} is already registered (by {registry[spec.peft_type].source})")
    for other in registry.values():
        # prefix first: lazy classes are imported only when two methods share a prefix
        if other.prefix == spec.prefix and not spec.is_prompt_learning and not other.is_prompt_learning:
            # methods may share a prefix only when one's tuner subclasses the other's (a variant)
            if not (issubclass(spec.model_cls, other.model_cls) or issubclass(other.model_cls, spec.model_cls)):
                raise ValueError(f"prefix {spec.prefix!r} of {spec.peft_type} is already used by {other.peft_type}")
    registry[spec.peft_type] = spec


_manager: PluginManager | None = None


def manager() -> PluginManager:
    """The process-wide plugin manager (created on first use)."""
    global _manager
    if _manager is None:
        _manager = PluginManager()
    return _manager


def reset_manager() -> None:
    """Forget all discovered plugins; the next call to :func:`manager` rediscovers them."""
    global _manager
    _manager = None
    from . import quant

    quant._reset()


def register_peft_method(*, name, config_cls, model_cls, prefix=None, is_mixed_compatible=False) -> None:
    """Register a PEFT method from plain code, without packaging a plugin.

    ``name`` is the lower-case method name; its ``peft_type`` is ``name.upper()`` and may
    be any string the kernel has never seen. ``config_cls`` and ``model_cls`` are classes
    or lazy ``"package.module:QualName"`` strings, imported when first used. Raises
    ``KeyError`` for a ``peft_type`` that is already registered and ``ValueError`` when
    ``prefix`` (default ``name + "_"``) disagrees with ``model_cls.prefix`` (checked when a
    lazy ``model_cls`` is imported) or collides with another method's prefix.
    """
    spec = _make_method_spec(
        name=name, config_cls=config_cls, model_cls=model_cls, prefix=prefix,
        is_mixed_compatible=is_mixed_compatible, source="register_peft_method",
    )
    manager().add_method(spec)
