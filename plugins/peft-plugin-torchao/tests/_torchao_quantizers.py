"""torchao quantizers of the quantization kit's float layers, shared by the tests of every method on
these bases (the quantizers of ``QuantCase``)."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import torch
import torchao.quantization as tq

from peft_kernel.testing.quant import TARGETS

warnings.filterwarnings("ignore", module="torchao")


def quantizer(make_config):
    def quantize(model):
        tq.quantize_(model, make_config(), filter_fn=lambda m, fqn: fqn in TARGETS)
        return model

    return quantize


def hf_quantizer(make_config):
    """HF PEFT requantizes torchao weights with the config transformers keeps on the model
    (``model.hf_quantizer.quantization_config.get_apply_tensor_subclass``); stand in for it."""

    def prepare(model):
        model.hf_quantizer = SimpleNamespace(quantization_config=SimpleNamespace(get_apply_tensor_subclass=make_config))

    return prepare


def int8_wo_config():
    return tq.Int8WeightOnlyConfig(set_inductor_config=False)


def intx4_wo_config():
    return tq.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=tq.PerGroup(32))
