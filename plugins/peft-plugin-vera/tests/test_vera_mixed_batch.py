"""Mixed batches (``adapter_names=``) through VeRA layers: adapters that share their projections
run in one pass (x·Aᵀ once, each row's λ gathered), others take the kernel's per-adapter loop;
both equal each row alone, also after the λ's change."""

from __future__ import annotations

import pytest
import torch

from peft_kernel import get_peft_model
from peft_kernel.testing import tiny_models as M
from peft_kernel.testing.differential import assert_close, each_row_alone, perturb, record_batched_forward, run
from peft_plugin_vera import VeraConfig
from peft_plugin_vera.layer import VeraLayer

TARGETS = ["lin0", "lin1"]


@pytest.mark.parametrize("second_r", [4, 2])
def test_shared_projections_in_one_pass_others_loop(second_r, monkeypatch):
    torch.manual_seed(0)
    model = get_peft_model(M.build("mlp_wide"), VeraConfig(target_modules=TARGETS, r=4))
    model.add_adapter("b", VeraConfig(target_modules=TARGETS, r=second_r))
    model.base_model.set_adapter(["default", "b"])
    perturb(model)
    model.set_adapter("default")
    model.eval()
    taken = record_batched_forward(monkeypatch, VeraLayer)
    x = M.inputs("mlp_wide", batch=4)
    names = ["b", "__base__", "default", "b"]
    assert_close(run(model, x, adapter_names=names), each_row_alone(model, x, names), "mixed batch")
    assert taken == [second_r == 4] * 2  # projections of another r differ: the loop
    with torch.no_grad():
        model.base_model.model.lin1.vera_lambda_b["b"].add_(0.5)
    assert_close(run(model, x, adapter_names=names), each_row_alone(model, x, names), "after an edit")
