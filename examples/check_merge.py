"""Check what the demo produced: the merged model equals base + adapter.

Usage: python examples/check_merge.py ADAPTER_DIR MERGED_DIR
"""

import sys

import torch
from transformers import AutoModelForCausalLM

from peft_kernel import PeftModel
from peft_kernel.cli._models import build_default_model


def main(adapter_dir: str, merged_dir: str) -> None:
    ids = torch.randint(3, 259, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = PeftModel.from_pretrained(build_default_model(), adapter_dir).eval()(input_ids=ids).logits
        base = build_default_model().eval()(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()(input_ids=ids).logits
    print(f"adapter changes the logits by up to {(adapted - base).abs().max():.3f}")
    diff = (adapted - merged).abs().max().item()
    print(f"merged model vs base + adapter: max |difference| = {diff:.2e}")
    if diff > 1e-4:
        sys.exit("the merged model differs from the adapter")
    print("OK: the merged model reproduces the adapter")


if __name__ == "__main__":
    main(*sys.argv[1:3])
