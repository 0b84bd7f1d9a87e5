"""LoRA on tiny models and many configs: structure, forward, merge, unmerge, unload vs HF PEFT."""

from __future__ import annotations

import pytest
import torch
from _models import (
    SELFTEST,
    assert_close,
    assert_same_exception,
    assert_same_keys,
    assert_state_dicts_close,
    build_base,
    cached_pair,
    expect_hf_mha_bug,
    hf_mha_out_proj_bug,
    make_inputs,
    max_abs_diff,
    pair_copy,
    trainable_names,
)

from peft_kernel.testing.differential import run

# (id, model name, LoraConfig overrides)
CASES = [
    # ---- plain nn.Module models
    ("mlp-default", "mlp", {}),
    ("mlp-r2-alpha3", "mlp", {"r": 2, "lora_alpha": 3}),
    ("mlp-r8-alpha4-rslora", "mlp", {"r": 8, "lora_alpha": 4, "use_rslora": True}),
    ("mlp-bias-all", "mlp", {"bias": "all"}),
    ("mlp-bias-lora_only", "mlp", {"bias": "lora_only"}),
    ("mlp-lora_bias", "mlp", {"lora_bias": True}),
    ("mlp-init-true", "mlp", {"init_lora_weights": True}),
    ("mlp-init-gaussian", "mlp", {"init_lora_weights": "gaussian"}),
    ("mlp-dora", "mlp", {"use_dora": True}),
    ("mlp_nobias-dora", "mlp_nobias", {"use_dora": True, "target_modules": ["lin0", "lin1", "lin2"]}),
    ("mlp-dora-rslora", "mlp", {"use_dora": True, "use_rslora": True, "r": 8}),
    ("mlp-regex", "mlp", {"target_modules": r"lin[02]"}),
    ("mlp-all-linear", "mlp", {"target_modules": "all-linear"}),
    ("mlp-exclude-list", "mlp", {"target_modules": ["lin0", "lin1", "lin2"], "exclude_modules": ["lin1"]}),
    ("mlp-exclude-regex", "mlp", {"target_modules": ["lin0", "lin1", "lin2"], "exclude_modules": r"lin[12]"}),
    ("mlp-rank-alpha-pattern", "mlp", {"rank_pattern": {"lin1": 8}, "alpha_pattern": {"lin0": 16}}),
    ("mlp-modules_to_save", "mlp", {"modules_to_save": ["lin2"]}),
    ("mlp-inference_mode-dropout", "mlp", {"inference_mode": True, "lora_dropout": 0.3}),
    ("conv1d-default", "conv1d", {}),
    ("conv1d-dora", "conv1d", {"use_dora": True}),
    ("conv2d-default", "conv2d", {}),
    ("conv2d-rslora-lora_bias", "conv2d", {"use_rslora": True, "lora_bias": True}),
    ("conv2d-dora", "conv2d", {"use_dora": True}),
    ("conv3d-default", "conv3d", {}),
    ("conv3d-dora", "conv3d", {"use_dora": True}),
    ("conv2d_groups-r4", "conv2d_groups", {"r": 4}),
    ("emb-default", "emb", {}),
    ("emb-init-true", "emb", {"init_lora_weights": True}),
    ("emb-dora", "emb", {"use_dora": True}),
    ("emb-and-linear-modules_to_save", "emb", {"target_modules": ["emb"], "modules_to_save": ["lin"]}),
    ("mha-default", "mha", {}),
    ("mha-rslora", "mha", {"use_rslora": True, "r": 8, "lora_alpha": 16}),
    # ---- transformers models
    ("llama-default", "llama", {}),
    ("llama-all-linear", "llama", {"target_modules": "all-linear"}),
    ("llama-regex", "llama", {"target_modules": r".*\.(q_proj|v_proj|down_proj)"}),
    (
        "llama-layers_to_transform",
        "llama",
        {
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
            "layers_to_transform": [1],
            "layers_pattern": "layers",
        },
    ),
    ("llama-exclude", "llama", {"target_modules": "all-linear", "exclude_modules": r".*\.mlp\..*"}),
    (
        "llama-rank-alpha-pattern",
        "llama",
        {
            "target_modules": ["q_proj", "v_proj", "gate_proj"],
            "rank_pattern": {"q_proj": 8, "layers.1.mlp.gate_proj": 2},
            "alpha_pattern": {"model.layers.1.self_attn.v_proj": 32},
        },
    ),
    ("llama-dora-all-linear", "llama", {"target_modules": "all-linear", "use_dora": True}),
    ("llama-rslora-bias-all", "llama", {"use_rslora": True, "bias": "all", "target_modules": "all-linear"}),
    ("llama-modules_to_save", "llama", {"modules_to_save": ["lm_head"]}),
    ("llama-embed_tokens", "llama", {"target_modules": ["embed_tokens", "q_proj"]}),
    ("gpt2-default", "gpt2", {}),
    ("gpt2-all-linear", "gpt2", {"target_modules": "all-linear"}),
    ("gpt2-dora", "gpt2", {"use_dora": True, "target_modules": ["c_attn", "c_fc"]}),
    (
        "gpt2-layers_to_transform",
        "gpt2",
        {"target_modules": ["c_attn"], "layers_to_transform": 0, "layers_pattern": "h"},
    ),
    ("gpt2-lora_bias", "gpt2", {"lora_bias": True}),
    ("t5-default", "t5", {}),
    ("t5-all-linear", "t5", {"target_modules": "all-linear"}),
    ("t5-dora-regex", "t5", {"target_modules": r".*(SelfAttention|EncDecAttention)\.(q|k|v|o)$", "use_dora": True}),
    ("bert_cls-default", "bert_cls", {}),
    ("bert_cls-mts-bias-all", "bert_cls", {"modules_to_save": ["classifier"], "bias": "all"}),
    ("bert_cls-all-linear", "bert_cls", {"target_modules": "all-linear"}),
    (
        "bert_cls-layers-pattern-rank",
        "bert_cls",
        {"target_modules": ["query", "key", "dense"], "layers_to_transform": [0], "layers_pattern": "layer", "r": 2},
    ),
]

