"""WeightDeltaLayer: the kernel's base for methods that define ΔW or a weight transform.

Two small test methods exercise it: a dense delta (ΔW is one trainable tensor of the canonical
shape) and a scale-and-shift transform (W' = diag(γ) W, b' = γ b + β). Each is checked against
the base layer with the adapted weight put in by hand, for every kind of base layer.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import peft_kernel
from peft_kernel import TunerConfig, WeightDeltaLayer, get_peft_model, hookimpl
from peft_kernel.delta import base_kind
from peft_kernel.plugins import manager
from peft_kernel.testing import Case, MethodConformance
from peft_kernel.testing.toy_quant import ToyBackendPlugin, ToyInt8Linear

Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D


@dataclass
class DenseConfig(TunerConfig):
    scale: float = 1.0
    module_dropout: float | None = None
    row_dropout: float = 0.0
    input_dropout: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = "TESTDENSE"


class DenseLayer(WeightDeltaLayer):
    adapter_layer_names = ("tdense_w",)

    def update_layer(self, adapter_name, config, **kwargs):
        self.tdense_w[adapter_name] = nn.Parameter(torch.zeros(self.delta_shape))
        self.scaling[adapter_name] = config.scale
        if config.module_dropout is not None:
            self.module_dropout[adapter_name] = config.module_dropout
        self.row_dropout[adapter_name], self.row_dropout_rescale[adapter_name] = config.row_dropout, True
        self.input_dropout[adapter_name] = config.input_dropout

    def get_delta(self, adapter_name):
        return self.tdense_w[adapter_name]


@dataclass
class ScaleShiftConfig(TunerConfig):
    def __post_init__(self):
        super().__post_init__()
        self.peft_type = "TESTSS"


class ScaleShiftLayer(WeightDeltaLayer):
    adapter_layer_names = ("tss_scale", "tss_shift")

    def update_layer(self, adapter_name, config, **kwargs):
        self.tss_scale[adapter_name] = nn.Parameter(torch.ones(self.delta_shape[0]))
        self.tss_shift[adapter_name] = nn.Parameter(torch.zeros(self.delta_shape[0]))

    def _rows(self, vector, like):
        return vector.view(-1, *[1] * (like.dim() - 1))

    def transform_weight(self, weight, adapter_name):
        return weight * self._rows(self.tss_scale[adapter_name], weight)

    def untransform_weight(self, weight, adapter_name):
        return weight / self._rows(self.tss_scale[adapter_name], weight)

    def transform_bias(self, bias, adapter_name):
        shift = self.tss_shift[adapter_name]
        return shift if bias is None else bias * self.tss_scale[adapter_name] + shift

    def untransform_bias(self, bias, adapter_name):
        return (bias - self.tss_shift[adapter_name]) / self.tss_scale[adapter_name]


@dataclass
class ScaleInOutConfig(TunerConfig):
    def __post_init__(self):
        super().__post_init__()
        self.peft_type = "TESTIO"


class ScaleInOutLayer(WeightDeltaLayer):
    """W' = diag(γ_out)·W·diag(γ_in) (over the flattened fan-in), run on the activations for
    linear bases. In training, γ_out is left out: a stand-in for training-time randomness."""

    adapter_layer_names = ("tio_in", "tio_out")

    def update_layer(self, adapter_name, config, **kwargs):
        self.tio_in[adapter_name] = nn.Parameter(torch.ones(math.prod(self.delta_shape[1:])))
        self.tio_out[adapter_name] = nn.Parameter(torch.ones(self.delta_shape[0]))

    def _scaled(self, weight, adapter_name, with_out=True):
        flat = weight.flatten(1) * self.tio_in[adapter_name]
        return (flat * self.tio_out[adapter_name][:, None] if with_out else flat).reshape_as(weight)

    def transform_weight(self, weight, adapter_name):
        return self._scaled(weight, adapter_name)

    def training_transform_weight(self, weight, adapter_name):
        return self._scaled(weight, adapter_name, with_out=False)

    def untransform_weight(self, weight, adapter_name):
        flat = weight.flatten(1) / self.tio_in[adapter_name] / self.tio_out[adapter_name][:, None]
        return flat.reshape_as(weight)

    @property
    def transforms_activations(self):
        return self.base_kind == "linear"

    def transform_input(self, x, adapter_name):
        return x * self.tio_in[adapter_name]

    def transform_output(self, y, adapter_name):
        if self.training:
            return y
        bias = self.bias
        return y * self.tio_out[adapter_name] if bias is None else (y - bias) * self.tio_out[adapter_name] + bias


class ScaleInOutModel(peft_kernel.BaseTuner):
    prefix = "tio_"


class ScaleOnlyLayer(ScaleShiftLayer):
    """Scales the rows of W and b: a layer without a bias keeps none."""

    def transform_bias(self, bias, adapter_name):
        return None if bias is None else bias * self.tss_scale[adapter_name]

    def untransform_bias(self, bias, adapter_name):
        return bias / self.tss_scale[adapter_name]


class DenseModel(peft_kernel.BaseTuner):
    prefix = "tdense_"


class ScaleShiftModel(peft_kernel.BaseTuner):
    prefix = "tss_"


@dataclass
class KernelDispatchedConfig(TunerConfig):
    def __post_init__(self):
        super().__post_init__()
        self.peft_type = "TESTKD"


class KernelDispatchedLayer(WeightDeltaLayer):
    adapter_layer_names = ("tkd_w",)

    def update_layer(self, adapter_name, config, **kwargs):
        self.tkd_w[adapter_name] = nn.Parameter(torch.zeros(self.delta_shape))

    def get_delta(self, adapter_name):
        return self.tkd_w[adapter_name]


class KernelDispatchedModel(peft_kernel.BaseTuner):
    """No dispatch hook: the kernel builds ``layer_cls`` (``dispatch_types``)."""

    prefix = "tkd_"
    layer_cls = KernelDispatchedLayer
    dispatch_types = (nn.Conv2d,)


class TestMethods:
    @hookimpl
    def peft_kernel_register_methods(self, register):
        register(name="testkd", config_cls=KernelDispatchedConfig, model_cls=KernelDispatchedModel, prefix="tkd_")
        register(name="testdense", config_cls=DenseConfig, model_cls=DenseModel, prefix="tdense_")
        register(name="testss", config_cls=ScaleShiftConfig, model_cls=ScaleShiftModel, prefix="tss_")
        register(name="testio", config_cls=ScaleInOutConfig, model_cls=ScaleInOutModel, prefix="tio_")

    @hookimpl(trylast=True)
    def peft_kernel_dispatch_layer(self, target, target_name, adapter_name, config):
        layer_cls = {"TESTDENSE": DenseLayer, "TESTSS": ScaleShiftLayer, "TESTIO": ScaleInOutLayer}.get(
            config.peft_type)
        if layer_cls is None or base_kind(target) is None:
            return None
        return layer_cls(target, adapter_name, config=config)


@pytest.fixture(autouse=True, scope="module")
def methods():
    name = manager().register(TestMethods(), name="weight-delta-test-methods")
    toy = manager().register(ToyBackendPlugin(), name="weight-delta-toy-backend")
    yield
    manager().unregister(name)
    manager().unregister(toy)


# -- every kind of base layer against the hand-adapted base --------------------------------

BASES = {
    "linear": (lambda: nn.Linear(6, 5), lambda: torch.randn(3, 6)),
    "conv1D": (lambda: Conv1D(5, 6), lambda: torch.randn(2, 3, 6)),
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1, padding_mode="circular"), lambda: torch.randn(2, 4, 9)),
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, groups=2, dilation=2, padding=2, padding_mode="reflect"),
               lambda: torch.randn(2, 4, 7, 7)),
    "conv3d": (lambda: nn.Conv3d(2, 4, 2, bias=False), lambda: torch.randn(2, 2, 3, 3, 3)),
    "embedding": (lambda: nn.Embedding(10, 5, padding_idx=0), lambda: torch.tensor([[0, 3, 9], [2, 0, 1]])),
    "toy-int8": (lambda: ToyInt8Linear(nn.Linear(6, 5)), lambda: torch.randn(3, 6)),
}


def _adapted(kind: str, config_cls, seed: int = 0):
    make_base, make_input = BASES[kind]
    torch.manual_seed(seed)
    base = nn.Sequential(make_base())
    reference = copy.deepcopy(base)
    model = get_peft_model(base, config_cls(target_modules=["0"]))
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape) * 0.3)
    return model, model.base_model.model[0], reference[0], make_input()


def _hand_adapted(reference: nn.Module, layer: WeightDeltaLayer, weight_fn, bias_fn=None) -> nn.Module:
    """``reference`` as a float layer with its weight (canonical layout) mapped by ``weight_fn``."""
    base = reference
    if isinstance(base, ToyInt8Linear):
        base = nn.Linear(base.in_features, base.out_features)
        base.weight.data, base.bias = reference.dequantize(), reference.bias
    adapted = copy.deepcopy(base)
    with torch.no_grad():
        adapted.weight.data = layer.to_storage(weight_fn(layer.canonical(base.weight))).contiguous()
        if bias_fn is not None:
            adapted.bias = nn.Parameter(bias_fn(getattr(base, "bias", None)))
    return adapted


@pytest.mark.parametrize("kind", BASES)
def test_additive_forward_and_merge_match_the_adapted_base(kind):
    model, layer, reference, x = _adapted(kind, DenseConfig)
    assert layer.base_kind == base_kind(reference)
    delta = layer.tdense_w["default"].detach()
    expected = _hand_adapted(reference, layer, lambda w: w + delta)(x)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    hook = layer.get_base_layer().register_forward_hook(lambda *args: None)  # the unfused path: base(x) + op(x, ΔW)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    hook.remove()
    before = peft_kernel.quant.base_weight(layer.get_base_layer()).detach().clone()
    model.merge_adapter()
    tol = 0.05 if kind == "toy-int8" else 1e-5  # requantization
    torch.testing.assert_close(model(x), expected, atol=tol, rtol=tol)
    model.unmerge_adapter()
    torch.testing.assert_close(peft_kernel.quant.base_weight(layer.get_base_layer()), before, atol=tol, rtol=0)


@pytest.mark.parametrize("kind", ["linear", "conv1D", "conv2d", "embedding", "toy-int8"])
def test_transform_forward_and_merge_match_the_adapted_base(kind):
    model, layer, reference, x = _adapted(kind, ScaleShiftConfig)
    scale, shift = layer.tss_scale["default"].detach(), layer.tss_shift["default"].detach()
    expected = _hand_adapted(reference, layer, lambda w: w * scale.view(-1, *[1] * (w.dim() - 1)),
                             lambda b: shift if b is None else b * scale + shift)(x)
    if kind == "embedding":  # the lookup has no bias: the shift is added to every row
        expected = _hand_adapted(reference, layer, lambda w: w * scale[:, None])(x) + shift
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    if kind == "embedding":
        with pytest.raises(ValueError, match="changes the bias and this layer has none"):
            model.merge_adapter()
        return
    before = {k: v.clone() for k, v in layer.get_base_layer().state_dict().items()}
    model.merge_adapter()
    tol = 0.05 if kind == "toy-int8" else 1e-5
    torch.testing.assert_close(model(x), expected, atol=tol, rtol=tol)
    model.unmerge_adapter()
    for key, value in layer.get_base_layer().state_dict().items():
        torch.testing.assert_close(value.float(), before[key].float(), atol=1 if key == "qweight" else 1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["linear", "conv1D", "toy-int8", "conv2d"])
def test_activation_form_matches_the_adapted_base(kind, monkeypatch):
    """Linear bases run transform_output(base(transform_input(x))): the quantized base is never
    dequantized in the forward pass; convolutions (no activation form here) build T(W)."""
    model, layer, reference, x = _adapted(kind, ScaleInOutConfig)
    model.eval()
    assert layer.transforms_activations == (kind != "conv2d")
    scale_in, scale_out = layer.tio_in["default"].detach(), layer.tio_out["default"].detach()
    expected = _hand_adapted(reference, layer, lambda w: layer._scaled(w, "default").detach())(x)
    if kind == "toy-int8":
        with monkeypatch.context() as patch:
            patch.setattr(peft_kernel.quant, "base_weight", lambda module: 1 / 0)
            torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    model.merge_adapter()
    tol = 0.05 if kind == "toy-int8" else 1e-5
    torch.testing.assert_close(model(x), expected, atol=tol, rtol=tol)
    model.unmerge_adapter()
    assert scale_in.sub(1).abs().max() > 0.1 and scale_out.sub(1).abs().max() > 0.1  # not a vacuous check


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_training_forward_uses_the_training_transform_and_merging_the_exact_one(kind):
    model, layer, reference, x = _adapted(kind, ScaleInOutConfig)
    exact = _hand_adapted(reference, layer, lambda w: layer._scaled(w, "default").detach())(x)
    training = _hand_adapted(reference, layer, lambda w: layer._scaled(w, "default", with_out=False).detach())(x)
    model.train()
    torch.testing.assert_close(model(x), training, atol=1e-5, rtol=1e-5)
    model.merge_adapter()
    torch.testing.assert_close(model(x), exact, atol=1e-5, rtol=1e-5)


def test_a_transform_that_makes_no_bias_merges_into_a_layer_without_one():
    torch.manual_seed(0)
    layer = ScaleOnlyLayer(nn.Linear(6, 5, bias=False), "default", config=ScaleShiftConfig())
    with torch.no_grad():
        layer.tss_scale["default"].uniform_(0.5, 2.0)
    x = torch.randn(3, 6)
    before, expected = layer.get_base_layer().weight.detach().clone(), layer(x).detach()
    layer.merge()
    torch.testing.assert_close(layer(x), expected)
    assert layer.get_base_layer().bias is None
    layer.unmerge()
    torch.testing.assert_close(layer.get_base_layer().weight, before)


def test_additive_forward_never_dequantizes(monkeypatch):
    model, layer, _, x = _adapted("toy-int8", DenseConfig)

    def refuse(module):
        raise AssertionError("the additive forward read the quantized base weight")

    monkeypatch.setattr(peft_kernel.quant, "base_weight", refuse)
    model(x).sum().backward()
    assert layer.tdense_w["default"].grad is not None


def test_several_adapters_add_or_compose_in_order():
    for config_cls in (DenseConfig, ScaleShiftConfig):
        model, layer, _, x = _adapted("linear", config_cls)
        model.add_adapter("b", config_cls(target_modules=["0"]))
        with torch.no_grad():
            for name, param in layer.named_parameters():
                if ".b" in name or name.endswith("b"):
                    param.add_(torch.randn(param.shape) * 0.3)
        model.base_model.set_adapter(["default", "b"])
        both = model(x)
        model.merge_adapter()
        torch.testing.assert_close(model(x), both, atol=1e-5, rtol=1e-5)
        model.unmerge_adapter()
        model.base_model.set_adapter("default")
        assert not torch.allclose(model(x), both)


def test_half_precision_base_keeps_fp32_adapters_and_its_dtype():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 8)).to(torch.bfloat16)
    reference = copy.deepcopy(base).float()
    model = get_peft_model(base, DenseConfig(target_modules=["0"]))
    layer = model.base_model.model[0]
    assert layer.tdense_w["default"].dtype == torch.float32
    with torch.no_grad():
        layer.tdense_w["default"].normal_(0, 0.1)
    x = torch.randn(4, 16)
    out = model(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    expected = nn.functional.linear(x, reference[0].weight + layer.tdense_w["default"], reference[0].bias)
    torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.02)
    model.merge_adapter()
    assert layer.get_base_layer().weight.dtype == torch.bfloat16


# -- training-time dropout ------------------------------------------------------------------


def test_module_dropout_skips_the_adapter_in_training_only():
    model, layer, reference, x = _adapted("linear", lambda **kw: DenseConfig(module_dropout=1.0, **kw))
    base_out = reference(x)
    model.train()
    torch.testing.assert_close(model(x), base_out)
    model.eval()
    assert not torch.allclose(model(x), base_out)


def test_module_dropout_draws_only_when_the_method_asks():
    generator_state = torch.get_rng_state()
    model, _, _, x = _adapted("linear", DenseConfig)
    model.train()
    state = torch.get_rng_state()
    model(x)
    assert torch.equal(torch.get_rng_state(), state), "a layer without module dropout drew random numbers"
    model, _, _, x = _adapted("linear", lambda **kw: DenseConfig(module_dropout=0.0, **kw))
    model.train()
    state = torch.get_rng_state()
    model(x)
    assert not torch.equal(torch.get_rng_state(), state)
    torch.set_rng_state(generator_state)


def test_row_dropout_zeroes_delta_rows_and_rescales_the_rest():
    model, layer, reference, x = _adapted("linear", lambda **kw: DenseConfig(row_dropout=0.5, scale=2.0, **kw))
    delta = layer.tdense_w["default"].detach() * 2.0
    torch.manual_seed(11)
    keep = (torch.rand(delta.shape[0]) > 0.5).float()
    keep = keep / keep.mean()
    expected = reference(x) + x @ (delta * keep[:, None]).T
    model.train()
    torch.manual_seed(11)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    model.merge_adapter()  # merging never drops rows
    torch.testing.assert_close(model(x), reference(x) + x @ delta.T, atol=1e-5, rtol=1e-5)


def test_input_dropout_gives_each_adapter_its_own_dropped_out_input():
    model, layer, reference, x = _adapted("linear", lambda **kw: DenseConfig(input_dropout=0.5, **kw))
    model.add_adapter("b", DenseConfig(target_modules=["0"], input_dropout=0.5))
    with torch.no_grad():
        layer.tdense_w["b"].normal_()
    model.base_model.set_adapter(["default", "b"])
    deltas = [layer.tdense_w[name].detach() for name in ("default", "b")]
    torch.manual_seed(5)  # one draw per adapter, in the order of the active adapters
    expected = reference(x) + sum(nn.functional.dropout(x, 0.5) @ delta.T for delta in deltas)
    model.train()
    torch.manual_seed(5)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    model.eval()  # no dropout: one fused operation
    torch.testing.assert_close(model(x), reference(x) + x @ sum(deltas).T, atol=1e-5, rtol=1e-5)


# -- gradients --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "conv1D", "conv2d", "embedding"])
@pytest.mark.parametrize("hooked", [False, True], ids=["fused", "unfused"])
def test_gradcheck(kind, hooked):
    model, layer, _, x = _adapted(kind, DenseConfig)
    model.double()
    if x.is_floating_point():
        x = x.double().requires_grad_()
    else:
        x = x.masked_fill(x == 0, 5)  # the padding row gets no gradient, by design
    if hooked:
        layer.get_base_layer().register_forward_hook(lambda *args: None)
    delta = layer.tdense_w["default"].detach().clone().requires_grad_()

    def forward(delta, x):
        return torch.func.functional_call(layer, {"tdense_w.default": delta}, (x,))

    inputs = (delta, x) if x.is_floating_point() else (delta,)
    fn = forward if x.is_floating_point() else (lambda d: forward(d, x))
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


# -- bad input --------------------------------------------------------------------------------


def test_unsupported_base_layer_is_a_clear_error():
    with pytest.raises(TypeError, match="cannot adapt LSTM.*nn.Linear"):
        DenseLayer(nn.LSTM(4, 4), "default", config=DenseConfig())


# -- the conformance kit on both test methods ---------------------------------------------------


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(12, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.proj = Conv1D(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, ids):
        h = self.conv(self.emb(ids).transpose(1, 2)).transpose(1, 2).contiguous()
        return self.head(torch.relu(self.proj(h)))


def _ids():
    return torch.randint(0, 12, (3, 5), generator=torch.Generator().manual_seed(0))


class TestDenseDeltaConformance(MethodConformance):
    cases = [Case("net", Net, lambda: DenseConfig(target_modules=["emb", "conv", "proj", "head"]), _ids)]


class TestTransformConformance(MethodConformance):
    cases = [Case("net", Net, lambda: ScaleShiftConfig(target_modules=["conv", "proj", "head"]), _ids),
             Case("activation-form", Net, lambda: ScaleInOutConfig(target_modules=["conv", "proj", "head"]), _ids)]


def test_default_targets_may_be_a_regex(monkeypatch):
    """``default_target_modules`` entries may be a regex string (HF PEFT's table has one)."""
    monkeypatch.setattr(DenseModel, "default_target_modules", {"toy": r".*\.lin[02]"})
    model = nn.Sequential()
    model.add_module("block", nn.ModuleDict({f"lin{i}": nn.Linear(4, 4) for i in range(3)}))
    model.config = {"model_type": "toy"}
    peft_model = get_peft_model(model, DenseConfig(target_modules=None))
    assert sorted(peft_model.base_model.targeted_module_names) == ["block.lin0", "block.lin2"]


class OpaqueWeight(torch.Tensor):
    """A weight that only the base layer's own operation may use, as a quantized tensor subclass
    on a plain nn.Linear (torchao) is: arithmetic on it is refused."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.__add__, torch.Tensor.add, torch.add):
            raise RuntimeError("arithmetic on an opaque weight")
        with torch._C.DisableTorchFunctionSubclass():  # results are plain tensors
            return func(*args, **(kwargs or {}))


def test_a_tensor_subclass_weight_is_only_used_by_the_base_layer():
    model, layer, reference, x = _adapted("linear", DenseConfig)
    base = layer.get_base_layer()
    opaque = base.weight.detach().as_subclass(OpaqueWeight)
    del base.weight
    base.weight = opaque
    expected = nn.functional.linear(x, reference.weight + layer.tdense_w["default"], reference.bias)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_dispatch_types_let_the_kernel_build_the_layer():
    """A tuner with ``dispatch_types`` and no dispatch hook: the kernel builds its ``layer_cls`` on
    linear-like targets (a quantized one included) and on those types, and refuses the rest."""
    model = nn.ModuleDict({"lin": nn.Linear(6, 4), "conv": nn.Conv2d(2, 4, 3), "q": ToyInt8Linear(nn.Linear(6, 4)),
                           "conv1d": nn.Conv1d(2, 4, 3)})
    peft_model = get_peft_model(copy.deepcopy(model), KernelDispatchedConfig(target_modules=["lin", "conv", "q"]))
    for name in ("lin", "conv", "q"):
        assert type(peft_model.base_model.model[name]) is KernelDispatchedLayer
    with pytest.raises(ValueError, match=r"Target module 'conv1d' .* not supported by TESTKD"):
        get_peft_model(copy.deepcopy(model), KernelDispatchedConfig(target_modules=["conv1d"]))


def test_a_layer_mapping_wins_over_the_kernel_dispatch():
    class Other(KernelDispatchedLayer):
        pass

    peft_kernel.register_layer_mapping(nn.Linear, Other, method="TESTKD")
    try:
        model = get_peft_model(nn.Sequential(nn.Linear(6, 4)), KernelDispatchedConfig(target_modules=["0"]))
    finally:
        peft_kernel.unregister_layer_mapping(nn.Linear, method="TESTKD")
    assert type(model.base_model.model[0]) is Other
