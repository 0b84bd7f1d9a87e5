"""Weight-delta methods (LoKr, MiSS, RoAd, HiRA) on torchao-quantized weights, through the one
torchao backend: the kernel's quantization-backend kit (:mod:`peft_kernel.testing.quant`). HF PEFT
0.21.2 supports none of these methods on torchao.

Run with ``-s`` to see the measured errors.
"""

from __future__ import annotations

import pytest

from peft_kernel.testing.quant import QuantBackendConformance, QuantCase
from peft_plugin_hira import HiraConfig
from peft_plugin_lokr import LoKrConfig
from peft_plugin_miss import MissConfig
from peft_plugin_road import RoadConfig

Q = pytest.importorskip("_torchao_quantizers")  # (imports torchao)

INT8 = QuantCase("int8-weight-only", Q.quantizer(Q.int8_wo_config), "torchao", merged_tol=0.01, roundtrip_tol=0.01)
INTX4 = QuantCase("intx4-weight-only", Q.quantizer(Q.intx4_wo_config), "torchao", merged_tol=0.12,
                  roundtrip_tol=0.15)


class TestLoKrOnTorchao(QuantBackendConformance):
    config_fn = staticmethod(lambda targets: LoKrConfig(target_modules=targets, r=4))
    cases = [INT8, INTX4]


class TestMissOnTorchao(QuantBackendConformance):
    identity_atol = 1e-5  # "bat" runs on the dequantized weight: torchao's int8 kernel rounds differently
    config_fn = staticmethod(lambda targets: MissConfig(target_modules=targets, r=16, init_weights="bat"))
    cases = [INT8]


class TestRoadOnTorchao(QuantBackendConformance):
    training_steps = 40  # few parameters, each moved by about lr per Adam step
    config_fn = staticmethod(lambda targets: RoadConfig(target_modules=targets, variant="road_2", group_size=32))
    cases = [INT8]


class TestHiraOnTorchao(QuantBackendConformance):
    training_steps = 40  # B starts at zero and ΔW is W₀ ⊙ B A: the first steps move the output little
    config_fn = staticmethod(lambda targets: HiraConfig(target_modules=targets, r=4))
    cases = [INT8]
