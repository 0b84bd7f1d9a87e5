"""Forward and training-step cost of weight-delta and weight-transform methods on peft-kernel's
``WeightDeltaLayer`` next to HF PEFT's, on the same CPU in one process.

    python bench/weight_delta.py [--method loha|lokr|oft|all] [--threads 1] [--repeats 20] [--clock cpu]

LoHa rows: one adapted ``nn.Linear`` (fused path ``op(x, W + ΔW) + b``, and the unfused path
``base(x) + op(x, ΔW)`` that quantized, hooked or mixed-dtype bases take) and one adapted
``nn.Conv2d`` in CP form; LoKr the same rows. OFT rows: one adapted ``nn.Linear`` (the input is rotated, then the
base layer runs), with the Cayley-Neumann series and with the exact Cayley transform. Each for
inference (no grad, unmerged) and a training step (forward + backward). Prints the median time
per call and the ratio ours / HF.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import statistics
import time

import peft
import torch
from torch import nn

import peft_kernel


def _timed(fn, repeats: int, clock) -> float:
    for _ in range(3):
        fn()
    samples = []
    for _ in range(repeats):
        start = clock()
        fn()
        samples.append(clock() - start)
    return statistics.median(samples)


def _models(method: str, base: nn.Module, **config):
    hf_config, our_config = {"loha": (peft.LoHaConfig, "peft_plugin_loha:LoHaConfig"),
                             "lokr": (peft.LoKrConfig, "peft_plugin_lokr:LoKrConfig"),
                             "oft": (peft.OFTConfig, "peft_plugin_oft:OFTConfig")}[method]
    module, _, name = our_config.partition(":")
    torch.manual_seed(0)
    hf = peft.get_peft_model(copy.deepcopy(base), hf_config(**config))
    torch.manual_seed(0)
    ours = peft_kernel.get_peft_model(copy.deepcopy(base), getattr(importlib.import_module(module), name)(**config))
    ours.load_state_dict(hf.state_dict())
    return hf, ours


def _step(model, x):
    def run():
        model.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
    return run


def _infer(model, x):
    def run():
        with torch.no_grad():
            model(x)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="cpu")
    parser.add_argument("--method", choices=["loha", "lokr", "oft", "all"], default="all")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    linear = nn.Sequential(nn.Linear(1024, 1024))
    conv = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1))
    tokens = torch.randn(512, 1024)
    images = torch.randn(8, 64, 32, 32)
    cases = []
    for method, cp_rank in (("loha", 8), ("lokr", 2)):  # LoKr: a rank small enough for a low-rank factor
        cases += [
            (method, "Linear 1024, 512 tokens", linear, dict(target_modules=["0"], r=8, init_weights=False), tokens,
             False),
            (method, "Linear 1024, 512 tokens, unfused", linear, dict(target_modules=["0"], r=8, init_weights=False),
             tokens, True),
            (method, "Conv2d 64x3x3 CP, 8x32x32", conv,
             dict(target_modules=["0"], r=cp_rank, init_weights=False, use_effective_conv2d=True), images, False),
        ]
    cases += [
        ("oft", "Linear 1024, 512 tokens, blocks of 32", linear,
         dict(target_modules=["0"], oft_block_size=32, init_weights=False), tokens, False),
        ("oft", "Linear 1024, 512 tokens, blocks of 32, exact Cayley", linear,
         dict(target_modules=["0"], oft_block_size=32, init_weights=False, use_cayley_neumann=False), tokens, False),
        ("oft", "Linear 1024, 8 tokens, blocks of 32", linear,
         dict(target_modules=["0"], oft_block_size=32, init_weights=False), torch.randn(8, 1024), False),
    ]
    print(f"| method | workload | mode | HF PEFT (ms) | ours (ms) | ours / HF |  ({args.clock} time, "
          f"{args.threads} thread(s))")
    print("|---|---|---|---|---|---|")
    for method, name, base, config, x, unfused in cases:
        if args.method not in ("all", method):
            continue
        hf, ours = _models(method, base, **config)
        if unfused:  # a no-op hook: what a hooked (offloaded, quantized, ...) base gets
            ours.base_model.model[0].get_base_layer().register_forward_hook(lambda *a: None)
        for mode, make in (("inference", _infer), ("train step", _step)):
            t_hf = _timed(make(hf, x), args.repeats, clock) * 1e3
            t_ours = _timed(make(ours, x), args.repeats, clock) * 1e3
            print(f"| {method} | {name} | {mode} | {t_hf:.2f} | {t_ours:.2f} | {t_ours / t_hf:.2f} |")


if __name__ == "__main__":
    main()
