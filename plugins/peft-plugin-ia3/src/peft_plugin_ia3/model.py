"""``IA3Model``: the (IA)³ tuner. Injection and bookkeeping are the kernel's; this adds the
model-type defaults for ``feedforward_modules`` and ``add_weighted_adapter``."""

from __future__ import annotations

import copy
import dataclasses

import torch

from peft_kernel import BaseTuner
from peft_kernel.tuner import combine_target_modules

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

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "linear", **options) -> None:
        """Add ``adapter_name`` whose vectors are ``Σ weights[i] · l(adapters[i])``.

        The new adapter targets the union of the sources' ``target_modules`` and
        ``feedforward_modules`` (regexes are joined with ``|``); a layer contributes only
        the sources that adapt it. It is created frozen and inactive: call
        ``set_adapter(adapter_name)`` to use it. Weights are usually chosen to sum to 1.
        Validation, bookkeeping and rollback are the kernel's (``BaseTuner``).
        """
        super().add_weighted_adapter(adapters, weights, adapter_name, combination_type=combination_type, **options)

    def _combined_config(self, adapters, combination_type, combination, svd_rank):
        if combination_type != "linear":
            raise ValueError(f"IA3 adapters combine linearly only; got combination_type={combination_type!r}")
        configs = [self.peft_config[a] for a in adapters]
        targets = combine_target_modules([c.target_modules for c in configs], "target_modules")
        feedforward = combine_target_modules([c.feedforward_modules for c in configs], "feedforward_modules")
        return dataclasses.replace(configs[0], target_modules=targets, feedforward_modules=feedforward)

    def _combine_layer(self, layer, adapter_name, sources, weights, combination_type, combination, **options):
        combined = torch.zeros_like(layer.ia3_l[adapter_name])
        for source, weight in zip(sources, weights, strict=True):
            combined += layer.ia3_l[source].to(combined.device, combined.dtype) * weight
        layer.ia3_l[adapter_name].copy_(combined)
