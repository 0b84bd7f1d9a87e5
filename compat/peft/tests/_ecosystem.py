"""Helpers shared by the ecosystem tests: tiny models, a word-level tokenizer, a token dataset,
and the HF PEFT oracle (run in subprocesses; see conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
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


class HFPeft:
    """An interpreter whose ``import peft`` is HF PEFT, started once and fed code snippets (each
    run with its own globals), so that the oracle's imports are paid for once per session."""

    SERVER = textwrap.dedent("""
        import json, os, sys, traceback
        replies = os.fdopen(os.dup(1), "w")
        os.dup2(2, 1)  # what the snippets print goes to stderr, the replies alone to the pipe
        import peft
        assert peft.__file__.startswith(sys.argv[1]), peft.__file__
        for line in sys.stdin:
            try:
                exec(json.loads(line), {})
                reply = {"ok": True}
            except BaseException:
                reply = {"ok": False, "error": traceback.format_exc()}
            replies.write(json.dumps(reply) + "\\n")
            replies.flush()
    """)

    def __init__(self) -> None:
        path = os.environ.get("PEFT_KERNEL_HF_PEFT_PATH")
        if not path or not os.path.isdir(os.path.join(path, "peft")):
            pytest.fail("PEFT_KERNEL_HF_PEFT_PATH must name a folder with HF PEFT installed (tox -e ecosystem sets it)")
        env = {**os.environ, "PYTHONPATH": path, "TRANSFORMERS_VERBOSITY": "error"}
        self.log = tempfile.TemporaryFile("w+")  # its stderr, shown when it dies
        self.process = subprocess.Popen([sys.executable, "-c", self.SERVER, path], env=env, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log)

    def run(self, code: str, definitions: str = "", timeout: float = 300) -> None:
        """Run ``code`` in the HF PEFT interpreter, after ``import torch`` and ``definitions`` (both
        dedented); its exceptions fail the test, with their traceback."""
        import json
        import select

        source = "import torch\n" + textwrap.dedent(definitions) + "\n" + textwrap.dedent(code)
        self.process.stdin.write(json.dumps(source) + "\n")
        self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        line = self.process.stdout.readline() if ready else ""
        if not line:
            self.close()
            self.log.seek(0)
            pytest.fail(f"the HF PEFT interpreter gave no answer; its stderr ends with:\n{self.log.read()[-3000:]}")
        reply = json.loads(line)
        assert reply["ok"], reply["error"]

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        self.log.close()


def hf_peft_causal_logits(hf_peft: HFPeft, base_dir: str, adapter_dir: str, out_file: str) -> torch.Tensor:
    """Logits of HF PEFT's ``PeftModel.from_pretrained(base, adapter_dir)`` on :data:`PROBE`."""
    hf_peft.run(f"""
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
