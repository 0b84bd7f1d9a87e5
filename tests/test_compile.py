"""torch.compile on adapted models: ``fullgraph=True`` (no graph break) gives eager's outputs
and gradients, and switching adapters, enabling / disabling or train / eval compiles each
state once, however the model was called eagerly in between (the eager fast paths keep
state that compiled code must not depend on).

These tests compile with ``aot_eager``: dynamo and AOTAutograd as under inductor, without
code generation, which takes tens of seconds per graph on a small CPU. With
``PEFT_KERNEL_SLOW=1`` one test also compiles with inductor."""

from __future__ import annotations

import functools
import os
import sys
import types

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from peft_kernel import get_peft_model
from peft_kernel.testing import tiny_models
from peft_plugin_lora import LoraConfig

X = torch.randn(3, 8)


MLP = functools.partial(tiny_models.MLP, (8, 8, 4))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def two_adapters(**config):
    torch.manual_seed(0)
    model = get_peft_model(MLP(), LoraConfig(r=4, lora_alpha=8, target_modules=["lin0", "lin1"], **config))
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=["lin0", "lin1"], **config))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn(param.shape) * 0.3)
    return model


def compiled(model):
    counter = CompileCounterWithBackend("aot_eager")
    return torch.compile(model, backend=counter, fullgraph=True), counter


def same(compiled_out, eager_out):
    torch.testing.assert_close(compiled_out, eager_out, rtol=0, atol=1e-5)


def test_switching_adapters_and_disabling_compile_each_state_once():
    model = two_adapters().eval()
    model(X)  # eager calls before and between compiled ones install the eager fast paths
    fast, counter = compiled(model)
    states = [("default", True), ("other", True), ("default", True), ("other", False), ("other", True),
              ("default", False), ("default", True)]
    seen = set()
    for adapter, enabled in states:
        model.set_adapter(adapter)
        model.base_model.enable_adapter_layers() if enabled else model.base_model.disable_adapter_layers()
        seen.add(adapter if enabled else "disabled")
        same(fast(X), model(X))
        same(fast(X), model(X))
        assert counter.frame_count == len(seen), f"recompiled in state {adapter}, enabled={enabled}"


def test_mixed_batch_compiles_once_per_batch_composition():
    model = two_adapters().eval()
    fast, counter = compiled(model)
    batches = [["default", "other", "__base__"], ["other", "other", "default"], ["default", "other", "__base__"]]
    for names in batches:
        same(fast(X, adapter_names=names), model(X, adapter_names=names))
    assert counter.frame_count == 2
    same(fast(X), model(X))
    assert counter.frame_count == 3


def test_compiled_inner_model_under_an_eager_mixed_batch():
    """The mixed batch is bound by eager code (PeftModel.forward) around a compiled inner
    model: the layers must read it there (a graph break), never take it as absent."""
    model = two_adapters().eval()
    names = ["default", "other", "__base__"]
    plain, mixed = model(X), model(X, adapter_names=names)
    inner = model.base_model.model
    counter = CompileCounterWithBackend("aot_eager")
    inner.forward = torch.compile(inner.forward, backend=counter)
    try:
        same(model(X), plain)
        same(model(X, adapter_names=names), mixed)
    finally:
        del inner.forward
    assert counter.frame_count >= 1


def test_dora_compiles_for_inference_and_training():
    model = two_adapters(use_dora=True)
    fast, counter = compiled(model)
    try:
        for _ in range(2):
            model.eval()
            with torch.no_grad():
                same(fast(X), model(X))
            # a module imported between calls: no guard may read sys.modules (a quantization
            # backend checking whether its library is loaded would recompile on every import)
            sys.modules["peft_kernel_test_new_module"] = types.ModuleType("peft_kernel_test_new_module")
            model.train()
            loss = fast(X).pow(2).sum()
            params = [p for p in model.parameters() if p.requires_grad]
            got = torch.autograd.grad(loss, params)
            want = torch.autograd.grad(model(X).pow(2).sum(), params)
            for g, w in zip(got, want, strict=True):
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    finally:
        sys.modules.pop("peft_kernel_test_new_module", None)
    assert counter.frame_count == 2  # one graph for inference, one for training


@pytest.mark.skipif(os.environ.get("PEFT_KERNEL_SLOW") != "1", reason="inductor compiles for minutes on a small "
                    "CPU; set PEFT_KERNEL_SLOW=1 to run")
def test_inductor_gives_eager_outputs():
    for config in ({}, {"use_dora": True}):
        model = two_adapters(**config).eval()
        fast = torch.compile(model, fullgraph=True)
        with torch.no_grad():
            same(fast(X), model(X))
            if not config:
                names = ["default", "other", "__base__"]
                same(fast(X, adapter_names=names), model(X, adapter_names=names))
        model.train()
        same(fast(X), model(X))
