"""Checkpoints both ways between HF PEFT and ours, and the on-disk format itself."""

from __future__ import annotations

import json
import os

import pytest
from _models import (
    HF,
    OURS,
    assert_close,
    assert_same_keys,
    assert_state_dicts_close,
    build_base,
    cached_pair,
    expect_hf_mha_bug,
    make_inputs,
    make_pair,
    trainable_names,
)

from peft_kernel.testing.differential import run

safetensors_torch = pytest.importorskip("safetensors.torch")

CKPT_CASES = [
    ("mlp-default", "mlp", {}),
    ("mlp-rslora-r8", "mlp", {"use_rslora": True, "r": 8, "lora_alpha": 4}),
    ("mlp-bias-all", "mlp", {"bias": "all"}),
    ("mlp-bias-lora_only", "mlp", {"bias": "lora_only"}),
    ("mlp-lora_bias", "mlp", {"lora_bias": True}),
    ("mlp-dora", "mlp", {"use_dora": True}),
    ("mlp-regex", "mlp", {"target_modules": r"lin[02]"}),
    ("mlp-all-linear", "mlp", {"target_modules": "all-linear"}),
    ("mlp-exclude", "mlp", {"target_modules": ["lin0", "lin1", "lin2"], "exclude_modules": ["lin1"]}),
    ("mlp-rank-alpha-pattern", "mlp", {"rank_pattern": {"lin1": 8}, "alpha_pattern": {"lin0": 16}}),
    ("mlp-modules_to_save", "mlp", {"modules_to_save": ["lin2"]}),
    ("mlp-init-gaussian", "mlp", {"init_lora_weights": "gaussian"}),
    ("mlp-pissa", "mlp", {"init_lora_weights": "pissa"}),
    ("llama-olora", "llama", {"init_lora_weights": "olora"}),
    ("conv1d-default", "conv1d", {}),
    ("conv2d-dora", "conv2d", {"use_dora": True}),
    ("conv3d-lora_bias", "conv3d", {"lora_bias": True}),
    ("conv2d_groups-r4", "conv2d_groups", {"r": 4}),
    ("emb-default", "emb", {}),
    ("emb-dora", "emb", {"use_dora": True}),
    ("mha-default", "mha", {}),
    ("llama-default", "llama", {}),
    ("llama-all-linear-dora", "llama", {"target_modules": "all-linear", "use_dora": True}),
    (
        "llama-layers-pattern",
        "llama",
        {"target_modules": ["q_proj", "o_proj"], "layers_to_transform": [1], "layers_pattern": "layers"},
    ),
    ("llama-modules_to_save", "llama", {"modules_to_save": ["lm_head"], "bias": "all"}),
    ("llama-embed_tokens", "llama", {"target_modules": ["embed_tokens", "q_proj"]}),
    ("gpt2-default", "gpt2", {}),
    ("gpt2-dora", "gpt2", {"use_dora": True}),
    ("t5-default", "t5", {}),
    ("bert_cls-default", "bert_cls", {}),
    ("bert_cls-mts-bias-all", "bert_cls", {"modules_to_save": ["classifier"], "bias": "all"}),
]
IDS = [c[0] for c in CKPT_CASES]

# fields whose JSON list comes from a set (order is not meaningful)
_SET_FIELDS = {"target_modules", "exclude_modules", "modules_to_save", "layers_to_transform"}


def _files(root):
    out = set()
    for d, _, fs in os.walk(root):
        for f in fs:
            out.add(os.path.relpath(os.path.join(d, f), root))
    return out


def _load_config(path):
    with open(os.path.join(path, "adapter_config.json")) as f:
        cfg = json.load(f)
    cfg.pop("peft_version", None)
    for k in _SET_FIELDS:
        if isinstance(cfg.get(k), list):
            cfg[k] = sorted(cfg[k], key=str)
    return cfg


