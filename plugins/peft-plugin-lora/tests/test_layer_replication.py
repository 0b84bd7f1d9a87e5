"""``layer_replication``: repeated layers share their base weights and each gets its own LoRA."""

from __future__ import annotations

import _lora_models as M
import pytest
import torch

from peft_kernel import MergeNotSupportedError, PeftModel, get_peft_model
from peft_kernel.testing import perturb
from peft_kernel.testing.generation import generation_gap
from peft_plugin_lora import LoraConfig

hf_peft = pytest.importorskip("peft")

pytestmark = pytest.mark.filterwarnings("ignore")

CONFIG = dict(target_modules=["q_proj", "v_proj"], r=4, layer_replication=[[0, 2], [1, 3]], task_type="CAUSAL_LM",
              init_lora_weights=False)


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(1)
    ours = get_peft_model(M.llama(3), LoraConfig(**CONFIG)).eval()
    torch.manual_seed(1)
    theirs = hf_peft.get_peft_model(M.llama(3), hf_peft.LoraConfig(**CONFIG)).eval()
    return ours, theirs


def ids():
    return torch.randint(3, M.VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))


def test_layers_are_stacked_with_shared_weights_and_own_adapters(pair):
    ours, _ = pair
    layers = ours.base_model.model.model.layers
    assert len(layers) == 4 and ours.config.num_hidden_layers == 4  # 0 1 | 1 2
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1, 2, 3]
    first, copy_ = layers[1].self_attn.q_proj, layers[2].self_attn.q_proj
    assert first.get_base_layer().weight is copy_.get_base_layer().weight
    assert first.lora_A["default"].weight is not copy_.lora_A["default"].weight


def test_same_adapter_and_outputs_as_hf(pair):
    ours, theirs = pair
    mine = {k: v for k, v in ours.state_dict().items() if "lora_" in k}
    hf = {k: v for k, v in theirs.state_dict().items() if "lora_" in k}
    assert sorted(mine) == sorted(hf) and all(torch.equal(mine[k], hf[k]) for k in mine)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids()).logits, theirs(input_ids=ids()).logits, atol=1e-5, rtol=1e-5)


def test_generation_with_cache_is_exact(pair):
    ours, _ = pair
    assert generation_gap(ours, ids(), max_new_tokens=3) <= 1e-4


def test_checkpoints_load_both_ways(pair, tmp_path):
    ours, theirs = pair
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "hf")
    from_ours = hf_peft.PeftModel.from_pretrained(M.llama(3), str(tmp_path / "ours")).eval()
    from_hf = PeftModel.from_pretrained(M.llama(3), str(tmp_path / "hf")).eval()
    with torch.no_grad():
        torch.testing.assert_close(from_ours(input_ids=ids()).logits, ours(input_ids=ids()).logits, atol=1e-5,
                                   rtol=1e-5)
        torch.testing.assert_close(from_hf(input_ids=ids()).logits, theirs(input_ids=ids()).logits, atol=1e-5,
                                   rtol=1e-5)


def test_merging_is_refused_because_the_weights_are_shared():
    model = get_peft_model(M.llama(3), LoraConfig(**CONFIG)).eval()
    with torch.no_grad():
        before = model(input_ids=ids()).logits
        with pytest.raises(MergeNotSupportedError, match="share their base weight"):
            model.merge_and_unload()
        torch.testing.assert_close(model(input_ids=ids()).logits, before, atol=0, rtol=0)


@pytest.mark.xfail(strict=True, reason="HF PEFT 0.21.2 merges replicated layers into their shared base weights (its "
                                       "check reads peft_config['layer_replication'], a key that never exists), so "
                                       "each copy gets the other copies' deltas too")
def test_hf_merge_of_replicated_layers_keeps_the_outputs():
    torch.manual_seed(1)
    model = hf_peft.get_peft_model(M.llama(3), hf_peft.LoraConfig(**CONFIG)).eval()
    with torch.no_grad():
        before = model(input_ids=ids()).logits
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids()).logits, before, atol=1e-4, rtol=1e-4)


def test_second_adapter_replicates_once_and_must_agree():
    model = get_peft_model(M.llama(3), LoraConfig(**CONFIG))
    model.add_adapter("other", LoraConfig(**CONFIG))
    assert len(model.base_model.model.model.layers) == 4
    perturb(model)
    with pytest.raises(ValueError, match="already replicated"):
        model.add_adapter("third", LoraConfig(**{**CONFIG, "layer_replication": [[0, 3]]}))
    assert "third" not in model.peft_config


def test_bad_ranges_and_models_are_refused():
    with pytest.raises(ValueError, match="does not fit"):
        get_peft_model(M.llama(3), LoraConfig(**{**CONFIG, "layer_replication": [[0, 4]]}))
    with pytest.raises(ValueError, match="nn.ModuleList"):
        get_peft_model(M.mlp(), LoraConfig(target_modules=["lin0"], layer_replication=[[0, 1]]))
    with pytest.raises(ValueError, match="start, end"):
        LoraConfig(layer_replication=[[0, 1, 2]])
