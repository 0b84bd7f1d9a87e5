"""What ported HF PEFT scripts rely on without checking it, as plain behaviour (no HF PEFT needed;
``tests/differential/test_dropin*.py`` runs the same scenarios on HF PEFT too)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peft_kernel import (
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from peft_plugin_lora import LoraConfig

X = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))


class MLP(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.lin0, self.lin1 = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


def _config(**kwargs):
    kwargs.setdefault("target_modules", ["lin0", "lin1"])
    kwargs.setdefault("init_lora_weights", False)
    return LoraConfig(**kwargs)


def _trainable(model):
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def test_injected_model_round_trips_its_state_dict():
    model = inject_adapter_in_model(_config(), MLP()).eval()
    state = get_peft_model_state_dict(model)
    assert sorted(state) == ["lin0.lora_A.weight", "lin0.lora_B.weight", "lin1.lora_A.weight", "lin1.lora_B.weight"]
    fresh = inject_adapter_in_model(_config(), MLP(), low_cpu_mem_usage=True).eval()
    assert fresh.lin0.lora_A["default"].weight.is_meta
    assert set_peft_model_state_dict(fresh, state, low_cpu_mem_usage=True).unexpected_keys == []
    assert torch.allclose(fresh(X), model(X))


def test_inference_load_is_in_eval_mode_and_keeps_other_flags(tmp_path):
    get_peft_model(MLP(), _config(lora_dropout=0.5)).save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(MLP().train(), tmp_path)
    assert not any(m.training for m in loaded.modules())
    model = get_peft_model(MLP(), _config()).train()
    model.set_requires_grad("default", False)
    model.load_adapter(tmp_path, "frozen")
    assert not model.training and _trainable(model) == []
    model.load_adapter(tmp_path, "trainable", is_trainable=True)
    assert _trainable(model) and all(".trainable." in n for n in _trainable(model))


def test_disable_adapter_nests_and_restores():
    model = get_peft_model(MLP(), _config()).eval()
    adapted, base = model(X), MLP()(X)
    flags = _trainable(model)
    with model.disable_adapter():
        with model.disable_adapter():
            pass
        assert torch.allclose(model(X), base)
    assert torch.allclose(model(X), adapted) and _trainable(model) == flags
    model.base_model.disable_adapter_layers()
    with model.disable_adapter():
        pass
    assert torch.allclose(model(X), base)


def test_merged_adapter_cannot_be_deleted_and_deletion_forgets_settings():
    model = get_peft_model(MLP(), _config())
    model.add_adapter("b", _config(use_dora=True))
    model.merge_adapter(["b"])
    with pytest.raises(ValueError, match="unmerge"):
        model.delete_adapter("b")
    model.unmerge_adapter()
    model.delete_adapter("b")
    layer = model.base_model.model.lin0
    assert all("b" not in getattr(layer, attr) for attr in ("use_dora", "lora_bias", "r", "scaling"))


def test_several_dora_adapters_merge_to_the_unmerged_outputs():
    model = get_peft_model(MLP(), _config(use_dora=True))
    model.add_adapter("b", _config(use_dora=True, r=4))
    model.base_model.set_adapter(["default", "b"])
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "magnitude" in name:
                param.mul_(1.5)
    model.eval()
    with torch.no_grad():
        unmerged = model(X)
        model.merge_adapter()
        assert torch.allclose(model(X), unmerged, atol=1e-5)


def test_safe_merge_leaves_the_base_alone_when_the_bias_would_break():
    model = get_peft_model(MLP(), _config(lora_bias=True))
    layer = model.base_model.model.lin0
    with torch.no_grad():
        layer.lora_B["default"].bias.fill_(float("inf"))
    bias = layer.base_layer.bias.detach().clone()
    with pytest.raises(ValueError, match="NaN"):
        model.merge_adapter(safe_merge=True)
    assert torch.equal(layer.base_layer.bias, bias) and not layer.merged


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed_tokens = nn.Embedding(16, 8)
        self.lin = nn.Linear(8, 8)
        self.lm_head = nn.Linear(8, 16, bias=False)
        self.lm_head.weight = self.embed_tokens.weight

    def get_input_embeddings(self):
        return self.embed_tokens

    def forward(self, ids):
        return self.lm_head(self.lin(self.embed_tokens(ids)))


def test_ensure_weight_tying_trains_one_tensor():
    model = get_peft_model(TiedLM(), _config(target_modules=["lin"], modules_to_save=["embed_tokens"],
                                             ensure_weight_tying=True))
    embedding = model.base_model.model.embed_tokens.modules_to_save["default"]
    assert model.base_model.model.lm_head.modules_to_save["default"].weight is embedding.weight
    merged = model.merge_and_unload()
    assert merged.lm_head.weight is merged.embed_tokens.weight


def test_checkpoint_conversion_mapping_renames_old_keys(tmp_path):
    old = get_peft_model(MLP(), _config(target_modules=["lin0"]))
    with torch.no_grad():
        old.base_model.model.lin0.lora_B["default"].weight.add_(1.0)  # not what a fresh init draws
    old.save_pretrained(tmp_path)

    class Renamed(MLP):
        _checkpoint_conversion_mapping = {"^lin0": "first"}

        def __init__(self):
            super().__init__()
            self.first = self.lin0
            del self.lin0

        def forward(self, x):
            return self.lin1(torch.relu(self.first(x)))

    loaded = PeftModel.from_pretrained(Renamed(), tmp_path, config=_config(target_modules=["first"]))
    assert torch.allclose(loaded(X), old(X))
