"""Multi-process training: DDP (plain and through accelerate), FSDP2, FSDP1, ZeRO-3, and the
``finetune`` command under ``torchrun`` / ``accelerate launch``.

Each launch starts 2 real processes on CPU with the gloo backend (the environment
``torchrun`` would give them). They train LoRA on their halves of one global batch; the
saved adapters must equal the single-process run on the whole batch (rank 0 trains that
reference itself) to 1e-5.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
WORKER = HERE / "worker.py"
TIMEOUT = 420
ATOL = 1e-5


def _load_worker():
    spec = importlib.util.spec_from_file_location("peft_kernel_dist_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


worker = _load_worker()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    env.pop("PEFT_KERNEL_DEBUG", None)
    return env


def launch(scenarios: str, out: Path, nprocs: int = 2, extra_env: dict | None = None) -> dict:
    """Start ``nprocs`` ranks of worker.py (the env:// contract torchrun uses); returns the
    reports ``{scenario: [rank 0 report, rank 1 report, ...]}``."""
    port = _free_port()
    procs = []
    for rank in range(nprocs):
        env = _env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nprocs), LOCAL_WORLD_SIZE=str(nprocs),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **(extra_env or {}))
        log = open(out / f"rank{rank}.log", "w")
        procs.append((subprocess.Popen([sys.executable, str(WORKER), scenarios, str(out)], env=env, stdout=log,
                                       stderr=subprocess.STDOUT), log))
    codes = []
    try:
        for proc, _ in procs:
            try:
                codes.append(proc.wait(timeout=TIMEOUT))
            except subprocess.TimeoutExpired:
                codes.append("timeout")
            if codes[-1] != 0:
                break  # a failed rank leaves its peer waiting in a collective
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    reports = {}
    for scenario in scenarios.split(","):
        reports[scenario] = []
        for rank in range(nprocs):
            path = out / f"{scenario}-rank{rank}.json"
            reports[scenario].append(json.loads(path.read_text()) if path.exists() else None)
    if any(c != 0 for c in codes):
        logs = "\n".join(f"--- rank {r} ---\n{(out / f'rank{r}.log').read_text()[-6000:]}" for r in range(nprocs))
        pytest.fail(f"worker exit codes {codes}\n{logs}")
    return reports


def load_adapter(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def assert_same_adapter(path: Path, reference: Path) -> None:
    got, want = load_adapter(path), load_adapter(reference)
    assert sorted(got) == sorted(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=ATOL, rtol=0, msg=key)
    assert json.loads((path / "adapter_config.json").read_text())["peft_type"] == "LORA"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One 2-process launch running the ddp and fsdp scenarios (imports cost more than training)."""
    out = tmp_path_factory.mktemp("dist")
    return out, launch("ddp,fsdp", out)


# -- DDP ----------------------------------------------------------------------------------------


def test_ddp_reduces_only_adapter_parameters(run):
    _, reports = run
    for report in reports["ddp"]:
        assert report["reducer_params"] == report["adapter_params"] == report["lora_params"]
        assert report["reducer_num_tensors"] == len(report["lora_params"]) == 8
        assert report["frozen_grads"] == []
        assert report["grad_rank_diff"] == 0.0  # gradients synchronised


def test_ddp_saves_once_and_matches_single_process(run):
    out, _ = run
    assert_same_adapter(out / "ddp", out / "reference")
    assert not (out / "ddp-not-main-0").exists() and not (out / "ddp-not-main-1").exists()
    untrained = worker.make_model()
    from peft_kernel.state_dict import get_peft_model_state_dict

    moved = max(float((v - get_peft_model_state_dict(untrained)[k].detach()).abs().max())
                for k, v in load_adapter(out / "ddp").items())
    assert moved > 1e-2  # the comparison is not between two untrained adapters


def test_accelerate_ddp_matches_single_process(run):
    out, reports = run
    for report in reports["ddp"]:
        assert report["accelerate"] == {"num_processes": 2, "distributed_type": "DistributedType.MULTI_CPU",
                                        "wrapper": "DistributedDataParallel"}
    assert_same_adapter(out / "accelerate", out / "reference")


# -- FSDP2 --------------------------------------------------------------------------------------


def test_fsdp2_shards_blocks_and_matches_single_process(run):
    out, reports = run
    report = reports["fsdp"][0]
    assert report["fsdp2_units"] == ["", "base_model.model.blocks.0", "base_model.model.blocks.1"]
    assert report["fsdp2_dtensor"]
    assert_same_adapter(out / "fsdp2", out / "reference")  # save_pretrained gathered the DTensors
    assert_same_adapter(out / "fsdp2-state-dict", out / "reference")  # full state dict passed in


def test_fsdp2_custom_model_shards_adapter_layers(run):
    out, reports = run
    assert reports["fsdp"][0]["fsdp2_custom_units"] == [
        "", "base_model.model.blocks.0.q", "base_model.model.blocks.0.v", "base_model.model.blocks.1.q",
        "base_model.model.blocks.1.v"]
    assert_same_adapter(out / "fsdp2-custom", out / "reference-custom")


def test_fsdp2_load_into_sharded_model(run):
    _, reports = run
    for report in reports["fsdp"]:
        assert report["fsdp2_load_missing"] == [] and report["fsdp2_load_unexpected"] == []
        assert report["fsdp2_reload_diff"] == 0.0
        torch.testing.assert_close(torch.tensor(report["fsdp2_reload_out"]),
                                   torch.tensor(report["fsdp2_trained_out"]), atol=1e-6, rtol=0)


def test_merging_sharded_model_raises_with_advice(run):
    _, reports = run
    for report in reports["fsdp"]:
        for key in ("fsdp2_merge_error", "fsdp2_merge_and_unload_error", "fsdp1-origTrue_merge_error",
                    "fsdp1-origFalse_merge_error"):
            message = report[key]
            assert message and not message.startswith("WRONG"), (key, message)
            assert "sharded" in message and "merge_and_unload()" in message and "save_pretrained" in message


# -- FSDP1 --------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_orig_params", [True, False])
def test_fsdp1_with_wrap_policy_matches_single_process(run, use_orig_params):
    out, reports = run
    tag = f"fsdp1-orig{use_orig_params}"
    units = reports["fsdp"][0][f"{tag}_units"]
    lora_units = [u for u in units if ".lora_" in u]
    assert len(lora_units) == 8  # every adapter leaf is its own unit (trainable never shares a flat param)
    # blocks come from _no_split_modules; the custom model (orig False) has none and still wraps
    assert ("base_model.model.blocks.0" in units) == use_orig_params
    reference = "reference" if use_orig_params else "reference-custom"
    assert_same_adapter(out / tag, out / reference)
    message = reports["fsdp"][0][f"{tag}_live_save_error"]
    assert message and "state_dict=" in message and "FullyShardedDataParallel" in message
    message = reports["fsdp"][0][f"{tag}_load_error"]  # loading goes before wrapping
    assert message and "before wrapping" in message and "FullyShardedDataParallel" in message


def test_fsdp_checkpoint_loads_in_hf_peft(run):
    """The FSDP1-saved checkpoint (keys stripped of _fsdp_wrapped_module) is plain HF PEFT format."""
    peft = pytest.importorskip("peft")
    out, _ = run
    from peft_kernel import PeftModel

    torch.manual_seed(0)
    base = worker.Custom()
    x = torch.randn(3, worker.DIM)
    ours = PeftModel.from_pretrained(base, str(out / "fsdp1-origFalse"))
    with torch.no_grad():
        expected = ours(x)
    torch.manual_seed(0)
    hf = peft.PeftModel.from_pretrained(worker.Custom(), str(out / "fsdp1-origFalse"))
    with torch.no_grad():
        torch.testing.assert_close(hf(x), expected, atol=1e-6, rtol=0)


# -- ZeRO-3 -------------------------------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_deepspeed_zero3(tmp_path):
    reports = launch("deepspeed", tmp_path)
    for report in reports["deepspeed"]:
        assert report["partitioned"]
        assert report["counts"] == [512, 1668]  # counted with ds_numel, not the empty local shards
        assert "ZeRO-3" in report["merge_error"] and "GatheredParameters" in report["merge_error"]
        assert "ZeRO-3" in report["ungathered_save_error"]
        assert report["merged_layers"] == 4 and report["gathered_merge_diff"] < 1e-5
    assert_same_adapter(tmp_path / "zero3", tmp_path / "reference")


# -- the finetune command -----------------------------------------------------------------------


FINETUNE = ["-m", "peft_kernel.cli", "finetune", "--method", "lora", "--steps", "3", "--batch-size", "2",
            "--seq-len", "16", "--seed", "0"]


def _bin(name: str) -> str:
    path = Path(sys.executable).parent / name
    if not path.exists():
        pytest.skip(f"{name} is not installed next to {sys.executable}")
    return str(path)


def _check_cli_run(result, output: Path) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert result.stdout.count("saved LORA adapter") == 1, result.stdout  # only the main process reports
    assert " x2" in result.stdout
    state = json.loads((output / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 3
    assert sorted(p.name for p in output.parent.iterdir()) == [output.name]  # no leftover staging directory


def test_finetune_under_torchrun(tmp_path):
    output = tmp_path / "run" / "adapter"
    output.parent.mkdir()
    result = subprocess.run([_bin("torchrun"), "--standalone", "--nproc-per-node", "2", *FINETUNE,
                             "--output", str(output)], capture_output=True, text=True, env=_env(), timeout=TIMEOUT)
    _check_cli_run(result, output)


@pytest.mark.skipif(os.environ.get("PEFT_KERNEL_SLOW") != "1", reason="slow (another 2-process launch); set "
                    "PEFT_KERNEL_SLOW=1 to run")
def test_finetune_under_accelerate_launch(tmp_path):
    output = tmp_path / "run" / "adapter"
    output.parent.mkdir()
    # on a machine without GPUs, --multi_gpu starts the processes on CPU (gloo); --cpu alone starts ONE process
    result = subprocess.run([_bin("accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
                             "1", "--mixed_precision", "no", "--dynamo_backend", "no", *FINETUNE,
                             "--output", str(output)], capture_output=True, text=True, env=_env(), timeout=TIMEOUT)
    _check_cli_run(result, output)


# -- in-process: wrap policy and sharding checks (no process group needed) ----------------------


def _policy_decisions(model: nn.Module, policy) -> set[str]:
    return {name for name, module in model.named_modules()
            if name and policy(module=module, recurse=False, nonwrapped_numel=0)}


def test_wrap_policy_from_no_split_modules(monkeypatch):
    from peft_kernel.distributed import block_classes, fsdp_auto_wrap_policy

    monkeypatch.delenv("FSDP_TRANSFORMER_CLS_TO_WRAP", raising=False)
    model = worker.make_model()
    assert block_classes(model) == {worker.Block}
    wrapped = _policy_decisions(model, fsdp_auto_wrap_policy(model))
    assert {"base_model.model.blocks.0", "base_model.model.blocks.1"} <= wrapped
    assert {n for n in wrapped if ".lora_" in n} == {
        f"base_model.model.blocks.{i}.{m}.lora_{ab}.default" for i in (0, 1) for m in "qv" for ab in "AB"}
    assert not any(n.endswith("base_layer") or n.endswith("head") for n in wrapped)  # frozen leaves are not


def test_wrap_policy_custom_model_and_env(monkeypatch):
    from peft_kernel.distributed import block_classes, fsdp_auto_wrap_policy

    monkeypatch.delenv("FSDP_TRANSFORMER_CLS_TO_WRAP", raising=False)
    custom = worker.make_model(worker.Custom)
    assert block_classes(custom) == set()
    assert len(_policy_decisions(custom, fsdp_auto_wrap_policy(custom))) == 8  # adapter leaves only; no error
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "Block")
    assert block_classes(custom) == {worker.Block}
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "Block,NoSuchLayer")
    with pytest.raises(ValueError, match="NoSuchLayer"):
        fsdp_auto_wrap_policy(custom)
    assert nn.Linear in block_classes(custom, ["Linear"])  # explicit names win over the variable


def test_unsharded_model_is_not_blocked():
    from peft_kernel import distributed

    model = worker.make_model()
    assert distributed.merge_blocker(model) is None
    assert all(distributed.shard_reason(p) is None for p in model.parameters())
    fake = torch.zeros(0)
    fake.ds_numel = 12  # what a ZeRO-3 partition looks like outside a gather
    assert "ZeRO-3" in distributed.shard_reason(fake)
    model.merge_adapter()  # still merges normally
