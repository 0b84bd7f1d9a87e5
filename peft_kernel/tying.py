"""``ensure_weight_tying``: adapters of modules that share the input embedding's weight.

A language model often ties its output head to its input embeddings (``lm_head.weight is
embed_tokens.weight``). An adapter that trains a copy of the embedding (``modules_to_save``) or
adapts it (``target_modules``) breaks that tie unless the tied modules use the very same trained
tensors. With ``ensure_weight_tying=True`` in the config the kernel makes them do so:

* ``modules_to_save``: the tied module's copy shares its ``weight`` with the embedding's copy;
* ``target_modules``: the tied module gets an adapter layer whose tensors the tuner ties to the
  embedding's layer (:meth:`peft_kernel.BaseTuner._tie_layer`).

The config is rewritten as HF PEFT rewrites it (the embedding's full name is added to the
field, the tied names are taken out of it), so ``adapter_config.json`` stays the same.
"""

from __future__ import annotations

import dataclasses
import re
import warnings

from torch import nn

from .auxiliary import ModulesToSaveWrapper
from .errors import PeftWarning
from .layer import AdapterLayer


def _unwrapped(module: nn.Module) -> nn.Module:
    while isinstance(module, (AdapterLayer, ModulesToSaveWrapper)):
        module = module.original_module if isinstance(module, ModulesToSaveWrapper) else module.base_layer
    return module


def tied_to_input_embeddings(model: nn.Module) -> tuple[str, list[str]] | None:
    """``(embedding name, [names of the modules sharing its weight])``, or ``None`` when the
    model has no input embeddings (``get_input_embeddings()``) or nothing is tied to them.
    Adapter wrappers are seen through, so the answer does not change once adapters exist."""
    getter = getattr(model, "get_input_embeddings", None)
    embedding = getter() if callable(getter) else None
    if embedding is None:
        return None
    weight = getattr(_unwrapped(embedding), "weight", None)
    if weight is None:
        return None
    source, tied = None, []
    skip: tuple[str, ...] = ()
    for name, module in model.named_modules(remove_duplicate=False):
        if not name or (skip and name.startswith(skip)):
            continue
        if getattr(_unwrapped(module), "weight", None) is not weight:
            continue
        skip += (name + ".",)  # a wrapper's inner modules are the same module again
        if module is embedding:
            source = name
        else:
            tied.append(name)
    if source is None or not tied:
        return None
    return source, tied


def _matches(names, key: str) -> bool:
    return any(key == n or key.endswith("." + n) for n in names)


@dataclasses.dataclass
class TyingPlan:
    """What one injection ties: the input embedding and the modules tied to it, and whether
    through ``modules_to_save`` copies or through adapter layers."""

    source: str
    tied: list[str]
    via_modules_to_save: bool

    def skips(self, key: str) -> bool:
        """Whether the normal walk must leave ``key`` alone (it is tied afterwards)."""
        return key in self.tied


def plan(config, model: nn.Module, is_target) -> TyingPlan | None:
    """The tying for this adapter, with ``config`` rewritten for it; ``None`` when there is
    nothing to tie. Warns as HF PEFT does when the model ties weights that the adapter
    touches but ``ensure_weight_tying`` is off, or when it is on and there is nothing to tie."""
    wanted = getattr(config, "ensure_weight_tying", False)
    if config.keeps_weight_tying:
        return None
    found = tied_to_input_embeddings(model)
    if found is None:
        if wanted:
            warnings.warn("ensure_weight_tying=True, but no module of the model shares the input embeddings' weight; "
                          "there is nothing to tie.", PeftWarning, stacklevel=4)
        return None
    source, tied = found
    saves = list(getattr(config, "modules_to_save", None) or ())
    in_saves = any(_matches(saves, name) for name in [source, *tied])
    in_targets = any(is_target(name) for name in [source, *tied])
    if not wanted:
        if in_saves or in_targets:
            warnings.warn(
                f"{tied} share the weight of the input embeddings {source!r}, which this adapter trains, but "
                "ensure_weight_tying is not set: they will not see the trained weights, and merging or exporting "
                "may break the tie. Set ensure_weight_tying=True to keep them tied.", PeftWarning, stacklevel=4)
        return None
    if in_saves:
        if source not in saves:
            saves.append(source)
        for name in tied:
            for entry in saves:
                if name == entry or name.endswith("." + entry):
                    saves.remove(entry)
                    break
        config.modules_to_save = saves
        return TyingPlan(source, tied, via_modules_to_save=True)
    if in_targets:
        targets = config.target_modules
        if isinstance(targets, str):
            config.target_modules = rf"(?:{targets}|^{re.escape(source)}$)"
        else:
            targets = set(targets or ())
            targets.add(source)
            for name in tied:
                for entry in sorted(targets):
                    if name == entry or name.endswith("." + entry):
                        targets.discard(entry)
                        break
            config.target_modules = targets
        return TyingPlan(source, tied, via_modules_to_save=False)
    warnings.warn("ensure_weight_tying=True, but neither modules_to_save nor target_modules includes the input "
                  f"embeddings {source!r} or a module tied to them; there is nothing to tie.", PeftWarning,
                  stacklevel=4)
    return None
