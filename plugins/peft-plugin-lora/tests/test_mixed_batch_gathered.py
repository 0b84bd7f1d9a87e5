"""Mixed batches (``adapter_names=``) through LoRA linear layers run all rows at once
(``batched.py``: stacked factors, gathered per row). These tests hold that path to the
per-row truth (each row alone with its adapter active, on a copy of the model) and to the
kernel's per-adapter loop; they check which layers take it and which fall back, and that the
stacks kept between calls never outlive a change of the factors they were built from."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from peft_kernel import AdapterLayer, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft_kernel.testing.differential import each_row_alone
from peft_plugin_lora import LoraConfig, VeloraConfig, batched
from peft_plugin_lora import layer as lora_layer

BASE = "__base__"


class Net(nn.Module):
    """Embedding → Linear → Linear: the embedding's LoRA takes the per-adapter loop."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(12, 8)
        self.lin0 = nn.Linear(8, 16)
        self.lin1 = nn.Linear(16, 8)

    def forward(self, ids):
        return self.lin1(torch.relu(self.lin0(self.emb(ids))))


TARGETS = ["emb", "lin0", "lin1"]


def _model(dora: bool = False):
    """Adapters of ranks 2, 4 and 8 (``b`` with lora_bias, or DoRA; ``c`` rsLoRA), random factors."""
    torch.manual_seed(0)
    model = get_peft_model(Net(), LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS), adapter_name="a")
    model.add_adapter("b", LoraConfig(r=4, lora_alpha=3, target_modules=["lin0", "lin1"], lora_bias=not dora,
                                      use_dora=dora))
    model.add_adapter("c", LoraConfig(r=8, lora_alpha=8, use_rslora=True, target_modules=TARGETS))
    _randomise(model)
    return model.eval()


def _randomise(model):
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape) * 0.3)


def same(got, want):
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.fixture
def gathered(monkeypatch):
    """Counts the batched products per layer, and the stacks built."""
    calls = {"rows": 0, "stacks": 0}
    add_rows, stack_factors = batched.add_rows, batched.stack_factors

    def counting_add_rows(*args, **kwargs):
        calls["rows"] += 1
        return add_rows(*args, **kwargs)

    def counting_stack(*args, **kwargs):
        calls["stacks"] += 1
        return stack_factors(*args, **kwargs)

    monkeypatch.setattr(batched, "add_rows", counting_add_rows)
    monkeypatch.setattr(batched, "stack_factors", counting_stack)
    return calls


def loop_only(monkeypatch):
    monkeypatch.setattr(lora_layer.Linear, "batched_forward", AdapterLayer.batched_forward)


IDS = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 0], [3, 3, 3], [5, 1, 2]])
NAMES = ["b", BASE, "a", "c", "b", "a"]


def test_all_rows_at_once_equal_each_row_alone_and_the_loop(gathered, monkeypatch):
    model = _model()
    with torch.no_grad():
        got = model(IDS, adapter_names=NAMES)
        assert gathered["rows"] == 2  # both linear layers; the embedding loops
        same(got, each_row_alone(model, IDS, NAMES))
        # the linear layers alone, 2-D input (one token per row)
        lin0 = model.base_model.model.lin0
        x = torch.randn(6, 8)
        gathered_out = lin0(x, adapter_names=NAMES)
        loop_only(monkeypatch)
        same(gathered_out, lin0(x, adapter_names=NAMES))
        same(got, model(IDS, adapter_names=NAMES))


def test_gradients_equal_the_loop(monkeypatch):
    model = _model()
    lin0 = model.base_model.model.lin0
    lin0.set_adapter(["a", "b", "c"])  # trainable factors: autograd records, nothing is kept
    x = torch.randn(6, 3, 8)
    params = [p for p in lin0.parameters() if p.requires_grad]
    got = torch.autograd.grad(lin0(x, adapter_names=NAMES).pow(2).sum(), params)
    assert "_kept" not in lin0.__dict__
    loop_only(monkeypatch)
    want = torch.autograd.grad(lin0(x, adapter_names=NAMES).pow(2).sum(), params)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_variants_and_active_dropout_take_the_loop(gathered):
    model = _model(dora=True)  # adapter "b" is DoRA
    with torch.no_grad():
        same(model(IDS, adapter_names=NAMES), each_row_alone(model, IDS, NAMES))
        assert gathered["rows"] == 0
        model.add_adapter("k", LoraConfig(r=2, target_modules=["lin0", "lin1"], velora_config=VeloraConfig()))
        _randomise(model)
        names = ["k", "a", BASE, "c", "k", "a"]
        same(model(IDS, adapter_names=names), each_row_alone(model, IDS, names))
        assert gathered["rows"] == 0
        model.delete_adapter("k")
        names = ["a", "c", BASE, "c", "a", "a"]  # no DoRA row: gathered
        same(model(IDS, adapter_names=names), each_row_alone(model, IDS, names))
        assert gathered["rows"] == 2
    torch.manual_seed(0)
    model = get_peft_model(Net(), LoraConfig(r=2, target_modules=["lin0"], lora_dropout=0.5), adapter_name="a")
    model.add_adapter("b", LoraConfig(r=2, target_modules=["lin0"]))
    _randomise(model)
    lin0, x = model.base_model.model.lin0, torch.randn(4, 8)
    with torch.no_grad():
        lin0.train()
        lin0(x, adapter_names=["a", "b", "a", BASE])
        assert gathered["rows"] == 2
        lin0.eval()  # dropout is the identity in eval mode
        names = ["a", "b", "a", BASE]
        same(lin0(x, adapter_names=names), _lin0_rows(lin0, x, names))
        assert gathered["rows"] == 3


