"""MiSS against HF PEFT (the oracle), for its three variants: the same seed gives the same initial
shard, the same shards give the same outputs (unmerged, merged, in training with dropout), and
checkpoints load both ways with identical keys and config fields."""

from __future__ import annotations

import pytest

from peft_kernel.testing import differential as D
from peft_kernel.testing import layer_models as L
from peft_plugin_miss import MissConfig

hf_peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

pytestmark = pytest.mark.filterwarnings("ignore")

CASES = [
    ("default", "mlp", {"target_modules": ["lin0", "lin1"], "r": 2}),
    ("default-ragged", "mlp", {"target_modules": ["lin0", "lin1", "lin2"], "r": 3}),  # in % r != 0
    ("default-random", "mlp", {"target_modules": ["lin0", "lin1"], "r": 4, "init_weights": False,
                               "modules_to_save": ["lin2"]}),
    ("bat", "mlp", {"target_modules": ["lin0", "lin1"], "r": 2, "init_weights": "bat"}),
    ("mini", "mlp", {"target_modules": ["lin0", "lin1"], "r": 2, "mini_r": 4, "init_weights": "mini"}),
    ("llama-defaults", "llama", {"task_type": "CAUSAL_LM", "r": 4}),
    ("llama-bat", "llama", {"target_modules": ["q_proj", "o_proj"], "r": 4, "init_weights": "bat"}),
]
IDS = [c[0] for c in CASES]


def make_pair(model: str, kwargs: dict, perturb: bool = True):
    return L.oracle_pair(model, hf_peft.MissConfig(**kwargs), MissConfig(**kwargs), perturb=perturb)


@pytest.mark.parametrize("case", CASES[:5], ids=IDS[:5])
def test_same_seed_same_initial_shard(case):
    _, model, kwargs = case
    D.assert_same_initial_state(*make_pair(model, kwargs, perturb=False))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_outputs_merge_unmerge(case):
    _, model, kwargs = case
    hf, ours = make_pair(model, kwargs)
    x = L.inputs(model)
    D.assert_matches_oracle(hf, ours, x, D.run(L.build(model), x))


@pytest.mark.parametrize("variant", ["default", "mini"])
def test_training_with_dropout_matches(variant):
    """The input dropout draws from torch's generator as HF's does: the same seed gives the same
    outputs and gradients."""
    _, model, kwargs = next(c for c in CASES if c[0] == variant)
    hf, ours = make_pair(model, {**kwargs, "miss_dropout": 0.3})
    D.assert_same_training(hf, ours, L.inputs(model))


def test_two_bat_adapters_compose_as_in_hf():
    kwargs = {"target_modules": ["lin0", "lin1"], "r": 2, "init_weights": "bat"}
    hf, ours = make_pair("mlp", kwargs, perturb=False)
    hf.add_adapter("b", hf_peft.MissConfig(**kwargs))
    ours.add_adapter("b", MissConfig(**kwargs))
    hf.base_model.set_adapter(["default", "b"])
    D.perturb(hf)
    ours.load_state_dict(hf.state_dict())
    ours.base_model.set_adapter(["default", "b"])
    x = L.inputs("mlp")
    D.assert_close(D.run(ours, x), D.run(hf, x), "two active adapters")
    hf.merge_adapter(), ours.merge_adapter()
    D.assert_close(D.run(ours, x), D.run(hf, x), "two merged adapters", atol=1e-4)


@pytest.mark.parametrize("case", ["default-ragged", "bat", "mini", "llama-defaults"])
def test_checkpoints_both_ways(case, tmp_path):
    _, model, kwargs = next(c for c in CASES if c[0] == case)
    hf, ours = make_pair(model, kwargs)
    D.assert_checkpoints_load_both_ways(hf, ours, lambda: L.build(model), L.inputs(model), tmp_path)


def test_config_fields_and_defaults_match_hf():
    D.assert_same_config_defaults(MissConfig, hf_peft.MissConfig)
