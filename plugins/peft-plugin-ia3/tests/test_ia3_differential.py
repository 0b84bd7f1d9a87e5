"""(IA)³ against HF PEFT (the oracle): same weights give the same outputs before and after
merging, checkpoints load both ways with identical keys and config fields."""

from __future__ import annotations

import json

import pytest
import torch

import peft_kernel
from peft_kernel.testing import differential as D
from peft_kernel.testing import tiny_models as M
from peft_plugin_ia3 import IA3Config

hf_peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

pytestmark = pytest.mark.filterwarnings("ignore")

CASES = [
    ("mlp-output", "mlp_wide", {"target_modules": ["lin0", "lin1"], "feedforward_modules": []}),
    ("mlp-ff", "mlp_wide", {"target_modules": ["lin0", "lin1", "lin2"], "feedforward_modules": ["lin1", "lin2"]}),
    ("mlp-regex", "mlp_wide", {"target_modules": r"lin[01]", "feedforward_modules": r"lin1"}),
    ("mlp-exclude", "mlp_wide", {"target_modules": ["lin0", "lin1", "lin2"], "exclude_modules": ["lin2"],
                            "feedforward_modules": ["lin1"]}),
    ("mlp-modules_to_save", "mlp_wide", {"target_modules": ["lin0"], "feedforward_modules": ["lin0"],
                                    "modules_to_save": ["lin2"]}),
    ("conv2d-output", "conv2d", {"target_modules": ["conv0", "conv1"], "feedforward_modules": []}),
    ("conv2d-ff-groups", "conv2d", {"target_modules": ["conv0", "conv1"], "feedforward_modules": ["conv1"]}),
    ("conv3d-ff", "conv3d", {"target_modules": ["conv0"], "feedforward_modules": ["conv0"]}),
    ("gpt2-conv1d", "gpt2", {"target_modules": ["c_attn", "mlp.c_proj"], "feedforward_modules": ["mlp.c_proj"]}),
    ("gpt2-defaults", "gpt2", {}),
    ("gpt2-all-linear", "gpt2", {"target_modules": "all-linear", "feedforward_modules": r".*mlp\.c_proj"}),
    ("llama-defaults", "llama", {}),
    ("llama-custom", "llama", {"target_modules": ["q_proj", "k_proj", "up_proj", "down_proj"],
                               "feedforward_modules": ["up_proj", "down_proj"]}),
    ("llama-task", "llama", {"task_type": "CAUSAL_LM"}),
]
IDS = [c[0] for c in CASES]


def make_pair(model: str, kwargs: dict, perturb: bool = True, adapter_name: str = "default"):
    return D.make_pair(lambda: M.build(model), hf_peft.IA3Config(**kwargs), IA3Config(**kwargs), perturb=perturb,
                       adapter_name=adapter_name)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_structure_matches(case):
    _, model, kwargs = case
    hf, ours = make_pair(model, kwargs, perturb=False)
    hf_layers = {n: tuple(m.ia3_l["default"].shape) for n, m in hf.named_modules() if hasattr(m, "ia3_l")}
    our_layers = {n: tuple(m.ia3_l["default"].shape) for n, m in ours.named_modules() if hasattr(m, "ia3_l")}
    assert our_layers == hf_layers
    assert sorted(n for n, p in ours.named_parameters() if p.requires_grad) == sorted(
        n for n, p in hf.named_parameters() if p.requires_grad)
    # the identity init is identical, too
    for key, value in hf.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_outputs_merge_unmerge(case):
    _, model, kwargs = case
    hf, ours = make_pair(model, kwargs)
    x = M.inputs(model)
    base = D.run(M.build(model), x)
    D.assert_matches_oracle(hf, ours, x, base)


def test_random_init_matches():
    """init_ia3_weights=False draws the vectors from the global generator, as HF does."""
    kwargs = {"target_modules": ["lin0", "lin1", "lin2"], "feedforward_modules": ["lin1"], "init_ia3_weights": False}
    hf, ours = make_pair("mlp_wide", kwargs, perturb=False)
    for key, value in hf.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in (
    "mlp-ff", "mlp-regex", "mlp-modules_to_save", "conv2d-ff-groups", "gpt2-conv1d", "gpt2-defaults", "llama-defaults",
    "llama-task")], ids=lambda c: c[0])
def test_checkpoints_both_ways(case, tmp_path):
    _, model, kwargs = case
    hf, ours = make_pair(model, kwargs)
    x = M.inputs(model)
    D.assert_checkpoints_load_both_ways(hf, ours, lambda: M.build(model), x, tmp_path)


