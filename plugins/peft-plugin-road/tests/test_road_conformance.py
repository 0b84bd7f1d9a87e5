"""RoAd passes the kernel's conformance kit for each variant, on layers with and without a bias,
and on a quantized base (the kit's toy int8 backend: the rotation acts on its output)."""

from torch import nn

from peft_kernel.testing import Case, MethodConformance
from peft_kernel.testing import tiny_models as M
from peft_kernel.testing.quant import ToyQuantConformance
from peft_plugin_road import RoadConfig


def without_biases():
    model = M.build("mlp")
    for name in ("lin0", "lin1"):
        setattr(model, name, nn.Linear(getattr(model, name).in_features, getattr(model, name).out_features, bias=False))
    return model


def case(name, model_fn=lambda: M.build("mlp"), **kwargs):
    return Case(name, model_fn, lambda: RoadConfig(target_modules=["lin0", "lin1"], group_size=4, **kwargs),
                lambda: M.inputs("mlp"))


class TestRoadConformance(MethodConformance):
    cases = [case("road_1"), case("road_2", variant="road_2"), case("road_4-no-bias", without_biases, variant="road_4")]


class TestRoadOnQuantizedBase(ToyQuantConformance):
    training_steps = 40  # few parameters, each moved by about lr per Adam step
    config_fn = staticmethod(lambda targets: RoadConfig(target_modules=targets, group_size=4, variant="road_2"))
