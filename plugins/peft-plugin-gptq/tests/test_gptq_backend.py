"""Backend-level tests: the gptq backend against GPTQModel TorchLinear layers on CPU."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

pytest.importorskip("gptqmodel.nn_modules.qlinear.torch")

from gptq_layers import rtn_gptq_linear  # noqa: E402

from peft_plugin_gptq import GptqBackend  # noqa: E402

IN, OUT = 128, 64


@pytest.fixture
def plain():
    torch.manual_seed(0)
    return nn.Linear(IN, OUT)


@pytest.mark.parametrize("bits,sym", [(4, True), (4, False), (8, True), (2, True), (3, True)])
def test_recognise_shape_weight(plain, bits, sym):
    be = GptqBackend()
    m = rtn_gptq_linear(plain, bits=bits, group_size=32, sym=sym)
    assert be.matches(m) and not be.matches(plain)
    assert be.layer_shape(m) == (IN, OUT)
    assert be.compute_dtype(m) == torch.float16
    w = plain.weight.detach()
    got = be.get_weight(m)
    assert got.shape == (OUT, IN) and got.dtype == torch.float16
    # round to nearest: half a step per group, plus float16 scales; allow one step
    groups = w.reshape(OUT, IN // 32, 32)
    step = (2 * groups.abs().amax(-1, keepdim=True) / (2**bits - 1)).expand_as(groups).reshape(OUT, IN)
    assert ((got.float() - w).abs() <= step + 1e-3).all()
    for mode in (True, False):  # train and eval dequantize through different paths
        m.train(mode)
        x = torch.randn(5, IN)
        assert torch.allclose(m(x), x @ be.get_weight(m).float().T + m.bias.float(), atol=1e-4)


def test_forward_only(plain):
    be = GptqBackend()
    m = rtn_gptq_linear(plain)
    reason = be.merge_blocker(m)
    assert reason and "forward only" in reason and "TorchLinear" in reason
    with pytest.raises(NotImplementedError, match="forward only"):
        be.set_weight(m, be.get_weight(m))


def test_auto_gptq_layers_recognised_by_name(monkeypatch):
    """AutoGPTQ cannot be imported next to transformers 5; fake its layer class."""
    be = GptqBackend()
    fake_cls = type("QuantLinear", (nn.Module,), {"__module__": "auto_gptq.nn_modules.qlinear.qlinear_cuda"})
    layer = fake_cls()
    layer.in_features, layer.out_features = IN, OUT
    assert not be.matches(layer)  # auto_gptq never imported
    monkeypatch.setitem(sys.modules, "auto_gptq", type(sys)("auto_gptq"))
    assert be.matches(layer)
    assert be.layer_shape(layer) == (IN, OUT)
    assert be.merge_blocker(layer)
    with pytest.raises(NotImplementedError, match="cannot be dequantized"):
        be.get_weight(layer)
    other = type("QuantLinear", (nn.Module,), {"__module__": "somewhere.else"})()
    assert not be.matches(other)
