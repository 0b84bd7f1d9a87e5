"""Greedy ``generate`` through the PEFT wrapper gives HF PEFT's token ids."""

from __future__ import annotations

import pytest
import torch
from _models import HF, OURS, build_base, config_pair, copy_state, lora_kwargs, make_pair, perturb_trainable

GEN = {"max_new_tokens": 5, "do_sample": False, "num_beams": 1, "pad_token_id": 0}


def _prompt(batch=2, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (batch, 6), generator=g)
    mask = torch.ones_like(ids)
    ids[0, :2] = 0  # left padding in the first row
    mask[0, :2] = 0
    return ids, mask


@pytest.mark.parametrize(
    "model,overrides",
    [
        ("llama", {}),
        ("llama", {"target_modules": "all-linear", "use_dora": True}),
        ("t5", {}),
        ("t5", {"target_modules": "all-linear"}),
    ],
    ids=["llama", "llama-dora-all-linear", "t5", "t5-all-linear"],
)
def test_generate_greedy(model, overrides):
    hf, ours = make_pair(model, **overrides)
    ids, mask = _prompt()
    with torch.no_grad():
        base_tokens = build_base(model).generate(input_ids=ids, attention_mask=mask, **GEN)
        hf_tokens = hf.generate(input_ids=ids, attention_mask=mask, **GEN)
        ours_tokens = ours.generate(input_ids=ids, attention_mask=mask, **GEN)
    assert ours_tokens.tolist() == hf_tokens.tolist(), f"ours {ours_tokens.tolist()} vs hf {hf_tokens.tolist()}"
    assert hf_tokens.tolist() != base_tokens.tolist(), "test is vacuous: the adapter does not change generation"
    # generation after merging gives the same tokens as well
    hf.merge_adapter()
    ours.merge_adapter()
    with torch.no_grad():
        merged = ours.generate(input_ids=ids, attention_mask=mask, **GEN)
    assert merged.tolist() == hf_tokens.tolist(), "generate() after merge_adapter() differs"
    # and inside disable_adapter() it is the base model's generation
    ours.unmerge_adapter()
    with ours.disable_adapter(), torch.no_grad():
        disabled = ours.generate(input_ids=ids, attention_mask=mask, **GEN)
    assert disabled.tolist() == base_tokens.tolist(), "generate() inside disable_adapter() differs from base"


@pytest.mark.parametrize("model", ["llama", "t5"])
def test_generate_mixed_adapter_batch(model):
    """generate(..., adapter_names=[...]) routes each row through its own adapter."""
    a_hf, a_ours = config_pair(**lora_kwargs(model))
    b_hf, b_ours = config_pair(**lora_kwargs(model, r=2, lora_alpha=16))
    hf = HF.get_peft_model(build_base(model), a_hf, adapter_name="a")
    hf.add_adapter("b", b_hf)
    ours = OURS.get_peft_model(build_base(model), a_ours, adapter_name="a")
    ours.add_adapter("b", b_ours)
    hf.eval()
    ours.eval()
    hf.set_adapter("b")
    perturb_trainable(hf, seed=5, scale=0.3)
    hf.set_adapter("a")
    perturb_trainable(hf, seed=6, scale=0.3)
    copy_state(hf, ours)
    names = ["a", "b", "__base__"]
    ids, mask = _prompt(batch=3)
    with torch.no_grad():
        hf_tokens = hf.generate(input_ids=ids, attention_mask=mask, adapter_names=names, **GEN)
        ours_tokens = ours.generate(input_ids=ids, attention_mask=mask, adapter_names=names, **GEN)
    assert ours_tokens.tolist() == hf_tokens.tolist(), f"ours {ours_tokens.tolist()} vs hf {hf_tokens.tolist()}"
