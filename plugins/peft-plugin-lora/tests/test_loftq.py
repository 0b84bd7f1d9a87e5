"""LoftQ against its definition: the quantizers (NormalFloat-4, FP4, int8), the alternation
of quantize / truncated SVD, and what ``init_lora_weights="loftq"`` leaves in the model.
(bitsandbytes' own quantizers are compared in plugins/peft-plugin-bnb/tests/test_bnb_lora_inits.py.)"""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
from torch import nn

from peft_kernel import PeftModel, get_peft_model
from peft_kernel.testing import tiny_models
from peft_plugin_lora import LoftQConfig, LoraConfig
from peft_plugin_lora.loftq import fp4_levels, normal_float_levels, quantize_roundtrip

# NF4 as published with QLoRA (Dettmers et al. 2023, appendix E) and shipped by bitsandbytes
PUBLISHED_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]


def test_nf4_levels_are_the_published_ones():
    assert normal_float_levels().tolist() == PUBLISHED_NF4


def test_fp4_levels():
    levels = fp4_levels()
    assert levels.numel() == 16 and levels.max() == 1 and levels.min() == -1
    assert sorted({abs(v) * 12 for v in levels.tolist()}) == pytest.approx([0, 0.0625, 2, 3, 4, 6, 8, 12])


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", [(8, 64), (5, 30)])  # whole blocks, and a partial last block
def test_blockwise_4bit_is_nearest_level_times_block_absmax(quant_type, shape):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    levels = normal_float_levels() if quant_type == "nf4" else fp4_levels()
    got = quantize_roundtrip(weight, quant_type).reshape(-1)
    for start in range(0, weight.numel(), 64):
        block = weight.reshape(-1)[start:start + 64]
        absmax = block.abs().max()
        nearest = levels[(block[:, None] / absmax - levels[None, :]).abs().argmin(dim=1)] * absmax
        torch.testing.assert_close(got[start:start + 64], nearest, rtol=0, atol=1e-7)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int8"])
def test_roundtrip_is_idempotent(quant_type):
    """Quantizing an already quantized weight changes nothing: a LoftQ base saved in full
    precision loads into the quantized format exactly."""
    once = quantize_roundtrip(torch.randn(12, 40, generator=torch.Generator().manual_seed(1)), quant_type)
    assert torch.equal(quantize_roundtrip(once, quant_type), once)


def test_int8_is_rowwise_absmax():
    weight = torch.randn(6, 50, generator=torch.Generator().manual_seed(2))
    got = quantize_roundtrip(weight, "int8")
    scale = weight.abs().amax(dim=1, keepdim=True) / 127
    torch.testing.assert_close(got, torch.round(weight / scale) * scale, rtol=0, atol=1e-6)
    assert ((got - weight).abs() <= scale / 2 + 1e-7).all()


def test_zero_block_stays_zero():
    weight = torch.zeros(2, 64)
    weight[1] = torch.linspace(-1, 1, 64)
    got = quantize_roundtrip(weight, "nf4")
    assert torch.equal(got[0], torch.zeros(64)) and torch.isfinite(got).all()


# -- init_lora_weights="loftq" ---------------------------------------------------------


MLP = functools.partial(tiny_models.MLP, (64, 48, 32))


def _base(seed=0):
    torch.manual_seed(seed)
    return MLP()


def _loftq(base, r=4, alpha=4, bits=4, iters=1, **kw):
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=["lin0", "lin1"], init_lora_weights="loftq",
                        loftq_config=LoftQConfig(loftq_bits=bits, loftq_iter=iters), **kw)
    return get_peft_model(copy.deepcopy(base), config)


def _residual_singular_values(W, Q):
    return torch.linalg.svdvals(W - Q)


@pytest.mark.parametrize("bits", [4, 8])
def test_one_step_is_quantize_then_best_low_rank_fit(bits):
    base = _base()
    model = _loftq(base, r=4, bits=bits)
    for name in ("lin0", "lin1"):
        W = getattr(base, name).weight.detach()
        layer = getattr(model.base_model.model, name)
        Q = layer.get_base_layer().weight.detach()
        torch.testing.assert_close(Q, quantize_roundtrip(W, "nf4" if bits == 4 else "int8"))
        # Eckart-Young: Q + sBA misses W by exactly the trailing singular values of W - Q
        trailing = _residual_singular_values(W, Q)[4:]
        error = torch.linalg.norm(W - Q - layer.delta_weight("default"))
        torch.testing.assert_close(error, trailing.square().sum().sqrt(), rtol=1e-4, atol=1e-6)
        assert layer.lora_A["default"].weight.shape == (4, W.shape[1])


