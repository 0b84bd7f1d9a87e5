"""LoKr against HF PEFT (the oracle): the same seed gives the same initial factors, the same
factors give the same outputs (unmerged, merged, in training with dropout), and checkpoints
load both ways with identical keys and config fields. One HF bug (Conv1d with a full W2) is
kept as a strict xfail; ours is checked against the Kronecker product there."""

from __future__ import annotations

import pytest
import torch

from peft_kernel.testing import differential as D
from peft_kernel.testing import layer_models as L
from peft_plugin_lokr import LoKrConfig
from peft_plugin_lokr.layer import factorization

hf_peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

pytestmark = pytest.mark.filterwarnings("ignore")

# with r at least half a factor's larger side that factor is a full matrix, else a rank-r product
CASES = [
    ("linear", "mlp", {"target_modules": ["lin0", "lin1"], "r": 4, "alpha": 6}),
    ("linear-low-rank", "mlp", {"target_modules": ["lin0", "lin1"], "r": 1, "alpha": 2, "decompose_both": True}),
    ("linear-patterns", "mlp", {"target_modules": r"lin\d", "exclude_modules": ["lin2"], "r": 3,
                                "rank_pattern": {"lin1": 1}, "alpha_pattern": {"^lin0": 2.5}, "decompose_factor": 2}),
    ("linear-modules_to_save", "mlp", {"target_modules": ["lin0"], "modules_to_save": ["lin2"]}),
    ("conv1d-low-rank", "conv1d", {"target_modules": ["conv0", "conv1"], "r": 1}),
    ("conv1d-cp", "conv1d_wide", {"target_modules": ["conv0"], "r": 2, "use_effective_conv2d": True}),
    ("conv2d", "conv2d", {"target_modules": ["conv0", "conv1", "conv2"], "r": 4, "alpha": 3}),
    ("conv2d-low-rank", "conv2d", {"target_modules": ["conv0", "conv1", "conv2"], "r": 1, "decompose_both": True}),
    ("conv2d-cp", "conv2d", {"target_modules": ["conv0", "conv1", "conv2"], "r": 1, "alpha": 4,
                             "use_effective_conv2d": True}),
    ("llama-defaults", "llama", {"task_type": "CAUSAL_LM", "r": 2}),
]
IDS = [c[0] for c in CASES]
#: HF PEFT 0.21.2 builds a Conv1d delta with a full (3-D) W2 wrongly (see below)
CONV1D_FULL_W2 = ("conv1d", {"target_modules": ["conv0", "conv1"], "r": 4})
HF_CONV1D_BUG = ("HF PEFT 0.21.2 takes torch.kron of the 2-D W1 and the 3-D W2 of a Conv1d, which pads W1 to (1, a, c) "
                 "and reshapes a (b, a·d, c·k) product into (out, in, k): the entries of W1 ⊗ W2 in the wrong places")

HF_CONV1D_CP_CRASH = ("HF PEFT 0.21.2: the CP form of a Conv1d with r = 1 fails in torch.kron ('view size is not "
                      "compatible with input tensor's size and stride'); ours runs (conformance kit)")


def make_pair(model: str, kwargs: dict, perturb: bool = True):
    return L.oracle_pair(model, hf_peft.LoKrConfig(**kwargs), LoKrConfig(**kwargs), perturb=perturb)


@pytest.mark.parametrize("init_weights", [True, False, "lycoris"])
@pytest.mark.parametrize("case", [c for c in CASES if c[0] != "llama-defaults"], ids=lambda c: c[0])
def test_same_seed_same_initial_factors(case, init_weights):
    _, model, kwargs = case
    D.assert_same_initial_state(*make_pair(model, {**kwargs, "init_weights": init_weights}, perturb=False))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_outputs_merge_unmerge(case):
    _, model, kwargs = case
    hf, ours = make_pair(model, kwargs)
    x = L.inputs(model)
    D.assert_matches_oracle(hf, ours, x, D.run(L.build(model), x))


