"""One rank of a multi-process test run (started by test_distributed.py, or by hand).

    RANK=0 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 python worker.py <scenario> <out_dir>
    torchrun --nproc-per-node 2 worker.py <scenario> <out_dir>

``<scenario>`` is one or several of these, comma-separated: ``ddp`` (plain
DistributedDataParallel, then accelerate), ``fsdp`` (FSDP2, then FSDP1 with
use_orig_params=True and False), ``deepspeed`` (ZeRO-3). Every rank trains on its half of
one global batch; rank 0 also trains an unwrapped copy on the whole batch (the
single-process reference) and saves it to ``<out_dir>/reference``. Each rank writes what it
observed to ``<out_dir>/<scenario>-rank<r>.json``; the test reads and asserts.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import torch
import torch.distributed as dist
from torch import nn

from peft_kernel import get_peft_model
from peft_kernel.errors import MergeNotSupportedError
from peft_plugin_lora import LoraConfig

STEPS = 3
LR = 0.5
GLOBAL_BATCH = 8
DIM = 16


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(DIM, DIM)
        self.v = nn.Linear(DIM, DIM)

    def forward(self, x):
        return x + self.v(torch.tanh(self.q(x)))


class Tiny(nn.Module):
    """Stands for a transformers model: repeated blocks named in ``_no_split_modules``."""

    _no_split_modules = ["Block"]

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(DIM, 4)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class Custom(Tiny):
    """A custom model: no ``_no_split_modules``."""

    _no_split_modules = None


def make_model(cls=Tiny):
    torch.manual_seed(0)
    base = cls()
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], init_lora_weights=False)
    return get_peft_model(base, config)


def global_batch():
    g = torch.Generator().manual_seed(123)
    return torch.randn(STEPS, GLOBAL_BATCH, DIM, generator=g), torch.randn(STEPS, GLOBAL_BATCH, 4, generator=g)


def local(tensor, rank, world):
    n = tensor.shape[1] // world
    return tensor[:, rank * n:(rank + 1) * n]


def train(model, xs, ys):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    for x, y in zip(xs, ys, strict=True):
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()


def adapter_names(model):
    return {n for n, p in model.named_parameters() if ".lora_" in n}


def merge_error(fn):
    try:
        fn()
    except MergeNotSupportedError as exc:
        return str(exc)
    except Exception as exc:  # the wrong kind of error is a finding too
        return f"WRONG {type(exc).__name__}: {exc}"
    return None


def reference(out, rank, cls=Tiny, name="reference"):
    if rank == 0 and not os.path.exists(os.path.join(out, name)):
        model = make_model(cls)
        xs, ys = global_batch()
        train(model, xs, ys)
        model.save_pretrained(os.path.join(out, name))


# -- scenarios ---------------------------------------------------------------------------------


def scenario_ddp(out, rank, world, report):
    from torch.nn.parallel import DistributedDataParallel as DDP

    xs, ys = (local(t, rank, world) for t in global_batch())
    model = make_model()
    ddp = DDP(model)
    reducer_params, _ = ddp._build_params_for_reducer()
    by_id = {id(p): n for n, p in model.named_parameters()}
    report["reducer_params"] = sorted(by_id[id(p)] for p in reducer_params)
    report["adapter_params"] = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    report["lora_params"] = sorted(adapter_names(model))
    report["reducer_num_tensors"] = ddp._get_ddp_logging_data().get("num_parameter_tensors")
    grads = []
    opt = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=LR)
    for x, y in zip(xs, ys, strict=True):
        nn.functional.mse_loss(ddp(x), y).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        opt.step()
        opt.zero_grad()
    gathered = [torch.zeros_like(grads[-1]) for _ in range(world)]
    dist.all_gather(gathered, grads[-1])
    report["grad_rank_diff"] = max(float((g - gathered[0]).abs().max()) for g in gathered)
    report["frozen_grads"] = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    model.save_pretrained(os.path.join(out, "ddp"), is_main_process=rank == 0)
    model.save_pretrained(os.path.join(out, f"ddp-not-main-{rank}"), is_main_process=False)

    # the same through accelerate (it finds the process group already set up)
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    report["accelerate"] = {
        "num_processes": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type)
    }
    model = make_model()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    wrapped, opt = accelerator.prepare(model, opt)
    report["accelerate"]["wrapper"] = type(wrapped).__name__
    for x, y in zip(xs, ys, strict=True):
        accelerator.backward(nn.functional.mse_loss(wrapped(x), y))
        opt.step()
        opt.zero_grad()
    accelerator.wait_for_everyone()
    accelerator.unwrap_model(wrapped).save_pretrained(os.path.join(out, "accelerate"),
                                                      is_main_process=accelerator.is_main_process)
    reference(out, rank)


def scenario_fsdp(out, rank, world, report):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from peft_kernel.distributed import fsdp_auto_wrap_policy, fully_shard_model
    from peft_kernel.state_dict import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict

    xs, ys = (local(t, rank, world) for t in global_batch())
    full_x = global_batch()[0][0]

    # FSDP2 ------------------------------------------------------------------------------------
    model = make_model()
    fully_shard_model(model)
    report["fsdp2_units"] = sorted(n for n, m in model.named_modules() if isinstance(m, FSDPModule))
    report["fsdp2_dtensor"] = all(type(p).__name__ == "DTensor" for p in model.parameters())
    train(model, xs, ys)
    model.save_pretrained(os.path.join(out, "fsdp2"), is_main_process=rank == 0)  # gathers DTensors itself
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    model.save_pretrained(os.path.join(out, "fsdp2-state-dict"), state_dict=full, is_main_process=rank == 0)
    report["fsdp2_merge_error"] = merge_error(model.merge_adapter)
    report["fsdp2_merge_and_unload_error"] = merge_error(model.merge_and_unload)
    # load the saved adapter back into a freshly sharded model
    dist.barrier()
    fresh = make_model()
    with torch.no_grad():
        for p in fresh.parameters():
            if p.requires_grad:
                p.zero_()
    fully_shard_model(fresh)
    result = set_peft_model_state_dict(fresh, load_peft_weights(os.path.join(out, "fsdp2")))
    report["fsdp2_load_missing"] = list(result.missing_keys)
    report["fsdp2_load_unexpected"] = list(result.unexpected_keys)
    with torch.no_grad():
        report["fsdp2_reload_out"] = fresh(full_x).tolist()
        report["fsdp2_trained_out"] = model(full_x).tolist()
    reloaded = get_peft_model_state_dict(fresh)
    saved = load_peft_weights(os.path.join(out, "fsdp2"))
    report["fsdp2_reload_diff"] = max(float((reloaded[k] - saved[k]).abs().max()) for k in saved)

    # FSDP2 on a custom model (no _no_split_modules): each adapter layer is a unit
    custom = make_model(Custom)
    fully_shard_model(custom)
    report["fsdp2_custom_units"] = sorted(n for n, m in custom.named_modules() if isinstance(m, FSDPModule))
    train(custom, xs, ys)
    custom.save_pretrained(os.path.join(out, "fsdp2-custom"), is_main_process=rank == 0)

    # FSDP1 ------------------------------------------------------------------------------------
    for use_orig in (True, False):
        tag = f"fsdp1-orig{use_orig}"
        cls = Tiny if use_orig else Custom
        peft_model = make_model(cls)
        fsdp = FSDP(peft_model, auto_wrap_policy=fsdp_auto_wrap_policy(peft_model), use_orig_params=use_orig,
                    device_id=torch.device("cpu"))
        report[f"{tag}_units"] = sorted(n.replace("_fsdp_wrapped_module.", "") for n, m in fsdp.named_modules()
                                        if isinstance(m, FSDP))
        train(fsdp, xs, ys)
        try:
            peft_model.save_pretrained(os.path.join(out, f"{tag}-live"), is_main_process=rank == 0)
            report[f"{tag}_live_save_error"] = None
        except ValueError as exc:
            report[f"{tag}_live_save_error"] = str(exc)
        # on CPU, offload_to_cpu=True crashes inside FSDP1; it is for GPUs
        with FSDP.state_dict_type(fsdp, StateDictType.FULL_STATE_DICT,
                                  FullStateDictConfig(offload_to_cpu=False, rank0_only=True)):
            state = fsdp.state_dict()
        peft_model.save_pretrained(os.path.join(out, tag), state_dict=state, is_main_process=rank == 0)
        report[f"{tag}_merge_error"] = merge_error(peft_model.merge_and_unload)
        dist.barrier()
        try:
            set_peft_model_state_dict(peft_model, load_peft_weights(os.path.join(out, tag)))
            report[f"{tag}_load_error"] = None
        except ValueError as exc:
            report[f"{tag}_load_error"] = str(exc)

    reference(out, rank)
    reference(out, rank, Custom, "reference-custom")


def scenario_deepspeed(out, rank, world, report):
    import deepspeed

    xs, ys = (local(t, rank, world) for t in global_batch())
    model = make_model()
    config = {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // world, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "gradient_clipping": 0.0,  # DeepSpeed clips at 1.0 unless told otherwise
              "zero_allow_untested_optimizer": True}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    report["partitioned"] = all(p.numel() == 0 for p in model.parameters())
    trainable, total = model.get_nb_trainable_parameters()
    report["counts"] = [trainable, total]
    for x, y in zip(xs, ys, strict=True):
        loss = nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
    report["merge_error"] = merge_error(model.merge_adapter)
    try:
        model.save_pretrained(os.path.join(out, "zero3-ungathered"), is_main_process=rank == 0)
        report["ungathered_save_error"] = None
    except ValueError as exc:
        report["ungathered_save_error"] = str(exc)
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        model.save_pretrained(os.path.join(out, "zero3"), is_main_process=rank == 0)
    # the documented way to merge under ZeRO-3: gathered, modified on rank 0, re-partitioned on exit
    probe = global_batch()[0][0]
    with torch.no_grad():
        before = engine(probe)
        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
            model.merge_adapter()
        after = engine(probe)
    report["merged_layers"] = sum(bool(getattr(m, "merged", False)) for m in model.modules())
    report["gathered_merge_diff"] = float((before - after).abs().max())
    reference(out, rank)


def main() -> int:
    scenarios, out = sys.argv[1].split(","), sys.argv[2]
    torch.set_num_threads(1)
    if "deepspeed" in scenarios:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    else:
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ok = True
    for scenario in scenarios:
        report: dict = {}
        try:
            globals()[f"scenario_{scenario}"](out, rank, world, report)
            report["ok"] = True
        except Exception:
            ok = report["ok"] = False
            report["traceback"] = traceback.format_exc()
            print(report["traceback"], file=sys.stderr, flush=True)
        with open(os.path.join(out, f"{scenario}-rank{rank}.json"), "w") as fh:
            json.dump(report, fh, indent=1)
        if not ok:
            return 1  # the other rank may wait in a collective: the launcher ends it
        dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
