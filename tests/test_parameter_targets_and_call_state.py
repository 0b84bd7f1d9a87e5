"""Two kernel features, exercised with a toy method defined here (no method plugin involved):
adapting bare parameters (``target_parameters`` / ``ParameterLayer``) and per-call state
(``BaseTuner.per_call_state`` / ``AdapterLayer.call_state`` / ``batch_rows``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

import peft_kernel
from peft_kernel import MergeNotSupportedError, TunerConfig, get_peft_model, register_peft_method
from peft_kernel.layer import ParameterLayer
from peft_kernel.plugins import reset_manager


@dataclass
class ShiftConfig(TunerConfig):
    """Adds a trainable matrix to each targeted parameter; ``offset`` shifts every output of
    targeted modules from the position the per-call state names on."""

    target_parameters: list[str] | None = field(default=None)

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = "SHIFT"


class ShiftParameter(ParameterLayer):
    adapter_layer_names = ("shift_delta",)

    def __init__(self, base_layer, adapter_name, parameter_name, config=None, **kwargs):
        super().__init__(base_layer, parameter_name=parameter_name, adapter_name=adapter_name)
        self.register_containers("shift_delta", container=nn.ParameterDict)
        self.update_layer(adapter_name, config=config)

    def update_layer(self, adapter_name, config=None, **kwargs):
        self.shift_delta[adapter_name] = nn.Parameter(torch.zeros_like(self.parameter()))

    def delta_weight(self, adapter_name):
        return self.shift_delta[adapter_name]


class ShiftOutput(peft_kernel.AdapterLayer):
    """Adds 1 to the outputs of the tokens from ``call_state["start"][row]`` on."""

    adapter_layer_names = ("shift_scale",)

    def __init__(self, base_layer, adapter_name, config=None, **kwargs):
        super().__init__(base_layer, adapter_name=adapter_name)
        self.register_containers("shift_scale", container=nn.ParameterDict)
        self.update_layer(adapter_name)

    def update_layer(self, adapter_name, config=None, **kwargs):
        self.shift_scale[adapter_name] = nn.Parameter(torch.ones(()))

    def adapter_forward(self, x, result, adapter_name, *args, **kwargs):
        starts = self.call_state.get("start")
        if starts is None:
            return result
        rows = range(result.shape[0]) if self.batch_rows is None else self.batch_rows.tolist()
        mask = torch.stack([torch.arange(result.shape[1]) >= starts[row] for row in rows])
        return result + self.shift_scale[adapter_name] * mask[..., None]


class ShiftModel(peft_kernel.BaseTuner):
    prefix = "shift_"
    layer_cls = (ShiftParameter, ShiftOutput)
    parameter_layer_cls = ShiftParameter
    steps: list = []

    def per_call_state(self, args, kwargs, *, generating):
        starts = kwargs.get("shift_starts")
        if starts is None:
            return None

        def step(step_args, step_kwargs):
            type(self).steps.append(step_args[0].shape)
            return {"start": starts}

        return step

    special_forward_args = ("shift_starts",)


class ShiftDispatch:
    @peft_kernel.hookimpl(trylast=True)
    def peft_kernel_dispatch_layer(self, target, target_name, adapter_name, config):
        if config.peft_type == "SHIFT" and isinstance(target, nn.Linear):
            return ShiftOutput(target, adapter_name, config=config)


class Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Parameter(torch.randn(4, 4))
        self.second = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        return x @ self.first.T @ self.second.T


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.holder = Holder()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(self.holder(x))


@pytest.fixture
def shift_method():
    reset_manager()
    register_peft_method(name="shift", config_cls=ShiftConfig, model_cls=ShiftModel)
    peft_kernel.plugins.manager().register(ShiftDispatch(), name="shift-dispatch")
    yield
    reset_manager()


def test_parameters_are_adapted_nested_saved_and_merged(shift_method, tmp_path):
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(2, 3, 4)
    model = get_peft_model(net, ShiftConfig(target_parameters=["holder.first", "holder.second"]))
    outer = model.base_model.model.holder
    assert (outer.parameter_name, outer.base_layer.parameter_name) == ("second", "first")  # registration order
    with torch.no_grad():
        outer.shift_delta["default"].fill_(0.1)
        outer.base_layer.shift_delta["default"].fill_(-0.2)
    holder = outer.get_base_layer()
    expected = net.lin(x @ (holder.first - 0.2).T @ (holder.second + 0.1).T)
    torch.testing.assert_close(model(x), expected)
    assert isinstance(holder._parameters["first"], nn.Parameter)  # put back after the call
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    assert set(load_file(tmp_path / "adapter_model.safetensors")) == {
        "base_model.model.holder.shift_delta", "base_model.model.holder.base_layer.shift_delta"}
    merged = model.merge_and_unload()
    assert type(merged.holder) is Holder
    torch.testing.assert_close(merged(x), expected)


def test_merging_into_shared_weights_is_refused(shift_method):
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    net[1].weight = net[0].weight  # tied
    model = get_peft_model(net, ShiftConfig(target_modules=["0", "1"]))
    with pytest.raises(MergeNotSupportedError, match="share their base weight"):
        model.merge_adapter()


def test_call_state_reaches_every_layer_for_one_call(shift_method):
    net = nn.Sequential(nn.Linear(4, 4))
    model = get_peft_model(net, ShiftConfig(target_modules=["0"]))
    layer = model.base_model.model[0]
    x = torch.randn(2, 5, 4)
    ShiftModel.steps.clear()
    with torch.no_grad():
        out = model(x, shift_starts=[1, 3])
        base = net[0].base_layer(x)
    assert ShiftModel.steps == [x.shape]  # one step per forward of the base model
    torch.testing.assert_close(out[0, 1:], base[0, 1:] + 1)
    torch.testing.assert_close(out[1, :3], base[1, :3])
    assert dict(layer.call_state) == {}  # dropped after the call
    with torch.no_grad():
        torch.testing.assert_close(model(x), base)  # no state: no shift


def test_batch_rows_name_the_sub_batch(shift_method):
    net = nn.Sequential(nn.Linear(4, 4))
    model = get_peft_model(net, ShiftConfig(target_modules=["0"])).eval()
    x = torch.randn(3, 5, 4)
    with torch.no_grad():
        out = model(x, shift_starts=[0, 2, 4], adapter_names=["__base__", "default", "default"])
        base = net[0].base_layer(x)
    torch.testing.assert_close(out[0], base[0])
    torch.testing.assert_close(out[1, 2:], base[1, 2:] + 1)
    torch.testing.assert_close(out[2, :4], base[2, :4])
