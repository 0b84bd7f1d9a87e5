"""LoKr against HF PEFT (the oracle; the kit's OracleSuite): the same seed gives the same initial
factors, the same factors give the same outputs (unmerged, merged, in training with dropout), and
checkpoints load both ways with identical keys and config fields. HF's bugs (a Conv1d with a full
W2 is not W1 ⊗ W2; the rank-1 CP form of a Conv1d crashes; rank dropout of every row gives NaN)
are strict xfails, and ours is checked against the math there."""

from __future__ import annotations

import pytest
import torch

from peft_kernel.testing import differential as D
from peft_kernel.testing import tiny_models as M
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
#: HF PEFT 0.21.2 builds a Conv1d delta with a full (3-D) W2 wrongly (see below)
CONV1D_FULL_W2 = ("conv1d", {"target_modules": ["conv0", "conv1"], "r": 4})
HF_CONV1D_BUG = ("HF PEFT 0.21.2 takes torch.kron of the 2-D W1 and the 3-D W2 of a Conv1d, which pads W1 to (1, a, c) "
                 "and reshapes a (b, a·d, c·k) product into (out, in, k): the entries of W1 ⊗ W2 in the wrong places")

HF_CONV1D_CP_CRASH = ("HF PEFT 0.21.2: the CP form of a Conv1d with r = 1 fails in torch.kron ('view size is not "
                      "compatible with input tensor's size and stride'); ours runs (conformance kit)")


class TestLoKrAgainstHF(D.OracleSuite):
    config_cls, hf_config, cases = LoKrConfig, "LoKrConfig", CASES
    init_values = (True, False, "lycoris")
    # module and rank dropout draw from torch's generator as HF's do; HF's LoKr CP form is plain
    # autograd (unlike its LoHa's), so the gradients agree there too
    training = [(name, {"rank_dropout": 0.4, "module_dropout": 0.3, "rank_dropout_scale": scale})
                for name, scale in [("linear", True), ("linear-low-rank", False), ("conv2d", True),
                                    ("conv1d-cp", True)]]
    checkpoint_cases = ("linear-patterns", "linear-modules_to_save", "conv1d-cp", "conv2d", "llama-defaults")
    two_adapter_cases = ("conv2d-cp",)
    hf_mixed_batch_bug = "HF PEFT 0.21.2 accepts adapter_names= for LoKr but gives every sample the active adapter"


def make_pair(model: str, kwargs: dict, perturb: bool = True):
    return D.make_pair(lambda: M.build(model), hf_peft.LoKrConfig(**kwargs), LoKrConfig(**kwargs), perturb=perturb)


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
    x = M.inputs("conv1d")
    merged = D.run(ours, x)
    ours.merge_adapter()
    D.assert_close(D.run(ours, x), merged, "merged", atol=1e-4)


@pytest.mark.xfail(strict=True, reason=HF_CONV1D_BUG)
def test_conv1d_with_a_full_w2_matches_hf():
    hf, ours = make_pair(*CONV1D_FULL_W2)
    x = M.inputs("conv1d")
    D.assert_close(D.run(ours, x), D.run(hf, x), "forward")


@pytest.mark.xfail(strict=True, raises=RuntimeError, reason=HF_CONV1D_CP_CRASH)
def test_conv1d_cp_form_of_rank_1_runs_in_hf():
    hf, ours = make_pair("conv1d", {"target_modules": ["conv0"], "r": 1, "use_effective_conv2d": True})
    x = M.inputs("conv1d")
    D.assert_close(D.run(ours, x), D.run(hf, x), "forward")


def test_rank_dropout_of_every_row_drops_the_update():
    _, ours = make_pair("mlp", {"target_modules": ["lin0", "lin1"], "rank_dropout": 1.0, "rank_dropout_scale": True})
    x = M.inputs("mlp")
    ours.train()
    D.assert_close(ours(x).detach(), D.run(M.build("mlp"), x), "every row dropped")


@pytest.mark.xfail(strict=True, reason="HF PEFT 0.21.2: with rank_dropout_scale, rank dropout that drops every row "
                                       "divides by their zero mean, and the layer outputs NaN")
def test_rank_dropout_of_every_row_matches_hf():
    hf, ours = make_pair("mlp", {"target_modules": ["lin0", "lin1"], "rank_dropout": 1.0, "rank_dropout_scale": True})
    x = M.inputs("mlp")
    hf.train(), ours.train()
    D.assert_close(hf(x).detach(), ours(x).detach(), "HF with every row dropped")


def test_factorization_matches_hf():
    from peft.tuners.lokr.layer import factorization as hf_factorization

    for dimension in range(1, 130):
        for factor in (-1, 0, 1, 2, 3, 4, 5, 8, 16):
            assert factorization(dimension, factor) == hf_factorization(dimension, factor), (dimension, factor)
