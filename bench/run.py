#!/usr/bin/env python
"""Side-by-side benchmark: HF PEFT versus peft-kernel (LoRA), on CPU.

Usage::

    python bench/run.py                 # full run (about 5 min on 2 cores), markdown table
    python bench/run.py --quick         # fewer repeats (about 3 min)
    python bench/run.py --json out.json # also write every sample as JSON
    python bench/run.py --clock cpu --rounds 2 --stat min   # on a busy machine
    python bench/run.py --dry-run-hf-only   # both columns use HF PEFT (tests the harness)
    python bench/run.py --smoke --quick     # tiny models: checks the harness in ~1 min

The parent process never imports torch, peft or peft_kernel. Each library's workload runs
in its own fresh interpreter (``--lib hf`` / ``--lib ours`` worker mode), one after the
other, with the same thread count, seeds and model shapes. Imports are timed in further
fresh interpreters. See bench/README.md for what each row means.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
# --smoke (env BENCH_SMOKE=1): tiny models, only to check that the harness runs end to end
SMOKE = os.environ.get("BENCH_SMOKE") == "1"
# --clock cpu (env BENCH_CLOCK=cpu): time with the process's CPU time instead of the wall
# clock. With one torch thread this is the work done, whatever else the machine is running.
CLOCK_NAME = os.environ.get("BENCH_CLOCK", "wall")
CLOCK = time.process_time if CLOCK_NAME == "cpu" else time.perf_counter

IMPORT_STMTS = {
    "torch": "import torch",
    "hf": "import peft",
    "ours": "import peft_kernel; from peft_kernel.plugins import manager; manager().methods()",
    # informational: what a user script imports
    "hf_user": "from peft import get_peft_model, PeftModel, LoraConfig",
    "ours_user": "from peft_kernel import get_peft_model, PeftModel; from peft_plugin_lora import LoraConfig",
}

# --------------------------------------------------------------------------------------
# worker side (runs in a child interpreter; imports torch and exactly one library)
# --------------------------------------------------------------------------------------


def _log(msg: str) -> None:
    print(f"  [{os.environ.get('BENCH_LIB', '?')}] {msg}", file=sys.stderr, flush=True)


def _import_lib(lib: str, dry_run: bool):
    """Return (get_peft_model, PeftModel, LoraConfig) for ``lib``."""
    if lib == "hf" or dry_run:
        from peft import LoraConfig, PeftModel, get_peft_model
    else:
        from peft_kernel import PeftModel, get_peft_model
        from peft_plugin_lora import LoraConfig
    return get_peft_model, PeftModel, LoraConfig


def _models():
    import torch
    from torch import nn

    class Block(nn.Module):
        """Six D×D Linear layers: attention-like q/k/v/o plus an MLP up/down."""

        def __init__(self, d: int) -> None:
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
            self.up, self.down = nn.Linear(d, d), nn.Linear(d, d)

        def forward(self, x):
            x = x + self.o(self.q(x) + self.k(x) + self.v(x))
            return x + self.down(torch.relu(self.up(x)))

    class Deep(nn.Module):
        """``n_blocks`` × 6 Linear(D, D): 144 LoRA targets at the default 24 blocks."""

        def __init__(self, n_blocks: int = 24, d: int = 512) -> None:
            super().__init__()
            if SMOKE:
                n_blocks = 2
            self.blocks = nn.ModuleList(Block(d) for _ in range(n_blocks))

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return x

    class Cell(nn.Module):
        def __init__(self, w: int) -> None:
            super().__init__()
            self.lin = nn.Linear(w, w, bias=False)
            nn.init.orthogonal_(self.lin.weight)  # norm-preserving: no under/overflow over depth

        def forward(self, x):
            return self.lin(x)

    class Wide(nn.Module):
        """``n`` tiny Linear(16, 16) targets applied in sequence (dispatch-bound)."""

        def __init__(self, n: int, w: int = 16) -> None:
            super().__init__()
            if SMOKE:
                n = max(n // 20, 2)
            self.cells = nn.ModuleList(Cell(w) for _ in range(n))

        def forward(self, x):
            for cell in self.cells:
                x = cell(x)
            return x

    return Deep, Wide


class Timer:
    def __init__(self, repeats: int, warmup: int) -> None:
        self.repeats, self.warmup = repeats, warmup
        self.results: dict[str, dict] = {}

    def measure(self, name, fn, setup=None, teardown=None, inner: int = 1, repeats=None, warmup=None):
        """Median over ``repeats`` samples of ``fn`` (per call; ``inner`` calls per sample).

        ``setup()`` (untimed) returns the argument passed to ``fn``; ``teardown(state, out)``
        runs untimed after each sample.
        """
        import gc

        repeats = self.repeats if repeats is None else repeats
        warmup = self.warmup if warmup is None else warmup
        samples = []
        c0 = time.process_time()
        try:
            for i in range(warmup + repeats):
                state = setup() if setup else None
                gc.collect()
                t0 = CLOCK()
                for _ in range(inner):
                    out = fn(state)
                dt = (CLOCK() - t0) / inner
                if teardown:
                    teardown(state, out)
                del out
                if i >= warmup:
                    samples.append(dt)
            self._store(name, samples)
            _log(f"{name}: {statistics.median(samples) * 1e3:.2f} ms "
                 f"(section CPU incl. setup {time.process_time() - c0:.1f} s)")
        except Exception as exc:  # one failing operation must not hide the others
            self._fail(name, exc)
        return self.results[name]

    def _store(self, name, samples):
        self.results[name] = {"median": statistics.median(samples), "min": min(samples), "samples": samples}

    def _fail(self, name, exc):
        import traceback

        traceback.print_exc()
        self.results[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        _log(f"{name}: ERROR {exc!r}")

    def measure_paired(self, fns: dict, inner: int, repeats=None, warmup=None):
        """Time several callables interleaved (A B C A B C ...; order rotated every round).

        Used for forward passes, so that drift in machine load hits base and variants alike.
        """
        import gc

        repeats = self.repeats if repeats is None else repeats
        warmup = self.warmup if warmup is None else warmup
        live = dict(fns)
        samples = {name: [] for name in fns}
        names = list(fns)
        for i in range(warmup + repeats):
            order = names[i % len(names):] + names[:i % len(names)]
            for name in order:
                if name not in live:
                    continue
                gc.collect()
                try:
                    t0 = CLOCK()
                    for _ in range(inner):
                        live[name]()
                    dt = (CLOCK() - t0) / inner
                except Exception as exc:
                    self._fail(name, exc)
                    del live[name]
                    continue
                if i >= warmup:
                    samples[name].append(dt)
        for name in live:
            self._store(name, samples[name])
            _log(f"{name}: {statistics.median(samples[name]) * 1e3:.2f} ms")


def worker(lib: str, out_path: str, quick: bool, dry_run: bool, threads: int) -> None:
    os.environ["BENCH_LIB"] = lib
    import copy
    import gc
    import shutil
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    get_peft_model, PeftModel, LoraConfig = _import_lib(lib, dry_run)
    Deep, Wide = _models()

    rep = 3 if quick else 5
    t = Timer(repeats=rep, warmup=1)
    info = {}

    def cfg(targets):
        return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets)

    deep_targets = ["q", "k", "v", "o", "up", "down"]
    wide_targets = ["lin"]

    torch.manual_seed(0)
    deep = Deep().eval()
    info["deep_targets"] = sum(isinstance(m, torch.nn.Linear) for m in deep.modules())
    wide_sizes = (400, 800, 1600)
    torch.manual_seed(0)
    wide = {n: Wide(n).eval() for n in wide_sizes}
    # Everything that exists now (library import, pristine models) is moved out of the
    # collector's reach, so that gc pauses inside timed regions depend on the objects the
    # operation creates, not on how big the library's import graph is.
    gc.collect()
    gc.freeze()

    # ---- 2. injection ---------------------------------------------------------------
    # HF PEFT needs ~1 ms per target here, so the wide models get fewer repeats.
    wrep = 2 if quick else 3
    t.measure("get_peft_model/deep144", lambda m: get_peft_model(m, cfg(deep_targets)),
              setup=lambda: copy.deepcopy(deep))
    get_peft_model(Wide(64), cfg(wide_targets))  # warm the wide-model code paths once
    for n in wide_sizes:
        t.measure(f"get_peft_model/wide{n}", lambda m: get_peft_model(m, cfg(wide_targets)),
                  setup=lambda n=n: copy.deepcopy(wide[n]), repeats=wrep, warmup=0)

    # ---- 3. add_adapter ---------------------------------------------------------------
    t.measure("add_adapter/deep144", lambda pm: pm.add_adapter("second", cfg(deep_targets)),
              setup=lambda: get_peft_model(copy.deepcopy(deep), cfg(deep_targets)))
    for n in (400, 1600):
        t.measure(f"add_adapter/wide{n}", lambda pm: pm.add_adapter("second", cfg(wide_targets)),
                  setup=lambda n=n: get_peft_model(copy.deepcopy(wide[n]), cfg(wide_targets)),
                  repeats=wrep, warmup=0)

    # ---- 4. forward -------------------------------------------------------------------
    # batch of 3 rows (one per adapter in the mixed batch); small inputs so that the
    # per-layer Python overhead, which is what the libraries differ in, is visible.
    torch.manual_seed(1)
    fw = {
        "deep144": (deep, deep_targets, torch.randn(3, 4, 512), 3),
        "wide400": (wide[400], wide_targets, torch.randn(3, 4, 16), 3),
    }
    fw_rep = 5 if quick else 7
    for key, (base, targets, x, inner) in fw.items():
        with torch.no_grad():
            fns = {f"forward/{key}/base": lambda base=base, x=x: base(x)}
            try:
                torch.manual_seed(2)
                pm = get_peft_model(copy.deepcopy(base), cfg(targets))
                for name in ("b", "c"):
                    pm.add_adapter(name, cfg(targets))
                pm.eval()
                _randomize_lora(pm)
                fns[f"forward/{key}/lora_unmerged"] = lambda pm=pm, x=x: pm(x)
                fns[f"forward/{key}/lora_mixed3"] = lambda pm=pm, x=x: pm(x, adapter_names=["default", "b", "c"])
            except Exception as exc:
                t._fail(f"forward/{key}/lora_unmerged", exc)
            try:
                merged = copy.deepcopy(pm)
                merged.merge_adapter()
                fns[f"forward/{key}/lora_merged"] = lambda merged=merged, x=x: merged(x)
            except Exception as exc:
                t._fail(f"forward/{key}/lora_merged", exc)
            t.measure_paired(fns, inner=inner, repeats=fw_rep)
            fns.clear()
            pm = merged = None

    # ---- 5. training step ---------------------------------------------------------------
    def train_setup():
        torch.manual_seed(3)
        pm = get_peft_model(copy.deepcopy(deep), cfg(deep_targets))
        pm.train()
        params = [p for p in pm.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3)
        x = torch.randn(3, 4, 512)
        return pm, opt, x

    def train_step(state):
        pm, opt, x = state
        for _ in range(3):
            loss = pm(x).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss

    t.measure("train_step/deep144(x3)", train_step, setup=train_setup, repeats=3)
    r = t.results["train_step/deep144(x3)"]
    if "median" in r:  # report per step
        t.results["train_step/deep144"] = {"median": r["median"] / 3, "samples": [s / 3 for s in r["samples"]]}

    # ---- 6. save / load / merge_and_unload ------------------------------------------------
    tmp = tempfile.mkdtemp(prefix="peftbench-")
    try:
        torch.manual_seed(4)
        pm = _randomize_lora(get_peft_model(copy.deepcopy(deep), cfg(deep_targets)))
        counter = iter(range(10**6))

        def save(model):
            d = os.path.join(tmp, f"save-{next(counter)}")
            model.save_pretrained(d)
            return d

        # the model reaches save() through setup, not through the name pm, which is deleted below
        t.measure("save_pretrained/deep144", save, setup=lambda model=pm: model)
        ckpt = os.path.join(tmp, "ckpt")
        pm.save_pretrained(ckpt)
        del pm
        t.measure("from_pretrained/deep144", lambda m: PeftModel.from_pretrained(m, ckpt),
                  setup=lambda: copy.deepcopy(deep))
        t.measure("merge_and_unload/deep144", lambda pm: pm.merge_and_unload(),
                  setup=lambda: _randomize_lora(get_peft_model(copy.deepcopy(deep), cfg(deep_targets))))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    import resource

    info["ru_maxrss_kb_self"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    info.update(_lib_info(lib, dry_run))
    with open(out_path, "w") as f:
        json.dump({"lib": lib, "info": info, "results": t.results}, f)


def _lib_info(lib: str, dry_run: bool) -> dict:
    import torch

    info = {"torch": torch.__version__}
    if lib == "hf" or dry_run:
        import peft

        info["lib_version"] = "peft " + peft.__version__
    else:
        from importlib import metadata

        import peft_kernel

        try:
            version = metadata.version("peft-kernel")
        except metadata.PackageNotFoundError:
            version = getattr(peft_kernel, "__version__", "?")
        info["lib_version"] = f"peft_kernel {version} ({os.path.dirname(peft_kernel.__file__)})"
    return info


#: the sections a worker of their own measures after the main one (--section)
EXTRA_SECTIONS = ("dora", "compile", "many")
DORA_TARGETS = ["q", "k", "v", "o", "up", "down"]


def section_worker(section: str, lib: str, out_path: str, quick: bool, dry_run: bool, threads: int) -> None:
    """The DoRA or the torch.compile rows, in a fresh interpreter of their own."""
    os.environ["BENCH_LIB"] = lib
    import gc
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(threads)
    get_peft_model, _, LoraConfig = _import_lib(lib, dry_run)
    Deep, _ = _models()
    t = Timer(repeats=3 if quick else 5, warmup=1)
    gc.collect()
    gc.freeze()
    rows = {"dora": _dora_rows, "compile": _compile_rows, "many": _many_adapter_rows}[section]
    rows(t, get_peft_model, LoraConfig, Deep, quick)
    with open(out_path, "w") as f:
        json.dump({"lib": lib, "info": _lib_info(lib, dry_run), "results": t.results}, f)


def _dora_rows(t, get_peft_model, LoraConfig, Deep, quick) -> None:
    """48 Linear(512) with DoRA (r=16), x = 8×64×512: inference next to the base model, and a training step."""
    import copy

    import torch

    torch.manual_seed(0)
    base = Deep(n_blocks=8).eval()

    def dora_model(use_dora=True):
        torch.manual_seed(5)
        config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=DORA_TARGETS, use_dora=use_dora)
        return _randomize_lora(get_peft_model(copy.deepcopy(base), config))

    x = torch.randn(8, 64, 512)
    model = dora_model().eval()
    with torch.no_grad():
        t.measure_paired({"dora/forward/base": lambda: base(x), "dora/forward/dora": lambda m=model: m(x)},
                         inner=1, repeats=5 if quick else 9)
    del model

    def setup(use_dora=True):
        model = dora_model(use_dora).train()
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def steps(state):
        model, optimizer = state
        for _ in range(3):
            loss = model(x).pow(2).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss

    # the same step with plain LoRA: the floor a DoRA step shares (base matmuls, A/B gradients, AdamW)
    for key, make in (("dora/train_step", setup), ("dora/train_step_lora", lambda: setup(use_dora=False))):
        t.measure(f"{key}(x3)", steps, setup=make, repeats=3 if quick else 5)
        r = t.results[f"{key}(x3)"]
        if "samples" in r:  # report per step
            t.results[key] = {"median": r["median"] / 3, "samples": [s / 3 for s in r["samples"]]}


MANY_ADAPTERS = 32


def _many_adapter_rows(t, get_peft_model, LoraConfig, Deep, quick) -> None:
    """Mixed batches over many adapters: 12 blocks × 4 Linear(512) (q k v o), 32 LoRA adapters
    (r=8), x = 32 rows × 16 tokens; row i uses adapter i % n for n = 32, 4 and 1 distinct
    adapters, next to the base model."""
    import copy

    import torch
    from torch import nn

    class Attention(nn.Module):
        def __init__(self, d: int) -> None:
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

        def forward(self, x):
            return x + self.o(self.q(x) + self.k(x) + self.v(x))

    torch.manual_seed(0)
    base = nn.Sequential(*(Attention(512) for _ in range(2 if SMOKE else 12))).eval()
    config = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q", "k", "v", "o"])
    model = get_peft_model(copy.deepcopy(base), LoraConfig(**config), adapter_name="a0")
    for i in range(1, MANY_ADAPTERS):
        model.add_adapter(f"a{i}", LoraConfig(**config))
    model = _randomize_lora(model).eval()
    x = torch.randn(MANY_ADAPTERS, 16, 512)
    fns = {"many/forward/base": lambda: base(x)}
    for n in (MANY_ADAPTERS, 4, 1):
        names = [f"a{i % n}" for i in range(MANY_ADAPTERS)]
        fns[f"many/forward/{n}"] = lambda names=names: model(x, adapter_names=names)
    with torch.no_grad():
        t.measure_paired(fns, inner=1, repeats=5 if quick else 9)


def _compile_rows(t, get_peft_model, LoraConfig, Deep, quick) -> None:
    """Eager next to ``torch.compile`` (inductor, default settings) for unmerged LoRA (3
    adapters, one active), a mixed batch over the 3 and DoRA: 12 Linear(512), x = 6×64×512."""
    import copy

    import torch

    torch.manual_seed(0)
    base = Deep(n_blocks=2).eval()
    x = torch.randn(6, 64, 512)
    names = ["default", "b", "c"] * 2

    def adapted(**extra):
        torch.manual_seed(6)
        config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=DORA_TARGETS, **extra)
        model = get_peft_model(copy.deepcopy(base), config)
        if not extra:
            for name in ("b", "c"):
                model.add_adapter(name, config)
        return _randomize_lora(model).eval()

    lora, dora = adapted(), adapted(use_dora=True)
    calls = {"lora": (lora, lambda m: m(x)), "mixed": (lora, lambda m: m(x, adapter_names=names)),
             "dora": (dora, lambda m: m(x))}
    with torch.no_grad():
        for key, (model, call) in calls.items():
            try:
                compiled = torch.compile(model)
                start = time.perf_counter()
                call(compiled)  # compiles (wall clock: inductor runs a C++ compiler in subprocesses)
                t._store(f"compile/{key}/first_call", [time.perf_counter() - start])
                t.measure_paired({f"compile/{key}/eager": lambda m=model, c=call: c(m),
                                  f"compile/{key}/compiled": lambda m=compiled, c=call: c(m)},
                                 inner=1, repeats=5 if quick else 9)
            except Exception as exc:
                t._fail(f"compile/{key}/compiled", exc)


def _randomize_lora(pm):
    """Give every LoRA B matrix non-zero values so merge/forward do real work."""
    import torch

    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    return pm


def rss_worker(lib: str, quick: bool, dry_run: bool, threads: int) -> None:
    """A fixed, small workload whose peak RSS the parent reads with wait4()."""
    os.environ["BENCH_LIB"] = lib
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if lib != "torch":
        get_peft_model, PeftModel, LoraConfig = _import_lib(lib, dry_run)
    Deep, Wide = _models()
    model = Deep()
    x = torch.randn(3, 8, 512)
    if lib == "torch":  # reference: the same model, forward+backward, no adapters
        model.train()
        for p in model.parameters():
            p.requires_grad_(False)
        model.blocks[0].q.weight.requires_grad_(True)
        model(x).pow(2).mean().backward()
        return
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q", "k", "v", "o", "up", "down"])
    pm = get_peft_model(model, cfg)
    pm.add_adapter("second", cfg)
    pm.train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(2):
        pm(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    wide = get_peft_model(Wide(1600), LoraConfig(r=8, lora_alpha=16, target_modules=["lin"]))
    with torch.no_grad():
        wide(torch.randn(3, 4, 16))


# --------------------------------------------------------------------------------------
# parent side (no torch import)
# --------------------------------------------------------------------------------------


def _child_env(threads: int) -> dict:
    env = dict(os.environ)
    for k in list(env):
        if k.startswith("PEFT_KERNEL_"):
            del env[k]
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[k] = str(threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONWARNINGS"] = "ignore"
    return env


def _spawn(argv, env, capture=False):
    """Run ``argv``; return (returncode, wall seconds, ru_maxrss KB of that child, stdout)."""
    out_f = tempfile.TemporaryFile() if capture else None
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, env=env, stdout=out_f if capture else subprocess.DEVNULL,
                         stderr=subprocess.PIPE if capture else None)
    err = b""
    if capture:
        err = p.stderr.read()
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    if CLOCK_NAME == "cpu":  # the child's own CPU time (user + system)
        wall = ru.ru_utime + ru.ru_stime
    p.returncode = os.waitstatus_to_exitcode(status)
    stdout = ""
    if capture:
        out_f.seek(0)
        stdout = out_f.read().decode()
        if p.returncode:
            sys.stderr.write(err.decode()[-2000:])
    return p.returncode, wall, ru.ru_maxrss, stdout


def time_imports(python: str, env: dict, repeats: int, keys) -> dict:
    """Fresh interpreter per sample; interleaved so drift hits every statement equally."""
    res = {k: {"wall": [], "inproc": [], "rss": []} for k in keys}
    for i in range(repeats + 1):  # first round warms the .pyc / page caches
        for k in keys:
            clock = "process_time" if CLOCK_NAME == "cpu" else "perf_counter"
            code = f"import time; t=time.{clock}(); {IMPORT_STMTS[k]}; print(time.{clock}()-t)"
            rc, wall, rss, out = _spawn([python, "-c", code], env, capture=True)
            if rc:
                res[k]["error"] = f"exit code {rc}"
                continue
            if i:
                res[k]["wall"].append(wall)
                res[k]["inproc"].append(float(out.strip().splitlines()[-1]))
                res[k]["rss"].append(rss)
    out = {}
    for k, v in res.items():
        if v.get("error") and not v["wall"]:
            out[k] = {"error": v["error"]}
            continue
        out[k] = {
            "wall": {"median": statistics.median(v["wall"]), "samples": v["wall"]},
            "inproc": {"median": statistics.median(v["inproc"]), "samples": v["inproc"]},
            "rss_kb": max(v["rss"]),
        }
    return out


def _merge_worker(workers: dict, lib: str, got: dict) -> None:
    """Pool the samples of several rounds of one library's worker."""
    if lib not in workers:
        workers[lib] = got
        return
    cur = workers[lib]
    cur["wall_s"] = cur.get("wall_s", 0) + got.get("wall_s", 0)
    for k, v in got.get("results", {}).items():
        old = cur["results"].get(k)
        if old is None or "error" in old:
            cur["results"][k] = v
        elif "samples" in v:
            old["samples"] = old["samples"] + v["samples"]
            old["median"] = statistics.median(old["samples"])


