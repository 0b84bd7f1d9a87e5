"""TrainableTokens against HF PEFT 0.21.2: same config and rows -> same outputs (unmerged, merged,
disabled, unloaded), gradients, seeded random init, checkpoints both ways, tied output heads."""

from __future__ import annotations

import peft
import pytest
import torch
from _tokens_models import TOKENS, inputs, llama
from torch import nn

from peft_kernel import get_peft_model
from peft_kernel.testing.differential import (
    assert_checkpoints_load_both_ways,
    assert_close,
    assert_matches_oracle,
    assert_same_config_defaults,
    assert_same_training,
    make_pair,
    perturb_into,
    run,
)
from peft_plugin_trainable_tokens import TrainableTokensConfig


def pair(tied=False, **kw):
    kw.setdefault("token_indices", TOKENS)
    return make_pair(lambda: llama(tied), peft.TrainableTokensConfig(**kw), TrainableTokensConfig(**kw), seed=3,
                     perturb=False)


def test_config_fields_and_defaults():
    assert_same_config_defaults(TrainableTokensConfig, peft.TrainableTokensConfig)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_outputs_merge_disable_unload_match_hf(tied):
    hf, ours = pair(tied)
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n for n, p in hf.named_parameters() if p.requires_grad}
    perturb_into(hf, ours)
    with torch.no_grad():
        base_out = run(llama(tied), inputs())
        assert_matches_oracle(hf, ours, inputs(), base_out)


def test_tied_head_follows_the_embedding_rows():
    _, ours = pair(tied=True)
    lm_head, embed = ours.base_model.model.lm_head, ours.base_model.model.model.embed_tokens
    assert lm_head.tied_to is embed
    with torch.no_grad():
        embed.trainable_tokens_delta["default"].add_(1.0)
    weight = lm_head.merged_weight(["default"])
    assert torch.equal(weight[TOKENS], embed.trainable_tokens_delta["default"])


def test_gradients_match_hf():
    hf, ours = pair()
    perturb_into(hf, ours)
    assert_same_training(hf, ours, inputs(), steps=1)
    grad = ours.base_model.model.model.embed_tokens.trainable_tokens_delta["default"].grad
    assert grad[:3].abs().sum() > 0 and grad[3].abs().sum() == 0  # token 40 is not in the batch


def test_random_init_draws_like_hf():
    hf, ours = pair(init_weights=False)
    name = "base_model.model.model.embed_tokens.trainable_tokens_delta.default"
    assert torch.equal(dict(ours.named_parameters())[name], dict(hf.named_parameters())[name])


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_checkpoints_load_both_ways(tied, tmp_path):
    hf, ours = pair(tied)
    perturb_into(hf, ours)
    assert_checkpoints_load_both_ways(hf, ours, lambda: llama(tied), inputs(), tmp_path)


def test_two_adapters_with_disjoint_tokens_match_hf():
    hf, ours = pair()
    for model, cfg in ((hf, peft.TrainableTokensConfig), (ours, TrainableTokensConfig)):
        model.add_adapter("other", cfg(token_indices=[2, 7]))
        model.base_model.set_adapter(["default", "other"])
    perturb_into(hf, ours)
    with torch.no_grad():
        assert_close(run(ours, inputs()), run(hf, inputs()), "two adapters")
        hf.merge_adapter(), ours.merge_adapter()
        assert_close(run(ours, inputs()), run(hf, inputs()), "two adapters merged")


def test_gradcheck_embedding_and_tied_head():
    from peft_kernel.testing import assert_gradcheck
    from peft_plugin_trainable_tokens import TiedTrainableTokensLayer, TrainableTokensLayer

    torch.manual_seed(0)
    embedding = nn.Embedding(12, 5, padding_idx=0).double()
    head = nn.Linear(5, 12, bias=True).double()
    head.weight = embedding.weight
    # not the padding row: the embedding gives it no gradient (by design, in torch and HF PEFT alike)
    layer = TrainableTokensLayer(embedding, "default", token_indices=[2, 3, 7], init_weights=False)
    tied = TiedTrainableTokensLayer(head, layer, "default")
    ids = torch.tensor([[3, 1, 7, 0], [2, 3, 11, 7]])
    assert assert_gradcheck(layer, ids) == ["trainable_tokens_delta.default"]
    assert assert_gradcheck(tied, torch.randn(2, 4, 5, dtype=torch.float64)) == ["trainable_tokens_delta.default"]


def test_explicitly_targeted_tied_head_still_follows_the_embeddings():
    ours = get_peft_model(llama(True), TrainableTokensConfig(target_modules=["embed_tokens", "lm_head"],
                                                             token_indices=TOKENS))
    model = ours.base_model.model
    assert model.lm_head.tied_to is model.model.embed_tokens


@pytest.mark.parametrize("indices, match", [([1, 1], "more than once"), ([-1], "non-negative"), ("12", "list")])
def test_bad_token_indices_are_refused(indices, match):
    with pytest.raises(ValueError, match=match):
        TrainableTokensConfig(token_indices=indices)


def test_overlapping_active_adapters_are_refused():
    _, ours = pair()
    ours.add_adapter("other", TrainableTokensConfig(token_indices=[5, 6]))
    ours.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="disjoint"):
        ours(**inputs())
    with pytest.raises(ValueError, match="disjoint"):
        ours.merge_adapter()


def test_full_embeddings_are_not_saved_by_default(tmp_path):
    _, ours = pair()
    ours.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    assert list(load_file(tmp_path / "adapter_model.safetensors")) == [
        "base_model.model.model.embed_tokens.trainable_tokens_delta"]


def test_mixed_batch_gives_each_sample_its_adapters_rows():
    _, ours = pair()
    ours.add_adapter("other", TrainableTokensConfig(token_indices=[1, 2]))
    ours.eval()
    with torch.no_grad():
        for name, shift in (("default", 0.5), ("other", 1.0)):
            ours.base_model.model.model.embed_tokens.trainable_tokens_delta[name].add_(shift)
    x = inputs()
    x["input_ids"][1, :2] = torch.tensor([1, 2])
    mixed = run(ours, x, adapter_names=["default", "other"])
    for row, name in enumerate(("default", "other")):
        ours.set_adapter(name)
        assert_close(mixed[row], run(ours, x)[row], f"sample {row} ({name})")
    with ours.disable_adapter():
        assert (mixed - run(ours, x)).abs().amax(dim=(1, 2)).min() > 1e-3  # both samples changed
