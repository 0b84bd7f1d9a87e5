"""``add_weighted_adapter``: the kernel's generic part (validation, bookkeeping, rollback)
and LoRA's combination hooks.

Three kinds of checks:

* results against formulas written out here, in float64 from the source factors
  (cat is exact, full-rank SVD reproduces cat, linear has cross terms, DARE rescales);
* results against HF PEFT 0.21.2 on the same weights and the same seed (bit for bit,
  the random DARE masks included);
* every error case, and that a failed call leaves the model as it was.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import peft_kernel
from peft_kernel import PeftModel, PeftWarning, TunerConfig, get_peft_model, hookimpl
from peft_kernel.plugins import manager, register_peft_method, reset_manager
from peft_plugin_lora import LoraConfig

FACTOR_WISE = ["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"]
SVD_TYPES = ["svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd"]
ALL_TYPES = FACTOR_WISE + ["cat"] + SVD_TYPES
NEEDS_DENSITY = {"ties", "dare_linear", "dare_ties", "magnitude_prune", "ties_svd", "dare_linear_svd",
                 "dare_ties_svd", "magnitude_prune_svd"}
LAYERS = ["emb", "lin", "fifo", "conv", "pw", "c1"]


def _conv1d_cls():
    from transformers.pytorch_utils import Conv1D

    return Conv1D


class Net(nn.Module):
    """One layer of every kind LoRA combines: embedding, linear, transformers Conv1D
    (fan_in_fan_out), Conv2d k×k and 1×1, Conv1d; ``head`` for modules_to_save."""

    def __init__(self, with_c1: bool = True):
        super().__init__()
        self.emb = nn.Embedding(12, 8)
        self.lin = nn.Linear(8, 6)
        self.fifo = _conv1d_cls()(7, 6)  # nf=7 outputs, nx=6 inputs; weight stored (6, 7)
        self.head = nn.Linear(7, 3)
        self.conv = nn.Conv2d(3, 4, 3)
        self.pw = nn.Conv2d(4, 5, 1)
        if with_c1:
            self.c1 = nn.Conv1d(2, 3, 3)

    def forward(self, ids):
        return self.head(self.fifo(self.lin(self.emb(ids))))


def lora(r=4, alpha=8, targets=LAYERS, **kw):
    kw.setdefault("init_lora_weights", False)  # random A and B, so every delta is non-zero
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), **kw)


def two_sources(first=None, second=None, seed=0, with_c1=True):
    torch.manual_seed(seed)
    model = get_peft_model(Net(with_c1), first or lora(), adapter_name="a")
    model.add_adapter("b", second or lora(r=4, alpha=16, targets=["emb", "lin", "conv", "c1"] if with_c1 else
                                          ["emb", "lin", "conv"]))
    return model


def layer(model, name):
    return getattr(model.base_model.model, name)


def factors(lay, adapter):
    if adapter in lay.lora_A:
        return lay.lora_A[adapter].weight, lay.lora_B[adapter].weight
    return lay.lora_embedding_A[adapter], lay.lora_embedding_B[adapter]


def mat(lay, adapter):
    """s·B·A as a float64 (out, in·kernel) matrix, straight from the parameters."""
    A, B = (t.detach().double() for t in factors(lay, adapter))
    r = A.shape[0]
    return lay.scaling[adapter] * (B.reshape(B.shape[0], r) @ A.reshape(r, -1))


def expected_sum(model, name, adapters, weights):
    lay = layer(model, name)
    total = 0
    for a, w in zip(adapters, weights, strict=True):
        if a in lay.lora_A or a in lay.lora_embedding_A:
            total = total + w * mat(lay, a)
    return total


def close(actual, expected, atol=1e-5):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=1e-5, atol=atol)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # fan_in_fan_out notices, density >= 1 ...
        yield


# ---------------------------------------------------------------------------------------
# (a) semantics against formulas written out here
# ---------------------------------------------------------------------------------------


W = [0.7, -0.4]


def test_cat_is_exact_on_every_layer_type():
    model = two_sources()
    model.add_weighted_adapter(["a", "b"], W, "m", combination_type="cat")
    config = model.peft_config["m"]
    assert config.r == config.lora_alpha == 8 and config.rank_pattern == {} and config.alpha_pattern == {}
    for name in LAYERS:
        lay = layer(model, name)
        assert lay.r["m"] == 8 and lay.scaling["m"] == 1.0
        close(mat(lay, "m"), expected_sum(model, name, ["a", "b"], W))


@pytest.mark.parametrize("combination_type", ["svd", "dare_linear_svd", "magnitude_prune_svd"])
def test_full_rank_svd_family_reproduces_cat(combination_type):
    """Scaling is applied exactly once: at full rank the SVD family gives cat's delta
    (density >= 1 turns every pruning step off; the TIES variants elect signs even then,
    see test_ties_svd_applies_the_strategy_to_the_full_deltas)."""
    cat = two_sources()
    cat.add_weighted_adapter(["a", "b"], W, "m", combination_type="cat")
    model = two_sources()
    kw = {"density": 1.0} if combination_type in NEEDS_DENSITY else {}
    model.add_weighted_adapter(["a", "b"], W, "m", combination_type=combination_type, svd_rank=8, **kw)
    for name in LAYERS:
        close(mat(layer(model, name), "m"), mat(layer(cat, name), "m"))


def test_svd_default_rank_is_the_largest_and_truncation_is_the_best_approximation():
    model = two_sources(second=lora(r=3, alpha=6, targets=["emb", "lin", "conv", "c1"]))
    model.add_weighted_adapter(["a", "b"], W, "m", combination_type="svd")
    assert model.peft_config["m"].r == 4
    model.add_weighted_adapter(["a", "b"], W, "m2", combination_type="svd", svd_rank=2)
    assert model.peft_config["m2"].r == model.peft_config["m2"].lora_alpha == 2
    for name in LAYERS:
        target = expected_sum(model, name, ["a", "b"], W)
        U, S, Vh = torch.linalg.svd(target, full_matrices=False)
        for adapter, k in (("m", 4), ("m2", 2)):
            best = U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]
            close(mat(layer(model, name), adapter), best)


def test_svd_clamp_clamps_both_factors_to_the_quantile():
    model = two_sources()
    model.add_weighted_adapter(["a", "b"], W, "free", combination_type="svd")
    model.add_weighted_adapter(["a", "b"], W, "clamped", combination_type="svd", svd_clamp=0.9)
    lay = layer(model, "lin")
    A, B = (t.detach() for t in factors(lay, "free"))
    h = torch.quantile(torch.cat([B.flatten(), A.flatten()]), 0.9)
    Ac, Bc = factors(lay, "clamped")
    torch.testing.assert_close(Ac, A.clamp(-h, h))
    torch.testing.assert_close(Bc, B.clamp(-h, h))


def test_svd_rank_above_the_matrix_size_pads_with_zeros():
    model = two_sources()
    model.add_weighted_adapter(["a", "b"], W, "m", combination_type="svd", svd_rank=20)
    for name in LAYERS:
        lay = layer(model, name)
        A, B = factors(lay, "m")
        assert A.shape[0] == 20 and B.shape[1] == 20
        close(mat(lay, "m"), expected_sum(model, name, ["a", "b"], W))


def test_linear_combines_factors_so_the_result_has_cross_terms():
    model = two_sources(second=lora(r=4, alpha=16))
    model.add_weighted_adapter(["a", "b"], W, "m", combination_type="linear")
    assert model.peft_config["m"].r == 4
    for name in LAYERS:
        lay = layer(model, name)
        parts = []
        for a, w in zip(["a", "b"], W, strict=True):
            A, B = (t.detach().double() for t in factors(lay, a))
            c = math.sqrt(abs(w * lay.scaling[a]))
            parts.append((math.copysign(c, w * lay.scaling[a]) * A, c * B))
        r = parts[0][0].shape[0]
        expected = sum(Bj.reshape(Bj.shape[0], r) @ Ai.reshape(r, -1) for Ai, _ in parts for _, Bj in parts)
        close(mat(lay, "m"), expected)
        # the diagonal terms alone are the weighted sum; the cross terms make it differ
        assert not torch.allclose(mat(lay, "m"), expected_sum(model, name, ["a", "b"], W), atol=1e-3)


def test_single_source_forces_linear_and_a_negative_weight_subtracts():
    model = two_sources()
    model.add_weighted_adapter(["a"], [-0.5], "m", combination_type="svd", svd_rank=2)
    assert model.peft_config["m"].r == 4  # linear keeps the rank; svd_rank does not apply
    for name in LAYERS:
        close(mat(layer(model, name), "m"), -0.5 * mat(layer(model, name), "a"))


@pytest.mark.parametrize("combination_type", ["linear", "cat", "svd", "magnitude_prune", "dare_linear"])
def test_negative_weights_subtract(combination_type):
    """b is a copy of a; 1·a − 1·b is no change at all."""
    model = two_sources(second=lora())
    for name in LAYERS:
        for fa, fb in zip(factors(layer(model, name), "a"), factors(layer(model, name), "b"), strict=True):
            fb.data.copy_(fa.data)
    kw = {"density": 1.0} if combination_type in NEEDS_DENSITY else {}
    model.add_weighted_adapter(["a", "b"], [1.0, -1.0], "m", combination_type=combination_type, **kw)
    for name in LAYERS:
        close(mat(layer(model, name), "m"), torch.zeros_like(mat(layer(model, name), "a")), atol=1e-6)


def test_dare_keeps_about_density_and_divides_the_kept_entries_by_it():
    model = two_sources(second=lora())
    density = 0.3
    torch.manual_seed(5)
    # b's weight is 0, so the new factors are a's factors, masked and rescaled
    model.add_weighted_adapter(["a", "b"], [0.5, 0.0], "m", combination_type="dare_linear", density=density)
    lay = layer(model, "lin")
    c = math.sqrt(0.5 * lay.scaling["a"])
    for new, src in zip(factors(lay, "m"), factors(lay, "a"), strict=True):
        kept = new != 0
        assert 0 < kept.float().mean() < 0.7
        torch.testing.assert_close(new[kept], src.detach()[kept] * c / density)


def test_dare_is_unbiased_in_expectation():
    """Averaged over seeds, the DARE delta is the plain weighted sum (a rescale no-op
    would give ``density`` times it)."""
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(5, 4)), lora(r=2, targets=["0"]), adapter_name="a")
    model.add_adapter("b", lora(r=2, alpha=3, targets=["0"]))
    lay = model.base_model.model[0]
    target = expected_sum(model, "0", ["a", "b"], W)
    runs = 200
    total = 0
    for i in range(runs):
        torch.manual_seed(i)
        model.add_weighted_adapter(["a", "b"], W, "m", combination_type="dare_linear_svd", density=0.5, svd_rank=4)
        total = total + mat(lay, "m")
        model.delete_adapter("m")
    mean = total / runs
    assert (mean - target).abs().max() < 0.2 * target.abs().max()  # seeded: 0.11
    assert (mean - 0.5 * target).abs().max() > 0.3 * target.abs().max()


def _np_magnitude_prune(t, density):
    flat = t.flatten().clone()
    k = int(density * flat.numel())
    order = torch.argsort(flat.abs(), descending=True)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[order[:k]] = True
    return torch.where(mask, flat, torch.zeros_like(flat)).reshape(t.shape)


def _reference_ties(tensors, weights, density, method):
    pruned = torch.stack([_np_magnitude_prune(t, density) for t in tensors])
    if method == "total":
        elected = torch.where(pruned.sum(0) >= 0, 1.0, -1.0)
    else:
        elected = torch.where(torch.sign(pruned).sum(0) >= 0, 1.0, -1.0)
    agree = torch.sign(pruned) == elected
    w = torch.tensor(weights, dtype=pruned.dtype).reshape(-1, *([1] * (pruned.dim() - 1)))
    weighted = torch.where(agree, pruned * w, torch.zeros_like(pruned))
    return weighted.sum(0) / agree.sum(0).clamp(min=1)


@pytest.mark.parametrize("method", ["total", "frequency"])
def test_ties_and_magnitude_prune_work_factor_wise(method):
    model = two_sources(second=lora(r=4, alpha=16))
    model.add_weighted_adapter(["a", "b"], W, "t", combination_type="ties", density=0.5, majority_sign_method=method)
    model.add_weighted_adapter(["a", "b"], W, "mp", combination_type="magnitude_prune", density=0.5)
    for name in LAYERS:
        lay = layer(model, name)
        ws = [w * lay.scaling[a] for a, w in zip(["a", "b"], W, strict=True)]
        wA = [math.copysign(math.sqrt(abs(x)), x) for x in ws]
        wB = [math.sqrt(abs(x)) for x in ws]
        As = [factors(lay, a)[0].detach().double() for a in ("a", "b")]
        Bs = [factors(lay, a)[1].detach().double() for a in ("a", "b")]
        close(factors(lay, "t")[0], _reference_ties(As, wA, 0.5, method))
        close(factors(lay, "t")[1], _reference_ties(Bs, wB, 0.5, method))
        close(factors(lay, "mp")[0], sum(w * _np_magnitude_prune(t, 0.5) for w, t in zip(wA, As, strict=True)))
        close(factors(lay, "mp")[1], sum(w * _np_magnitude_prune(t, 0.5) for w, t in zip(wB, Bs, strict=True)))


def test_ties_svd_applies_the_strategy_to_the_full_deltas():
    model = two_sources(second=lora(r=4, alpha=16))
    model.add_weighted_adapter(["a", "b"], W, "m", combination_type="ties_svd", density=0.5, svd_rank=20)
    for name in LAYERS:
        lay = layer(model, name)
        close(mat(lay, "m"), _reference_ties([mat(lay, "a"), mat(lay, "b")], W, 0.5, "total"))


def test_cat_sums_ranks_including_rank_pattern_maximum():
    first = lora(r=2, alpha=4, rank_pattern={"lin": 6}, alpha_pattern={"lin": 3})
    model = two_sources(first=first)
    assert layer(model, "lin").r["a"] == 6 and layer(model, "conv").r["a"] == 2
    model.add_weighted_adapter(["a", "b"], W, "m", combination_type="cat")
    config = model.peft_config["m"]
    assert config.r == config.lora_alpha == 10 and config.rank_pattern == {} and config.alpha_pattern == {}
    for name in LAYERS:
        close(mat(layer(model, name), "m"), expected_sum(model, name, ["a", "b"], W))
    model.add_weighted_adapter(["a", "b"], W, "s", combination_type="svd")
    assert model.peft_config["s"].r == 6


def test_factor_wise_types_need_equal_ranks():
    model = two_sources(second=lora(r=2, alpha=4))
    for combination_type in FACTOR_WISE:
        with pytest.raises(ValueError, match="same rank"):
            model.add_weighted_adapter(["a", "b"], W, "m", combination_type=combination_type, density=0.5)
    # equal maximum ranks but different ranks in one layer (rank_pattern): named in the error
    model = two_sources(first=lora(r=4, rank_pattern={"lin": 2}), second=lora(r=4))
    with pytest.raises(ValueError, match="'lin'"):
        model.add_weighted_adapter(["a", "b"], W, "m", combination_type="linear")
    assert "m" not in model.peft_config


def test_rslora_scaling_of_the_new_adapter_is_compensated():
    model = two_sources(first=lora(r=2, alpha=4, use_rslora=True), second=lora(r=4, alpha=4, use_rslora=True))
    for combination_type in ("cat", "svd"):
        model.add_weighted_adapter(["a", "b"], W, combination_type, combination_type=combination_type, svd_rank=6)
        config = model.peft_config[combination_type]
        assert config.use_rslora and config.r == config.lora_alpha == 6
        assert layer(model, "lin").scaling[combination_type] == pytest.approx(math.sqrt(6))
        for name in LAYERS:
            close(mat(layer(model, name), combination_type), expected_sum(model, name, ["a", "b"], W))


def test_lora_bias_is_combined_linearly():
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(5, 4)), lora(r=2, targets=["0"], lora_bias=True), adapter_name="a")
    model.add_adapter("b", lora(r=2, alpha=3, targets=["0"]))
    lay = model.base_model.model[0]
    nn.init.normal_(lay.lora_B["a"].bias)
    model.add_weighted_adapter(["a", "b"], W, "m", combination_type="cat")
    assert model.peft_config["m"].lora_bias
    torch.testing.assert_close(lay.lora_B["m"].bias * lay.scaling["m"], lay.lora_B["a"].bias * 0.7 * lay.scaling["a"])


def test_conv3d_and_multihead_attention():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c3 = nn.Conv3d(2, 3, 2)
            self.mha = nn.MultiheadAttention(8, 2)

    torch.manual_seed(0)
    model = get_peft_model(M(), lora(r=2, targets=["c3", "mha"]), adapter_name="a")
    model.add_adapter("b", lora(r=3, alpha=3, targets=["c3", "mha"]))
    model.add_weighted_adapter(["a", "b"], W, "cat", combination_type="cat")
    model.add_weighted_adapter(["a", "b"], W, "svd", combination_type="svd", svd_rank=5)
    inner = model.base_model.model
    for lay in (inner.c3, inner.mha, inner.mha.base_layer.out_proj):
        expected = W[0] * mat(lay, "a") + W[1] * mat(lay, "b")
        close(mat(lay, "cat"), expected)
        close(mat(lay, "svd"), expected)


def test_layer_without_any_source_gets_a_zero_delta():
    """The union of the targets can reach a layer no source adapts: here ``b`` lists
    ``conv`` but excludes it, and the new config keeps the first source's (empty) exclusions."""
    torch.manual_seed(0)
    model = get_peft_model(Net(), lora(targets=["lin"]), adapter_name="a")
    model.add_adapter("b", lora(targets=["lin", "conv"], exclude_modules=["conv"]))
    assert type(layer(model, "conv")) is nn.Conv2d  # nobody adapts it yet
    model.add_weighted_adapter(["a", "b"], W, "m", combination_type="cat")
    assert torch.count_nonzero(mat(layer(model, "conv"), "m")) == 0
    close(mat(layer(model, "lin"), "m"), expected_sum(model, "lin", ["a", "b"], W))