def assert_same_adapter_config(ours_dir, hf_dir):
    ours_cfg, hf_cfg = _load_config(ours_dir), _load_config(hf_dir)
    assert_same_keys(ours_cfg, hf_cfg, "adapter_config.json fields")
    diffs = {k: {"ours": ours_cfg[k], "hf": hf_cfg[k]} for k in hf_cfg if ours_cfg[k] != hf_cfg[k]}
    assert not diffs, f"adapter_config.json values differ: {diffs}"


def assert_same_safetensors(ours_file, hf_file, case_id=None):
    from safetensors import safe_open

    ours_sd = safetensors_torch.load_file(ours_file)
    hf_sd = _drop_hf_only(case_id, safetensors_torch.load_file(hf_file))
    # weights were copied from HF, so the saved tensors must be bit-identical
    assert_state_dicts_close(ours_sd, hf_sd, os.path.basename(ours_file), atol=0.0, rtol=0.0)
    with safe_open(ours_file, "pt") as f:
        ours_meta = f.metadata()
    with safe_open(hf_file, "pt") as f:
        hf_meta = f.metadata()
    assert ours_meta == hf_meta, f"safetensors metadata: ours {ours_meta} vs hf {hf_meta}"


@pytest.mark.parametrize("case", CKPT_CASES, ids=IDS)
def test_hf_save_ours_load(case, tmp_path, request):
    model = case[1]
    expect_hf_mha_bug(request, model)
    hf, _ = cached_pair(model, **case[2])
    hf.save_pretrained(tmp_path)
    ours = OURS.PeftModel.from_pretrained(build_base(model), tmp_path)
    hf2 = HF.PeftModel.from_pretrained(build_base(model), tmp_path)
    assert type(ours).__name__ == type(hf2).__name__, "from_pretrained returned a different task class"
    assert_state_dicts_close(ours.state_dict(), hf.state_dict(), "state_dict after loading HF checkpoint")
    inputs = make_inputs(model)
    assert_close(run(ours, inputs), run(hf, inputs), "output of ours loaded from HF checkpoint")
    # from_pretrained loads for inference by default
    if case[2].get("bias", "none") != "none":
        # Deliberate difference: HF PEFT leaves the base biases trainable in inference mode; ours
        # freezes every parameter of an adapter loaded with is_trainable=False.
        assert not trainable_names(ours), "an adapter loaded for inference must be fully frozen"
        assert all(n.endswith("bias") for n in trainable_names(hf2))
    else:
        assert_same_keys(trainable_names(ours), trainable_names(hf2), "trainable parameters after from_pretrained")
    assert ours.peft_config["default"].inference_mode == hf2.peft_config["default"].inference_mode


@pytest.mark.parametrize("case", CKPT_CASES, ids=IDS)
def test_ours_save_hf_load(case, tmp_path):
    model = case[1]
    hf, ours = cached_pair(model, **case[2])
    ours.save_pretrained(tmp_path)
    hf2 = HF.PeftModel.from_pretrained(build_base(model), tmp_path)
    assert_state_dicts_close(hf2.state_dict(), hf.state_dict(), "HF state_dict after loading our checkpoint")
    inputs = make_inputs(model)
    assert_close(run(hf2, inputs), run(hf, inputs), "output of HF loaded from our checkpoint")


# Deliberate difference: with bias="all" and modules_to_save, HF PEFT also writes the wrapper's
# internal copies (`classifier.modules_to_save.bias`, `classifier.original_module.bias`); the
# trained head is already saved under `classifier.bias`, so ours does not duplicate it.
_HF_ONLY_KEYS = {"bert_cls-mts-bias-all": {"base_model.model.classifier.modules_to_save.bias",
                                           "base_model.model.classifier.original_module.bias"}}


def _drop_hf_only(case_id, state):
    return {k: v for k, v in state.items() if k not in _HF_ONLY_KEYS.get(case_id, ())}


