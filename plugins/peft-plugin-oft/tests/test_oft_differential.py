"""OFT against HF PEFT (the oracle; the kit's OracleSuite): the same seed gives the same initial
tensors, the same tensors give the same outputs (unmerged, merged, disabled, unloaded) and
gradients, and checkpoints load both ways with identical keys and config fields. Where HF PEFT 0.21.2 is wrong
(its unmerged Conv2d forward, the order of several active adapters, module_dropout, mixed
batches), ours is tested against the math and the HF comparison is a strict xfail."""

from __future__ import annotations

import pytest
import torch

import peft_kernel
from peft_kernel.testing import differential as D
from peft_kernel.testing import tiny_models as M
from peft_plugin_oft import OFTConfig

hf_peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

pytestmark = pytest.mark.filterwarnings("ignore")

LINEARS = ["lin0", "lin1", "lin2"]
CASES = [
    ("linear", "mlp8", {"target_modules": LINEARS, "oft_block_size": 4}),
    ("linear-r", "mlp8", {"target_modules": LINEARS, "r": 2, "oft_block_size": 0}),
    ("linear-exact-cayley", "mlp8", {"target_modules": LINEARS, "oft_block_size": 4, "use_cayley_neumann": False}),
    ("linear-shared-coft", "mlp8", {"target_modules": LINEARS, "oft_block_size": 4, "block_share": True,
                                   "coft": True, "eps": 1e-2}),
    ("linear-3-terms", "mlp8", {"target_modules": LINEARS, "oft_block_size": 4, "num_cayley_neumann_terms": 3}),
    ("linear-2-terms", "mlp8", {"target_modules": LINEARS, "oft_block_size": 4, "num_cayley_neumann_terms": 2}),
    ("linear-bias-modules_to_save", "mlp8", {"target_modules": ["lin0", "lin1"], "oft_block_size": 4,
                                            "bias": "oft_only", "modules_to_save": ["lin2"]}),
    ("embedding", "embedding", {"target_modules": ["emb"], "oft_block_size": 4}),
    ("llama-defaults", "llama", {"task_type": "CAUSAL_LM"}),
    ("llama-adjusted-blocks", "llama", {"target_modules": ["q_proj", "down_proj"], "layers_to_transform": [1],
                                        "layers_pattern": "layers"}),  # down_proj: 48 inputs, blocks of 24
]
CONV = {"target_modules": ["conv0", "conv1"], "oft_block_size": 6}
HF_TWO_ADAPTERS_BUG = ("HF PEFT 0.21.2's unmerged OFT Linear rotates the input by the active adapters in activation "
                       "order, but merges them in the same order into the weight, which is the opposite order on the "
                       "input: with two active adapters its merged and unmerged outputs differ")


class TestOFTAgainstHF(D.OracleSuite):
    config_cls, hf_config, cases = OFTConfig, "OFTConfig", CASES
    scale = 0.05  # rotations of realistic size: the Neumann series of a large skew matrix is all rounding
    training = [("linear-shared-coft", {}), ("embedding", {})]  # (module_dropout: HF ignores it, below)
    checkpoint_cases = ("linear-shared-coft", "linear-bias-modules_to_save", "embedding", "llama-defaults")
    two_adapter_cases = ()  # HF_TWO_ADAPTERS_BUG: test_two_active_adapters_compose_as_merging_does
    hf_mixed_batch_bug = "HF PEFT 0.21.2 accepts adapter_names= for OFT but gives every sample the active adapter"


def make_pair(model: str, kwargs: dict, perturb: bool = True):
    """(hf, ours) on the same base under the same seed; HF's perturbed tensors copied into ours."""
    return D.make_pair(lambda: M.build(model), hf_peft.OFTConfig(**kwargs), OFTConfig(**kwargs), perturb=perturb,
                       seed=1, scale=TestOFTAgainstHF.scale)


# -- Conv2d: HF PEFT's merged weights are right, its unmerged forward is not ----------------------

HF_CONV_BUG = ("HF PEFT 0.21.2's unmerged OFT Conv2d forward rotates unfolded input patches and folds them back, "
               "which sums overlapping patches: even the identity adapter changes the output (its merged weights "
               "are right)")


def test_conv2d_unmerged_is_hf_merged_layer():
    hf, ours = make_pair("conv3", CONV)
    x = M.inputs("conv3")
    unmerged = D.run(ours, x)
    hf.merge_adapter(), ours.merge_adapter()
    D.assert_close(unmerged, D.run(hf, x), "ours unmerged vs HF merged")
    D.assert_close(D.run(ours, x), D.run(hf, x), "merged")
    D.assert_close(D.run(ours, x), unmerged, "merged vs unmerged", atol=1e-4)


def test_conv2d_starts_as_the_exact_identity():
    _, ours = make_pair("conv3", CONV, perturb=False)
    x = M.inputs("conv3")
    assert torch.equal(D.run(ours, x), D.run(M.build("conv3"), x))