def test_layer_a_source_covers_but_the_new_config_excludes_warns():
    torch.manual_seed(0)
    model = get_peft_model(Net(), LoraConfig(target_modules=r".*(lin|conv)", exclude_modules=["lin"],
                                             init_lora_weights=False), adapter_name="a")
    model.add_adapter("b", LoraConfig(target_modules=r".*lin", init_lora_weights=False))
    with pytest.warns(PeftWarning, match="does not cover"):
        model.add_weighted_adapter(["a", "b"], W, "m", combination_type="cat")
    assert model.peft_config["m"].target_modules == r"(.*(lin|conv))|(.*lin)"
    assert "m" not in layer(model, "lin").lora_A  # excluded by the first source's config, as in HF PEFT


# ---------------------------------------------------------------------------------------
# (b) bookkeeping: inactive, frozen, config, modules_to_save, rollback, checkpoints
# ---------------------------------------------------------------------------------------


def test_new_adapter_is_inactive_and_frozen_and_nothing_else_changes():
    model = two_sources()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    assert any(before.values())
    x = torch.randint(0, 12, (2, 5))
    out = model(x)
    model.add_weighted_adapter(["a", "b"], W, "m", combination_type="ties", density=0.5)
    assert model.active_adapter == "a" and model.base_model.active_adapters == ["a"]
    assert all(layer(model, n).active_adapters == ["a"] for n in LAYERS)
    for n, p in model.named_parameters():
        assert p.requires_grad == before.get(n, False), n
        if ".m." in n:
            assert not p.requires_grad
    torch.testing.assert_close(model(x), out)
    model.set_adapter("m")
    assert not torch.allclose(model(x), out)


