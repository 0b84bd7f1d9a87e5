"""LoKr passes the kernel's conformance kit: for linear layers (full and low-rank factors),
Conv1d (the full W2 HF PEFT gets wrong, and the CP form HF PEFT crashes on), the CP form of
Conv2d, and on a quantized base (the kit's toy int8 backend)."""


from peft_kernel.testing import Case, MethodConformance
from peft_kernel.testing import tiny_models as M
from peft_kernel.testing.quant import ToyQuantConformance
from peft_plugin_lokr import LoKrConfig


def case(name, model, **kwargs):
    return Case(name, lambda: M.build(model), lambda: LoKrConfig(**kwargs), lambda: M.inputs(model))


class TestLoKrConformance(MethodConformance):
    cases = [
        case("linear", "mlp", target_modules=["lin0", "lin1"], r=1, decompose_both=True),
        case("conv1d", "conv1d", target_modules=["conv0", "conv1"], r=4, modules_to_save=["head"]),
        case("conv1d-cp", "conv1d", target_modules=["conv0"], r=1, use_effective_conv2d=True),
        case("conv2d-cp", "conv2d", target_modules=["conv0", "conv1", "conv2"], r=1, use_effective_conv2d=True),
    ]


class TestLoKrOnQuantizedBase(ToyQuantConformance):
    config_fn = staticmethod(lambda targets: LoKrConfig(target_modules=targets, r=2))
