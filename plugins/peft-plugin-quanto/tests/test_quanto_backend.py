"""Backend-level tests: the quanto backend against real optimum-quanto QLinear layers on CPU.

qint4/qint2 weights need quanto's C++ extension, which is compiled on first use (about
1-3 minutes on 2 cores; cached inside the installed optimum-quanto afterwards).
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

quanto = pytest.importorskip("optimum.quanto")

from peft_plugin_quanto import QuantoBackend  # noqa: E402

IN, OUT = 256, 64  # in_features 256 > 128 gives qint4/qint2 a group size of 128

# relative Frobenius error of one quantization, measured on this layer with margin
# (qint8 0.004, qfloat8 0.025, qint4 0.065, qint2 0.32; after a merge up to 0.007, 0.034, 0.10, 0.54)
REL_TOL = {"qint8": 0.01, "qfloat8": 0.05, "qint4": 0.15, "qint2": 0.6}
QTYPES = ["qint8", "qfloat8", "qint4", "qint2"]


@pytest.fixture
def plain():
    torch.manual_seed(0)
    return nn.Linear(IN, OUT)


def make_qlinear(lin, weights="qint8", frozen=True, activations=None, dtype=torch.float32):
    model = nn.Sequential(nn.Linear(IN, OUT).to(dtype))
    model[0].load_state_dict(lin.state_dict())
    quanto.quantize(model, weights=getattr(quanto, weights), activations=activations)
    if frozen:
        quanto.freeze(model)
    return model[0]


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_matches(plain, monkeypatch):
    be = QuantoBackend()
    m = make_qlinear(plain)
    assert be.matches(m) and be.matches(make_qlinear(plain, frozen=False))
    assert not be.matches(plain)
    monkeypatch.delitem(sys.modules, "optimum.quanto.nn.qlinear")
    assert not be.matches(m)


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "dynamic"])
@pytest.mark.parametrize("qtype", QTYPES)
def test_recognise_shape_weight(plain, qtype, frozen):
    be = QuantoBackend()
    m = make_qlinear(plain, qtype, frozen)
    assert be.layer_shape(m) == (IN, OUT)
    assert be.compute_dtype(m) == torch.float32
    assert be.merge_blocker(m) is None
    got = be.get_weight(m)
    assert type(got) is torch.Tensor and got.shape == (OUT, IN) and got.dtype == torch.float32
    w = plain.weight.detach()
    if frozen:
        assert rel(got, w) < REL_TOL[qtype]
        x = torch.randn(5, IN)
        assert torch.allclose(m(x), x @ got.T + plain.bias, atol=1e-5)
    else:  # the float master weight, quantized on the fly by the forward
        assert torch.equal(got, w)


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "dynamic"])
@pytest.mark.parametrize("qtype", QTYPES)
def test_requantize(plain, qtype, frozen):
    be = QuantoBackend()
    m = make_qlinear(plain, qtype, frozen)
    m.weight.requires_grad_(False)  # as a tuner freezes base weights
    group_size, optimizer = m.weight_group_size, type(m.optimizer)
    torch.manual_seed(1)
    delta = 0.02 * torch.randn(OUT, IN)
    target = be.get_weight(m) + delta
    be.set_weight(m, target)

    assert be._frozen(m) == frozen
    assert not m.weight.requires_grad
    assert (m.weight_group_size, type(m.optimizer)) == (group_size, optimizer)
    if frozen:
        assert m.weight.qtype.name.startswith(qtype)
    got = be.get_weight(m)
    assert rel(got, target) < REL_TOL[qtype]
    x = torch.randn(16, IN)
    y = m(x)
    effective = m.qweight.dequantize()
    assert torch.allclose(y, x @ effective.T + plain.bias, atol=1e-5)
    ref = x @ (plain.weight.detach() + delta).T + plain.bias
    assert rel(y, ref) < REL_TOL[qtype]
    # requantizing what we read back changes nothing
    be.set_weight(m, got)
    assert torch.equal(be.get_weight(m), got)


def test_bf16_layer(plain):
    be = QuantoBackend()
    m = make_qlinear(plain, "qint8", True, dtype=torch.bfloat16)
    assert be.compute_dtype(m) == torch.bfloat16
    w = be.get_weight(m)
    assert w.dtype == torch.bfloat16
    be.set_weight(m, w.float() + 0.01)
    assert m.weight.dtype == torch.bfloat16
    assert m(torch.randn(2, IN, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_activation_quantized_layer_is_forward_only(plain):
    be = QuantoBackend()
    m = make_qlinear(plain, "qint8", True, activations=quanto.qint8)
    assert be.matches(m)
    reason = be.merge_blocker(m)
    assert reason and "activations" in reason and "forward only" in reason
    w = be.get_weight(m)
    assert rel(w, plain.weight.detach()) < REL_TOL["qint8"]
    before = m.weight
    with pytest.raises(ValueError, match="forward only"):
        be.set_weight(m, w)
    assert m.weight is before
