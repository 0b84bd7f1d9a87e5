"""Which modules an adapter targets: HF PEFT's matching rules, written once for all methods."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from . import dispatch

if TYPE_CHECKING:
    from torch import nn

ALL_LINEAR = "all-linear"
DUMMY_TARGET = "dummy-target-modules"
#: target lists at least this long are compressed to their shortest equivalent suffixes
MIN_TARGETS_FOR_COMPRESSION = 20

#: default targets per transformers model type: the attention's query and value projections (or
#: its fused projection), as HF PEFT chooses them for the low-rank family of methods; a tuner that
#: adapts these by default sets ``default_target_modules = ATTENTION_TARGETS``. A string is a regex.
ATTENTION_TARGETS: dict[str, list[str] | str] = {
    "t5": ["q", "v"], "mt5": ["q", "v"], "bart": ["q_proj", "v_proj"], "gpt2": ["c_attn"],
    "bloom": ["query_key_value"], "blip-2": ["q", "v", "q_proj", "v_proj"], "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"], "gpt_neox": ["query_key_value"], "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"], "roberta": ["query", "value"], "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"], "deberta-v2": ["query_proj", "value_proj"], "deberta": ["in_proj"],
    "layoutlm": ["query", "value"], "llama": ["q_proj", "v_proj"], "llama4": ["q_proj", "v_proj"],
    "chatglm": ["query_key_value"], "gpt_bigcode": ["c_attn"], "mpt": ["Wqkv"],
    "RefinedWebModel": ["query_key_value"], "RefinedWeb": ["query_key_value"], "falcon": ["query_key_value"],
    "btlm": ["c_proj", "c_attn"], "codegen": ["qkv_proj"], "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"], "stablelm": ["q_proj", "v_proj"], "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"], "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)", "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"], "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
}


def _suffix_match(key: str, entries: Iterable[str]) -> str | None:
    for entry in entries:
        if key == entry or key.endswith("." + entry):
            return entry
    return None


def is_excluded(config, key: str) -> bool:
    excluded = config.exclude_modules
    if not excluded:
        return False
    if isinstance(excluded, str):
        return re.fullmatch(excluded, key) is not None
    return _suffix_match(key, excluded) is not None


def layer_index(key: str, layers_pattern) -> int | None:
    """Index of the first numbered segment (``.<pattern>.<digits>``) in ``key``."""
    if layers_pattern is None:
        patterns = [None]
    elif isinstance(layers_pattern, str):
        patterns = [layers_pattern]
    else:
        patterns = list(layers_pattern)
    for pattern in patterns:
        if pattern is None:  # any named segment followed by a number
            match = re.search(r"[^.]\.(\d+)\.", key)
        else:
            match = re.search(rf"(?:^|\.){pattern}\.(\d+)\.", key)
        if match:
            return int(match.group(1))
    return None


def matches_target(config, key: str) -> bool:
    """Whether module ``key`` is a target of ``config`` (exclusions not applied)."""
    targets = config.target_modules
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if _suffix_match(key, targets) is None:
        return False
    wanted = config.layers_to_transform
    if wanted is None:
        return True
    index = layer_index(key, config.layers_pattern)
    if index is None:
        return False
    if isinstance(wanted, int):
        return index == wanted
    return index in wanted


def in_modules_to_save(config, key: str) -> bool:
    """Whether ``key`` is, or lies inside, a module named in ``modules_to_save``
    (compared by whole dot-segments, so ``classifier`` covers ``classifier.dense``)."""
    parts = key.split(".")
    for name in getattr(config, "modules_to_save", None) or ():
        wanted = name.split(".")
        for i in range(len(parts) - len(wanted) + 1):
            if parts[i : i + len(wanted)] == wanted:
                return True
    return False


def is_target(config, key: str) -> bool:
    """The full rule of HF PEFT §3: exclusions, ``modules_to_save`` and the target match."""
    if is_excluded(config, key) or in_modules_to_save(config, key):
        return False
    return matches_target(config, key)


def pattern_value(pattern: dict | None, key: str, default: Any) -> Any:
    """The value ``rank_pattern``-style ``pattern`` gives module ``key`` (see
    :func:`get_pattern_key`), or ``default`` when no entry matches."""
    if not pattern:
        return default
    return pattern.get(get_pattern_key(pattern.keys(), key), default)


def get_pattern_key(pattern_keys: Iterable[str], key: str) -> str:
    """The first ``rank_pattern``-style key that matches module ``key``, else ``key``.

    A pattern matches the full name or a dot-separated suffix (``$`` implied); a leading
    ``^`` anchors it at the top level.
    """
    for pattern in pattern_keys:
        if pattern.startswith("^"):
            if re.match(pattern + r"$", key):
                return pattern
        elif re.match(rf"(.*\.)?({pattern})$", key):
            return pattern
    return key


# -- all-linear -------------------------------------------------------------------------


def _transformers_class(name: str):
    """A transformers class if transformers is already imported (never imports it)."""
    module = sys.modules.get("transformers")
    return getattr(module, name, None) if module is not None else None


def expand_all_linear(model: nn.Module, config, is_adapter_layer) -> set[str]:
    """Full names of every linear layer that ``all-linear`` means for ``model``."""
    names: set[str] = set()
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if is_adapter_layer(module):
            inside.append(name)
            if "Linear" in type(module.get_base_layer()).__name__ or dispatch.is_linear_like(module.get_base_layer()):
                names.add(name)
            continue
        if dispatch.is_linear_like(module):
            names.add(name)
    pretrained = _transformers_class("PreTrainedModel")
    if pretrained is not None and isinstance(model, pretrained):
        head = model.get_output_embeddings()
        for name, module in model.named_modules():
            if module is head:
                names.discard(name)
    for name in list(names):
        if in_modules_to_save(config, name):
            names.discard(name)
    return names


def compress_targets(target_modules: set[str], module_names: list[str]) -> set[str]:
    """Shortest suffixes that match exactly the same modules as ``target_modules``.

    Used for long lists (e.g. adapters converted from other formats) because matching
    cost grows with the list length. The result is deterministic (sorted iteration).
    """
    targeted = [n for n in module_names if _suffix_match(n, target_modules) is not None]
    untargeted = ["." + n for n in module_names if _suffix_match(n, target_modules) is None]
    chosen: set[str] = set()
    for name in sorted(targeted):
        if _suffix_match(name, chosen) is not None:
            continue
        parts = name.split(".")
        for i in range(len(parts) - 1, -1, -1):
            suffix = ".".join(parts[i:])
            dotted = "." + suffix
            if not any(other.endswith(dotted) for other in untargeted):
                chosen.add(suffix)
                break
    return chosen if len(chosen) < len(target_modules) else set(target_modules)
