"""LoHa passes the kernel's conformance kit: for linear layers, Conv1d and the CP form of Conv2d,
and on a quantized base (the kit's toy int8 backend)."""


from peft_kernel.testing import Case, MethodConformance
from peft_kernel.testing import tiny_models as M
from peft_kernel.testing.quant import ToyQuantConformance
from peft_plugin_loha import LoHaConfig


class TestLoHaConformance(MethodConformance):
    cases = [
        Case("linear", M.MLP, lambda: LoHaConfig(target_modules=["lin0", "lin1"], r=4), lambda: M.inputs("mlp")),
        Case("conv1d", M.Conv1dNet,
             lambda: LoHaConfig(target_modules=["conv0", "conv1"], r=2, modules_to_save=["head"]),
             lambda: M.inputs("conv1d")),
        Case("conv2d-cp", M.Conv2dNet,
             lambda: LoHaConfig(target_modules=["conv0", "conv1", "conv2"], r=2, use_effective_conv2d=True),
             lambda: M.inputs("conv2d")),
    ]


class TestLoHaOnQuantizedBase(ToyQuantConformance):
    config_fn = staticmethod(lambda targets: LoHaConfig(target_modules=targets, r=4))
