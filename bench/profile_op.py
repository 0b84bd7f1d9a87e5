#!/usr/bin/env python
"""cProfile one benchmark operation of bench/run.py, for one library.

    python bench/profile_op.py get_peft_model --lib ours            # wide-1600 model
    python bench/profile_op.py add_adapter --model deep --lib hf
    python bench/profile_op.py forward --model wide --n 400 --lib ours
    python bench/profile_op.py import --lib ours                    # import + discovery

Operations: import, get_peft_model, add_adapter, forward, forward_mixed, forward_merged,
train_step, save_pretrained, from_pretrained, merge_and_unload. Prints the top functions by
cumulative and by own (tottime) time; ``--out file.prof`` keeps the raw profile (snakeviz,
``python -m pstats``).
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import os
import pstats
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("op")
    ap.add_argument("--lib", choices=["hf", "ours"], default="ours")
    ap.add_argument("--model", choices=["deep", "wide"], default="wide")
    ap.add_argument("--n", type=int, default=1600, help="targets of the wide model")
    ap.add_argument("--repeat", type=int, default=1, help="profile this many calls (forward: default 20)")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--out", help="write the raw profile here")
    args = ap.parse_args()

    prof = cProfile.Profile()
    if args.op == "import":
        stmt = ("import peft" if args.lib == "hf" else
                "import peft_kernel; from peft_kernel.plugins import manager; manager().methods()")
        t0 = time.perf_counter()
        prof.enable()
        exec(stmt, {})
        prof.disable()
        print(f"{stmt}: {time.perf_counter() - t0:.3f} s under the profiler")
        return _report(prof, args)

    import run as bench
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    get_peft_model, PeftModel, LoraConfig = bench._import_lib(args.lib, False)
    Deep, Wide = bench._models()
    base = Deep().eval() if args.model == "deep" else Wide(args.n).eval()
    targets = ["q", "k", "v", "o", "up", "down"] if args.model == "deep" else ["lin"]
    x = torch.randn(3, 4, 512 if args.model == "deep" else 16)

    def cfg():
        return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets)

    def fresh_pm(n_adapters=1):
        pm = get_peft_model(copy.deepcopy(base), cfg())
        for name in ("b", "c")[: n_adapters - 1]:
            pm.add_adapter(name, cfg())
        return bench._randomize_lora(pm.eval())

    # warm-up once outside the profiler: first-call costs are not what we are after
    get_peft_model(Wide(32), LoraConfig(r=8, lora_alpha=16, target_modules=["lin"]))
    repeat = args.repeat
    tmp = tempfile.mkdtemp()
    op = args.op
    if op == "get_peft_model":
        states = [copy.deepcopy(base) for _ in range(repeat)]
        call = lambda m: get_peft_model(m, cfg())  # noqa: E731
    elif op == "add_adapter":
        states = [fresh_pm() for _ in range(repeat)]
        call = lambda pm: pm.add_adapter("second", cfg())  # noqa: E731
    elif op.startswith("forward"):
        repeat = max(repeat, 20)
        pm = fresh_pm(3)
        if op == "forward_merged":
            pm.merge_adapter()
        kwargs = {"adapter_names": ["default", "b", "c"]} if op == "forward_mixed" else {}
        states = [None] * repeat
        torch.set_grad_enabled(False)
        pm(x, **kwargs)
        call = lambda _: pm(x, **kwargs)  # noqa: E731
    elif op == "train_step":
        pm = fresh_pm().train()
        opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-3)
        states = [None] * max(repeat, 3)

        def call(_):
            pm(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    elif op == "save_pretrained":
        pm = fresh_pm()
        states = [os.path.join(tmp, f"s{i}") for i in range(repeat)]
        call = pm.save_pretrained
    elif op == "from_pretrained":
        fresh_pm().save_pretrained(os.path.join(tmp, "ckpt"))
        states = [copy.deepcopy(base) for _ in range(repeat)]
        call = lambda m: PeftModel.from_pretrained(m, os.path.join(tmp, "ckpt"))  # noqa: E731
    elif op == "merge_and_unload":
        states = [fresh_pm() for _ in range(repeat)]
        call = lambda pm: pm.merge_and_unload()  # noqa: E731
    else:
        ap.error(f"unknown operation {op!r}")

    import gc

    # one untimed call first, so one-time costs (lazy imports, caches) stay out of the profile;
    # ops that consume their state get one extra state for it
    if op in ("get_peft_model", "add_adapter", "from_pretrained", "merge_and_unload", "save_pretrained"):
        extra = {"get_peft_model": lambda: copy.deepcopy(base), "from_pretrained": lambda: copy.deepcopy(base),
                 "add_adapter": fresh_pm, "merge_and_unload": fresh_pm,
                 "save_pretrained": lambda: os.path.join(tmp, "warm")}[op]()
        call(extra)
        del extra
    else:
        call(states[0])
    gc.collect()
    gc.freeze()
    t0 = time.perf_counter()
    prof.enable()
    for s in states:
        call(s)
    prof.disable()
    dt = time.perf_counter() - t0
    print(f"{args.lib} {op} on {args.model}{args.n if args.model == 'wide' else ''}: "
          f"{dt / len(states) * 1e3:.1f} ms per call under the profiler ({len(states)} calls)")
    return _report(prof, args)


def _report(prof, args) -> int:
    if args.out:
        prof.dump_stats(args.out)
    for key in ("cumulative", "tottime"):
        s = io.StringIO()
        st = pstats.Stats(prof, stream=s)
        st.sort_stats(key).print_stats(args.top)
        text = s.getvalue()
        # shorten site-packages paths
        text = text.replace(sys.prefix + "/lib/python3.11/site-packages/", "")
        print(f"===== by {key} =====")
        print(text[text.find("   ncalls"):])
    return 0


if __name__ == "__main__":
    sys.exit(main())