def test_config_unions_targets_and_keeps_the_first_sources_settings():
    model = two_sources(first=lora(targets=["lin", "emb"], lora_dropout=0.1),
                        second=lora(targets=["fifo", "conv"], alpha=16))
    model.add_weighted_adapter(["a", "b"], W, "m", combination_type="cat")
    config = model.peft_config["m"]
    assert set(config.target_modules) == {"lin", "emb", "fifo", "conv"}
    assert config.lora_dropout == 0.1 and config.init_lora_weights is False
    for name in ("lin", "emb", "fifo", "conv"):
        close(mat(layer(model, name), "m"), expected_sum(model, name, ["a", "b"], W))


def test_base_rewriting_inits_are_not_rerun():
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(8, 8)), LoraConfig(r=2, target_modules=["0"],
                                                                        init_lora_weights="pissa"), adapter_name="a")
    model.add_adapter("b", LoraConfig(r=2, target_modules=["0"], init_lora_weights="olora"))
    base = model.base_model.model[0].base_layer.weight.clone()
    model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "m", combination_type="cat")
    assert torch.equal(model.base_model.model[0].base_layer.weight, base)
    assert model.peft_config["m"].init_lora_weights is True


def test_modules_to_save_copy_comes_from_its_single_owner():
    model = two_sources(second=lora(targets=["lin"], alpha=16, modules_to_save=["head"]))
    head = layer(model, "head")
    with torch.no_grad():
        head.modules_to_save["b"].weight.add_(1.0)
    model.add_weighted_adapter(["a", "b"], W, "m", combination_type="cat")
    assert model.peft_config["m"].modules_to_save == ["head"]
    assert torch.equal(head.modules_to_save["m"].weight, head.modules_to_save["b"].weight)
    assert not head.modules_to_save["m"].weight.requires_grad
    model.set_adapter("m")
    assert head._active_copy() is head.modules_to_save["m"]