def test_second_adapter_checkpoint_subfolder(tmp_path):
    kwargs = {"target_modules": ["lin0", "lin1"], "feedforward_modules": ["lin1"]}
    hf, ours = make_pair("mlp_wide", kwargs, perturb=False)
    for model in (hf, ours):
        model.add_adapter("other", (hf_peft.IA3Config if model is hf else IA3Config)(**kwargs))
    D.perturb(hf)  # (only the active adapter is trainable)
    hf.base_model.set_adapter("other")
    D.perturb(hf, seed=5)
    ours.load_state_dict(hf.state_dict())
    x = M.inputs("mlp_wide")
    for name in ("default", "other"):
        hf.set_adapter(name), ours.set_adapter(name)
        D.assert_close(D.run(ours, x), D.run(hf, x), f"adapter {name}")
    hf.save_pretrained(tmp_path / "hf")
    ours.save_pretrained(tmp_path / "ours")
    assert (tmp_path / "ours" / "other" / "adapter_model.safetensors").is_file()
    mine = peft_kernel.PeftModel.from_pretrained(M.build("mlp_wide"), str(tmp_path / "hf" / "other"))
    theirs = hf_peft.PeftModel.from_pretrained(M.build("mlp_wide"), str(tmp_path / "ours"), adapter_name="x")
    theirs.load_adapter(str(tmp_path / "ours" / "other"), adapter_name="other")
    theirs.set_adapter("other")
    D.assert_close(D.run(mine, x), D.run(theirs, x), "second adapter across libraries")


def test_several_active_adapters_multiply():
    kwargs = {"target_modules": ["lin0", "lin1", "lin2"], "feedforward_modules": ["lin1"]}
    hf, ours = make_pair("mlp_wide", kwargs, perturb=False)
    hf.add_adapter("b", hf_peft.IA3Config(**kwargs))
    ours.add_adapter("b", IA3Config(**kwargs))
    hf.base_model.set_adapter(["default", "b"])
    D.perturb(hf)
    ours.load_state_dict(hf.state_dict())
    ours.base_model.set_adapter(["default", "b"])
    x = M.inputs("mlp_wide")
    D.assert_close(D.run(ours, x), D.run(hf, x), "two active adapters")
    hf.merge_adapter(), ours.merge_adapter()
    D.assert_close(D.run(ours, x), D.run(hf, x), "two merged adapters")


@pytest.mark.parametrize("kind", ["lists", "regex", "different-targets"])
def test_add_weighted_adapter_matches(kind):
    if kind == "lists":
        first = second = {"target_modules": ["lin0", "lin1"], "feedforward_modules": ["lin1"]}
    elif kind == "regex":
        first = {"target_modules": "lin0", "feedforward_modules": "lin9"}
        second = {"target_modules": "lin[12]", "feedforward_modules": "lin1"}
    else:
        first = {"target_modules": ["lin0"], "feedforward_modules": []}
        second = {"target_modules": ["lin1", "lin2"], "feedforward_modules": ["lin2"]}
    hf, ours = make_pair("mlp_wide", first, perturb=False)
    hf.add_adapter("b", hf_peft.IA3Config(**second))
    ours.add_adapter("b", IA3Config(**second))
    hf.base_model.set_adapter(["default", "b"])
    D.perturb(hf)
    hf.base_model.set_adapter("default")
    ours.load_state_dict(hf.state_dict())
    hf.add_weighted_adapter(["default", "b"], [0.7, 0.3], "mix")
    ours.add_weighted_adapter(["default", "b"], [0.7, 0.3], "mix")
    assert ours.peft_config["mix"].target_modules == hf.peft_config["mix"].target_modules
    assert ours.peft_config["mix"].feedforward_modules == hf.peft_config["mix"].feedforward_modules
    assert ours.active_adapters == ["default"]
    assert not any("mix" in n.split(".") for n, p in ours.named_parameters() if p.requires_grad)
    x = M.inputs("mlp_wide")
    D.assert_close(D.run(ours, x), D.run(hf, x), "still the old adapter")
    hf.set_adapter("mix"), ours.set_adapter("mix")
    D.assert_close(D.run(ours, x), D.run(hf, x), "combined adapter")
    for key, value in hf.state_dict().items():
        if ".mix" in key:
            D.assert_close(ours.state_dict()[key], value, key)


def test_default_targets_match_hf():
    hf, ours = make_pair("llama", {}, perturb=False)
    assert sorted(ours.targeted_module_names) == sorted(hf.targeted_module_names)
    assert ours.peft_config["default"].target_modules == hf.peft_config["default"].target_modules
    assert ours.peft_config["default"].feedforward_modules == hf.peft_config["default"].feedforward_modules


def test_config_dict_roundtrip_both_ways():
    ours = IA3Config(target_modules=["a", "b"], feedforward_modules=["b"], exclude_modules=["c"],
                     modules_to_save=["head"], init_ia3_weights=False, fan_in_fan_out=True, task_type="SEQ_CLS")
    theirs = hf_peft.IA3Config(**{k: v for k, v in ours.to_dict().items() if k != "peft_version"})
    back = IA3Config.from_dict(json.loads(json.dumps(theirs.to_dict(), default=sorted)))
    assert back.to_dict() | {"peft_version": None} == ours.to_dict() | {"peft_version": None}
    assert set(ours.to_dict()) == set(theirs.to_dict())
