"""Quick start: LoRA on a tiny Llama built from a config (no downloads).

Fine-tunes a few steps on a toy task, saves the adapter in HF PEFT's format, reloads it,
merges it, and checks that the merged model gives the same outputs as the adapter.
"""

import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from peft_kernel import PeftModel, get_peft_model
from peft_plugin_lora import LoraConfig


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def main() -> None:
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                    task_type="CAUSAL_LM"))
    model.print_trainable_parameters()

    # toy task: continue an arithmetic sequence of token ids
    starts = torch.randint(0, 32, (16, 1))
    batch = (starts + torch.arange(12)) % 64
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for step in range(30):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 5 == 0 or step == 29:
            print(f"step {step:2d}  loss {loss.item():.4f}")

    model.eval()
    with tempfile.TemporaryDirectory() as out:
        model.save_pretrained(out)
        reloaded = PeftModel.from_pretrained(tiny_llama(), out)
        with torch.no_grad():
            adapted = reloaded(input_ids=batch).logits
            merged = reloaded.merge_and_unload()
            merged_logits = merged(input_ids=batch).logits
    diff = (adapted - merged_logits).abs().max().item()
    print(f"saved, reloaded and merged: max |adapter - merged| = {diff:.2e}")
    assert diff < 1e-4, "merged model differs from the adapter"
    print("OK")


if __name__ == "__main__":
    main()