def test_two_owners_of_one_module_to_save_raise_and_change_nothing():
    model = two_sources(first=lora(modules_to_save=["head"]), second=lora(modules_to_save=["head"]))
    with pytest.raises(ValueError, match="modules_to_save copy of 'head'"):
        model.add_weighted_adapter(["a", "b"], W, "m", combination_type="cat")
    assert "m" not in model.peft_config and "m" not in layer(model, "head").modules_to_save


def test_failure_while_combining_rolls_back():
    model = two_sources()
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    targeted = list(model.base_model.targeted_module_names)
    with pytest.raises(ValueError, match="density"):
        model.add_weighted_adapter(["a", "b"], W, "m", combination_type="ties", density=-1)
    assert "m" not in model.peft_config
    for name in LAYERS:
        assert "m" not in layer(model, name)._all_available_adapter_names()
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert model.base_model.targeted_module_names == targeted
    model.add_weighted_adapter(["a", "b"], W, "m", combination_type="ties", density=0.5)  # the name is free again


def test_rollback_unwraps_layers_the_failed_call_created():
    torch.manual_seed(0)
    model = get_peft_model(Net(), lora(targets=["lin"]), adapter_name="a")
    model.add_adapter("b", lora(targets=["lin", "conv"], exclude_modules=["conv"]))
    keys = set(model.state_dict())
    with pytest.raises(ValueError, match="density"):
        model.add_weighted_adapter(["a", "b"], W, "m", combination_type="ties", density=-1)
    assert type(layer(model, "conv")) is nn.Conv2d and set(model.state_dict()) == keys


