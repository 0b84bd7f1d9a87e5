"""A mixed batch (``adapter_names=``) is per call: threads running different batches through
one model each get their own routing, and plain calls keep their specialised forwards."""

from __future__ import annotations

import random
import sys
import threading

import pytest
import torch
from torch import nn

from peft_kernel import AdapterLayer, get_peft_model
from peft_plugin_lora import LoraConfig


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(6, 8)
        self.lin1 = nn.Linear(8, 3)
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        return self.head(self.lin1(torch.relu(self.lin0(x))))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = get_peft_model(MLP(), LoraConfig(target_modules=["lin0", "lin1"], modules_to_save=["head"],
                                             init_lora_weights=False), adapter_name="a")
    model.add_adapter("b", LoraConfig(target_modules=["lin0", "lin1"], modules_to_save=["head"], lora_alpha=64,
                                      init_lora_weights=False))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".b." in name or name.endswith(".b.weight"):
                param.add_(torch.randn_like(param))
    return model.eval()


BATCHES = [["a", "b", "__base__", "a"], ["b", "b", "a", "__base__"], ["__base__", "a", "b", "b"], None]


def test_threads_running_different_mixed_batches_each_get_their_own(model):
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = [model(x, adapter_names=names) if names else model(x) for names in BATCHES]
    assert not torch.equal(expected[0], expected[1])
    failures = []

    def worker(seed):
        rng = random.Random(seed)
        with torch.no_grad():
            for _ in range(40):
                i = rng.randrange(len(BATCHES))
                try:
                    got = model(x, adapter_names=BATCHES[i]) if BATCHES[i] else model(x)
                except Exception as exc:  # noted below, with the batch that raised it
                    failures.append(f"{BATCHES[i]}: {exc!r}")
                    continue
                if not torch.equal(got, expected[i]):
                    failures.append(f"{BATCHES[i]}: wrong output")

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: a race shows up at once
    try:
        threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not failures, f"{len(failures)} of 320 calls went wrong, e.g. {failures[:3]}"


def test_mixed_batch_leaves_no_state_and_keeps_specialised_forwards(model):
    x = torch.randn(4, 6)
    with torch.no_grad():
        model(x)
        layers = [m for m in model.modules() if isinstance(m, AdapterLayer)]
        specialised = [m.__dict__.get("forward") for m in layers]
        assert all(f is not None for f in specialised)
        model(x, adapter_names=BATCHES[0])
        assert [m.__dict__.get("forward") for m in layers] == specialised  # not dropped per call
        assert all(m.batch_adapter_names is None for m in model.modules() if hasattr(m, "batch_adapter_names"))
        with pytest.raises(ValueError, match="entries but the batch has"):
            model(x, adapter_names=["a"] * 3)
        assert all(m.batch_adapter_names is None for m in layers)  # a failed call leaves nothing behind
