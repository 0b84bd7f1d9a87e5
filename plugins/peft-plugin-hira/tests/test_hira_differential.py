"""HiRA against HF PEFT (the oracle; the kit's OracleSuite), for every layer kind: the same seed gives the same initial
factors, the same factors give the same outputs (unmerged, merged, in training with dropout), and
checkpoints load both ways with identical keys and config fields."""

from __future__ import annotations

import pytest

import peft_kernel
from peft_kernel.testing import differential as D
from peft_kernel.testing import tiny_models as M
from peft_plugin_hira import HiraConfig

hf_peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

pytestmark = pytest.mark.filterwarnings("ignore")

CASES = [
    ("linear", "mlp", {"target_modules": ["lin0", "lin1"], "r": 3}),
    ("linear-regex", "mlp", {"target_modules": r"lin\d", "exclude_modules": ["lin2"], "r": 2,
                             "modules_to_save": ["lin2"]}),
    ("conv1d", "conv1d", {"target_modules": ["conv0", "conv1"], "r": 2}),
    ("conv2d", "conv2d", {"target_modules": ["conv0", "conv2"], "r": 2}),  # (HF refuses the grouped conv1)
    ("conv3d", "conv3d", {"target_modules": ["conv0"], "r": 2}),
    ("embedding", "embedding", {"target_modules": ["emb", "lin"], "r": 3}),
    ("gpt2-conv1D", "gpt2", {"target_modules": ["c_attn", "c_fc"], "r": 4, "fan_in_fan_out": True}),
    ("llama-defaults", "llama", {"task_type": "CAUSAL_LM", "r": 4}),
]


HF_RANK_PATTERN_BUG = ("HF PEFT 0.21.2 ignores rank_pattern when it creates a HiRA layer (its dispatch reads "
                       "config.r); only a further adapter on an existing layer gets the pattern's rank")
HF_CONV3D_BUG = ("HF PEFT 0.21.2 takes its 1×1 Conv2d shortcut for every convolution whose kernel starts with 1×1, "
                 "and a Conv3d with a 1×1×1 kernel then fails in a batched matmul")


class TestHiraAgainstHF(D.OracleSuite):
    config_cls, hf_config, cases = HiraConfig, "HiraConfig", CASES
    init_values = (True, False, "gaussian")
    training = [(name, {"hira_dropout": 0.3}) for name in ("linear", "conv2d", "embedding")]  # HF's dropout draws
    checkpoint_cases = ("linear-regex", "conv3d", "embedding", "gpt2-conv1D")
    two_adapter_cases = ("linear", "conv2d")  # both multiply W₀, also merged one after the other
    hf_mixed_batch_bug = "HF PEFT 0.21.2 accepts adapter_names= for HiRA but gives every sample the active adapter"


def make_pair(model: str, kwargs: dict, perturb: bool = True):
    return D.make_pair(lambda: M.build(model), hf_peft.HiraConfig(**kwargs), HiraConfig(**kwargs), perturb=perturb)


RANK_PATTERN = {"target_modules": ["lin0", "lin1"], "r": 2, "rank_pattern": {"lin1": 4}}


def test_rank_pattern_sets_the_rank_per_layer():
    ours = peft_kernel.get_peft_model(M.build("mlp"), HiraConfig(**RANK_PATTERN))
    assert ours.base_model.model.lin0.hira_A["default"].shape == (2, 10)
    assert ours.base_model.model.lin1.hira_A["default"].shape == (4, 16)


@pytest.mark.xfail(strict=True, reason=HF_RANK_PATTERN_BUG)
def test_rank_pattern_in_hf():
    hf = hf_peft.get_peft_model(M.build("mlp"), hf_peft.HiraConfig(**RANK_PATTERN))
    assert hf.base_model.model.lin1.hira_A["default"].shape == (4, 16)


@pytest.mark.xfail(strict=True, raises=RuntimeError, reason=HF_CONV3D_BUG)
def test_pointwise_conv3d_matches_hf():
    hf, ours = make_pair("conv3d", {"target_modules": ["conv1"], "r": 2})
    x = M.inputs("conv3d")
    D.assert_close(D.run(ours, x), D.run(hf, x), "forward")
