"""Backend-level tests: the hqq backend against real HQQLinear layers on CPU."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch import nn

hqq_quantize = pytest.importorskip("hqq.core.quantize")
HQQLinear, BaseQuantizeConfig = hqq_quantize.HQQLinear, hqq_quantize.BaseQuantizeConfig

from peft_plugin_hqq import HqqBackend  # noqa: E402

IN, OUT = 128, 64

# relative Frobenius error of one HQQ quantization, measured on this layer with margin
# (8-bit 0.004, 4-bit 0.06-0.08, 3-bit 0.13-0.17, 2-bit 0.31-0.39)
REL_TOL = {8: 0.01, 4: 0.1, 3: 0.2, 2: 0.45}
CASES = [(8, 64), (8, None), (4, 64), (4, None), (3, 64), (2, 64), (2, 32)]
IDS = [f"{b}bit-g{g}" for b, g in CASES]


@pytest.fixture
def plain():
    torch.manual_seed(0)
    return nn.Linear(IN, OUT)


def make_hqq(lin, nbits=4, group_size=64, dtype=torch.float32):
    src = copy.deepcopy(lin)
    return HQQLinear(src, BaseQuantizeConfig(nbits=nbits, group_size=group_size), compute_dtype=dtype, device="cpu")


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_matches(plain, monkeypatch):
    be = HqqBackend()
    m = make_hqq(plain)
    assert be.matches(m)
    assert not be.matches(plain)
    monkeypatch.delitem(sys.modules, "hqq.core.quantize")
    assert not be.matches(m)


@pytest.mark.parametrize("nbits,group_size", CASES, ids=IDS)
def test_recognise_shape_weight(plain, nbits, group_size):
    be = HqqBackend()
    m = make_hqq(plain, nbits, group_size)
    assert be.layer_shape(m) == (IN, OUT)
    assert be.compute_dtype(m) == torch.float32
    assert be.merge_blocker(m) is None
    w = plain.weight.detach()
    got = be.get_weight(m)
    assert got.shape == (OUT, IN) and got.dtype == torch.float32
    assert rel(got, w) < REL_TOL[nbits]
    x = torch.randn(5, IN)
    assert torch.allclose(m(x), x @ got.T + plain.bias, atol=1e-5)


@pytest.mark.parametrize("nbits,group_size", CASES, ids=IDS)
def test_requantize(plain, nbits, group_size):
    be = HqqBackend()
    m = make_hqq(plain, nbits, group_size)
    config_before = copy.deepcopy(m.quant_config)
    torch.manual_seed(1)
    delta = 0.02 * torch.randn(OUT, IN)
    target = be.get_weight(m) + delta
    be.set_weight(m, target)

    assert m.quant_config == config_before
    assert m.meta["nbits"] == nbits and isinstance(m.W_q, nn.Parameter) and not m.W_q.requires_grad
    assert "W_q" in dict(m.named_parameters())
    got = be.get_weight(m)
    assert rel(got, target) < REL_TOL[nbits]
    x = torch.randn(16, IN)
    y = m(x)
    assert torch.allclose(y, x @ got.T + plain.bias, atol=1e-5)
    ref = x @ (plain.weight.detach() + delta).T + plain.bias
    assert rel(y, ref) < 1.5 * REL_TOL[nbits]


def test_bf16_compute_dtype_kept(plain):
    be = HqqBackend()
    m = make_hqq(plain, 4, 64, dtype=torch.bfloat16)
    assert be.compute_dtype(m) == torch.bfloat16
    w = be.get_weight(m)
    assert w.dtype == torch.bfloat16
    be.set_weight(m, w.float() + 0.01)
    assert be.get_weight(m).dtype == torch.bfloat16 and m.bias.dtype == torch.bfloat16
    assert m(torch.randn(2, IN, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_failed_requantization_leaves_layer_intact(plain, monkeypatch):
    be = HqqBackend()
    m = make_hqq(plain)
    before = be.get_weight(m).clone()

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(m, "quantize", boom)
    with pytest.raises(RuntimeError, match="boom"):
        be.set_weight(m, before + 1)
    assert "W_q" in dict(m.named_parameters())
    assert torch.equal(be.get_weight(m), before)


def test_uninitialised_layer_is_blocked():
    be = HqqBackend()
    m = HQQLinear(None, BaseQuantizeConfig(nbits=4, group_size=64), device="cpu", initialize=False)
    assert be.matches(m)
    assert "not been quantized" in be.merge_blocker(m)
    with pytest.raises(ValueError):
        be.set_weight(m, torch.zeros(OUT, IN))
