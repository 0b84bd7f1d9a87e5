"""The specialised forwards an adapter layer installs for its current state (merged: the
base layer; unmerged LoRA on nn.Linear: direct F.linear calls) must never go stale: every
state change, and every change they cannot see coming (hooks, replaced modules, dtypes,
copies), has to give the same outputs as the general path."""

from __future__ import annotations

import copy
import functools
import pickle

import pytest
import torch
from torch import nn

from peft_kernel import get_peft_model
from peft_kernel.testing import tiny_models
from peft_plugin_lora import LoraConfig

MLP = functools.partial(tiny_models.MLP, (8, 8, 4))


def reference(model: nn.Module, layer, x):
    """The layer's output through the general path (the class's forward, not the instance's)."""
    return type(layer).forward(layer, x)


@pytest.fixture
def peft_model():
    torch.manual_seed(0)
    model = get_peft_model(MLP(), LoraConfig(r=4, lora_alpha=8, target_modules=["lin0", "lin1"]))
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=["lin0", "lin1"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    return model.eval()


def layer_of(model):
    return model.base_model.model.lin0


X = torch.randn(5, 8)


def expected(model, x=X):
    """Output computed by hand from the weights: base + scaling * B A x for the active adapters."""
    layer = layer_of(model)
    base = layer.base_layer
    out = x @ base.weight.T + base.bias
    if layer.merged or layer.disable_adapters:
        return out
    for name in layer.active_adapters:
        A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
        out = out + layer.scaling[name] * (x @ A.T @ B.T)
    return out


def test_plain_calls_use_the_specialised_forward(peft_model):
    layer = layer_of(peft_model)
    layer(X)
    assert layer.__dict__["_fast_forward"].__func__.__name__ == "_forward_plain"
    torch.testing.assert_close(layer(X), expected(peft_model), rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(X), reference(peft_model, layer, X), rtol=0, atol=0)


def test_switching_adapters_is_seen(peft_model):
    layer = layer_of(peft_model)
    first = layer(X)
    peft_model.set_adapter("other")
    assert not torch.allclose(layer(X), first)
    torch.testing.assert_close(layer(X), expected(peft_model), rtol=0, atol=1e-6)


def test_merge_and_unmerge_are_seen(peft_model):
    layer = layer_of(peft_model)
    unmerged = layer(X)
    peft_model.merge_adapter()
    assert "_fast_forward" not in layer.__dict__  # dropped by the state change
    merged = layer(X)
    assert layer.__dict__["_fast_forward"].__func__.__name__ == "_forward_merged"
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)
    peft_model.unmerge_adapter()
    torch.testing.assert_close(layer(X), unmerged, rtol=0, atol=1e-5)
    torch.testing.assert_close(layer(X), expected(peft_model), rtol=0, atol=1e-6)


def test_merged_layer_still_runs_hooks_registered_on_the_base_afterwards(peft_model):
    layer = layer_of(peft_model)
    peft_model.merge_adapter()
    layer(X)
    seen = []
    handle = layer.base_layer.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    layer(X)
    handle.remove()
    assert seen == [torch.Size([5, 8])]


def test_hook_on_base_after_specialising_runs(peft_model):
    layer = layer_of(peft_model)
    layer(X)
    handle = layer.base_layer.register_forward_hook(lambda m, i, o: o * 0)
    try:
        out = layer(X)
    finally:
        handle.remove()
    # the hook zeroed the base output: only the adapter's contribution remains
    torch.testing.assert_close(out, expected(peft_model) - (X @ layer.base_layer.weight.T + layer.base_layer.bias),
                               rtol=0, atol=1e-5)


def test_forward_replaced_on_the_base_instance_is_used(peft_model):
    layer = layer_of(peft_model)
    layer(X)
    base = layer.base_layer
    base.forward = lambda x: torch.zeros(x.shape[0], 8)  # what accelerate's hooks do, in spirit
    try:
        out = layer(X)
    finally:
        del base.forward
    torch.testing.assert_close(out, expected(peft_model) - (X @ base.weight.T + base.bias), rtol=0, atol=1e-5)


def test_replaced_factor_module_is_used(peft_model):
    layer = layer_of(peft_model)
    layer(X)
    new_B = nn.Linear(4, 8, bias=False)
    nn.init.constant_(new_B.weight, 0.5)
    layer.lora_B["default"] = new_B
    torch.testing.assert_close(layer(X), expected(peft_model), rtol=0, atol=1e-5)


