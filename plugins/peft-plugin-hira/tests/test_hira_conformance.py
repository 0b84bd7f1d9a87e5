"""HiRA passes the kernel's conformance kit for every layer kind (including the grouped and
pointwise convolutions HF PEFT refuses or fails on), and on a quantized base (the kit's toy int8
backend: ΔW reads the dequantized weight)."""


from peft_kernel.testing import Case, MethodConformance
from peft_kernel.testing import tiny_models as M
from peft_kernel.testing.quant import ToyQuantConformance
from peft_plugin_hira import HiraConfig


def case(name, model, **kwargs):
    return Case(name, lambda: M.build(model), lambda: HiraConfig(**kwargs), lambda: M.inputs(model))


class TestHiraConformance(MethodConformance):
    cases = [
        case("linear", "mlp", target_modules=["lin0", "lin1"], r=2, hira_dropout=0.1),
        case("conv2d-grouped", "conv2d", target_modules=["conv0", "conv1", "conv2"], r=2),
        case("conv3d", "conv3d", target_modules=["conv0", "conv1"], r=2),
        case("embedding", "embedding", target_modules=["emb"], r=2),
    ]


class TestHiraOnQuantizedBase(ToyQuantConformance):
    training_steps = 40  # B starts at zero and ΔW is W₀ ⊙ B A: the first steps move the output little
    config_fn = staticmethod(lambda targets: HiraConfig(target_modules=targets, r=4))