IDS = [c[0] for c in CASES]


def _readonly_pair(case):
    """(hf, ours) with HF's (perturbed) weights copied into ours, shared by the tests that
    only read from the models."""
    return cached_pair(case[1], **case[2])


def _mutable_pair(case):
    """A private copy of :func:`_readonly_pair` for tests that merge or unload."""
    return pair_copy(case[1], **case[2])


def _fresh_pair(case):
    """(hf, ours) right after get_peft_model, without copying weights, to look at what
    get_peft_model itself produced (shared, read-only)."""
    return cached_pair(case[1], copy_weights=False, perturb=False, **case[2])


def _outcome(fn):
    try:
        return fn(), None
    except Exception as exc:  # noqa: BLE001 - we compare the exception types
        return None, exc


def _same_outcome(hf_fn, ours_fn, what):
    """Both calls must succeed, or both must raise the same kind of exception. Returns (hf, ours, raised)."""
    hf_res, hf_exc = _outcome(hf_fn)
    ours_res, ours_exc = _outcome(ours_fn)
    assert_same_exception(ours_exc, hf_exc, what)
    return hf_res, ours_res, hf_exc is not None


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_structure(case):
    hf, ours = _fresh_pair(case)
    assert type(ours).__name__ == type(hf).__name__, "PeftModel task class differs"
    assert_same_keys(ours.state_dict().keys(), hf.state_dict().keys(), "state_dict")
    hf_sd, ours_sd = hf.state_dict(), ours.state_dict()
    shapes = [
        f"{k}: ours {tuple(ours_sd[k].shape)}/{ours_sd[k].dtype} vs hf {tuple(v.shape)}/{v.dtype}"
        for k, v in hf_sd.items()
        if ours_sd[k].shape != v.shape or ours_sd[k].dtype != v.dtype
    ]
    assert not shapes, "state_dict shapes differ:\n  " + "\n  ".join(shapes)
    hf_mods = {n for n, _ in hf.named_modules()}
    ours_mods = {n for n, _ in ours.named_modules()}
    assert_same_keys(ours_mods, hf_mods, "named_modules")


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_targeted_module_names(case):
    hf, ours = _fresh_pair(case)
    assert sorted(ours.targeted_module_names) == sorted(hf.targeted_module_names)
    assert list(ours.targeted_module_names) == list(hf.targeted_module_names), "same names, different order"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_trainable_parameters(case):
    hf, ours = _fresh_pair(case)
    assert_same_keys(trainable_names(ours), trainable_names(hf), "trainable parameter")
    assert ours.get_nb_trainable_parameters() == hf.get_nb_trainable_parameters()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_config_after_injection(case):
    """target_modules etc. as resolved by get_peft_model (e.g. 'all-linear' expanded)."""
    hf, ours = _fresh_pair(case)
    hf_cfg = hf.peft_config["default"].to_dict()
    ours_cfg = ours.peft_config["default"].to_dict()
    for d in (hf_cfg, ours_cfg):
        d.pop("peft_version", None)
        for k, v in d.items():
            if isinstance(v, set):
                d[k] = sorted(v)
    assert_same_keys(ours_cfg, hf_cfg, "config.to_dict()")
    diffs = {k: (ours_cfg[k], hf_cfg[k]) for k in hf_cfg if ours_cfg[k] != hf_cfg[k]}
    assert not diffs, f"config fields differ (ours, hf): {diffs}"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_unmerged(case, request):
    expect_hf_mha_bug(request, case[1])
    model = case[1]
    hf, ours = _readonly_pair(case)
    inputs = make_inputs(model)
    base_out = run(build_base(model), inputs)
    hf_out, ours_out = run(hf, inputs), run(ours, inputs)
    # harness sanity: the adapter must actually change the output
    assert max_abs_diff(hf_out, base_out) > 1e-4, "test is vacuous: HF adapter output equals base output"
    assert_close(ours_out, hf_out, "unmerged output")


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_merge_unmerge(case, request):
    expect_hf_mha_bug(request, case[1])
    model = case[1]
    hf, ours = _mutable_pair(case)
    inputs = make_inputs(model)
    _, _, raised = _same_outcome(
        lambda: hf.merge_adapter(safe_merge=True), lambda: ours.merge_adapter(safe_merge=True), "merge_adapter()"
    )
    if raised:
        # unmergeable layer (e.g. groups > 1): the adapter must still work unmerged
        assert_close(run(ours, inputs), run(hf, inputs), "output after failed merge")
        return
    assert_state_dicts_close(ours.state_dict(), hf.state_dict(), "state_dict after merge_adapter()")
    assert_close(run(ours, inputs), run(hf, inputs), "output after merge_adapter()")
    hf.unmerge_adapter()
    ours.unmerge_adapter()
    assert_state_dicts_close(ours.state_dict(), hf.state_dict(), "state_dict after unmerge_adapter()")
    assert_close(run(ours, inputs), run(hf, inputs), "output after unmerge_adapter()")


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_merge_and_unload(case, request):
    expect_hf_mha_bug(request, case[1])
    model = case[1]
    hf, ours = _mutable_pair(case)
    inputs = make_inputs(model)
    hf_out = run(hf, inputs)
    hf_m, ours_m, raised = _same_outcome(
        lambda: hf.merge_and_unload(),
        lambda: ours.merge_and_unload(),
        "merge_and_unload()",
    )
    if raised:
        return
    assert type(ours_m).__name__ == type(hf_m).__name__, "merge_and_unload returned a different model class"
    assert_state_dicts_close(ours_m.state_dict(), hf_m.state_dict(), "merged base model state_dict")
    assert_close(run(ours_m, inputs), run(hf_m, inputs), "merge_and_unload() output")
    # and merging preserves the adapter's function
    assert_close(run(ours_m, inputs), hf_out, "merge_and_unload() output vs HF unmerged output", atol=1e-4)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_unload(case):
    model = case[1]
    hf, ours = _mutable_pair(case)
    inputs = make_inputs(model)
    hf_u, ours_u = hf.unload(), ours.unload()
    assert type(ours_u).__name__ == type(hf_u).__name__
    assert_state_dicts_close(ours_u.state_dict(), hf_u.state_dict(), "unloaded base model state_dict")
    assert_close(run(ours_u, inputs), run(hf_u, inputs), "unload() output")


