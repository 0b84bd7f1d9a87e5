"""``LoraModel``: the LoRA tuner. All injection and bookkeeping is the kernel's."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from peft_kernel import BaseTuner, quant
from peft_kernel.dispatch import transformers_conv1d
from peft_kernel.targeting import ALL_LINEAR, expand_all_linear, is_target
from peft_kernel.tuner import replicate_layers

from . import alora, trainable_tokens, variants
from .config import init_name
from .layer import Embedding, Linear, LoraLayer, ParamWrapper

#: default targets per transformers model type, used when target_modules is None
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"], "gemma3_text": ["q_proj", "v_proj"], "phi3": ["qkv_proj"],
    "gpt2": ["c_attn"], "gptj": ["q_proj", "v_proj"], "gpt_neox": ["query_key_value"], "opt": ["q_proj", "v_proj"],
    "bloom": ["query_key_value"], "falcon": ["query_key_value"], "t5": ["q", "v"], "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"], "bert": ["query", "value"], "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"], "deberta-v2": ["query_proj", "value_proj"], "distilbert": ["q_lin", "v_lin"],
}


def linear_targets(model: nn.Module, config) -> list[tuple[str, nn.Module]]:
    """The nn.Linear / transformers Conv1D modules of a plain model that ``config`` targets
    (``"all-linear"`` included), in module order: the layers a data-driven init prepares."""
    conv1d = transformers_conv1d()
    kinds = (nn.Linear,) if conv1d is None else (nn.Linear, conv1d)
    if config.target_modules == ALL_LINEAR:
        chosen = expand_all_linear(model, config, lambda module: False)
        return [(name, m) for name, m in model.named_modules() if name in chosen and isinstance(m, kinds)]
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, kinds) and (config.target_modules is None or is_target(config, name))]


def data_init_targets(model: nn.Module, config, init: str) -> list[tuple[str, nn.Module]]:
    """:func:`linear_targets` for a data-driven init that reads full-precision weights (CorDA,
    LoRA-GA): at least one, none quantized, else ``ValueError``."""
    targets = linear_targets(model, config)
    if not targets:
        raise ValueError(f"{init}: no nn.Linear / Conv1D layer matches the config's target_modules")
    quantized = [name for name, module in targets if quant.is_quantized(module)]
    if quantized:
        raise ValueError(f"{init} needs full-precision weights, but {quantized} are quantized; run it on the "
                         "unquantized model (and quantize the result afterwards).")
    return targets


class LoraModel(BaseTuner):
    prefix = "lora_"
    layer_cls = LoraLayer
    default_target_modules = DEFAULT_TARGETS
    supported_layer_types = (
        "torch.nn.Linear", "torch.nn.Embedding", "torch.nn.Conv1d", "torch.nn.Conv2d", "torch.nn.Conv3d",
        "torch.nn.MultiheadAttention", "transformers Conv1D",
    )
    parameter_layer_cls = ParamWrapper
    special_forward_args = (alora.OFFSETS,)

    def _check_new_adapter_config(self, config) -> None:
        """KaSA changes the base weight when its adapter is added, so a plain adapter next to it
        would see another base than it was made for (and the other way round)."""
        kasa = config.kasa_config is not None
        for name, other in self.peft_config.items():
            if other is not config and (getattr(other, "kasa_config", None) is not None) != kasa:
                raise ValueError(f"KaSA adapters cannot share a model with other LoRA adapters: KaSA truncates the "
                                 f"base weights, so adapter {name!r} and the new one would see different bases. "
                                 "Load them on separate copies of the base model.")

    @property
    def adapter_prefixes(self) -> tuple[str, ...]:
        """The rows of ``trainable_token_indices`` train with the adapter (see ``trainable_tokens.py``)."""
        return (self.prefix, trainable_tokens.PREFIX)

    def _prepare_model(self, config, model) -> None:
        """``trainable_token_indices``: the embedding rows get their layer first (so that a LoRA target among
        them is refused with a clear error). ``layer_replication``: stack the layers once; later adapters must
        ask for the same stack."""
        if config.trainable_token_indices is not None:
            adapter_name = next(name for name, c in self.peft_config.items() if c is config)  # the one being added
            trainable_tokens.add(model, adapter_name, config)
        ranges = config.layer_replication
        if not ranges:
            return
        done = self.__dict__.get("_replicated_layers")
        if done is None:
            replicate_layers(model, ranges)
            self.__dict__["_replicated_layers"] = ranges
        elif done != ranges:
            raise ValueError(f"The model's layers were already replicated as {done}; an adapter asking for {ranges} "
                             "cannot be added. Use the same layer_replication (or none) for every adapter.")

    def save_relative_to_initial(self, peft_model, adapter_name, config, state_dict, initial_path):
        """PiSSA / OLoRA saved as a LoRA of twice the rank for the original base (``conversion.py``)."""
        from .conversion import relative_to_initial

        return relative_to_initial(peft_model, adapter_name, config, state_dict, initial_path)

    def _tie_layer(self, layer, source, adapter_name) -> None:
        """``ensure_weight_tying``: a linear layer tied to the embeddings gets the embedding
        adapter's factors, transposed (A = B_emb^T, B = A_emb^T, so that its update is the
        embedding update's transpose), as views of the same storage."""
        if not (isinstance(layer, Linear) and isinstance(source, Embedding)):
            raise ValueError(f"ensure_weight_tying ties a LoRA Linear to a LoRA Embedding, not {type(layer).__name__} "
                             f"to {type(source).__name__}")
        if layer.r[adapter_name] != source.r[adapter_name]:
            raise ValueError("ensure_weight_tying needs the same rank for the embeddings and the layers tied to them; "
                             "remove them from rank_pattern")
        A, B = source.lora_embedding_A[adapter_name], source.lora_embedding_B[adapter_name]
        layer.lora_A[adapter_name].weight = nn.Parameter(B.data.t(), requires_grad=B.requires_grad)
        layer.lora_B[adapter_name].weight = nn.Parameter(A.data.t(), requires_grad=A.requires_grad)
        layer.adapter_state_changed()

    def per_call_state(self, args, kwargs, *, generating):
        """aLoRA: where each row's invocation sequence starts, for the adapters that have one."""
        invocations = {name: config.alora_invocation_tokens for name, config in self.peft_config.items()
                       if getattr(config, "alora_invocation_tokens", None)}
        if not invocations:
            return None
        return alora.offsets_step(invocations, args, kwargs, generating)

    def _variant_layers(self, adapter_names, field: str):
        """``(layer, adapter, its config)`` for the adapters among ``adapter_names`` (default:
        the active ones) whose config sets ``field``, over every LoRA layer that holds them."""
        if isinstance(adapter_names, str):
            adapter_names = [adapter_names]
        chosen = [name for name in (self.active_adapters if adapter_names is None else adapter_names)
                  if getattr(self.peft_config.get(name), field, None) is not None]
        for module in self.model.modules():
            if isinstance(module, LoraLayer):
                for name in chosen:
                    if module.variant.get(name) is not None and module.variant[name].field == field:
                        yield module, name, self.peft_config[name]

    def _get_kasa_loss(self, adapter_names: str | list[str] | None = None) -> torch.Tensor | float:
        """The KaSA regularisers, summed over layers, for the task loss: per layer
        β·Σd² + γ·(‖BᵀB − I‖_F + ‖AAᵀ − I‖_F) with β, γ from each adapter's KasaConfig
        (HF PEFT's name). 0.0 without KaSA adapters."""
        from .variants.kasa import kasa_loss

        losses = [kasa_loss(layer, name, config.kasa_config.beta, config.kasa_config.gamma)
                  for layer, name, config in self._variant_layers(adapter_names, "kasa_config")]
        return torch.stack(losses).sum() if losses else 0.0

    def _get_monteclora_loss(self, adapter_names: str | list[str] | None = None) -> torch.Tensor | float:
        """The MonteCLoRA variational loss (KL terms, and Σ w² with ``use_entropy``) averaged over
        the layers of the adapters (default: the active ones), for the task loss (HF PEFT's name).
        0.0 in eval mode or without MonteCLoRA adapters."""
        losses = [layer.lora_monteclora_sampler[name].variational_loss()
                  for layer, name, _ in self._variant_layers(adapter_names, "monteclora_config")]
        return sum(losses) / len(losses) if losses else 0.0

    def _set_layers(self, method: str, *args) -> None:
        for module in self.model.modules():
            if isinstance(module, LoraLayer):
                getattr(module, method)(*args)

    def set_scale(self, adapter: str, scale: float) -> None:
        self._set_layers("set_scale", adapter, scale)

    def scale_layer(self, scale: float) -> None:
        self._set_layers("scale_layer", scale)

    def unscale_layer(self, scale=None) -> None:
        self._set_layers("unscale_layer", scale)

    # -- combining adapters (add_weighted_adapter) --------------------------------------

    combination_types = ("cat",)

    def _combined_config(self, adapters, combination_type, combination, svd_rank):
        """Check the sources and build the combined config: a copy of the first source's
        with ``r = lora_alpha = new rank`` and no rank/alpha patterns.

        New rank: the common rank for factor-wise strategies (ranks must be equal), the
        sum for ``cat``, ``svd_rank`` or the largest rank for SVD strategies. A source's
        rank is ``max(r, *rank_pattern.values())``."""
        configs = [self.peft_config[a] for a in adapters]
        dora = [a for a, c in zip(adapters, configs, strict=True) if c.use_dora]
        if dora:
            raise ValueError(
                f"add_weighted_adapter cannot combine DoRA adapters ({dora}): their magnitude vectors have no "
                "weighted combination. Merge them into the base instead (merge_and_unload)."
            )
        for adapter, config in zip(adapters, configs, strict=True):
            variant = variants.resolve(config)
            if variant is not None and not variant.combinable:
                raise ValueError(f"add_weighted_adapter cannot combine {variant.title} adapter {adapter!r}: its update "
                                 "is not a plain product of lora_B and lora_A. Merge it into the base instead.")
        ranks = [max(c.r, *c.rank_pattern.values()) if c.rank_pattern else c.r for c in configs]
        svd = combination is not None and combination.svd
        factor_wise = combination is not None and not svd
        if combination_type == "cat":
            new_rank = sum(ranks)
        elif svd:
            new_rank = svd_rank or max(ranks)
        else:
            if len(set(ranks)) != 1:
                raise ValueError(
                    f"combination_type={combination_type!r} combines the factors entry by entry, so all adapters must "
                    f"have the same rank; got {dict(zip(adapters, ranks, strict=True))}. Use 'cat' or an SVD type "
                    "such as 'svd' for different ranks."
                )
            new_rank = ranks[0]
        for name, layer in self.model.named_modules():
            if isinstance(layer, LoraLayer):
                self._check_combinable_layer(name, layer, adapters, combination_type, svd, factor_wise)
        first = configs[0]
        init = first.init_lora_weights
        if init_name(init) not in (True, False, "gaussian"):
            init = True  # the factors are overwritten; never re-run an init that rewrites the base weights
        return dataclasses.replace(
            first, r=new_rank, lora_alpha=new_rank, rank_pattern={}, alpha_pattern={}, init_lora_weights=init,
            lora_bias=any(c.lora_bias for c in configs),
            trainable_token_indices=trainable_tokens.combined_indices(configs),
        )

    @staticmethod
    def _check_combinable_layer(name, layer, adapters, combination_type, svd, factor_wise) -> None:
        present = [a for a in adapters if layer.has_adapter(a)]
        if not present:
            return
        factors = {a: layer.combination_factors(a) for a in present}
        if any(f is None for f in factors.values()):
            raise ValueError(
                f"Layer {name!r} ({type(layer).__name__}) keeps its factors where add_weighted_adapter cannot find "
                "them; override combination_factors() / combine_adapters() in the layer class to combine it."
            )
        if getattr(layer.get_base_layer(), "groups", 1) > 1:
            raise ValueError(f"Layer {name!r} is a grouped convolution (groups > 1); it cannot be combined")
        if svd:
            half = [a for a, (A, B) in factors.items() if A.dtype in (torch.float16, torch.bfloat16)]
            if half:
                raise ValueError(
                    f"combination_type={combination_type!r} needs a singular value decomposition, which is not "
                    f"supported for float16/bfloat16; adapter(s) {half} hold {factors[half[0]][0].dtype} weights in "
                    f"{name!r}. Cast the adapters to float32 first, or use a combination type without SVD."
                )
        if factor_wise:
            shapes = {a: tuple(A.shape) + tuple(B.shape) for a, (A, B) in factors.items()}
            if len(set(shapes.values())) > 1:
                ranks = {a: layer.r[a] for a in present}
                raise ValueError(
                    f"combination_type={combination_type!r} needs equal ranks in every layer, but {name!r} has "
                    f"ranks {ranks} (from rank_pattern). Use 'cat' or an SVD type instead."
                )

    def _combine_layer(self, layer, adapter_name, sources, weights, combination_type, combination, **options):
        if trainable_tokens.is_rows_layer(layer):  # trainable_token_indices: the rows' changes combine
            layer.combine_rows(adapter_name, sources, weights, combination, density=options["density"],
                               majority_sign_method=options["majority_sign_method"])
            return
        if not isinstance(layer, LoraLayer):
            raise TypeError(f"{type(layer).__name__} is not a LoRA layer and cannot be combined by LoRA")
        layer.combine_adapters(adapter_name, sources, weights, combination_type, combination, **options)
