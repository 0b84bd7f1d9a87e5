"""LoRA (peft-kernel) on bitsandbytes-quantized layers, and the same against HF PEFT: the
kernel's quantization-backend kit (:mod:`peft_kernel.testing.quant`) with bnb cases.

Run with ``-s`` to see the measured errors.
"""

from __future__ import annotations

import pytest

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft_plugin_lora")

from _bnb_layers import CPU_REPACKS, HF_REPACKED_MERGE, flag, quantize_4bit, quantize_8bit  # noqa: E402

from peft_kernel.testing.quant import QuantBackendConformance, QuantCase  # noqa: E402
from peft_plugin_lora import LoraConfig  # noqa: E402


class TestLoraOnBnb(QuantBackendConformance):
    config_fn = staticmethod(lambda targets: LoraConfig(target_modules=targets, r=8))
    reference_config_fn = staticmethod(
        lambda targets: pytest.importorskip("peft").LoraConfig(target_modules=targets, r=8)
    )
    cases = [
        QuantCase("int8", quantize_8bit, "bnb-8bit", merged_tol=0.01, roundtrip_tol=0.01,
                  reference_merge_tol=1e-5, reference_prepare=flag("is_loaded_in_8bit")),
        # the layers as this CPU runs them (repacked after the first inference forward where it can)
        QuantCase("nf4-dq", quantize_4bit("nf4", True), "bnb-4bit", merged_tol=0.15, roundtrip_tol=0.2,
                  reference_merge_tol=1e-5, reference_prepare=flag("is_loaded_in_4bit"),
                  reference_merge_bug=HF_REPACKED_MERGE if CPU_REPACKS else None),
        QuantCase("fp4", quantize_4bit("fp4", False), "bnb-4bit", merged_tol=0.2, roundtrip_tol=0.3,
                  reference_merge_tol=1e-5, reference_prepare=flag("is_loaded_in_4bit"),
                  reference_merge_bug=HF_REPACKED_MERGE if CPU_REPACKS else None),
    ] + ([
        # and, on a CPU that repacks, the layers as every other CPU runs them
        QuantCase("nf4-dq-no-repack", quantize_4bit("nf4", True, repack=False), "bnb-4bit", merged_tol=0.15,
                  roundtrip_tol=0.2, reference_merge_tol=1e-5, reference_prepare=flag("is_loaded_in_4bit")),
        QuantCase("fp4-no-repack", quantize_4bit("fp4", False, repack=False), "bnb-4bit", merged_tol=0.2,
                  roundtrip_tol=0.3, reference_merge_tol=1e-5, reference_prepare=flag("is_loaded_in_4bit")),
    ] if CPU_REPACKS else [])