def test_combined_adapter_saves_and_loads_in_both_libraries(tmp_path):
    peft = pytest.importorskip("peft")
    model = two_sources(with_c1=False)
    model.add_weighted_adapter(["a", "b"], W, "m", combination_type="dare_ties", density=0.5)
    model.set_adapter("m")
    x = torch.randint(0, 12, (2, 5))
    expected = model(x)
    model.save_pretrained(tmp_path, selected_adapters=["m"])
    torch.manual_seed(0)
    base = Net(with_c1=False)
    ours = PeftModel.from_pretrained(base, tmp_path / "m")
    torch.testing.assert_close(ours(x), expected)
    torch.manual_seed(0)
    hf = peft.PeftModel.from_pretrained(Net(with_c1=False), tmp_path / "m")
    torch.testing.assert_close(hf(x), expected)


# ---------------------------------------------------------------------------------------
# (c) errors
# ---------------------------------------------------------------------------------------


def test_existing_name_raises_and_keeps_the_adapter():
    model = two_sources()
    before = layer(model, "lin").lora_A["b"].weight.clone()
    with pytest.raises(ValueError, match="'b' already exists"):
        model.add_weighted_adapter(["a"], [1.0], "b")
    assert torch.equal(layer(model, "lin").lora_A["b"].weight, before)


