"""OFT passes the kernel's conformance kit: on linear layers, convolutions (those HF PEFT's OFT
adapts and those it refuses: grouped, dilated, reflect-padded, non-square kernels, Conv1d) and
embeddings, and on a quantized base (the kit's toy int8 backend)."""

import pytest

from peft_kernel.plugins import manager
from peft_kernel.testing import Case, MethodConformance
from peft_kernel.testing import tiny_models as M
from peft_kernel.testing.quant import QuantBackendConformance, QuantCase, quantize_layers
from peft_kernel.testing.toy_quant import ToyBackendPlugin, ToyInt8Linear
from peft_plugin_oft import OFTConfig


class TestOFTConformance(MethodConformance):
    cases = [
        Case("linear", M.MODELS["mlp8"], lambda: OFTConfig(target_modules=["lin0", "lin1"], oft_block_size=4),
             lambda: M.inputs("mlp8")),
        Case("conv", M.OddConvNet, lambda: OFTConfig(target_modules=["conv0", "conv1", "conv2"], oft_block_size=6,
                                                     modules_to_save=["head"]), lambda: M.inputs("odd-conv3")),
        Case("embedding", M.EmbeddingNet, lambda: OFTConfig(target_modules=["emb"], r=2, oft_block_size=0),
             lambda: M.inputs("embedding")),
    ]


@pytest.fixture(scope="class")
def toy_backend():
    name = manager().register(ToyBackendPlugin(), name="oft-toy-backend")
    yield
    manager().unregister(name)


@pytest.mark.usefixtures("toy_backend")
class TestOFTOnQuantizedBase(QuantBackendConformance):
    config_fn = staticmethod(lambda targets: OFTConfig(target_modules=targets, oft_block_size=16))
    cases = [QuantCase("toy-int8", quantize_layers(ToyInt8Linear), backend="toy-int8", merged_tol=0.02,
                       roundtrip_tol=0.02)]