@pytest.mark.parametrize("overrides", [{}, {"use_rslora": True, "r": 8, "lora_alpha": 16}], ids=["default", "rslora"])
def test_mha_matches_reference(overrides):
    """nn.MultiheadAttention against a plain reference with W_in + s·B_in A_in and
    W_out + s·B_out A_out (independent of HF, whose MHA layer double-counts out_proj)."""
    if SELFTEST and hf_mha_out_proj_bug():
        pytest.skip("self-test: the 'ours' side is HF, which has the MHA out_proj bug")
    hf, ours = pair_copy("mha", **overrides)
    r = overrides.get("r", 4)
    alpha = overrides.get("lora_alpha", 8)
    s = alpha / r**0.5 if overrides.get("use_rslora") else alpha / r
    sd = ours.state_dict()
    pre = "base_model.model.mha."
    d_in = s * sd[pre + "lora_B.default.weight"] @ sd[pre + "lora_A.default.weight"]
    out_pre = pre + "base_layer.out_proj."
    d_out = s * sd[out_pre + "lora_B.default.weight"] @ sd[out_pre + "lora_A.default.weight"]
    ref = build_base("mha")
    with torch.no_grad():
        ref.mha.in_proj_weight += d_in
        ref.mha.out_proj.weight += d_out
    inputs = make_inputs("mha")
    assert_close(run(ours, inputs), run(ref, inputs), "MHA unmerged output vs reference")
    ours.merge_adapter()
    assert_close(run(ours, inputs), run(ref, inputs), "MHA merged output vs reference")
    ours.unmerge_adapter()
    with ours.disable_adapter():
        assert_close(run(ours, inputs), run(build_base("mha"), inputs), "MHA disabled output vs base")
    merged = ours.merge_and_unload()
    assert_state_dicts_close(merged.state_dict(), ref.state_dict(), "MHA merge_and_unload() vs reference")


