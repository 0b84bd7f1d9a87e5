"""Weight-delta methods (LoKr, MiSS, RoAd, HiRA) on bitsandbytes layers, through the one bnb backend:
the kernel's quantization-backend kit (:mod:`peft_kernel.testing.quant`). HF PEFT 0.21.2 has bnb
layers for RoAd and HiRA only (compared with ours here); LoKr and MiSS have none.

Run with ``-s`` to see the measured errors.
"""

from __future__ import annotations

import pytest

from peft_kernel.testing.quant import QuantBackendConformance, QuantCase
from peft_plugin_hira import HiraConfig
from peft_plugin_lokr import LoKrConfig
from peft_plugin_miss import MissConfig
from peft_plugin_road import RoadConfig

B = pytest.importorskip("_bnb_layers")  # (imports bitsandbytes)

NF4 = QuantCase("nf4-dq", B.quantize_4bit("nf4", True), "bnb-4bit", merged_tol=0.15, roundtrip_tol=0.2)
INT8 = QuantCase("int8", B.quantize_8bit, "bnb-8bit", merged_tol=0.01, roundtrip_tol=0.01)
#: with HF PEFT's bnb layers as the reference
NF4_VS_HF = QuantCase("nf4-dq", B.quantize_4bit("nf4", True), "bnb-4bit", merged_tol=0.15, roundtrip_tol=0.2,
                      reference_merge_tol=1e-5, reference_prepare=B.flag("is_loaded_in_4bit"),
                      reference_merge_bug=B.HF_REPACKED_MERGE if B.CPU_REPACKS else None)
#: HiRA's forward reads W₀: on a CPU that repacks, HF PEFT reads the repacked weight as if unpacked
#: (its forward is wrong there, not only its merge), so HF is compared on the layers as every other CPU
#: runs them, and on the repacked ones it is a strict expected failure
NF4_VS_HF_NO_REPACK = QuantCase("nf4-dq-no-repack", B.quantize_4bit("nf4", True, repack=False), "bnb-4bit",
                                merged_tol=0.15, roundtrip_tol=0.2, reference_merge_tol=1e-5,
                                reference_prepare=B.flag("is_loaded_in_4bit"))
NF4_REPACKED_VS_HF = QuantCase("nf4-dq", B.quantize_4bit("nf4", True), "bnb-4bit", merged_tol=0.15,
                               roundtrip_tol=0.2, reference_prepare=B.flag("is_loaded_in_4bit"),
                               reference_forward_bug=B.HF_REPACKED_FORWARD)


def hf(name, **kwargs):
    return staticmethod(lambda targets: getattr(pytest.importorskip("peft"), name)(target_modules=targets, **kwargs))


class TestLoKrOnBnb(QuantBackendConformance):
    config_fn = staticmethod(lambda targets: LoKrConfig(target_modules=targets, r=4))
    cases = [NF4, INT8]


class TestMissOnBnb(QuantBackendConformance):
    config_fn = staticmethod(lambda targets: MissConfig(target_modules=targets, r=16))
    cases = [NF4]


class TestRoadOnBnb(QuantBackendConformance):
    training_steps = 40  # few parameters, each moved by about lr per Adam step
    config_fn = staticmethod(lambda targets: RoadConfig(target_modules=targets, variant="road_2", group_size=32))
    reference_config_fn = hf("RoadConfig", variant="road_2", group_size=32)
    cases = [NF4_VS_HF]


class TestHiraOnBnb(QuantBackendConformance):
    training_steps = 40  # B starts at zero and ΔW is W₀ ⊙ B A: the first steps move the output little
    config_fn = staticmethod(lambda targets: HiraConfig(target_modules=targets, r=4))
    reference_config_fn = hf("HiraConfig", r=4)
    cases = [NF4_VS_HF_NO_REPACK] + ([NF4_REPACKED_VS_HF] if B.CPU_REPACKS else [])
