"""The complete examples of docs/plugin-authors.md run as written: every ```python block whose first
line is ``# docs-example: <name>`` is executed (blocks of one name in order, as one module), and the
methods and layers they define pass the conformance kit."""

from __future__ import annotations

import pathlib
import re
import sys
import types

import pytest
import torch
from torch import nn

import peft_kernel
from peft_kernel.plugins import manager
from peft_kernel.testing import Case, MethodConformance

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "plugin-authors.md"


def doc_example(name: str) -> types.ModuleType:
    blocks = re.findall(r"```python\n# docs-example: (\S+)\n(.*?)```", DOC.read_text(), flags=re.S)
    code = "\n".join(body for tag, body in blocks if tag == name)
    assert code, f"docs/plugin-authors.md has no example {name!r}"
    module = types.ModuleType(f"docs_example_{name.replace('-', '_')}")
    sys.modules[module.__name__] = module  # (dataclasses look their module up)
    exec(compile(code, f"{DOC}:{name}", "exec"), module.__dict__)
    return module


lowrank = doc_example("lowrank")
custom = doc_example("custom-layer")
peft_kernel.unregister_layer_mapping(custom.ScaledLinear, method="LORA")  # registered per test module below


@pytest.fixture(autouse=True, scope="module")
def registered():
    name = manager().register(lowrank.LowRankPlugin(), name="docs-lowrank")
    peft_kernel.register_layer_mapping(custom.ScaledLinear, custom.LoraScaledLinear, method="LORA")
    yield
    peft_kernel.unregister_layer_mapping(custom.ScaledLinear, method="LORA")
    manager().unregister(name)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.conv, self.lin = nn.Embedding(10, 6), nn.Conv1d(6, 6, 3, padding=1), nn.Linear(6, 3)

    def forward(self, ids):
        return self.lin(torch.relu(self.conv(self.emb(ids).transpose(1, 2))).transpose(1, 2))


def test_lowrank_delta_is_scaled_b_times_a():
    torch.manual_seed(0)
    model = peft_kernel.get_peft_model(nn.Sequential(nn.Linear(5, 4)), lowrank.LowRankConfig(target_modules=["0"],
                                                                                               r=2, alpha=3.0))
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.lowrank_B["default"].normal_()
    x = torch.randn(3, 5)
    base = layer.get_base_layer()
    delta = 1.5 * layer.lowrank_B["default"] @ layer.lowrank_A["default"]
    torch.testing.assert_close(model(x), nn.functional.linear(x, base.weight + delta, base.bias))


class TestLowRankExample(MethodConformance):
    cases = [Case("net", Net, lambda: lowrank.LowRankConfig(target_modules=["emb", "conv", "lin"], r=2),
                  lambda: torch.randint(0, 10, (3, 5), generator=torch.Generator().manual_seed(0)))]


class TestCustomLayerExample(custom.TestLoraScaledLinear):
    pass


def test_custom_layer_takes_a_second_adapter_and_loads_in_hf_format(tmp_path):
    from safetensors.torch import load_file

    model = peft_kernel.get_peft_model(nn.Sequential(custom.ScaledLinear(8, 6)),
                                       custom.LoraConfig(target_modules=["0"], r=4))
    model.add_adapter("other", custom.LoraConfig(target_modules=["0"], r=2))
    layer = model.base_model.model[0]
    assert isinstance(layer, custom.LoraScaledLinear) and set(layer.lora_A) == {"default", "other"}
    model.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert set(keys) == {"base_model.model.0.lora_A.weight", "base_model.model.0.lora_B.weight"}
