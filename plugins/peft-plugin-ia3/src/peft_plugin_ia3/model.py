"""``IA3Model``: the (IA)³ tuner. Injection and bookkeeping are the kernel's; this adds the
model-type defaults for ``feedforward_modules`` and ``add_weighted_adapter``."""

from __future__ import annotations

import copy
import dataclasses

import torch

from peft_kernel import BaseTuner, ModulesToSaveWrapper

from .layer import IA3Layer

# Default targets per transformers model type: the key and value projections and the
# second feed-forward projection, whose *input* is scaled (listed again in FEEDFORWARD).
# The same choices as HF PEFT, so `target_modules=None` adapts the same layers.
_ATTN_KV_FF = {
    "t5": (["k", "v", "wo"], ["wo"]),
    "mt5": (["k", "v", "wi_1"], []),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "gpt_bigcode": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "bloom": (["query_key_value", "mlp.dense_4h_to_h"], ["mlp.dense_4h_to_h"]),
    "gpt_neox": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "falcon": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "RefinedWeb": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "RefinedWebModel": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
    "roberta": (["key", "value", "output.dense"], ["output.dense"]),
    "deberta-v2": (["key_proj", "value_proj", "output.dense"], ["output.dense"]),
    "deberta": (["in_proj", "output.dense"], ["output.dense"]),
    "opt": (["q_proj", "k_proj", "fc2"], ["fc2"]),
    "bart": (["q_proj", "v_proj", "fc2"], ["fc2"]),
    "phi": (["q_proj", "v_proj", "fc2"], ["fc2"]),
    "gptj": (["q_proj", "v_proj", "fc_out"], ["fc_out"]),
    "gpt_neo": (["q_proj", "v_proj", "c_proj"], ["c_proj"]),
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mixtral": (["k_proj", "v_proj", "w2"], ["w2"]),
    "llama4": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma3_text": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen3": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
}
DEFAULT_TARGETS = {model_type: targets for model_type, (targets, _) in _ATTN_KV_FF.items()}
DEFAULT_FEEDFORWARD = {model_type: ff for model_type, (_, ff) in _ATTN_KV_FF.items()}


class IA3Model(BaseTuner):
    prefix = "ia3_"
    layer_cls = IA3Layer
    default_target_modules = DEFAULT_TARGETS
    default_feedforward_modules = DEFAULT_FEEDFORWARD
    # feedforward_modules is matched against the very names in target_modules, so the
    # target list must stay as the user wrote it
    compress_targets = False
    supported_layer_types = (
        "torch.nn.Linear", "torch.nn.Conv1d", "torch.nn.Conv2d", "torch.nn.Conv3d", "transformers Conv1D",
    )

    def _prepare_adapter_config(self, config, model_config: dict):
        config = super()._prepare_adapter_config(config, model_config)
        if config.feedforward_modules is None:
            model_type = model_config.get("model_type")
            if model_type not in self.default_feedforward_modules:
                raise ValueError(
                    f"Please specify `feedforward_modules` in the IA3Config: there is no default for model type "
                    f"{model_type!r}. Pass feedforward_modules=[] when no target should scale its input."
                )
            config = copy.copy(config)
            config.feedforward_modules = set(self.default_feedforward_modules[model_type])
        config.check_feedforward_subset()
        return config

    # -- combining adapters -----------------------------------------------------------

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str) -> None:
        """Add ``adapter_name`` whose vectors are ``Σ weights[i] · l(adapters[i])``.

        The new adapter targets the union of the sources' ``target_modules`` and
        ``feedforward_modules`` (regexes are joined with ``|``); a layer contributes only
        the sources that adapt it. It is created frozen and inactive: call
        ``set_adapter(adapter_name)`` to use it. Weights are usually chosen to sum to 1.
        """
        adapters, weights = list(adapters), [float(w) for w in weights]
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} already exists; delete it or choose another name")
        if not adapters:
            raise ValueError("add_weighted_adapter needs at least one source adapter")
        if len(adapters) != len(weights):
            raise ValueError(f"Got {len(adapters)} adapters but {len(weights)} weights; pass one weight per adapter")
        unknown = [a for a in adapters if a not in self.peft_config]
        if unknown:
            raise ValueError(f"Adapter(s) {unknown} do not exist; available: {sorted(self.peft_config)}")
        wrappers = [m for m in self.model.modules() if isinstance(m, ModulesToSaveWrapper)]
        for wrapper in wrappers:
            owners = [a for a in adapters if a in wrapper.modules_to_save]
            if len(owners) > 1:
                raise ValueError(
                    f"Cannot combine adapters {owners}: each has its own modules_to_save copy of the same module"
                )
        configs = [self.peft_config[a] for a in adapters]
        target_modules = _union([c.target_modules for c in configs], "target_modules")
        feedforward_modules = _union([c.feedforward_modules for c in configs], "feedforward_modules")
        new_config = dataclasses.replace(configs[0], target_modules=target_modules,
                                         feedforward_modules=feedforward_modules)
        new_config._custom_modules = configs[0]._custom_modules
        self.peft_config[adapter_name] = new_config
        try:
            self.inject_adapter(self.model, adapter_name)
        except BaseException:
            del self.peft_config[adapter_name]
            for module in self.model.modules():
                if isinstance(module, (IA3Layer, ModulesToSaveWrapper)):
                    module.delete_adapter(adapter_name)
            raise
        with torch.no_grad():
            for module in self.model.modules():
                if isinstance(module, IA3Layer) and adapter_name in module.ia3_l:
                    combined = torch.zeros_like(module.ia3_l[adapter_name])
                    for source, weight in zip(adapters, weights):
                        if source in module.ia3_l:
                            combined += module.ia3_l[source].to(combined.device, combined.dtype) * weight
                    module.ia3_l[adapter_name].copy_(combined)
                elif isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
                    owners = [a for a in adapters if a in module.modules_to_save]
                    if owners:  # the one source that trained this module provides the copy
                        module.modules_to_save[adapter_name].load_state_dict(
                            module.modules_to_save[owners[0]].state_dict())
        for name, param in self.model.named_parameters():
            if adapter_name in name.split("."):
                param.requires_grad_(False)


def _union(values: list, field_name: str):
    kinds = {type(v) for v in values}
    if len(kinds) > 1:
        raise ValueError(
            f"All adapters must give `{field_name}` the same kind (all name lists or all regexes) to be combined; "
            f"got {sorted(k.__name__ for k in kinds)}"
        )
    if kinds == {str}:
        return "|".join(f"({v})" for v in values)
    if kinds == {type(None)}:
        return None
    merged: set = set()
    for value in values:
        merged |= set(value)
    return merged
