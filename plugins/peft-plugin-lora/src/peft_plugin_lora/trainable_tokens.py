"""``trainable_token_indices``: embedding rows trained next to the LoRA adapter, with the layer of
peft-plugin-trainable-tokens (its public :func:`add_trainable_tokens`).

In memory the rows live at ``<embedding>.trainable_tokens_delta.<adapter>``; HF PEFT's LoRA
checkpoints hold them at ``<embedding>.token_adapter.trainable_tokens_delta``, so the plugin's save hook
renames that one segment (the kernel loads through the same renames). Torch-free: imported by the entry-point module.
"""

from __future__ import annotations

#: parameter-name prefix of the rows (peft_plugin_trainable_tokens.PREFIX; repeated so that this stays torch-free)
PREFIX = "trainable_tokens_"
_IN_MEMORY = ".trainable_tokens_delta"
_IN_CHECKPOINT = ".token_adapter.trainable_tokens_delta"


def add(model, adapter_name: str, config) -> list[str]:
    """Give the modules of ``config.trainable_token_indices`` trainable rows for ``adapter_name``."""
    try:
        from peft_plugin_trainable_tokens import add_trainable_tokens
    except ImportError as error:
        raise ImportError("LoraConfig.trainable_token_indices needs peft-plugin-trainable-tokens: "
                          "pip install peft-plugin-trainable-tokens") from error
    return add_trainable_tokens(model, adapter_name, config.trainable_token_indices, targets=config,
                                require_tie=config.ensure_weight_tying)


def to_checkpoint_keys(config, state_dict: dict) -> None:
    """Rename the rows' keys to HF PEFT's, in place (``state_dict`` may map keys to tensors or to names)."""
    if getattr(config, "trainable_token_indices", None) is None:
        return
    for key in [k for k in state_dict if k.endswith(_IN_MEMORY) and not k.endswith(_IN_CHECKPOINT)]:
        state_dict[key[: -len(_IN_MEMORY)] + _IN_CHECKPOINT] = state_dict.pop(key)



def combined_indices(configs) -> list[int] | dict[str, list[int]] | None:
    """``trainable_token_indices`` of an adapter combining ``configs``: every token any of them trains
    (per module for the dict form)."""
    values = [c.trainable_token_indices for c in configs if getattr(c, "trainable_token_indices", None) is not None]
    if not values:
        return None
    if all(isinstance(v, dict) for v in values):
        return {module: list(dict.fromkeys(t for v in values for t in v.get(module, ())))
                for module in dict.fromkeys(m for v in values for m in v)}
    if any(isinstance(v, dict) for v in values):
        raise ValueError("add_weighted_adapter cannot combine trainable_token_indices given as a list in one adapter "
                         "and as a dict in another: give them as {module name: token ids} in every adapter")
    return list(dict.fromkeys(t for v in values for t in v))


def is_rows_layer(layer) -> bool:
    """Whether ``layer`` holds trainable rows (peft-plugin-trainable-tokens' layer)."""
    try:
        from peft_plugin_trainable_tokens.layer import TrainableTokensLayer
    except ImportError:
        return False
    return isinstance(layer, TrainableTokensLayer)
