"""``init_lora_weights`` variants (and DoRA's magnitude init) vs HF PEFT.

Three levels, from weakest to strongest requirement:

* ``test_init_properties``: what the init promises (zero B, unchanged output, residual
  base weights reconstructing the original weight, ...), checked on ours alone.
* ``test_init_deterministic_tensors``: every tensor that does not depend on the random
  stream (base weights after PiSSA/OLoRA, zero factors, DoRA magnitudes, ...) equals HF's.
* ``test_init_rng_parity``: with the same ``torch.manual_seed`` before ``get_peft_model``,
  *all* tensors equal HF's, i.e. ours draws random numbers in exactly HF's order.
"""

from __future__ import annotations

import pytest
import torch
from _models import (
    assert_close,
    assert_state_dicts_close,
    build_base,
    make_inputs,
    make_pair,
    max_abs_diff,
)

from peft_kernel.testing.differential import run

# (id, model, overrides); overrides always contain init_lora_weights
INIT_CASES = [
    ("mlp-true", "mlp", {"init_lora_weights": True}),
    ("mlp-gaussian", "mlp", {"init_lora_weights": "gaussian"}),
    ("mlp-false", "mlp", {"init_lora_weights": False}),
    ("mlp-pissa", "mlp", {"init_lora_weights": "pissa"}),
    ("mlp-pissa-rslora", "mlp", {"init_lora_weights": "pissa", "use_rslora": True, "r": 8, "lora_alpha": 4}),
    ("mlp-pissa_niter_4", "mlp", {"init_lora_weights": "pissa_niter_4"}),
    ("mlp-olora", "mlp", {"init_lora_weights": "olora"}),
    ("mlp-orthogonal", "mlp", {"init_lora_weights": "orthogonal"}),
    ("mlp-dora-true", "mlp", {"init_lora_weights": True, "use_dora": True}),
    ("mlp-pissa-dora", "mlp", {"init_lora_weights": "pissa", "use_dora": True}),
    ("conv1d-true", "conv1d", {"init_lora_weights": True}),
    ("conv2d-true", "conv2d", {"init_lora_weights": True}),
    ("conv2d-gaussian", "conv2d", {"init_lora_weights": "gaussian"}),
    ("conv3d-true", "conv3d", {"init_lora_weights": True}),
    ("conv1d-dora-true", "conv1d", {"init_lora_weights": True, "use_dora": True}),
    ("conv2d-dora-true", "conv2d", {"init_lora_weights": True, "use_dora": True}),
    ("conv3d-dora-true", "conv3d", {"init_lora_weights": True, "use_dora": True}),
    ("emb-true", "emb", {"init_lora_weights": True}),
    ("emb-gaussian", "emb", {"init_lora_weights": "gaussian"}),
    ("emb-dora-true", "emb", {"init_lora_weights": True, "use_dora": True}),
    ("mha-true", "mha", {"init_lora_weights": True}),
    ("llama-true", "llama", {"init_lora_weights": True}),
    ("llama-gaussian", "llama", {"init_lora_weights": "gaussian"}),
    ("llama-pissa", "llama", {"init_lora_weights": "pissa", "target_modules": "all-linear"}),
    ("llama-pissa_niter_4", "llama", {"init_lora_weights": "pissa_niter_4"}),
    ("llama-olora", "llama", {"init_lora_weights": "olora", "target_modules": "all-linear"}),
    ("llama-orthogonal", "llama", {"init_lora_weights": "orthogonal"}),
    ("llama-dora-true", "llama", {"init_lora_weights": True, "use_dora": True, "target_modules": "all-linear"}),
    ("gpt2-true", "gpt2", {"init_lora_weights": True}),
    ("gpt2-pissa", "gpt2", {"init_lora_weights": "pissa"}),
    ("gpt2-dora-true", "gpt2", {"init_lora_weights": True, "use_dora": True}),
    ("t5-pissa", "t5", {"init_lora_weights": "pissa"}),
    ("bert_cls-gaussian", "bert_cls", {"init_lora_weights": "gaussian"}),
]
IDS = [c[0] for c in INIT_CASES]

BASE_MUTATING = ("pissa", "olora")


