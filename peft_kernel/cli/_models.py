"""Models, tokenizers and text data for the commands — all offline.

The built-in model (``default``) is a tiny Llama built from a fixed config with a fixed
seed: anyone can rebuild exactly the same weights, so adapters trained on it can be
loaded or merged later by naming ``default`` again. It pairs with :class:`ByteTokenizer`,
whose vocabulary is the 256 byte values plus three special tokens.
"""

from __future__ import annotations

import json
import os

from ._common import CLIError

DEFAULT_MODEL = "default"
#: seed of the built-in model's weights; independent of ``--seed`` (which seeds training)
DEFAULT_MODEL_SEED = 0
DEFAULT_MODEL_CONFIG = dict(
    hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
    max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False,
    # wider than transformers' 0.02: the frozen random head must be able to express confident
    # predictions, or no adapter could bring the loss down much
    initializer_range=0.15,
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")

#: task_type of an adapter -> transformers auto class that loads a matching base model
AUTO_CLASSES = {
    None: "AutoModelForCausalLM", "CAUSAL_LM": "AutoModelForCausalLM", "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "SEQ_CLS": "AutoModelForSequenceClassification", "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering", "FEATURE_EXTRACTION": "AutoModel",
}


class ByteTokenizer:
    """UTF-8 bytes as tokens 0-255, then ``<pad>``, ``<s>``, ``</s>``. Needs no files."""

    name = "bytes"
    pad_token_id, bos_token_id, eos_token_id = 256, 257, 258
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return [self.bos_token_id, *text.encode("utf-8"), self.eos_token_id]

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A transformers tokenizer, adapted to the same small interface."""

    name = "auto"

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        self.eos_token_id = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else (self.eos_token_id if self.eos_token_id is not None else 0)
        self.vocab_size = len(tokenizer)

    def encode(self, text: str) -> list[int]:
        ids = list(self.tok(text, add_special_tokens=True)["input_ids"])
        if self.eos_token_id is not None and (not ids or ids[-1] != self.eos_token_id):
            ids.append(self.eos_token_id)
        return ids

    def decode(self, ids) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


def check_model_arg(model: str | None) -> None:
    """Cheap validation before anything heavy is imported."""
    if model is None or model == DEFAULT_MODEL:
        return
    if not os.path.isdir(model):
        raise CLIError(
            f"model directory {model!r} not found (give a local transformers model directory, or "
            f"'{DEFAULT_MODEL}' for the built-in tiny model; nothing is downloaded)"
        )
    if not os.path.isfile(os.path.join(model, "config.json")):
        raise CLIError(f"{model!r} is not a transformers model directory (it has no config.json)")


def build_default_model():
    """The built-in tiny causal LM, identical on every call."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = ByteTokenizer
    config = LlamaConfig(vocab_size=tok.vocab_size, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, **DEFAULT_MODEL_CONFIG)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(DEFAULT_MODEL_SEED)
        with torch.device("cpu"):
            model = LlamaForCausalLM(config)
    return model.eval()


def load_model(model: str | None, task_type: str | None = "CAUSAL_LM", auto_mapping: dict | None = None):
    """``default`` → the built-in model; a directory → the transformers auto class for ``task_type``."""
    if model is None or model == DEFAULT_MODEL:
        return build_default_model()
    check_model_arg(model)
    import transformers

    cls_name = AUTO_CLASSES.get(task_type)
    if task_type is None and auto_mapping and auto_mapping.get("base_model_class"):
        cls_name = auto_mapping["base_model_class"] if hasattr(transformers, auto_mapping["base_model_class"]) \
            else cls_name
    if cls_name is None:
        raise CLIError(f"don't know which transformers class loads a base model for task_type {task_type!r}")
    try:
        return getattr(transformers, cls_name).from_pretrained(model)
    except (OSError, ValueError, KeyError) as exc:
        raise CLIError(f"cannot load model {model!r} with transformers.{cls_name}: {_first_line(exc)}") from None


def has_tokenizer_files(model_dir: str) -> bool:
    return any(os.path.isfile(os.path.join(model_dir, f)) for f in TOKENIZER_FILES)


def load_tokenizer(model: str | None, model_vocab_size: int | None = None):
    """The model's own tokenizer when its directory has one, else :class:`ByteTokenizer`."""
    if model is not None and model != DEFAULT_MODEL and has_tokenizer_files(model):
        from transformers import AutoTokenizer

        try:
            return HFTokenizer(AutoTokenizer.from_pretrained(model))
        except (OSError, ValueError) as exc:
            raise CLIError(f"cannot load the tokenizer of {model!r}: {_first_line(exc)}") from None
    tok = ByteTokenizer()
    if model_vocab_size is not None and model_vocab_size < tok.vocab_size:
        raise CLIError(
            f"{model!r} has no tokenizer files and its vocabulary ({model_vocab_size} tokens) is too small for the "
            f"built-in byte tokenizer ({tok.vocab_size} tokens); add tokenizer files to the model directory"
        )
    return tok


# -- text data --------------------------------------------------------------------------


def default_data_path() -> str:
    from importlib import resources

    return str(resources.files("peft_kernel.data").joinpath("tiny_sentences.jsonl"))


def load_texts(path: str | None) -> list[str]:
    """Examples from JSONL (a ``"text"`` field per line) or plain text (one per line).

    Blank lines are skipped. A malformed line is an error that names its line number.
    """
    path = path or default_data_path()
    if os.path.isdir(path):
        raise CLIError(f"--data {path!r} is a directory; give one JSONL file (a \"text\" field per line) or a "
                       "text file (one example per line)")
    if not os.path.isfile(path):
        raise CLIError(f"data file {path!r} not found")
    is_jsonl = path.lower().endswith((".jsonl", ".json", ".ndjson"))
    texts: list[str] = []
    try:
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                line = line.rstrip("\r\n")
                if not line.strip():
                    continue
                if not is_jsonl:
                    texts.append(line)
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise CLIError(f"{path}, line {lineno}: not valid JSON ({exc.msg})") from None
                if not isinstance(record, dict) or "text" not in record:
                    raise CLIError(f"{path}, line {lineno}: expected an object with a \"text\" field")
                if not isinstance(record["text"], str):
                    raise CLIError(f"{path}, line {lineno}: \"text\" must be a string")
                texts.append(record["text"])
    except UnicodeDecodeError:
        raise CLIError(f"data file {path!r} is not UTF-8 text") from None
    if not texts:
        raise CLIError(f"data file {path!r} has no examples")
    return texts


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