def test_scale_change_is_seen(peft_model):
    layer = layer_of(peft_model)
    before = layer(X)
    layer.set_scale("default", 3.0)
    after = layer(X)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected(peft_model), rtol=0, atol=1e-5)


def test_disable_adapter_and_mixed_batch_after_specialising(peft_model):
    layer = layer_of(peft_model)
    layer(X)
    with peft_model.disable_adapter():
        torch.testing.assert_close(layer(X), expected(peft_model), rtol=0, atol=1e-6)
        assert layer.disable_adapters
    names = ["default", "other", "__base__", "default", "other"]
    mixed = peft_model(X, adapter_names=names)
    for i, name in enumerate(names):
        if name == "__base__":
            with peft_model.disable_adapter():
                row = peft_model(X[i:i + 1])
        else:
            peft_model.set_adapter(name)
            row = peft_model(X[i:i + 1])
        torch.testing.assert_close(mixed[i:i + 1], row, rtol=0, atol=1e-5)


def test_other_dtype_input_takes_the_general_path(peft_model):
    layer = layer_of(peft_model)
    layer(X)
    peft_model.double()
    torch.testing.assert_close(layer(X.double()), expected(peft_model, X.double()), rtol=0, atol=1e-10)


def test_deep_copy_follows_the_copy(peft_model):
    layer = layer_of(peft_model)
    layer(X)
    clone = copy.deepcopy(peft_model)
    clone_layer = layer_of(clone)
    assert clone_layer.__dict__["_fast_forward"].__self__ is clone_layer
    with torch.no_grad():
        clone_layer.lora_B["default"].weight.add_(1.0)
        clone_layer.base_layer.weight.add_(1.0)
    torch.testing.assert_close(clone_layer(X), expected(clone), rtol=0, atol=1e-5)
    torch.testing.assert_close(layer(X), expected(peft_model), rtol=0, atol=1e-5)


def test_pickled_model_round_trips(peft_model):
    layer_of(peft_model)(X)
    restored = pickle.loads(pickle.dumps(peft_model))
    torch.testing.assert_close(restored(X), peft_model(X), rtol=0, atol=0)


def test_training_step_through_the_specialised_forward(peft_model):
    peft_model.train()
    layer = layer_of(peft_model)
    loss = layer(X).pow(2).sum()
    loss.backward()
    assert layer.lora_A["default"].weight.grad is not None
    assert layer.lora_B["default"].weight.grad.abs().sum() > 0
    assert layer.base_layer.weight.grad is None


def test_dropout_is_not_specialised_and_dora_has_its_own():
    torch.manual_seed(0)
    expected_forward = {0.5: None, 0.0: "_forward_dora"}
    for dropout, name in expected_forward.items():
        model = get_peft_model(MLP(), LoraConfig(r=4, target_modules=["lin0"], lora_dropout=dropout,
                                                 use_dora=dropout == 0.0))
        layer = layer_of(model)
        layer(X)
        fast = layer.__dict__["_fast_forward"]
        assert (fast and fast.__func__.__name__) == name


def test_global_hook_registered_after_specialising_runs(peft_model):
    layer = layer_of(peft_model)
    layer(X)
    peft_model.merge_adapter()
    layer(X)
    calls = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: calls.append(m))
    try:
        peft_model.unmerge_adapter()
        layer(X)  # specialises again (unmerged), then runs with the hook in place
        layer(X)
        peft_model.merge_adapter()
        layer(X)
        layer(X)
    finally:
        handle.remove()
    # every call reaches the hook for the layer and its base, merged or not
    assert sum(m is layer for m in calls) == 4 and sum(m is layer.base_layer for m in calls) == 4


def test_inference_and_training_paths_agree(peft_model):
    layer = layer_of(peft_model)
    peft_model.base_model.set_adapter(["default", "other"])
    with torch.no_grad():
        inference = layer(X.reshape(5, 1, 8))
    training = layer(X.reshape(5, 1, 8))
    assert training.requires_grad and not inference.requires_grad
    torch.testing.assert_close(inference, training.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(training.detach().reshape(5, 8), expected(peft_model), rtol=0, atol=1e-5)