@pytest.mark.parametrize("adapters,weights,match", [
    (["a", "nope"], [1.0, 1.0], "do not exist"),
    ([], [], "at least one"),
    (["a", "b"], [1.0], "one weight per adapter"),
    (["a", "b"], [1.0, float("nan")], "finite"),
    ("a", [1.0], "list of adapter names"),
])
def test_bad_sources_or_weights(adapters, weights, match):
    model = two_sources()
    with pytest.raises(ValueError, match=match):
        model.add_weighted_adapter(adapters, weights, "m")
    assert "m" not in model.peft_config


def test_unknown_combination_type_lists_the_known_ones():
    model = two_sources()
    with pytest.raises(ValueError, match="Unknown combination_type 'tiez'.*cat.*dare_linear.*ties_svd"):
        model.add_weighted_adapter(["a", "b"], W, "m", combination_type="tiez")
    with pytest.raises(ValueError, match="Unknown combination_type"):  # also with a single source
        model.add_weighted_adapter(["a"], [1.0], "m", combination_type="tiez")


def test_mixed_target_module_kinds_raise():
    torch.manual_seed(0)
    model = get_peft_model(Net(), lora(targets=["lin"]), adapter_name="a")
    model.add_adapter("b", LoraConfig(target_modules=r".*conv", init_lora_weights=False))
    with pytest.raises(ValueError, match="same kind"):
        model.add_weighted_adapter(["a", "b"], W, "m", combination_type="cat")


def test_bad_svd_rank_and_target_parameters():
    model = two_sources()
    with pytest.raises(ValueError, match="svd_rank"):
        model.add_weighted_adapter(["a", "b"], W, "m", svd_rank=0)
    model.peft_config["b"].target_parameters = ["lin.weight"]
    with pytest.raises(ValueError, match="target parameters"):
        model.add_weighted_adapter(["a", "b"], W, "m")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_svd_types_refuse_half_precision_adapters(dtype):
    model = two_sources().to(dtype)
    for combination_type in SVD_TYPES:
        with pytest.raises(ValueError, match="float16/bfloat16"):
            model.add_weighted_adapter(["a", "b"], W, "m", combination_type=combination_type, density=0.5)
    model.add_weighted_adapter(["a", "b"], W, "m", combination_type="cat")  # no SVD: fine
    lay = layer(model, "lin")
    assert factors(lay, "m")[0].dtype == torch.float32  # new adapters on a half base are fp32 (autocast)
    close(mat(lay, "m"), expected_sum(model, "lin", ["a", "b"], W), atol=1e-2)


def test_dora_sources_are_refused():
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(5, 4)), lora(targets=["0"], use_dora=True), adapter_name="a")
    model.add_adapter("b", lora(targets=["0"]))
    with pytest.raises(ValueError, match="DoRA"):
        model.add_weighted_adapter(["a", "b"], W, "m", combination_type="cat")