def test_scaling_is_honoured():
    """s·BA is the same low-rank fit whatever lora_alpha is (HF PEFT assumes s = 1)."""
    base = _base()
    deltas = []
    for alpha, use_rslora in ((4, False), (16, False), (8, True)):
        model = _loftq(base, r=4, alpha=alpha, use_rslora=use_rslora)
        deltas.append(model.base_model.model.lin0.delta_weight("default"))
    torch.testing.assert_close(deltas[1], deltas[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(deltas[2], deltas[0], rtol=1e-4, atol=1e-6)


def test_more_iterations_fit_better_and_end_on_a_quantized_base():
    base = _base()
    W = base.lin0.weight.detach()
    errors = []
    for iters in (1, 5):
        layer = _loftq(base, r=8, iters=iters).base_model.model.lin0
        Q = layer.get_base_layer().weight.detach()
        assert torch.equal(quantize_roundtrip(Q, "nf4"), Q), "the base must be exactly representable in NF4"
        errors.append(torch.linalg.norm(W - Q - layer.delta_weight("default")).item())
    assert errors[1] < errors[0], errors


def test_output_closer_to_the_original_than_plain_quantization():
    base = _base()
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    model = _loftq(base, r=8)
    with torch.no_grad():
        reference = base(x)
        with_adapter = model(x)
        with model.disable_adapter():
            quantized_only = model(x)
    assert (with_adapter - reference).abs().max() < 0.8 * (quantized_only - reference).abs().max()


def test_conv1d_layout_quantizes_the_stored_weight():
    """transformers Conv1D stores (in, out): blocks run along the stored layout, as bitsandbytes
    would quantize that weight when the model is loaded in 4 bits."""
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    torch.manual_seed(0)
    model = nn.Sequential(pytorch_utils.Conv1D(96, 32))  # weight (32, 96)
    stored = model[0].weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = get_peft_model(model, LoraConfig(r=4, target_modules=["0"], init_lora_weights="loftq",
                                                loftq_config=LoftQConfig(), fan_in_fan_out=True))
    layer = peft.base_model.model[0]
    Q = layer.get_base_layer().weight.detach()
    torch.testing.assert_close(Q, quantize_roundtrip(stored, "nf4"))
    trailing = _residual_singular_values(stored, Q)[4:]
    torch.testing.assert_close(torch.linalg.norm(stored - Q - layer.delta_weight("default")),
                               trailing.square().sum().sqrt(), rtol=1e-4, atol=1e-6)


def test_saved_loftq_adapter_reloads_on_the_quantized_base(tmp_path):
    """The LoftQ flow: init, save adapter and residual (quantized) base, reload both."""
    model = _loftq(_base(), r=4)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)  # "training"
    model.save_pretrained(tmp_path / "adapter")
    residual_base = copy.deepcopy(model).unload()
    x = torch.randn(4, 64)
    reloaded = PeftModel.from_pretrained(residual_base, str(tmp_path / "adapter"))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x))


@pytest.mark.parametrize("bad, error", [
    ({"init_lora_weights": "loftq"}, "needs loftq_config"),
    ({"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 3}}, "loftq_bits must be 4"),
    ({"init_lora_weights": "loftq", "loftq_config": {"loftq_iter": 0}}, "loftq_iter must be a positive"),
    ({"init_lora_weights": "loftq", "loftq_config": LoftQConfig(), "lora_bias": True}, "lora_bias=True"),
])
def test_config_errors(bad, error):
    with pytest.raises(ValueError, match=error):
        LoraConfig(**bad)


def test_loftq_config_without_loftq_init_is_dropped():
    with pytest.warns(UserWarning, match="loftq_config is ignored"):
        config = LoraConfig(loftq_config={"loftq_bits": 4})
    assert config.loftq_config == {}


def test_config_stores_a_plain_dict_and_round_trips():
    config = LoraConfig(init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_bits=8, loftq_iter=2))
    assert config.to_dict()["loftq_config"] == {"loftq_bits": 8, "loftq_iter": 2}
    assert LoraConfig.from_dict(config.to_dict()).loftq_config == {"loftq_bits": 8, "loftq_iter": 2}


def test_non_linear_layers_are_refused():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 4))
    with pytest.raises(ValueError, match="supports linear layers only, not Embedding"):
        get_peft_model(model, LoraConfig(target_modules=["0"], init_lora_weights="loftq", loftq_config=LoftQConfig()))
