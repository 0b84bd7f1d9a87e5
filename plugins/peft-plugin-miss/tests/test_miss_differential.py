"""MiSS against HF PEFT (the oracle; the kit's OracleSuite), for its three variants: the same
seed gives the same initial shard, the same shards give the same outputs (unmerged, merged, in
training with dropout), and checkpoints load both ways with identical keys and config fields."""

from __future__ import annotations

import pytest

from peft_kernel.testing import differential as D
from peft_kernel.testing import tiny_models as M
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


class TestMissAgainstHF(D.OracleSuite):
    config_cls, hf_config, cases = MissConfig, "MissConfig", CASES
    init_values = ()  # the variant is the case's init_weights: test_same_seed_same_initial_shard
    training = [("default", {"miss_dropout": 0.3}), ("mini", {"miss_dropout": 0.3})]  # HF's dropout draws
    checkpoint_cases = ("default-ragged", "bat", "mini", "llama-defaults")
    two_adapter_cases = ("bat", "mini")  # two "bat" transforms compose in order, as in HF
    hf_mixed_batch_bug = "HF PEFT 0.21.2 accepts adapter_names= for MiSS but gives every sample the active adapter"


def make_pair(model: str, kwargs: dict, perturb: bool = True):
    return D.make_pair(lambda: M.build(model), hf_peft.MissConfig(**kwargs), MissConfig(**kwargs), perturb=perturb)


@pytest.mark.parametrize("case", [c for c in CASES if c[1] == "mlp"], ids=lambda c: c[0])
def test_same_seed_same_initial_shard(case):
    _, model, kwargs = case
    D.assert_same_initial_state(*make_pair(model, kwargs, perturb=False))
