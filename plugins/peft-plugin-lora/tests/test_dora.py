"""DoRA's forward against its math, computed here from the weights:

    out = m / ‖W + sBA‖ · (x Wᵀ + s·(B(A x))) + b          (‖·‖ per output channel, detached)

in every path a layer can take (eval without gradients: the norm and scale are kept between
calls; eval with gradients; training: the norm without forming W + sBA; fan_in_fan_out and
dropout: the general path), and the kept values against every way the tensors they come from
can change."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peft_kernel import get_peft_model
from peft_plugin_lora import LoraConfig
from peft_plugin_lora.layer import LoraLayer

X = torch.randn(2, 5, 12)


class Net(nn.Module):
    def __init__(self, lin: nn.Module) -> None:
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x)


def dora_model(bias: bool = True, base: nn.Module | None = None, **config) -> nn.Module:
    torch.manual_seed(0)
    net = Net(nn.Linear(12, 10, bias=bias) if base is None else base)
    model = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, target_modules=["lin"], use_dora=True, **config))
    with torch.no_grad():  # away from the identity DoRA starts as
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn(param.shape) * 0.3)
    return model


def layer_of(model) -> LoraLayer:
    return model.base_model.model.lin


def math(layer: LoraLayer, x: torch.Tensor) -> torch.Tensor:
    """DoRA's output from the layer's tensors, as the paper (and HF PEFT) write it."""
    base = layer.get_base_layer()
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    s = layer.scaling["default"]
    weight = base.weight.T if layer.fan_in_fan_out else base.weight
    norm = torch.linalg.norm(weight + s * B.weight @ A.weight, dim=1).detach()
    scale = layer.lora_magnitude_vector["default"].weight / norm
    out = scale * (x @ weight.T + s * B(A(x)))
    return out if base.bias is None else out + base.bias


def fast_forward(layer) -> str | None:
    fast = layer.__dict__.get("_fast_forward")
    return fast.__func__.__name__ if fast else None


@pytest.mark.parametrize("bias", [True, False])
def test_every_path_computes_the_math(bias):
    model = dora_model(bias)
    layer = layer_of(model)
    for training in (False, True):
        model.train(training)
        with torch.no_grad():
            torch.testing.assert_close(model(X), math(layer, X), rtol=0, atol=1e-5)
            torch.testing.assert_close(model(X), math(layer, X), rtol=0, atol=1e-5)  # the kept values
        assert fast_forward(layer) == "_forward_dora"
        out = model(X)
        expected = math(layer, X)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
        params = [p for p in model.parameters() if p.requires_grad]
        got = torch.autograd.grad(out.pow(2).sum(), params)
        want = torch.autograd.grad(expected.pow(2).sum(), params)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_general_paths_compute_the_math():
    model = dora_model(lora_dropout=0.5)  # eval: the fast forward (dropout is off); training: the general one
    layer = layer_of(model)
    model.eval()
    torch.testing.assert_close(model(X), math(layer, X), rtol=0, atol=1e-5)
    assert fast_forward(layer) == "_forward_dora"
    model.train()
    torch.manual_seed(1)
    out = model(X)  # dropout draws a mask: compare the expected value through the same mask
    torch.manual_seed(1)
    mask_input = layer.lora_dropout["default"](X)
    base = layer.get_base_layer()
    A, B, s = layer.lora_A["default"], layer.lora_B["default"], layer.scaling["default"]
    norm = torch.linalg.norm(base.weight + s * B.weight @ A.weight, dim=1)
    scale = layer.lora_magnitude_vector["default"].weight / norm
    expected = base(X) + (scale - 1) * (mask_input @ base.weight.T) + scale * s * B(A(mask_input))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)



def test_transposed_weights_take_the_general_path():
    from transformers.pytorch_utils import Conv1D  # weight stored (in, out): fan_in_fan_out

    model = dora_model(fan_in_fan_out=True, base=Conv1D(10, 12)).eval()
    layer = layer_of(model)
    with torch.no_grad():
        torch.testing.assert_close(model(X), math(layer, X), rtol=0, atol=1e-5)
    assert fast_forward(layer) is None
    model.train()
    torch.testing.assert_close(model(X), math(layer, X), rtol=0, atol=1e-5)


def test_kept_norm_follows_every_change(monkeypatch):
    model = dora_model().eval()
    layer = layer_of(model)
    computed = []
    original = type(layer).compute_dora_norm
    monkeypatch.setattr(type(layer), "compute_dora_norm",
                        lambda self, *args: computed.append(1) or original(self, *args))

    def check(what):
        with torch.no_grad():
            torch.testing.assert_close(model(X), math(layer, X), rtol=0, atol=1e-5, msg=lambda m: f"{what}: {m}")

    check("first call")
    check("second call")
    assert len(computed) == 1, "in eval mode the norm is kept between calls"
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    base = layer.get_base_layer()
    edits = {
        "A edited in place": lambda: A.add_(0.1),
        "B edited in place": lambda: B.mul_(1.5),
        "base weight edited in place": lambda: base.weight.add_(0.2),
        "base bias edited in place": lambda: base.bias.add_(1.0),
        "magnitude edited in place": lambda: layer.lora_magnitude_vector["default"].weight.mul_(0.5),
        "base weight replaced (.data =)": lambda: setattr(base.weight, "data", base.weight.data * 2),
        "A loaded (copy_)": lambda: A.copy_(torch.randn(A.shape)),
        "scale changed": lambda: layer.set_scale("default", 0.5),
    }
    for what, edit in edits.items():
        with torch.no_grad():
            edit()
        check(what)
    model.train()
    with torch.no_grad():
        model(X)
        model(X)
    assert len(computed) == 1 + len(edits) + 2, "in training the norm is computed on every call"


def test_state_changes_drop_kept_values():
    model = dora_model().eval()
    model.add_adapter("other", LoraConfig(r=2, target_modules=["lin"], use_dora=True))
    layer = layer_of(model)
    with torch.no_grad():
        first = model(X)
        model.delete_adapter("default")
        model.add_adapter("default", LoraConfig(r=4, lora_alpha=8, target_modules=["lin"], use_dora=True))
        model.set_adapter("default")
        for name, param in model.named_parameters():
            if "lora_B.default" in name:
                param.normal_()
        second = model(X)
    assert not torch.allclose(first, second)
    torch.testing.assert_close(second, math(layer, X), rtol=0, atol=1e-5)
