"""A brand-new PEFT method from a plain script: no package, no entry point.

    python contrib/register_method_script.py [--output-dir DIR]

The method, "diagonal" (``peft_type`` ``"DIAGONAL"``), learns one vector per adapted
linear layer and adds it to the weight's diagonal: ``W' = W + diag(d)`` (on the leading
``min(out, in)`` square). It starts at ``d = 0`` (an identity) and merges exactly.

Two calls make it a full method — creation, training, several adapters, saving in HF
PEFT's format, loading, merging:

    peft_kernel.register_peft_method(name="diagonal", config_cls=DiagonalConfig, model_cls=DiagonalModel)
    peft_kernel.register_layer_mapping(nn.Linear, DiagonalLinear, method="DIAGONAL")

Like any registration from code, they are not saved: a process that loads a "DIAGONAL"
adapter runs them first (``register()`` below).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from dataclasses import dataclass, field

import torch
from torch import nn

import peft_kernel
from peft_kernel import BaseTuner, PeftModel, TunerConfig, WeightDeltaLayer, get_peft_model


@dataclass
class DiagonalConfig(TunerConfig):
    init_value: float = field(default=0.0, metadata={"help": "Initial value of the diagonal (0: identity)."})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = "DIAGONAL"


class DiagonalLinear(WeightDeltaLayer):
    """The method is its weight delta; forward, merging and the rest are the kernel's."""

    adapter_layer_names = ("diagonal_vector",)

    def update_layer(self, adapter_name, config, **kwargs):
        size = min(self.in_features, self.out_features)
        self.diagonal_vector[adapter_name] = nn.Parameter(torch.full((size,), float(config.init_value)))

    def get_delta(self, adapter_name):
        """diag(d), padded with zeros to the (out, in) shape of the weight."""
        d = self.diagonal_vector[adapter_name]
        return nn.functional.pad(torch.diag(d), (0, self.in_features - d.shape[0], 0, self.out_features - d.shape[0]))


class DiagonalModel(BaseTuner):
    prefix = "diagonal_"
    layer_cls = DiagonalLinear
    supported_layer_types = ("torch.nn.Linear",)


def register() -> None:
    """Make "DIAGONAL" known to this process (idempotent)."""
    from peft_kernel.plugins import manager

    if "DIAGONAL" not in manager().methods():
        peft_kernel.register_peft_method(name="diagonal", config_cls=DiagonalConfig, model_cls=DiagonalModel)
    peft_kernel.register_layer_mapping(nn.Linear, DiagonalLinear, method="DIAGONAL")


# -- the script -------------------------------------------------------------------------


def base_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))


def main(output_dir: str) -> dict:
    register()
    config = DiagonalConfig(target_modules=["0", "2"])
    model = get_peft_model(base_model(), config)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(128, 8, generator=generator)
    y = (x[:, :1] > 0).long().squeeze(1)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(40):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.save_pretrained(output_dir)
    with torch.no_grad():
        expected = model(x)
    loaded = PeftModel.from_pretrained(base_model(), output_dir)
    with torch.no_grad():
        reloaded = loaded(x)
        merged = loaded.merge_and_unload()(x)
    with open(os.path.join(output_dir, "adapter_config.json")) as fh:
        saved = json.load(fh)
    return {"peft_type": saved["peft_type"], "target_modules": saved["target_modules"], "losses": losses,
            "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad),
            "max_reload_diff": (reloaded - expected).abs().max().item(),
            "max_merge_diff": (merged - expected).abs().max().item()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Register, train, save and reload a brand-new PEFT method.")
    parser.add_argument("--output-dir", default=None)
    args = parser.parse_args()
    out = args.output_dir or tempfile.mkdtemp(prefix="diagonal-")
    result = main(out)
    print(f"peft_type {result['peft_type']}, targets {result['target_modules']}")
    print("trainable:", ", ".join(result["trainable"]))
    print(f"loss: {result['losses'][0]:.4f} -> {result['losses'][-1]:.4f}")
    print(f"saved to {out}: {', '.join(sorted(os.listdir(out)))}")
    print(f"reloaded max |diff| = {result['max_reload_diff']:.2e}; merged max |diff| = {result['max_merge_diff']:.2e}")
