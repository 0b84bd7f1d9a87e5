"""VeRA against HF PEFT (the oracle): bit-identical projections for the same key, same
outputs before and after merging, checkpoints that load both ways with identical keys and
config fields, with and without stored projections."""

from __future__ import annotations

import pytest
import torch

import peft_kernel
from peft_kernel.testing import differential as D
from peft_kernel.testing import tiny_models as M
from peft_plugin_vera import VeraConfig, make_projections

hf_peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

pytestmark = pytest.mark.filterwarnings("ignore")

CASES = [
    ("mlp_wide", "mlp_wide", {"target_modules": ["lin0", "lin1"], "r": 4}),
    ("mlp-all-r16", "mlp_wide", {"target_modules": ["lin0", "lin1", "lin2"], "r": 16, "d_initial": 0.5,
                            "projection_prng_key": 123}),
    ("mlp-no-projection", "mlp_wide", {"target_modules": ["lin0", "lin1"], "r": 4, "save_projection": False}),
    ("mlp-bias-vera_only", "mlp_wide", {"target_modules": ["lin0", "lin1"], "r": 4, "bias": "vera_only"}),
    ("mlp-bias-all", "mlp_wide", {"target_modules": ["lin1"], "r": 4, "bias": "all"}),
    ("mlp-regex-mts", "mlp_wide", {"target_modules": r"lin[01]", "r": 4, "modules_to_save": ["lin2"]}),
    ("mlp_wide_nobias", "mlp_wide_nobias", {"target_modules": ["lin0", "lin2"], "r": 4}),
    ("gpt2-conv1d", "gpt2", {"target_modules": ["c_attn", "c_proj"], "r": 8}),
    ("gpt2-defaults", "gpt2", {"r": 8, "save_projection": False}),
    ("llama-defaults", "llama", {"r": 8}),
    ("llama-all-linear", "llama", {"target_modules": "all-linear", "r": 8, "projection_prng_key": 5}),
    ("llama-layers", "llama", {"target_modules": ["q_proj", "down_proj"], "layers_to_transform": [1],
                               "layers_pattern": "layers", "r": 4, "task_type": "CAUSAL_LM"}),
]
IDS = [c[0] for c in CASES]


def make_pair(model: str, kwargs: dict, perturb: bool = True):
    return D.make_pair(lambda: M.build(model), hf_peft.VeraConfig(**kwargs), VeraConfig(**kwargs), perturb=perturb)


@pytest.mark.parametrize("shape", [(4, 10, 30), (256, 32, 48), (3, 1, 1), (7, 300, 5)])
@pytest.mark.parametrize("seed", [0, 1, 2**31 + 17])
def test_projection_generator_is_bit_identical(shape, seed):
    r, in_f, out_f = shape
    A, B = make_projections(r, in_f, out_f, seed)
    # what HF PEFT builds for the same key (its private helper, used here only as the oracle)
    from peft.tuners.vera.model import _kaiming_init

    generator = torch.Generator(device="cpu").manual_seed(seed)
    hf_A = _kaiming_init((r, in_f), generator=generator)
    hf_B = _kaiming_init((out_f, r), generator=generator)
    assert torch.equal(A, hf_A) and torch.equal(B, hf_B)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_structure_and_init_match(case):
    _, model, kwargs = case
    hf, ours = make_pair(model, kwargs, perturb=False)
    hf_sd, our_sd = hf.state_dict(), ours.state_dict()
    assert set(our_sd) == set(hf_sd)
    for key, value in hf_sd.items():
        assert torch.equal(our_sd[key], value), key  # projections included: bit-identical
    assert torch.equal(ours.base_model.vera_A["default"], hf.base_model.vera_A["default"])
    assert torch.equal(ours.base_model.vera_B["default"], hf.base_model.vera_B["default"])
    assert sorted(n for n, p in ours.named_parameters() if p.requires_grad) == sorted(
        n for n, p in hf.named_parameters() if p.requires_grad)
    assert sorted(ours.targeted_module_names) == sorted(hf.targeted_module_names)


def test_random_init_matches():
    kwargs = {"target_modules": ["lin0", "lin1", "lin2"], "r": 6, "init_weights": False}
    hf, ours = make_pair("mlp_wide", kwargs, perturb=False)
    for key, value in hf.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_outputs_merge_unmerge(case):
    _, model, kwargs = case
    hf, ours = make_pair(model, kwargs)
    x = M.inputs(model)
    base = D.run(M.build(model), x)
    D.assert_matches_oracle(hf, ours, x, base, disabled_is_base=kwargs.get("bias", "none") == "none")


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in (
    "mlp_wide", "mlp-no-projection", "mlp-bias-vera_only", "mlp-regex-mts", "gpt2-conv1d", "gpt2-defaults",
    "llama-defaults", "llama-layers")], ids=lambda c: c[0])
def test_checkpoints_both_ways(case, tmp_path):
    _, model, kwargs = case
    hf, ours = make_pair(model, kwargs)
    x = M.inputs(model)
    D.assert_checkpoints_load_both_ways(hf, ours, lambda: M.build(model), x, tmp_path)
    assert ("base_model.vera_A" in D.checkpoint_files(tmp_path / "ours")[1]) == kwargs.get("save_projection", True)


def test_second_adapter_matches_hf():
    first = {"target_modules": ["lin0", "lin1"], "r": 8}
    second = {"target_modules": ["lin1"], "r": 8, "d_initial": 0.3}
    hf, ours = make_pair("mlp_wide", first, perturb=False)
    hf.add_adapter("b", hf_peft.VeraConfig(**second))
    ours.add_adapter("b", VeraConfig(**second))
    assert torch.equal(ours.base_model.vera_A["b"], hf.base_model.vera_A["b"])
    hf.base_model.set_adapter(["default", "b"])
    D.perturb(hf)
    ours.load_state_dict(hf.state_dict())
    ours.base_model.set_adapter(["default", "b"])
    x = M.inputs("mlp_wide")
    D.assert_close(D.run(ours, x), D.run(hf, x), "two active adapters")
    for name in ("default", "b"):
        hf.set_adapter(name), ours.set_adapter(name)
        D.assert_close(D.run(ours, x), D.run(hf, x), f"adapter {name}")
    hf_sd = hf_peft.get_peft_model_state_dict(hf, adapter_name="b")
    our_sd = peft_kernel.get_peft_model_state_dict(ours, adapter_name="b")
    assert set(our_sd) == set(hf_sd)
    for key, value in hf_sd.items():
        assert torch.equal(our_sd[key], value), key


def test_smaller_second_adapter_matches_hf(tmp_path):
    """A second adapter on smaller layers slices the first adapter's projections."""
    hf, ours = make_pair("mlp_wide", {"target_modules": ["lin1"], "r": 4}, perturb=False)
    hf.add_adapter("b", hf_peft.VeraConfig(target_modules=["lin0"], r=4))
    ours.add_adapter("b", VeraConfig(target_modules=["lin0"], r=4))
    hf.set_adapter("b")
    D.perturb(hf)
    ours.load_state_dict(hf.state_dict())
    ours.set_adapter("b")
    x = M.inputs("mlp_wide")
    D.assert_close(D.run(ours, x), D.run(hf, x), "second, smaller adapter")
