"""Helpers shared by the ecosystem tests: tiny models, a word-level tokenizer, a token dataset,
and the HF PEFT oracle (run in subprocesses; see conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

VOCAB = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(29)]  # 32 tokens


def save_tiny_llama(path) -> str:
    """A 1-layer Llama with a 32-word vocabulary and its tokenizer, saved to ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, eos_token_id=1,
                         bos_token_id=None, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer().save_pretrained(path)
    return str(path)


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def load_llama(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


def token_dataset(n: int = 16, length: int = 8, seed: int = 0):
    """Causal-LM rows plus a text column the model does not take (Trainer must drop it)."""
    import datasets

    ids = torch.randint(3, len(VOCAB), (n, length), generator=torch.Generator().manual_seed(seed)).tolist()
    return datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * length] * n, "labels": ids,
                                       "text": [" ".join(VOCAB[i] for i in row) for row in ids]})


PROBE = torch.tensor([[3, 7, 11, 19, 23, 5], [4, 4, 9, 30, 31, 12]])


def hf_peft_run(code: str, timeout: int = 300) -> str:
    """Run ``code`` in a fresh interpreter whose ``import peft`` is HF PEFT; returns its stdout."""
    path = os.environ.get("PEFT_KERNEL_HF_PEFT_PATH")
    if not path or not os.path.isdir(os.path.join(path, "peft")):
        pytest.fail("PEFT_KERNEL_HF_PEFT_PATH must name a folder with HF PEFT installed (tox -e ecosystem sets it)")
    prelude = f"import peft\nassert peft.__file__.startswith({path!r}), peft.__file__\n"
    env = {**os.environ, "PYTHONPATH": path, "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def hf_peft_causal_logits(base_dir: str, adapter_dir: str, out_file: str) -> torch.Tensor:
    """Logits of HF PEFT's ``PeftModel.from_pretrained(base, adapter_dir)`` on :data:`PROBE`."""
    hf_peft_run(f"""
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base_dir!r}), {adapter_dir!r})
        with torch.no_grad():
            torch.save(model(input_ids=torch.tensor({PROBE.tolist()})).logits, {out_file!r})
    """)
    return torch.load(out_file, weights_only=True)


def logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=PROBE).logits
