"""QA-LoRA (``use_qalora``) on GPTQ TorchLinear layers: against HF PEFT (same seed: same
factors; same weights: same outputs; checkpoints both ways) and against the math
(h = W x + s · B A (n · pool_G(x)), and the same update as a weight)."""

from __future__ import annotations

import copy

import pytest
import torch
from gptq_layers import rtn_gptq_linear
from torch import nn

from peft_kernel import MergeNotSupportedError, get_peft_model
from peft_kernel.testing.differential import (
    assert_checkpoints_load_both_ways,
    assert_close,
    perturb,
    run,
)
from peft_plugin_lora import LoraConfig

pytest.importorskip("gptqmodel.nn_modules.qlinear.torch")
hf_peft = pytest.importorskip("peft")

X = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(0))
CONFIG = dict(r=4, lora_alpha=8, target_modules=["q", "o"], use_qalora=True, qalora_group_size=16)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(64, 32)
        self.o = nn.Linear(32, 32)
        self.head = nn.Linear(32, 8)  # stays float (HF PEFT needs a parameter to find the device)

    def forward(self, x):
        return self.head(self.o(torch.relu(self.q(x))))


_BASE = {}


def net() -> Net:
    if not _BASE:
        with torch.random.fork_rng(devices=[]):  # building it once leaves the generator alone
            torch.manual_seed(0)
            model = Net()
            model.q, model.o = rtn_gptq_linear(model.q), rtn_gptq_linear(model.o)
        _BASE["model"] = model
    return copy.deepcopy(_BASE["model"])


def pair():
    torch.manual_seed(1)
    hf = hf_peft.get_peft_model(net(), hf_peft.LoraConfig(**CONFIG))
    torch.manual_seed(1)
    ours = get_peft_model(net(), LoraConfig(**CONFIG))
    return hf.eval(), ours.eval()


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "lora_" in k}


def test_same_seed_same_factors_and_outputs_as_hf(tmp_path):
    hf, ours = pair()
    theirs, mine = adapter_tensors(hf), adapter_tensors(ours)
    assert set(mine) == set(theirs)  # (HF PEFT's GPTQ layer also lists its base as quant_linear_module)
    for key, value in theirs.items():  # the same draws; HF PEFT rounds them through float16 on GPTQ bases
        assert_close(mine[key], value, key, atol=1e-3)
        assert_close(mine[key].half().float(), value, key, atol=0)
    assert ours.base_model.model.q.lora_A["default"].weight.shape == (4, 4)  # (r, 64 / 16)
    perturb(hf)
    ours.load_state_dict(adapter_tensors(hf), strict=False)
    assert_close(run(ours, X), run(hf, X), "forward")
    assert_checkpoints_load_both_ways(hf, ours, net, X, tmp_path)


def test_forward_and_delta_weight_are_the_math():
    _, ours = pair()
    perturb(ours)
    layer = ours.base_model.model.q
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = X[0]
    pooled = x.reshape(3, 4, 16).mean(-1) * 4  # n = 64 / 16 groups
    with torch.no_grad():
        update = layer(x) - layer.get_base_layer()(x)
        torch.testing.assert_close(update, 2.0 * pooled @ A.T @ B.T, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(x @ layer.delta_weight("default").T, 2.0 * pooled @ A.T @ B.T, atol=1e-5,
                                   rtol=1e-5)


def test_gptq_layers_refuse_merging_and_the_model_is_unchanged():
    _, ours = pair()
    perturb(ours)
    before = run(ours, X)
    with pytest.raises(MergeNotSupportedError, match="forward only"):
        ours.merge_adapter()
    assert torch.equal(run(ours, X), before)


def test_group_size_must_divide_in_features():
    with pytest.raises(ValueError, match="must divide"):
        get_peft_model(net(), LoraConfig(**{**CONFIG, "qalora_group_size": 24}))