def _init(case):
    return case[2]["init_lora_weights"]


def _is_random(key: str, init) -> bool:
    """Whether the state-dict entry ``key`` depends on the random stream for this init."""
    if init in ("pissa", "olora"):
        return False
    if isinstance(init, str) and init.startswith("pissa_niter"):
        # randomized SVD: the factors and the residual base weight are random
        return "lora_" in key or "base_layer." in key
    if init is True or init == "gaussian":
        # A (B for embeddings) is drawn, the other factor is zero, DoRA magnitude = ||W||
        return "lora_A." in key or "lora_embedding_B" in key
    # False / orthogonal: both factors are drawn, and so the DoRA magnitude too
    return "lora_" in key


_CACHE: dict = {}


def _pair(case):
    """(hf, ours) right after get_peft_model; shared by the (read-only) tests below."""
    if case[0] not in _CACHE:
        _CACHE[case[0]] = make_pair(case[1], copy_weights=False, perturb=False, **case[2])
    return _CACHE[case[0]]


@pytest.mark.parametrize("case", INIT_CASES, ids=IDS)
def test_init_deterministic_tensors(case):
    hf, ours = _pair(case)
    init = _init(case)
    hf_sd = {k: v for k, v in hf.state_dict().items() if not _is_random(k, init)}
    ours_sd = {k: v for k, v in ours.state_dict().items() if not _is_random(k, init)}
    assert_state_dicts_close(ours_sd, hf_sd, f"RNG-independent tensors after init_lora_weights={init!r}")


@pytest.mark.parametrize("case", INIT_CASES, ids=IDS)
def test_init_rng_parity(case):
    hf, ours = _pair(case)
    assert_state_dicts_close(
        ours.state_dict(), hf.state_dict(), f"all tensors after seeded init_lora_weights={_init(case)!r}"
    )


def _lora_factors(model):
    """{key: tensor} for the LoRA factors (no magnitudes, no base weights)."""
    return {
        k: v
        for k, v in model.state_dict().items()
        if any(s in k for s in ("lora_A.", "lora_B.", "lora_embedding_A.", "lora_embedding_B."))
    }


@pytest.mark.parametrize("case", INIT_CASES, ids=IDS)
def test_init_properties(case):
    model = case[1]
    init = _init(case)
    hf, ours = _pair(case)
    inputs = make_inputs(model)
    base_out = run(build_base(model), inputs)
    ours_out = run(ours, inputs)

    if init is not False:
        # identity-preserving inits (orthogonal too: B @ A == 0 by construction): the
        # adapted model computes the base function
        atol = 1e-5 if not str(init).startswith(("pissa", "olora")) else 1e-4
        assert_close(ours_out, base_out, f"output right after init_lora_weights={init!r} vs base", atol=atol)
    else:
        assert max_abs_diff(ours_out, base_out) > 1e-4, f"init_lora_weights={init!r} should change the output"

    hf_f, ours_f = _lora_factors(hf), _lora_factors(ours)
    assert set(ours_f) == set(hf_f), "LoRA factor keys differ"
    for k, h in hf_f.items():
        o = ours_f[k]
        assert o.shape == h.shape, f"{k}: shape ours {tuple(o.shape)} vs hf {tuple(h.shape)}"
        h_zero, o_zero = bool((h == 0).all()), bool((o == 0).all())
        assert o_zero == h_zero, f"{k}: zero in hf={h_zero}, in ours={o_zero}"
        if not h_zero and h.numel() > 8:
            # same distribution: the spread must agree within a generous factor
            ratio = (o.float().std() / h.float().std()).item()
            assert 0.5 < ratio < 2.0, f"{k}: std ours/hf = {ratio:.3f}"
    if init in BASE_MUTATING:
        # the residual base weights must differ from the original weights
        base_sd = build_base(model).state_dict()
        ours_sd = ours.base_model.model.state_dict()
        mutated = [
            k for k, v in ours_sd.items() if "base_layer.weight" in k and not torch.equal(
                v, base_sd[k.replace("base_layer.", "")]
            )
        ]
        assert mutated, f"init_lora_weights={init!r} should leave residual base weights"
