"""MiSS passes the kernel's conformance kit for each variant, and on a quantized base (the kit's
toy int8 backend; "bat" reads the dequantized weight)."""

import pytest

from peft_kernel.plugins import manager
from peft_kernel.testing import Case, MethodConformance
from peft_kernel.testing import layer_models as L
from peft_kernel.testing.quant import QuantBackendConformance, QuantCase, quantize_layers
from peft_kernel.testing.toy_quant import ToyBackendPlugin, ToyInt8Linear
from peft_plugin_miss import MissConfig


def case(name, **kwargs):
    return Case(name, lambda: L.build("mlp"), lambda: MissConfig(target_modules=["lin0", "lin1"], **kwargs),
                lambda: L.inputs("mlp"))


class TestMissConformance(MethodConformance):
    cases = [case("default", r=3, miss_dropout=0.1), case("bat", r=2, init_weights="bat"),
             case("mini", r=2, mini_r=2, init_weights="mini")]


@pytest.fixture(scope="class")
def toy_backend():
    name = manager().register(ToyBackendPlugin(), name="miss-toy-backend")
    yield
    manager().unregister(name)


@pytest.mark.usefixtures("toy_backend")
class TestMissOnQuantizedBase(QuantBackendConformance):
    config_fn = staticmethod(lambda targets: MissConfig(target_modules=targets, r=4))
    cases = [QuantCase("toy-int8", quantize_layers(ToyInt8Linear), backend="toy-int8", merged_tol=0.02,
                       roundtrip_tol=0.02)]


@pytest.mark.usefixtures("toy_backend")
class TestMissBatOnQuantizedBase(QuantBackendConformance):
    config_fn = staticmethod(lambda targets: MissConfig(target_modules=targets, r=4, init_weights="bat"))
    cases = [QuantCase("toy-int8", quantize_layers(ToyInt8Linear), backend="toy-int8", merged_tol=0.02,
                       roundtrip_tol=0.02)]
