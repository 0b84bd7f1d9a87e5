"""Backend-level tests: the torchao backend against real torchao-quantized nn.Linear on CPU."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("torchao")
tq = pytest.importorskip("torchao.quantization")

from peft_plugin_torchao import TorchaoBackend  # noqa: E402

IN, OUT = 128, 64

warnings.filterwarnings("ignore", module="torchao")


@pytest.fixture
def plain():
    torch.manual_seed(0)
    return nn.Linear(IN, OUT)


def quantized(lin: nn.Linear, config, dtype=torch.float32) -> nn.Linear:
    m = nn.Linear(IN, OUT).to(dtype)
    m.load_state_dict(lin.state_dict())
    tq.quantize_(m, config)
    return m


def group_bound(w: torch.Tensor, group: int, bits: int) -> torch.Tensor:
    """One quantization step per group: 2*absmax/(2**bits - 1) is the symmetric step and
    exceeds the asymmetric one; rounding errs by half a step, so this has 2x headroom."""
    g = w.reshape(w.shape[0], -1, group)
    step = 2 * g.abs().amax(dim=-1, keepdim=True) / (2**bits - 1)
    return step.expand_as(g).reshape(w.shape) + 1e-6


# (id, config factory, group size or None for per-row, bits)
MERGEABLE = [
    ("int8wo-row", lambda: tq.Int8WeightOnlyConfig(), IN, 8),
    ("int8wo-group32", lambda: tq.Int8WeightOnlyConfig(granularity=tq.PerGroup(32)), 32, 8),
    ("int8wo-tensor", lambda: tq.Int8WeightOnlyConfig(granularity=tq.PerTensor()), None, 8),
    ("intx8-axis", lambda: tq.IntxWeightOnlyConfig(), IN, 8),
    ("intx4-g32-sym", lambda: tq.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=tq.PerGroup(32)), 32, 4),
    (
        "intx4-g32-asym",
        lambda: tq.IntxWeightOnlyConfig(
            weight_dtype=torch.int4, granularity=tq.PerGroup(32), mapping_type=tq.MappingType.ASYMMETRIC
        ),
        32,
        4,
    ),
    ("intx2-g64", lambda: tq.IntxWeightOnlyConfig(weight_dtype=torch.int2, granularity=tq.PerGroup(64)), 64, 2),
]
MERGEABLE_IDS = [c[0] for c in MERGEABLE]


def bound(w, group, bits):
    if group is None:  # per tensor
        return (2 * w.abs().max() / (2**bits - 1)).expand_as(w) + 1e-6
    return group_bound(w, group, bits)


def test_plain_linear_never_matches(plain, monkeypatch):
    be = TorchaoBackend()
    assert not be.matches(plain)
    assert not be.matches(nn.ReLU())
    m = quantized(plain, tq.Int8WeightOnlyConfig())
    assert be.matches(m)
    monkeypatch.delitem(sys.modules, "torchao")
    assert not be.matches(m)


@pytest.mark.parametrize("name,make,group,bits", MERGEABLE, ids=MERGEABLE_IDS)
def test_recognise_shape_weight(plain, name, make, group, bits):
    be = TorchaoBackend()
    m = quantized(plain, make())
    assert isinstance(m, nn.Linear) and be.matches(m)
    assert be.layer_shape(m) == (IN, OUT)
    assert be.compute_dtype(m) == torch.float32
    assert be.merge_blocker(m) is None
    w = plain.weight.detach()
    got = be.get_weight(m)
    assert type(got) is torch.Tensor and got.shape == (OUT, IN) and got.dtype == torch.float32
    assert ((got - w).abs() <= bound(w, group, bits)).all()
    x = torch.randn(5, IN)
    assert torch.allclose(m(x), x @ got.T + plain.bias, atol=1e-5)


@pytest.mark.parametrize("name,make,group,bits", MERGEABLE, ids=MERGEABLE_IDS)
def test_requantize(plain, name, make, group, bits):
    be = TorchaoBackend()
    m = quantized(plain, make())
    old = m.weight
    torch.manual_seed(1)
    delta = 0.02 * torch.randn(OUT, IN)
    target = be.get_weight(m) + delta
    be.set_weight(m, target)

    new = m.weight
    assert type(new) is type(old) and not new.requires_grad
    assert tuple(new.block_size) == tuple(old.block_size)
    assert getattr(new, "target_dtype", None) == getattr(old, "target_dtype", None)
    assert new.scale.dtype == old.scale.dtype
    got = be.get_weight(m)
    assert ((got - target).abs() <= bound(target, group, bits)).all()
    x = torch.randn(16, IN)
    y = m(x)
    assert torch.allclose(y, x @ got.T + plain.bias, atol=1e-5)
    ref = x @ (plain.weight.detach() + delta).T + plain.bias
    rel = ((y - ref).norm() / ref.norm()).item()
    assert rel < {8: 0.02, 4: 0.15, 2: 0.6}[bits]


def test_requantize_keeps_bf16_and_scale_dtype(plain):
    be = TorchaoBackend()
    cfg = tq.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=tq.PerGroup(32), scale_dtype=torch.float32)
    m = quantized(plain, cfg, dtype=torch.bfloat16)
    assert m.weight.scale.dtype == torch.float32 and be.compute_dtype(m) == torch.bfloat16
    w = be.get_weight(m)
    assert w.dtype == torch.bfloat16
    be.set_weight(m, w.float() + 0.01)
    assert m.weight.dtype == torch.bfloat16 and m.weight.scale.dtype == torch.float32
    assert m(torch.randn(2, IN, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_dynamic_activation_int8_is_forward_only(plain):
    be = TorchaoBackend()
    m = quantized(plain, tq.Int8DynamicActivationInt8WeightConfig())
    assert be.matches(m)
    w = be.get_weight(m)
    assert ((w - plain.weight.detach()).abs() <= bound(plain.weight.detach(), IN, 8)).all()
    reason = be.merge_blocker(m)
    assert reason and "Int8DynamicActivationInt8WeightConfig" in reason and "forward only" in reason
    before = m.weight
    with pytest.raises(ValueError, match="forward only"):
        be.set_weight(m, w)
    assert m.weight is before


def test_dynamic_activation_intx_is_forward_only(plain):
    be = TorchaoBackend()
    m = quantized(plain, tq.Int8DynamicActivationIntxWeightConfig())
    assert be.matches(m)
    assert "forward only" in be.merge_blocker(m)


def test_other_torchao_types_forward_but_block_merge(plain):
    be = TorchaoBackend()
    m = quantized(plain, tq.Float8WeightOnlyConfig())
    assert be.matches(m)
    w = be.get_weight(m)
    assert torch.allclose(w, plain.weight.detach(), rtol=2**-3, atol=1e-6)  # e4m3: 3 mantissa bits
    reason = be.merge_blocker(m)
    assert "Float8Tensor" in reason and "Int8WeightOnlyConfig" in reason


def test_requantize_does_not_touch_global_matmul_precision(plain):
    before = torch.get_float32_matmul_precision()
    be = TorchaoBackend()
    m = quantized(plain, tq.IntxWeightOnlyConfig())
    torch.set_float32_matmul_precision(before)
    be.set_weight(m, be.get_weight(m))
    assert torch.get_float32_matmul_precision() == before
