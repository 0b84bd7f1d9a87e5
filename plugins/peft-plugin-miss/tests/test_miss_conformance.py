"""MiSS passes the kernel's conformance kit for each variant, and on a quantized base (the kit's
toy int8 backend; "bat" reads the dequantized weight)."""


from peft_kernel.testing import Case, MethodConformance
from peft_kernel.testing import tiny_models as M
from peft_kernel.testing.quant import ToyQuantConformance
from peft_plugin_miss import MissConfig


def case(name, **kwargs):
    return Case(name, lambda: M.build("mlp"), lambda: MissConfig(target_modules=["lin0", "lin1"], **kwargs),
                lambda: M.inputs("mlp"))


class TestMissConformance(MethodConformance):
    cases = [case("default", r=3, miss_dropout=0.1), case("bat", r=2, init_weights="bat"),
             case("mini", r=2, mini_r=2, init_weights="mini")]


class TestMissOnQuantizedBase(ToyQuantConformance):
    config_fn = staticmethod(lambda targets: MissConfig(target_modules=targets, r=4))


class TestMissBatOnQuantizedBase(ToyQuantConformance):
    config_fn = staticmethod(lambda targets: MissConfig(target_modules=targets, r=4, init_weights="bat"))