def ours_available(python: str, env: dict) -> tuple[bool, str]:
    code = "from peft_kernel import get_peft_model, PeftModel; from peft_plugin_lora import LoraConfig"
    p = subprocess.run([python, "-c", code], env=env, capture_output=True, text=True)
    return p.returncode == 0, (p.stderr.strip().splitlines() or [""])[-1]


def _fmt_t(s):
    if s is None:
        return "—"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} µs"


STAT = "median"  # or "min" (--stat): which statistic of the samples the table shows


def _stat(r):
    if not isinstance(r, dict) or not r.get("samples"):
        return None
    return min(r["samples"]) if STAT == "min" else statistics.median(r["samples"])


def _med(d, key):
    return _stat(d.get(key) if d else None)


def build_rows(data: dict) -> list[dict]:
    """Rows of the table: metric, hf, ours, ratio, target, verdict."""
    rows = []
    hf, ours = data["workers"].get("hf", {}), data["workers"].get("ours", {})
    hr, orr = hf.get("results", {}), ours.get("results", {})
    imp = data.get("imports", {})

    def add(metric, h, o, fmt=_fmt_t, target="", ok=None, ratio=None):
        if ratio is False:  # explicitly no ratio
            ratio = None
        elif ratio is None and h and o:
            ratio = o / h
        verdict = "" if ok is None else ("PASS" if ok else "MISS")
        rows.append({"metric": metric, "hf": h, "ours": o, "hf_s": fmt(h) if h is not None else "n/a",
                     "ours_s": fmt(o) if o is not None else "n/a",
                     "ratio": ratio, "target": target, "verdict": verdict})

    def ratio_target(metric, h, o, limit):
        ok = None if (h is None or o is None) else o / h <= limit
        add(metric, h, o, target=f"≤ {limit}× HF", ok=ok)

    # 1. imports
    def imp_med(k, kind="wall"):
        v = imp.get(k, {})
        return _stat(v.get(kind)) if "error" not in v else None

    torch_wall = imp_med("torch")
    add("import torch (reference; fresh process, start-up included)", torch_wall, torch_wall)
    ratio_target("import + plugin discovery (fresh process, start-up included)", imp_med("hf"), imp_med("ours"), 0.3)
    add("  same, in-process time only", imp_med("hf", "inproc"), imp_med("ours", "inproc"))
    add("  user imports (ours: get_peft_model, PeftModel, LoraConfig; HF: import peft)", imp_med("hf"),
        imp_med("ours_user"))

    # 2. injection, scaling
    ratio_target("get_peft_model, 24×6 Linear(512) = 144 targets", _med(hr, "get_peft_model/deep144"),
                 _med(orr, "get_peft_model/deep144"), 0.3)
    per_target = {}
    for n in (400, 800, 1600):
        h, o = _med(hr, f"get_peft_model/wide{n}"), _med(orr, f"get_peft_model/wide{n}")
        ratio_target(f"get_peft_model, {n} Linear(16) targets", h, o, 0.3)
        per_target[n] = (h / n if h else None, o / n if o else None)
    for n in (400, 800, 1600):
        h, o = per_target[n]
        lin_ok = None
        target = ""
        if n == 1600 and per_target[400][1] and o:
            growth_o = o / per_target[400][1]
            lin_ok = growth_o <= 1.3
            target = f"linear: per-target(1600)/per-target(400) ≤ 1.3 (ours {growth_o:.2f}"
            if h and per_target[400][0]:
                target += f", HF {h / per_target[400][0]:.2f}"
            target += ")"
        add(f"  per target at {n}", h, o, target=target, ok=lin_ok)

    # 3. add_adapter
    ratio_target("add_adapter (2nd adapter), 24×6 Linear(512) = 144 targets", _med(hr, "add_adapter/deep144"),
                 _med(orr, "add_adapter/deep144"), 0.3)
    add_pt = {}
    for n in (400, 1600):
        h, o = _med(hr, f"add_adapter/wide{n}"), _med(orr, f"add_adapter/wide{n}")
        ratio_target(f"add_adapter (2nd adapter), {n} Linear(16) targets", h, o, 0.3)
        add_pt[n] = (h / n if h else None, o / n if o else None)
    for n in (400, 1600):
        h, o = add_pt[n]
        lin_ok, target = None, ""
        if n == 1600 and add_pt[400][1] and o:
            growth_o = o / add_pt[400][1]
            lin_ok = growth_o <= 1.3
            target = f"linear: per-target(1600)/per-target(400) ≤ 1.3 (ours {growth_o:.2f}"
            if h and add_pt[400][0]:
                target += f", HF {h / add_pt[400][0]:.2f}"
            target += ")"
        add(f"  add_adapter per target at {n}", h, o, target=target, ok=lin_ok)

    # 4. forward
    for key, label in (("deep144", "144 × Linear(512), x=3×4×512"), ("wide400", "400 × Linear(16), x=3×4×16")):
        hb, ob = _med(hr, f"forward/{key}/base"), _med(orr, f"forward/{key}/base")
        add(f"forward base model, {label}", hb, ob)
        for variant, vlabel in (("lora_unmerged", "unmerged LoRA"), ("lora_mixed3", "mixed batch, 3 adapters"),
                                ("lora_merged", "merged (merge_adapter)")):
            h, o = _med(hr, f"forward/{key}/{variant}"), _med(orr, f"forward/{key}/{variant}")
            add(f"forward {vlabel}, {label}", h, o)
            if None in (h, o, hb, ob):
                continue
            h_pct, o_pct = 100 * (h - hb) / hb, 100 * (o - ob) / ob

            def pct(v, _unused=None):
                return f"{v:+.1f} %"

            if variant == "lora_merged":
                ok = o_pct <= 5.0
                add("  overhead over base: merged", h_pct, o_pct, fmt=pct, ratio=False,
                    target="merged = base (ours ≤ +5 %)", ok=ok)
            else:
                # relative overheads: each library against its own base run, so a worker that
                # ran on a busier machine is not penalised
                ratio_ov = (o_pct / h_pct) if h_pct > 0 else None
                target, ok = "", None
                if variant == "lora_unmerged":
                    target = "ours overhead ≤ 0.5× HF overhead"
                    ok = ratio_ov is not None and ratio_ov <= 0.5
                add(f"  overhead over base: {vlabel}", h_pct, o_pct, fmt=pct, ratio=ratio_ov,
                    target=target + (" (ratio = overhead/overhead)" if target else "ratio = overhead/overhead"),
                    ok=ok)

    # 5. training
    add("train step (fwd+bwd+AdamW), 144 targets, x=3×4×512", _med(hr, "train_step/deep144"),
        _med(orr, "train_step/deep144"))

    # 5b. DoRA
    def pct(v, _unused=None):
        return f"{v:+.1f} %"

    label = "48 × Linear(512), r=16, x=8×64×512"
    hb, ob = _med(hr, "dora/forward/base"), _med(orr, "dora/forward/base")
    h, o = _med(hr, "dora/forward/dora"), _med(orr, "dora/forward/dora")
    add(f"forward base model, {label}", hb, ob)
    add(f"forward DoRA (eval, no_grad), {label}", h, o)
    if None not in (h, o, hb, ob):
        h_pct, o_pct = 100 * (h - hb) / hb, 100 * (o - ob) / ob
        ratio_ov = o_pct / h_pct if h_pct > 0 else None
        add("  overhead over base: DoRA inference", h_pct, o_pct, fmt=pct, ratio=ratio_ov,
            target="ours overhead ≤ 0.5× HF overhead (ratio = overhead/overhead)",
            ok=ratio_ov is not None and ratio_ov <= 0.5)
    ratio_target(f"train step DoRA (fwd+bwd+AdamW), {label}", _med(hr, "dora/train_step"),
                 _med(orr, "dora/train_step"), 0.8)
    hl, ol = _med(hr, "dora/train_step_lora"), _med(orr, "dora/train_step_lora")
    add(f"  reference: train step plain LoRA, {label}", hl, ol)
    h, o = _med(hr, "dora/train_step"), _med(orr, "dora/train_step")
    if None not in (h, o, hl, ol):
        h_pct, o_pct = 100 * (h - hl) / hl, 100 * (o - ol) / ol
        add("  overhead over plain LoRA: DoRA train step", h_pct, o_pct, fmt=pct,
            ratio=o_pct / h_pct if h_pct > 0 else None)

    # 5c. mixed batches over many adapters
    def times(v, _unused=None):
        return f"{v:.2f}×"

    label = "12×4 Linear(512), 32 adapters r=8, x=32×16×512"
    hb, ob = _med(hr, "many/forward/base"), _med(orr, "many/forward/base")
    add(f"forward base model, {label}", hb, ob)
    for n in (MANY_ADAPTERS, 4, 1):
        h, o = _med(hr, f"many/forward/{n}"), _med(orr, f"many/forward/{n}")
        add(f"forward mixed batch, {n} distinct adapter{'s' if n > 1 else ''} (row i → adapter i % {n})", h, o)
        if None in (h, o, hb, ob):
            continue
        target, ok = "", None
        if n == MANY_ADAPTERS:
            target, ok = "ours ≤ 1.5× base", o / ob <= 1.5
        add("  same / base", h / hb, o / ob, fmt=times, target=target, ok=ok, ratio=False)
    o_many, o_one = _med(orr, f"many/forward/{MANY_ADAPTERS}"), _med(orr, "many/forward/1")
    h_many, h_one = _med(hr, f"many/forward/{MANY_ADAPTERS}"), _med(hr, "many/forward/1")
    if None not in (o_many, o_one, h_many, h_one):
        add(f"  {MANY_ADAPTERS} distinct / 1 distinct", h_many / h_one, o_many / o_one, fmt=times, ratio=False,
            target="flat in the number of adapters: ours ≤ 1.15", ok=o_many / o_one <= 1.15)

    # 5d. torch.compile (--compile)
    for key, what in (("lora", "unmerged LoRA (3 adapters, 1 active)"), ("mixed", "mixed batch, 3 adapters"),
                      ("dora", "DoRA")):
        he, oe = _med(hr, f"compile/{key}/eager"), _med(orr, f"compile/{key}/eager")
        hc, oc = _med(hr, f"compile/{key}/compiled"), _med(orr, f"compile/{key}/compiled")
        if None in (he, oe) and None in (hc, oc):
            continue
        add(f"forward {what}, 12 × Linear(512), x=6×64×512, eager", he, oe)
        add("  same, torch.compile (inductor)", hc, oc)
        if None not in (he, oe, hc, oc):
            add("  compiled / eager", hc / he, oc / oe, fmt=times)
        add("  first compiled call (compilation, wall)", _med(hr, f"compile/{key}/first_call"),
            _med(orr, f"compile/{key}/first_call"))

    # 6. checkpoint + merge
    for key, label in (("deep144", "144 targets"),):
        add(f"save_pretrained, {label}", _med(hr, f"save_pretrained/{key}"), _med(orr, f"save_pretrained/{key}"))
        add(f"PeftModel.from_pretrained, {label}", _med(hr, f"from_pretrained/{key}"),
            _med(orr, f"from_pretrained/{key}"))
        add(f"merge_and_unload, {label}", _med(hr, f"merge_and_unload/{key}"), _med(orr, f"merge_and_unload/{key}"))

    # 7. memory
    def mb(kb, _unused=None):
        return f"{kb / 1024:.0f} MB"

    rss = data.get("rss", {})
    add("peak RSS: import + discovery only", imp.get("hf", {}).get("rss_kb"), imp.get("ours", {}).get("rss_kb"),
        fmt=mb)
    add("peak RSS: import torch only (reference)", imp.get("torch", {}).get("rss_kb"),
        imp.get("torch", {}).get("rss_kb"), fmt=mb)
    add("peak RSS: workload (144-target model, 2 adapters, 2 train steps, 1600-target model)",
        rss.get("hf"), rss.get("ours"), fmt=mb)
    add("peak RSS: same model, no adapters, torch only (reference)", rss.get("torch"), rss.get("torch"), fmt=mb)
    return rows