@dataclass
class NoCombineConfig(TunerConfig):
    def __post_init__(self):
        super().__post_init__()
        self.peft_type = "AWA_NOCOMBINE"


class NoCombineLayer(peft_kernel.AdapterLayer):
    adapter_layer_names = ("awa_nocombine_s",)

    def __init__(self, base_layer, adapter_name, config=None, **kwargs):
        super().__init__(base_layer, adapter_name=adapter_name)
        self.awa_nocombine_s = nn.ParameterDict()
        self.update_layer(adapter_name)

    def update_layer(self, adapter_name, **kwargs):
        self.awa_nocombine_s[adapter_name] = nn.Parameter(torch.ones(self.out_features))

    def adapter_forward(self, x, result, adapter_name, *args, **kwargs):
        return result * self.awa_nocombine_s[adapter_name]


class NoCombineModel(peft_kernel.BaseTuner):
    prefix = "awa_nocombine_"
    layer_cls = NoCombineLayer


class NoCombineDispatch:
    @hookimpl(trylast=True)
    def peft_kernel_dispatch_layer(self, target, target_name, adapter_name, config):
        if config.peft_type == "AWA_NOCOMBINE" and isinstance(target, nn.Linear):
            return NoCombineLayer(target, adapter_name, config=config)


def test_methods_without_combination_hooks_raise_type_error():
    reset_manager()
    try:
        register_peft_method(name="awa_nocombine", config_cls=NoCombineConfig, model_cls=NoCombineModel)
        manager().register(NoCombineDispatch(), name="awa-nocombine-dispatch")
        model = get_peft_model(nn.Sequential(nn.Linear(4, 4)), NoCombineConfig(target_modules=["0"]))
        model.add_adapter("other", NoCombineConfig(target_modules=["0"]))
        with pytest.raises(TypeError, match="AWA_NOCOMBINE does not support add_weighted_adapter"):
            model.add_weighted_adapter(["default", "other"], [0.5, 0.5], "m", combination_type="linear")
        assert "m" not in model.peft_config
    finally:
        reset_manager()


# ---------------------------------------------------------------------------------------
# (d) a third-party strategy, registered through the hook
# ---------------------------------------------------------------------------------------


class WeightedMax:
    """``max_i(w_i · t_i)`` per entry, plain and as an SVD strategy."""

    def __init__(self):
        self.seen = []

    def _fn(self, tensors, weights, **kw):
        self.seen.append(kw)
        stack = torch.stack(list(tensors))
        return (stack * weights.reshape(-1, *([1] * (stack.dim() - 1)))).amax(0)

    @hookimpl
    def peft_kernel_register_combinations(self, register):
        register("weighted_max", self._fn)
        register("weighted_max_svd", self._fn, svd=True)


@pytest.fixture
def weighted_max():
    reset_manager()
    plugin = WeightedMax()
    manager().register(plugin, name="weighted-max")
    yield plugin
    reset_manager()


def test_third_party_strategy_factor_wise_and_svd(weighted_max):
    model = two_sources(second=lora(r=4, alpha=16))
    model.add_weighted_adapter(["a", "b"], W, "m", combination_type="weighted_max", density=0.25,
                               majority_sign_method="frequency")
    assert weighted_max.seen[0] == {"density": 0.25, "majority_sign_method": "frequency"}
    model.add_weighted_adapter(["a", "b"], W, "s", combination_type="weighted_max_svd", svd_rank=20)
    assert model.peft_config["m"].r == 4 and model.peft_config["s"].r == 20
    for name in LAYERS:
        lay = layer(model, name)
        ws = [w * lay.scaling[a] for a, w in zip(["a", "b"], W, strict=True)]
        wA = [math.copysign(math.sqrt(abs(x)), x) for x in ws]
        wB = [math.sqrt(abs(x)) for x in ws]
        As = [factors(lay, a)[0].detach() for a in ("a", "b")]
        Bs = [factors(lay, a)[1].detach() for a in ("a", "b")]
        close(factors(lay, "m")[0], torch.maximum(wA[0] * As[0], wA[1] * As[1]))
        close(factors(lay, "m")[1], torch.maximum(wB[0] * Bs[0], wB[1] * Bs[1]))
        close(mat(lay, "s"), torch.maximum(W[0] * mat(lay, "a"), W[1] * mat(lay, "b")))
    with pytest.raises(ValueError, match="weighted_max_svd"):  # listed among the known types
        model.add_weighted_adapter(["a", "b"], W, "x", combination_type="nope")


