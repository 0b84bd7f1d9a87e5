"""LoRA on an ``nn.LSTM`` end to end: register the layer, train, save, reload.

    python contrib/lora_lstm/example.py [--output-dir DIR]

The "reload" part plays a new session: the mapping is removed first (as in a fresh
process), loading fails with an error that says what to do, then the mapping is
registered again and the adapter loads.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lora_lstm import LoraLSTM  # noqa: E402

import peft_kernel  # noqa: E402
from peft_kernel import PeftModel, get_peft_model  # noqa: E402
from peft_plugin_lora import LoraConfig  # noqa: E402


class SequenceClassifier(nn.Module):
    def __init__(self, vocab: int = 20, dim: int = 16, hidden: int = 32, classes: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        out, _ = self.lstm(self.embed(x))
        return self.head(out[:, -1])


def base_model() -> SequenceClassifier:
    torch.manual_seed(0)
    return SequenceClassifier()


def data(n: int = 64, length: int = 8):
    """Label: does token 3 occur in the sequence?"""
    generator = torch.Generator().manual_seed(1)
    x = torch.randint(4, 20, (n, length), generator=generator)
    y = torch.randint(0, 2, (n,), generator=generator)
    x[y == 1, torch.randint(0, length, (int(y.sum()),), generator=generator)] = 3
    return x, y


def train(model: nn.Module, steps: int = 30) -> list[float]:
    x, y = data()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.02)
    losses = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def main(output_dir: str) -> dict:
    peft_kernel.register_layer_mapping(nn.LSTM, LoraLSTM, method="LORA")  # the one registration
    try:
        config = LoraConfig(target_modules=["lstm"], r=4, lora_alpha=8, modules_to_save=["head"])
        model = get_peft_model(base_model(), config)
        trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        losses = train(model)
        model.save_pretrained(output_dir)
        model.eval()
        x, _ = data()
        with torch.no_grad():
            expected = model(x)
    finally:
        peft_kernel.unregister_layer_mapping(nn.LSTM, method="LORA")

    # -- a new session: the mapping is not there until registered again --------------
    try:
        PeftModel.from_pretrained(base_model(), output_dir)
    except ValueError as exc:
        error = str(exc)
    else:
        raise AssertionError("loading an LSTM adapter without the mapping should fail")
    peft_kernel.register_layer_mapping(nn.LSTM, LoraLSTM, method="LORA")
    try:
        loaded = PeftModel.from_pretrained(base_model(), output_dir)
        with torch.no_grad():
            reloaded = loaded(x)
            merged = loaded.merge_and_unload()(x)
    finally:
        peft_kernel.unregister_layer_mapping(nn.LSTM, method="LORA")
    return {"trainable": trainable, "losses": losses, "error_without_mapping": error,
            "max_reload_diff": (reloaded - expected).abs().max().item(),
            "max_merge_diff": (merged - expected).abs().max().item()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default=None)
    args = parser.parse_args()
    out = args.output_dir or tempfile.mkdtemp(prefix="lora-lstm-")
    result = main(out)
    print("trainable:", ", ".join(result["trainable"]))
    print(f"loss: {result['losses'][0]:.4f} -> {result['losses'][-1]:.4f}")
    print(f"saved to {out}: {', '.join(sorted(os.listdir(out)))}")
    print("without the mapping:", result["error_without_mapping"].split(". ")[0])
    print(f"reloaded max |diff| = {result['max_reload_diff']:.2e}; merged max |diff| = {result['max_merge_diff']:.2e}")
