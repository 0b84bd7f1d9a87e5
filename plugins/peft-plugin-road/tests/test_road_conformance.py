"""RoAd passes the kernel's conformance kit for each variant, on layers with and without a bias,
and on a quantized base (the kit's toy int8 backend: the rotation acts on its output)."""

import pytest
from torch import nn

from peft_kernel.plugins import manager
from peft_kernel.testing import Case, MethodConformance
from peft_kernel.testing import layer_models as L
from peft_kernel.testing.quant import QuantBackendConformance, QuantCase, quantize_layers
from peft_kernel.testing.toy_quant import ToyBackendPlugin, ToyInt8Linear
from peft_plugin_road import RoadConfig


def without_biases():
    model = L.build("mlp")
    for name in ("lin0", "lin1"):
        setattr(model, name, nn.Linear(getattr(model, name).in_features, getattr(model, name).out_features, bias=False))
    return model


def case(name, model_fn=lambda: L.build("mlp"), **kwargs):
    return Case(name, model_fn, lambda: RoadConfig(target_modules=["lin0", "lin1"], group_size=4, **kwargs),
                lambda: L.inputs("mlp"))


class TestRoadConformance(MethodConformance):
    cases = [case("road_1"), case("road_2", variant="road_2"), case("road_4-no-bias", without_biases, variant="road_4")]


@pytest.fixture(scope="class")
def toy_backend():
    name = manager().register(ToyBackendPlugin(), name="road-toy-backend")
    yield
    manager().unregister(name)


@pytest.mark.usefixtures("toy_backend")
class TestRoadOnQuantizedBase(QuantBackendConformance):
    training_steps = 40  # few parameters, each moved by about lr per Adam step
    config_fn = staticmethod(lambda targets: RoadConfig(target_modules=targets, group_size=4, variant="road_2"))
    cases = [QuantCase("toy-int8", quantize_layers(ToyInt8Linear), backend="toy-int8", merged_tol=0.02,
                       roundtrip_tol=0.02)]
