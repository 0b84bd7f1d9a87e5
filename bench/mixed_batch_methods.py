"""Mixed batches over 32 adapters for IA3 and VeRA (peft-kernel only: HF PEFT has no mixed
batches for IA3, and its VeRA loops like our per-adapter path): all rows at once against the
kernel's per-adapter path, both over the base model, in one process.

    python bench/mixed_batch_methods.py --method ia3      # or --method vera

12 blocks × 4 Linear(512) (q k v o; IA3 feed-forward on o; VeRA r=256), 32 adapters with
perturbed vectors, x = 32 rows × 16 tokens, row i with adapter i; torch.no_grad(), one thread,
CPU time, minimum over interleaved samples. Checks that both paths agree (1e-5) first.
"""

from __future__ import annotations

import argparse
import copy
import gc
import time

import torch
from torch import nn

from peft_kernel import AdapterLayer, get_peft_model


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        return x + self.o(self.q(x) + self.k(x) + self.v(x))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", choices=["ia3", "vera"], required=True)
    ap.add_argument("--samples", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.method == "ia3":
        from peft_plugin_ia3 import IA3Config as Config
        from peft_plugin_ia3.layer import IA3Layer as Layer

        config = dict(target_modules=["q", "k", "v", "o"], feedforward_modules=["o"])
    else:
        from peft_plugin_vera import VeraConfig as Config
        from peft_plugin_vera.layer import VeraLayer as Layer

        config = dict(target_modules=["q", "k", "v", "o"], r=256)
    torch.manual_seed(0)
    base = nn.Sequential(*(Block(512) for _ in range(12))).eval()
    model = get_peft_model(copy.deepcopy(base), Config(**config), adapter_name="a0")
    for i in range(1, 32):
        model.add_adapter(f"a{i}", Config(**config))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ia3_l" in name or "lambda" in name:
                param.add_(torch.randn(param.shape) * 0.1)
    model.eval()
    x = torch.randn(32, 16, 512)
    names = [f"a{i}" for i in range(32)]
    gathered = Layer.batched_forward

    def per_adapter():
        Layer.batched_forward = AdapterLayer.batched_forward
        try:
            return model(x, adapter_names=names)
        finally:
            Layer.batched_forward = gathered

    calls = {"base": lambda: base(x), "all rows at once": lambda: model(x, adapter_names=names),
             "per-adapter path": per_adapter, "one adapter, no mixed batch": lambda: model(x)}
    gc.collect()
    gc.freeze()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    with torch.no_grad():
        torch.testing.assert_close(calls["all rows at once"](), per_adapter(), rtol=1e-5, atol=1e-5)
        for _ in range(args.samples):
            for name, call in calls.items():
                start = time.process_time()
                call()
                samples[name].append(time.process_time() - start)
    base_time = min(samples["base"])
    for name, times in samples.items():
        print(f"{args.method}  {name:30s} {min(times) * 1e3:8.1f} ms  {min(times) / base_time:5.2f}× base")


if __name__ == "__main__":
    main()
