"""Train LoRA on a tiny Llama with several processes, save it in HF PEFT's format, merge later.

    torchrun --standalone --nproc-per-node 2 examples/distributed_lora.py --mode ddp   --output out-ddp
    torchrun --standalone --nproc-per-node 2 examples/distributed_lora.py --mode fsdp2 --output out-fsdp2
    torchrun --standalone --nproc-per-node 2 examples/distributed_lora.py --mode fsdp1 --output out-fsdp1

Runs on CPU (gloo) or GPUs (nccl, one per process). See docs/distributed.md.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from peft_kernel import PeftModel, get_peft_model
from peft_kernel.distributed import fsdp_auto_wrap_policy, fully_shard_model
from peft_plugin_lora import LoraConfig


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["ddp", "fsdp2", "fsdp1"], default="ddp")
    parser.add_argument("--output", default="lora-out")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    model = get_peft_model(tiny_llama(), LoraConfig(r=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    model.to(device)
    if args.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(model, device_ids=[device.index] if cuda else None)
    elif args.mode == "fsdp2":
        wrapped = fully_shard_model(model)  # each LlamaDecoderLayer (from _no_split_modules) + the root
    else:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        wrapped = FSDP(model, auto_wrap_policy=fsdp_auto_wrap_policy(model), use_orig_params=False,
                       device_id=device)

    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(rank)  # each rank its own data
    for step in range(args.steps):
        input_ids = torch.randint(0, 128, (4, 16), generator=generator).to(device)
        loss = wrapped(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if rank == 0:
            print(f"step {step + 1} loss {loss.item():.4f}")

    # every rank calls save_pretrained; only the main process writes
    if args.mode == "fsdp1":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=cuda))
        model.save_pretrained(args.output, state_dict=state, is_main_process=rank == 0)
    else:
        model.save_pretrained(args.output, is_main_process=rank == 0)  # FSDP2's DTensors are gathered here
    dist.barrier()

    if rank == 0:  # merging happens on one process, into an unsharded base model
        merged = PeftModel.from_pretrained(tiny_llama(), args.output).merge_and_unload()
        print(f"saved {args.output}; merged into {type(merged).__name__}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