def _lin0_rows(lin0, x, names):
    lin0 = copy.deepcopy(lin0)
    rows = []
    for row, name in zip(x, names, strict=True):
        if name == BASE:
            rows.append(lin0.base_layer(row[None]))
        else:
            lin0.set_adapter(name)
            rows.append(lin0(row[None]))
    return torch.cat(rows)


def test_kept_stacks_follow_every_change(gathered):
    model = _model()
    layers = [model.base_model.model.lin0, model.base_model.model.lin1]

    def check(expect_restack: bool):
        before = gathered["stacks"]
        with torch.no_grad():
            same(model(IDS, adapter_names=NAMES), each_row_alone(model, IDS, NAMES))
        assert (gathered["stacks"] > before) == expect_restack

    check(True)
    check(False)  # nothing changed: the kept stacks serve
    before = gathered["stacks"]
    with torch.no_grad():  # they hold every adapter: batches of other compositions share them
        for names in (["a", "a", "a", "a", BASE, "a"], ["c", "b", "c", "b", "c", "b"]):
            same(model(IDS, adapter_names=names), each_row_alone(model, IDS, names))
    assert gathered["stacks"] == before
    # an optimizer step (in place, no state change)
    model.train()
    model.base_model.set_adapter(["a", "b", "c"])
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    for _ in range(2):
        model(IDS).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    model.set_adapter("a")
    model.eval()
    check(True)
    check(False)
    with torch.no_grad():  # edits in place, a replaced tensor, a scaling
        layers[0].lora_B["c"].weight.mul_(2)
    check(True)
    layers[1].lora_A["a"].weight = nn.Parameter(torch.randn(2, 16) * 0.3)
    check(True)
    layers[1].lora_B["b"].bias.data = torch.randn(8) * 0.3
    check(True)
    layers[0].set_scale("b", 0.5)
    check(True)
    # load_state_dict, through the checkpoint path and the module itself
    state = get_peft_model_state_dict(model, adapter_name="a")
    set_peft_model_state_dict(model, {k: torch.randn(v.shape) * 0.3 for k, v in state.items()}, adapter_name="a")
    check(True)
    layers[0].load_state_dict({k: v + 0.1 for k, v in layers[0].state_dict().items()})
    check(True)
    # merge and unmerge
    model.merge_adapter(["c"])
    with pytest.raises(ValueError, match="merged"):
        model(IDS, adapter_names=NAMES)
    model.unmerge_adapter()
    check(True)


def test_added_and_deleted_adapters():
    model = _model()
    with torch.no_grad():
        model(IDS, adapter_names=NAMES)
        model.add_adapter("d", LoraConfig(r=3, lora_alpha=5, target_modules=["lin1"]))
        _randomise(model)
        names = ["d", "a", BASE, "d", "c", "b"]
        same(model(IDS, adapter_names=names), each_row_alone(model, IDS, names))
        model.delete_adapter("b")
        names = ["d", "a", BASE, "d", "c", "c"]
        same(model(IDS, adapter_names=names), each_row_alone(model, IDS, names))
        with pytest.raises(ValueError, match="Unknown adapter names"):
            model(IDS, adapter_names=NAMES)


class _Shifted(lora_layer.Linear):
    """A custom layer (as register_layer_mapping installs) with math of its own."""

    def adapter_forward(self, x, result, adapter_name, *args, **kwargs):
        return super().adapter_forward(x, result, adapter_name, *args, **kwargs) + 1


def test_a_subclass_with_its_own_adapter_forward_takes_the_loop(gathered, monkeypatch):
    lin1 = _model().base_model.model.lin1
    lin1.__class__ = _Shifted
    x = torch.randn(3, 16)
    names = ["a", BASE, "c"]
    with torch.no_grad():
        got = lin1(x, adapter_names=names)
        assert gathered["rows"] == 0
        monkeypatch.setattr(_Shifted, "batched_forward", AdapterLayer.batched_forward)
        same(got, lin1(x, adapter_names=names))
        same(got[1], lin1.base_layer(x[1]))