def test_third_party_strategy_needs_equal_ranks_like_linear(weighted_max):
    model = two_sources(second=lora(r=2, alpha=4))
    with pytest.raises(ValueError, match="same rank"):
        model.add_weighted_adapter(["a", "b"], W, "m", combination_type="weighted_max")


# ---------------------------------------------------------------------------------------
# (e) against HF PEFT 0.21.2 on the same weights and the same seed
# ---------------------------------------------------------------------------------------


def _pair(first, second, peft):
    """The same two adapters in both libraries (HF gets our weights)."""
    ours = two_sources(first=first, second=second, with_c1=False)  # HF reshapes only Conv2d deltas
    torch.manual_seed(0)
    hf_cfg = [peft.LoraConfig(**{k: v for k, v in c.to_dict().items() if k not in ("peft_version",)})
              for c in (ours.peft_config["a"], ours.peft_config["b"])]
    hf = peft.get_peft_model(Net(with_c1=False), hf_cfg[0], adapter_name="a")
    hf.add_adapter("b", hf_cfg[1])
    result = hf.load_state_dict(ours.state_dict(), strict=False)
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "lora" in k]
    return ours, hf


@pytest.mark.parametrize("combination_type", ALL_TYPES)
@pytest.mark.parametrize("weights,method", [([0.7, -0.4], "total"), ([2.0, 0.3], "frequency")])
def test_matches_hf_peft(combination_type, weights, method):
    peft = pytest.importorskip("peft")
    ours, hf = _pair(lora(), lora(r=4, alpha=16, targets=["emb", "lin", "conv"]), peft)
    kw = {"density": 0.4, "majority_sign_method": method} if combination_type in NEEDS_DENSITY else {}
    for model in (ours, hf):
        torch.manual_seed(123)  # DARE: both draw their masks from here, in the same order
        model.add_weighted_adapter(["a", "b"], weights, "m", combination_type=combination_type, **kw)
    assert ours.peft_config["m"].r == hf.peft_config["m"].r
    assert set(ours.peft_config["m"].target_modules) == set(hf.peft_config["m"].target_modules)
    # SVD factors depend on the thread count (other tests change it): the project-wide 1e-5 applies
    for name in ["emb", "lin", "fifo", "conv", "pw"]:
        for mine, theirs in zip(factors(layer(ours, name), "m"), factors(layer(hf, name), "m"), strict=True):
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    x = torch.randint(0, 12, (2, 5))
    ours.set_adapter("m")
    hf.set_adapter("m")
    torch.testing.assert_close(ours(x), hf(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("combination_type,kw", [
    ("svd", {"svd_rank": 3, "svd_clamp": 0.9}),
    ("dare_ties_svd", {"svd_rank": 2, "density": 0.6}),
    ("cat", {}),
])
def test_matches_hf_peft_with_rank_pattern_and_svd_options(combination_type, kw):
    peft = pytest.importorskip("peft")
    ours, hf = _pair(lora(r=2, alpha=4, rank_pattern={"lin": 5}), lora(r=4, alpha=16), peft)
    for model in (ours, hf):
        torch.manual_seed(7)
        model.add_weighted_adapter(["a", "b"], [1.5, 0.5], "m", combination_type=combination_type, **kw)
    assert ours.peft_config["m"].r == hf.peft_config["m"].r
    for name in ["emb", "lin", "fifo", "conv", "pw"]:
        for mine, theirs in zip(factors(layer(ours, name), "m"), factors(layer(hf, name), "m"), strict=True):
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# (f) the example the user guide quotes
# ---------------------------------------------------------------------------------------


def test_example_combine_adapters_runs_and_the_docs_quote_it():
    import pathlib
    import re
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    script = root / "examples" / "combine_adapters.py"
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {line.split()[0]: line.split()[1:4] for line in out.stdout.splitlines() if re.match(r"^\S+\s+\d+%", line)}
    assert rows["plus3"][0] == rows["minus1"][1] == rows["minus3"][2] == "100%"  # each adapter learned its task
    for exact in ("cat", "svd_24"):  # the deltas do not overlap, so exact combinations keep all three skills
        assert rows[exact] == ["100%", "100%", "100%"], out.stdout
    assert rows["linear"] != ["100%", "100%", "100%"]  # cross terms
    assert "combined adapters are frozen: True; active adapter: minus3" in out.stdout
    # the user guide quotes the combining step verbatim
    source = script.read_text()
    quoted = source.split("# --8<-- [start:combine]\n")[1].split("    # --8<-- [end:combine]")[0]
    quoted = "\n".join(line[4:] for line in quoted.splitlines())
    assert quoted in (root / "docs" / "combining-adapters.md").read_text()