def render(rows, data) -> str:
    lines = []
    meta = data["meta"]
    lines.append(f"peft-kernel vs HF PEFT — {meta['date']} — {meta['platform']}, python {meta['python']}, "
                 f"torch {meta.get('torch', '?')}, threads={meta['threads']}, statistic: {meta['stat']}, "
                 f"clock: {meta.get('clock', 'wall')}, repeats: "
                 f"{'quick' if meta['quick'] else 'full'}; "
                 f"HF = {meta.get('hf_version', '?')}, ours = {meta.get('ours_version', '?')}")
    if meta.get("smoke"):
        lines.append("**SMOKE RUN: tiny models; the numbers mean nothing.**")
    if meta.get("dry_run"):
        lines.append("**DRY RUN: the 'peft-kernel' column is HF PEFT too (harness check).**")
    if meta.get("load_before") is not None:
        lines.append(f"load average before run: {meta['load_before']:.2f} (cores: {meta['cores']})")
    lines.append("")
    lines.append("| metric | HF PEFT | peft-kernel | ratio (ours/HF) | target | |")
    lines.append("|---|---:|---:|---:|---|---|")
    for r in rows:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}×"
        lines.append(f"| {r['metric']} | {r['hf_s']} | {r['ours_s']} | {ratio} | {r['target']} | {r['verdict']} |")
    errors = []
    for lib, w in data["workers"].items():
        for k, v in w.get("results", {}).items():
            if "error" in v:
                errors.append(f"- {lib} {k}: {v['error']}")
        if "error" in w:
            errors.append(f"- {lib} worker: {w['error']}")
    if errors:
        lines.append("")
        lines.append("Errors:")
        lines.extend(errors)
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--json", metavar="PATH", help="write all raw samples and the table rows as JSON")
    ap.add_argument("--dry-run-hf-only", action="store_true",
                    help="use HF PEFT for both columns (checks the harness before peft-kernel exists)")
    ap.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads in every worker (default 1)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny models (2 blocks, targets/20): checks the harness in seconds; numbers meaningless")
    ap.add_argument("--stat", choices=["median", "min"], default="median",
                    help="statistic shown in the table (min is steadier on a busy machine)")
    ap.add_argument("--render", metavar="PATH", help="only re-print the table of a saved --json file")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall clock (default) or the process's CPU time, which a busy machine disturbs less")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run each library's worker this many times, alternating order, and pool the samples")
    ap.add_argument("--python", default=sys.executable, help="interpreter for the workers")
    ap.add_argument("--skip", default="",
                    help="comma list of sections to skip: imports,workers,dora,many,rss (workers: the main worker)")
    ap.add_argument("--compile", action="store_true",
                    help="also time torch.compile against eager (inductor; several minutes of compilation)")
    # worker modes (used by the parent; not for direct use)
    ap.add_argument("--lib", choices=["hf", "ours", "torch"], help=argparse.SUPPRESS)
    ap.add_argument("--section", choices=EXTRA_SECTIONS, help=argparse.SUPPRESS)
    ap.add_argument("--rss-workload", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.lib and args.rss_workload:
        rss_worker(args.lib, args.quick, args.dry_run_hf_only, args.threads)
        return 0
    if args.lib and args.section:
        section_worker(args.section, args.lib, args.out, args.quick, args.dry_run_hf_only, args.threads)
        return 0
    if args.lib:
        worker(args.lib, args.out, args.quick, args.dry_run_hf_only, args.threads)
        return 0

    global STAT, CLOCK_NAME, CLOCK
    STAT = args.stat
    if not args.lib:
        CLOCK_NAME = args.clock
        CLOCK = time.process_time if CLOCK_NAME == "cpu" else time.perf_counter
    if args.render:
        with open(args.render) as f:
            data = json.load(f)
        data["meta"]["stat"] = args.stat
        print(render(build_rows(data), data))
        return 0
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    env = _child_env(args.threads)
    if args.smoke:
        env["BENCH_SMOKE"] = "1"
    env["BENCH_CLOCK"] = args.clock
    py = args.python
    load = os.getloadavg()[0]
    cores = os.cpu_count()
    if load > 0.75 * cores:
        print(f"warning: load average {load:.2f} on {cores} cores; timings will be noisy "
              "(consider --clock cpu --stat min --rounds 2)", file=sys.stderr)

    dry = args.dry_run_hf_only
    if not dry:
        ok, why = ours_available(py, env)
        if not ok:
            print(f"peft-kernel is not importable ({why}); use --dry-run-hf-only to test the harness",
                  file=sys.stderr)
            return 2
    data = {"meta": {"date": time.strftime("%Y-%m-%d %H:%M"), "platform": platform.platform(terse=True),
                     "processor": platform.processor() or platform.machine(), "cores": cores,
                     "python": platform.python_version(), "threads": args.threads, "quick": args.quick,
                     "dry_run": dry, "smoke": args.smoke, "rounds": args.rounds, "stat": args.stat,
                     "clock": args.clock, "load_before": load},
            "imports": {}, "workers": {}, "rss": {}}
    t_start = time.perf_counter()

    # 1. imports
    if "imports" not in skip:
        print("== imports (fresh interpreters)", file=sys.stderr, flush=True)
        keys = ["torch", "hf", "ours", "ours_user"]
        saved = dict(IMPORT_STMTS)
        if dry:
            IMPORT_STMTS["ours"], IMPORT_STMTS["ours_user"] = IMPORT_STMTS["hf"], IMPORT_STMTS["hf_user"]
        data["imports"] = time_imports(py, env, 2 if args.quick else 4, keys)
        IMPORT_STMTS.update(saved)

    # 2.-6. one worker per library, sequentially
    script = os.path.abspath(__file__)
    common = ["--threads", str(args.threads)] + (["--quick"] if args.quick else []) + \
             (["--dry-run-hf-only"] if dry else [])
    sections = [[]] if "workers" not in skip else []
    sections += [["--section", "dora"]] if "dora" not in skip else []
    sections += [["--section", "many"]] if "many" not in skip else []
    sections += [["--section", "compile"]] if args.compile else []
    for rnd in range(args.rounds):
        for lib in ("hf", "ours") if rnd % 2 == 0 else ("ours", "hf"):
            for section in sections:
                print(f"== worker {lib} {' '.join(section[1:]) or 'main'} (round {rnd + 1}/{args.rounds})",
                      file=sys.stderr, flush=True)
                with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
                    out = f.name
                rc, wall, rss, _ = _spawn([py, script, "--lib", lib, "--out", out] + section + common, env)
                try:
                    with open(out) as f:
                        got = json.load(f)
                except (OSError, ValueError):
                    got = {"error": f"worker exited with {rc}", "results": {}}
                finally:
                    os.unlink(out)
                if not section:
                    got["wall_s"], got["rss_kb"] = wall, rss
                _merge_worker(data["workers"], lib, got)

    # 7. peak RSS of a fixed workload, one fresh process each
    if "rss" not in skip:
        print("== peak RSS", file=sys.stderr, flush=True)
        for lib in ("torch", "hf", "ours"):
            rc, wall, rss, _ = _spawn([py, script, "--lib", lib, "--rss-workload"] + common, env)
            data["rss"][lib] = rss if rc == 0 else None

    for lib, key in (("hf", "hf_version"), ("ours", "ours_version")):
        data["meta"][key] = data["workers"].get(lib, {}).get("info", {}).get("lib_version")
    data["meta"]["torch"] = data["workers"].get("hf", {}).get("info", {}).get("torch")
    data["meta"]["total_s"] = time.perf_counter() - t_start
    rows = build_rows(data)
    data["rows"] = [{k: v for k, v in r.items()} for r in rows]
    table = render(rows, data)
    print(table)
    print(f"\n(total {data['meta']['total_s']:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