@pytest.mark.xfail(strict=True, reason=HF_CONV_BUG)
def test_conv2d_unmerged_matches_hf():
    hf, ours = make_pair("conv3", CONV, perturb=False)
    x = M.inputs("conv3")
    D.assert_close(D.run(hf, x), D.run(ours, x), "HF's unmerged identity adapter")


def test_conv2d_checkpoints_both_ways(tmp_path):
    hf, ours = make_pair("conv3", CONV)
    x = M.inputs("conv3")
    expected = D.run(ours, x)
    hf.save_pretrained(tmp_path / "hf"), ours.save_pretrained(tmp_path / "ours")
    D.assert_same_checkpoint(tmp_path / "ours", tmp_path / "hf")
    loaded = peft_kernel.PeftModel.from_pretrained(M.build("conv3"), str(tmp_path / "hf"))
    D.assert_close(D.run(loaded, x), expected, "ours loading HF's checkpoint")
    hf_loaded = hf_peft.PeftModel.from_pretrained(M.build("conv3"), str(tmp_path / "ours"))
    hf_loaded.merge_adapter()  # (HF's merged forward is its right one)
    D.assert_close(D.run(hf_loaded, x), expected, "HF loading our checkpoint")


# -- several adapters, dropout, training ---------------------------------------------------------


def _two_active(model: str):
    kwargs = {"target_modules": ["lin0", "lin1"], "oft_block_size": 4, "init_weights": False}
    hf, ours = make_pair(model, kwargs, perturb=False)
    D.add_active_adapter(hf, ours, hf_peft.OFTConfig(**kwargs), OFTConfig(**kwargs))
    return hf, ours


def test_two_active_adapters_compose_as_merging_does():
    """Rotations do not commute: unmerged, the adapters act in the order merging applies them."""
    hf, ours = _two_active("mlp8")
    x = M.inputs("mlp8")
    unmerged = D.run(ours, x)
    hf.merge_adapter(), ours.merge_adapter()
    D.assert_close(unmerged, D.run(hf, x), "ours unmerged vs HF merged")
    D.assert_close(D.run(ours, x), unmerged, "merged vs unmerged", atol=1e-4)


@pytest.mark.xfail(strict=True, reason=HF_TWO_ADAPTERS_BUG)
def test_two_active_adapters_hf_unmerged_matches_its_merged():
    hf, _ = _two_active("mlp8")
    x = M.inputs("mlp8")
    unmerged = D.run(hf, x)
    hf.merge_adapter()
    D.assert_close(D.run(hf, x), unmerged, "HF merged vs unmerged", atol=1e-4)


@pytest.mark.parametrize("model,kwargs", [("mlp8", {"target_modules": LINEARS, "oft_block_size": 2}),
                                          ("embedding", {"target_modules": ["emb"], "oft_block_size": 2}),
                                          ("conv3", CONV)], ids=["linear", "embedding", "conv2d"])
def test_module_dropout_replaces_blocks_by_the_identity_in_training(model, kwargs):
    """module_dropout=1 drops every block: in training the layer is the base layer; in eval and
    when merging, dropout plays no part."""
    _, ours = make_pair(model, {**kwargs, "module_dropout": 1.0})
    x = M.inputs(model)
    base_out, adapted = D.run(M.build(model), x), D.run(ours, x)
    D.assert_differs(adapted, base_out, "adapter")
    ours.train()
    D.assert_close(D.run(ours, x), base_out, "every block dropped")
    ours.merge_adapter()
    ours.eval()
    D.assert_close(D.run(ours, x), adapted, "merged in training mode", atol=1e-4)


@pytest.mark.xfail(strict=True, reason="HF PEFT 0.21.2 builds OFT's module_dropout layer but never calls it: "
                                       "module_dropout has no effect")
def test_module_dropout_matches_hf_in_training():
    hf, ours = make_pair("mlp8", {"target_modules": LINEARS, "oft_block_size": 2, "module_dropout": 1.0})
    hf.train(), ours.train()
    x = M.inputs("mlp8")
    D.assert_close(D.run(hf, x), D.run(ours, x), "training forward with module_dropout")


# -- configs and combinations ----------------------------------------------------------------------


def test_configs_of_old_peft_versions_are_refused_or_warned_about(tmp_path):
    old = {"peft_type": "OFT", "r": 8, "target_modules": ["lin0"]}  # PEFT < 0.14: no oft_block_size
    with pytest.raises(ValueError, match="PEFT < 0.14.*Retrain"):
        peft_kernel.PeftConfig.from_peft_type(**old)
    older_series = {**OFTConfig(target_modules=["lin0"]).to_dict(), "peft_version": "0.17.1"}
    with pytest.warns(peft_kernel.PeftWarning, match="PEFT < 0.18"):
        peft_kernel.PeftConfig.from_peft_type(**older_series)


def test_add_weighted_adapter_is_refused_like_hf():
    hf, ours = make_pair("mlp8", {"target_modules": LINEARS, "oft_block_size": 4})
    with pytest.raises(TypeError, match="OFT does not support add_weighted_adapter"):
        ours.add_weighted_adapter(["default"], [1.0], "combined")
    assert not hasattr(hf.base_model, "add_weighted_adapter")