@pytest.mark.parametrize("case", CKPT_CASES, ids=IDS)
def test_checkpoint_files_identical(case, tmp_path):
    hf, ours = cached_pair(case[1], **case[2])
    hf.save_pretrained(tmp_path / "hf")
    ours.save_pretrained(tmp_path / "ours")
    problems = []
    hf_files, ours_files = _files(tmp_path / "hf"), _files(tmp_path / "ours")
    if ours_files != hf_files:
        problems.append(f"saved files: ours {sorted(ours_files)} vs hf {sorted(hf_files)}")
    for check, args in (
        (assert_same_adapter_config, (tmp_path / "ours", tmp_path / "hf")),
        (
            assert_same_safetensors,
            (str(tmp_path / "ours" / "adapter_model.safetensors"), str(tmp_path / "hf" / "adapter_model.safetensors"),
             case[0]),
        ),
    ):
        try:
            check(*args)
        except (AssertionError, OSError) as exc:
            problems.append(str(exc))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("case", CKPT_CASES, ids=IDS)
def test_get_set_peft_model_state_dict(case, request):
    model = case[1]
    expect_hf_mha_bug(request, model)
    hf, ours = cached_pair(model, **case[2])
    hf_sd = _drop_hf_only(case[0], HF.get_peft_model_state_dict(hf))
    ours_sd = OURS.get_peft_model_state_dict(ours)
    assert_state_dicts_close(ours_sd, hf_sd, "get_peft_model_state_dict", atol=0.0, rtol=0.0)

    # HF's adapter state dict into a freshly created model of ours
    hf_fresh, fresh = make_pair(model, copy_weights=False, perturb=False, init_seed=7, **case[2])
    hf_res = HF.set_peft_model_state_dict(hf_fresh, hf_sd)
    ours_res = OURS.set_peft_model_state_dict(fresh, hf_sd)
    assert sorted(ours_res.unexpected_keys) == sorted(hf_res.unexpected_keys), "unexpected_keys differ"
    fresh.eval()
    inputs = make_inputs(model)
    assert_close(run(fresh, inputs), run(hf, inputs), "output after set_peft_model_state_dict")


@pytest.mark.parametrize("direction", ["hf_to_ours", "ours_to_hf"])
def test_pickle_checkpoint(direction, tmp_path):
    """safe_serialization=False writes adapter_model.bin; it must load on the other side."""
    hf, ours = cached_pair("mlp", use_dora=True, modules_to_save=["lin2"])
    src = hf if direction == "hf_to_ours" else ours
    dst_lib = OURS if direction == "hf_to_ours" else HF
    src.save_pretrained(tmp_path, safe_serialization=False)
    assert _files(tmp_path) == {"adapter_config.json", "adapter_model.bin", "README.md"} or _files(tmp_path) == {
        "adapter_config.json",
        "adapter_model.bin",
    }
    loaded = dst_lib.PeftModel.from_pretrained(build_base("mlp"), tmp_path)
    inputs = make_inputs("mlp")
    assert_close(run(loaded, inputs), run(hf, inputs), f"{direction} via adapter_model.bin")


_TRAINABLE_CASES = [
    c for c in CKPT_CASES if c[0] in ("mlp-default", "mlp-bias-all", "llama-default", "bert_cls-mts-bias-all")
]


@pytest.mark.parametrize("case", _TRAINABLE_CASES, ids=[c[0] for c in _TRAINABLE_CASES])
def test_load_trainable(case, tmp_path):
    """from_pretrained(..., is_trainable=True) makes the same parameters trainable."""
    model = case[1]
    hf, _ = cached_pair(model, **case[2])
    hf.save_pretrained(tmp_path)
    ours = OURS.PeftModel.from_pretrained(build_base(model), tmp_path, is_trainable=True)
    hf2 = HF.PeftModel.from_pretrained(build_base(model), tmp_path, is_trainable=True)
    assert_same_keys(trainable_names(ours), trainable_names(hf2), "trainable parameters (is_trainable=True)")
    assert ours.peft_config["default"].inference_mode == hf2.peft_config["default"].inference_mode