def test_conv1d_with_a_full_w2_is_the_kronecker_product():
    _, ours = make_pair(*CONV1D_FULL_W2)
    for name in ("conv0", "conv1"):
        layer = getattr(ours.base_model.model, name)
        w1, w2 = layer.lokr_w1["default"], layer.lokr_w2["default"]
        assert w2.dim() == 3
        a, c = w1.shape
        b, d, k = w2.shape
        expected = torch.einsum("il,jmk->ijlmk", w1, w2).reshape(a * b, c * d, k) * layer.scaling["default"]
        D.assert_close(layer.delta_weight("default"), expected.detach(), name)
    x = L.inputs("conv1d")
    merged = D.run(ours, x)
    ours.merge_adapter()
    D.assert_close(D.run(ours, x), merged, "merged", atol=1e-4)


@pytest.mark.xfail(strict=True, reason=HF_CONV1D_BUG)
def test_conv1d_with_a_full_w2_matches_hf():
    hf, ours = make_pair(*CONV1D_FULL_W2)
    x = L.inputs("conv1d")
    D.assert_close(D.run(ours, x), D.run(hf, x), "forward")


@pytest.mark.xfail(strict=True, raises=RuntimeError, reason=HF_CONV1D_CP_CRASH)
def test_conv1d_cp_form_of_rank_1_runs_in_hf():
    hf, ours = make_pair("conv1d", {"target_modules": ["conv0"], "r": 1, "use_effective_conv2d": True})
    x = L.inputs("conv1d")
    D.assert_close(D.run(ours, x), D.run(hf, x), "forward")


@pytest.mark.parametrize("case,scale", [("linear", True), ("linear-low-rank", False), ("conv2d", True),
                                        ("conv1d-cp", True)])
def test_training_with_dropout_matches(case, scale):
    """Module and rank dropout draw from torch's generator exactly as HF does: the same seed gives
    the same outputs and gradients (HF's LoKr CP form is plain autograd, unlike its LoHa's)."""
    _, model, kwargs = next(c for c in CASES if c[0] == case)
    hf, ours = make_pair(model, {**kwargs, "rank_dropout": 0.4, "module_dropout": 0.3, "rank_dropout_scale": scale})
    D.assert_same_training(hf, ours, L.inputs(model))


def test_rank_dropout_of_every_row_drops_the_update():
    _, ours = make_pair("mlp", {"target_modules": ["lin0", "lin1"], "rank_dropout": 1.0, "rank_dropout_scale": True})
    x = L.inputs("mlp")
    ours.train()
    D.assert_close(ours(x).detach(), D.run(L.build("mlp"), x), "every row dropped")


@pytest.mark.xfail(strict=True, reason="HF PEFT 0.21.2: with rank_dropout_scale, rank dropout that drops every row "
                                       "divides by their zero mean, and the layer outputs NaN")
def test_rank_dropout_of_every_row_matches_hf():
    hf, ours = make_pair("mlp", {"target_modules": ["lin0", "lin1"], "rank_dropout": 1.0, "rank_dropout_scale": True})
    x = L.inputs("mlp")
    hf.train(), ours.train()
    D.assert_close(hf(x).detach(), ours(x).detach(), "HF with every row dropped")


@pytest.mark.parametrize("case", ["linear-patterns", "linear-modules_to_save", "conv1d-cp", "conv2d",
                                  "llama-defaults"])
def test_checkpoints_both_ways(case, tmp_path):
    _, model, kwargs = next(c for c in CASES if c[0] == case)
    hf, ours = make_pair(model, {**kwargs, "init_weights": "lycoris"})
    D.assert_checkpoints_load_both_ways(hf, ours, lambda: L.build(model), L.inputs(model), tmp_path)


def test_config_fields_and_defaults_match_hf():
    D.assert_same_config_defaults(LoKrConfig, hf_peft.LoKrConfig)


def test_factorization_matches_hf():
    from peft.tuners.lokr.layer import factorization as hf_factorization

    for dimension in range(1, 130):
        for factor in (-1, 0, 1, 2, 3, 4, 5, 8, 16):
            assert factorization(dimension, factor) == hf_factorization(dimension, factor), (dimension, factor)
