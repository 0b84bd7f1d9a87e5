"""BOFT passes the kernel's conformance kit: on linear layers with several butterfly factors, on
convolutions (incl. those HF PEFT's BOFT cannot run: non-square kernels, grouped, dilated,
reflect-padded, Conv1d), and on a quantized base (the kit's toy int8 backend)."""

import pytest

from peft_kernel.plugins import manager
from peft_kernel.testing import Case, MethodConformance
from peft_kernel.testing import tiny_models as M
from peft_kernel.testing.quant import QuantBackendConformance, QuantCase, quantize_layers
from peft_kernel.testing.toy_quant import ToyBackendPlugin, ToyInt8Linear
from peft_plugin_boft import BOFTConfig


class TestBOFTConformance(MethodConformance):
    cases = [
        Case("linear", M.MODELS["mlp8"], lambda: BOFTConfig(target_modules=["lin0", "lin1"], boft_block_size=2,
                                                 boft_n_butterfly_factor=3), lambda: M.inputs("mlp8")),
        Case("conv", lambda: M.build("odd-conv2"),
             lambda: BOFTConfig(target_modules=["conv0", "conv1", "conv2"], boft_block_size=2,
                                boft_n_butterfly_factor=2, modules_to_save=["head"]),
             lambda: M.inputs("odd-conv2")),
    ]


@pytest.fixture(scope="class")
def toy_backend():
    name = manager().register(ToyBackendPlugin(), name="boft-toy-backend")
    yield
    manager().unregister(name)


@pytest.mark.usefixtures("toy_backend")
class TestBOFTOnQuantizedBase(QuantBackendConformance):
    config_fn = staticmethod(lambda targets: BOFTConfig(target_modules=targets, boft_block_size=8,
                                                        boft_n_butterfly_factor=2))
    cases = [QuantCase("toy-int8", quantize_layers(ToyInt8Linear), backend="toy-int8", merged_tol=0.02,
                       roundtrip_tol=0.02)]
