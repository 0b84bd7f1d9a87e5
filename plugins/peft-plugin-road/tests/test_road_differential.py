"""RoAd against HF PEFT (the oracle; the kit's OracleSuite), for its three variants: the same
seed gives the same initial angles and scales, the same parameters give the same outputs
(unmerged, merged, mixed batches), and checkpoints load both ways with identical keys and config
fields."""

from __future__ import annotations

import pytest
import torch

from peft_kernel.testing import differential as D
from peft_kernel.testing import tiny_models as M
from peft_plugin_road import RoadConfig

hf_peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

pytestmark = pytest.mark.filterwarnings("ignore")

CASES = [
    ("road_1", "mlp", {"target_modules": ["lin0", "lin1"], "group_size": 4}),
    ("road_2", "mlp", {"target_modules": ["lin0", "lin1", "lin2"], "variant": "road_2", "group_size": 2,
                       "modules_to_save": ["lin2"]}),
    ("road_4", "mlp", {"target_modules": ["lin0", "lin1"], "variant": "road_4", "group_size": 4}),
    ("llama-defaults", "llama", {"task_type": "CAUSAL_LM", "group_size": 8}),
    ("llama-road_4", "llama", {"target_modules": ["q_proj", "down_proj"], "variant": "road_4", "group_size": 16}),
]


class TestRoadAgainstHF(D.OracleSuite):
    config_cls, hf_config, cases = RoadConfig, "RoadConfig", CASES
    checkpoint_cases = ("road_2", "road_4", "llama-defaults")
    two_adapter_cases = ("road_4",)
    training = [("road_1", {}), ("llama-road_4", {})]  # (no dropout: the gradients)


def make_pair(model: str, kwargs: dict, perturb: bool = True):
    return D.make_pair(lambda: M.build(model), hf_peft.RoadConfig(**kwargs), RoadConfig(**kwargs), perturb=perturb)


def test_merged_weights_match_hf():
    hf, ours = make_pair("mlp", CASES[2][2])
    hf.merge_adapter(), ours.merge_adapter()
    for name in ("lin0", "lin1"):
        ours_base, hf_base = (m.base_model.model.get_submodule(name).get_base_layer() for m in (ours, hf))
        torch.testing.assert_close(ours_base.weight, hf_base.weight)
        torch.testing.assert_close(ours_base.bias, hf_base.bias)
