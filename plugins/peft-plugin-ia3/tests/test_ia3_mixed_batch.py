"""Mixed batches (``adapter_names=``) scale each row by its own vector, gathered from a stack
of the batch's vectors (``IA3Layer.batched_forward``): equal to each row alone and to the
kernel's per-adapter loop, and never computed from a stale stack."""

from __future__ import annotations

import pytest
import torch

from peft_kernel import AdapterLayer, get_peft_model
from peft_kernel.testing import tiny_models as M
from peft_kernel.testing.differential import assert_close, each_row_alone, perturb, record_batched_forward, run
from peft_plugin_ia3 import IA3Config
from peft_plugin_ia3.layer import IA3Layer

CASES = {"mlp_wide": dict(target_modules=["lin0", "lin1", "lin2"], feedforward_modules=["lin1"]),
         "conv2d": dict(target_modules=["conv0", "conv1", "head"], feedforward_modules=["conv1"])}


def _model(kind):
    torch.manual_seed(0)
    model = get_peft_model(M.build(kind), IA3Config(**CASES[kind]))
    model.add_adapter("b", IA3Config(**CASES[kind]))
    model.base_model.set_adapter(["default", "b"])
    perturb(model)
    model.set_adapter("default")
    return model.eval()


@pytest.mark.parametrize("kind", CASES)
def test_rows_gathered_equal_each_row_alone_and_the_loop(kind, monkeypatch):
    model = _model(kind)
    x = M.inputs(kind, batch=4)
    names = ["b", "__base__", "default", "b"]
    taken = record_batched_forward(monkeypatch, IA3Layer)
    mixed = run(model, x, adapter_names=names)
    assert taken == [True] * 3
    assert_close(mixed, each_row_alone(model, x, names), "mixed batch")
    with torch.no_grad():  # an in-place edit after the stack was kept
        model.base_model.model.get_submodule(CASES[kind]["feedforward_modules"][0]).ia3_l["b"].mul_(1.5)
    assert_close(run(model, x, adapter_names=names), each_row_alone(model, x, names), "after an edit")
    monkeypatch.setattr(IA3Layer, "batched_forward", AdapterLayer.batched_forward)
    assert_close(run(model, x, adapter_names=names), each_row_alone(model, x, names), "loop")