def _loss(model, inputs):
    out = model(**inputs) if not ("x" in inputs and len(inputs) == 1) else model(inputs["x"])
    out = out.logits if hasattr(out, "logits") else out
    out = out[0] if isinstance(out, (tuple, list)) else out
    return (out.float() ** 2).mean()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradients(case, request):
    """Backward through the adapted model: same loss, same gradient for every trainable
    parameter (catches e.g. a DoRA weight norm that is not detached)."""
    expect_hf_mha_bug(request, case[1])
    hf, ours = _mutable_pair(case)
    inputs = make_inputs(case[1])
    hf_loss, ours_loss = _loss(hf, inputs), _loss(ours, inputs)
    assert_close(ours_loss.detach(), hf_loss.detach(), "loss")
    if not hf_loss.requires_grad:  # nothing trainable (inference_mode)
        assert not ours_loss.requires_grad, "ours has trainable parameters where HF has none"
        return
    hf_loss.backward()
    ours_loss.backward()
    hf_grads = {n: p.grad for n, p in hf.named_parameters() if p.requires_grad}
    ours_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert_same_keys(ours_grads, hf_grads, "trainable parameter")
    missing = sorted(n for n in hf_grads if (hf_grads[n] is None) != (ours_grads[n] is None))
    assert not missing, f"gradient present on one side only: {missing[:10]}"
    assert_state_dicts_close(
        {n: g for n, g in ours_grads.items() if g is not None},
        {n: g for n, g in hf_grads.items() if g is not None},
        "gradients",
        atol=1e-5,
        rtol=1e-4,
    )


DISABLE_MERGED_CASES = [c for c in CASES if c[0] in (
    "mlp-default", "mlp-dora", "conv2d-default", "emb-dora", "llama-default", "gpt2-dora", "bert_cls-default"
)]


@pytest.mark.parametrize("case", DISABLE_MERGED_CASES, ids=[c[0] for c in DISABLE_MERGED_CASES])
def test_disable_adapter_while_merged(case):
    """disable_adapter() on a merged model gives the base output, and leaves the same
    merge state behind as in HF."""
    model = case[1]
    hf, ours = _mutable_pair(case)
    inputs = make_inputs(model)
    hf.merge_adapter()
    ours.merge_adapter()
    with hf.disable_adapter():
        hf_out = run(hf, inputs)
    with ours.disable_adapter():
        ours_out = run(ours, inputs)
    assert_close(ours_out, hf_out, "output inside disable_adapter() on a merged model")
    assert_close(ours_out, run(build_base(model), inputs), "... vs the base model")
    hf_merged = sorted(n for n, m in hf.named_modules() if getattr(m, "merged", False) is True)
    ours_merged = sorted(n for n, m in ours.named_modules() if getattr(m, "merged", False) is True)
    assert ours_merged == hf_merged, f"merged layers afterwards: ours {ours_merged} vs hf {hf_merged}"
    assert_state_dicts_close(ours.state_dict(), hf.state_dict(), "state_dict after disable_adapter() on merged")
    assert_close(run(ours, inputs), run(hf, inputs), "output after leaving disable_adapter()")
