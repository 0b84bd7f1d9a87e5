"""The LoRA feature tests' own models, next to the kernel's :mod:`peft_kernel.testing.tiny_models`:
a mixture of experts with bare 3-D parameters, the variants' two-layer ``QO`` model and its HF/ours
pair, and adapters saved by HF PEFT."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from peft_kernel.testing import tiny_models

VOCAB = tiny_models.VOCAB


def llama(layers: int = 2):
    return tiny_models.llama(num_hidden_layers=layers)


class Experts(nn.Module):
    """A mixture-of-experts block that keeps its experts as bare 3-D parameters (as
    transformers' MoE models do): every token goes through every expert, weighted evenly."""

    def __init__(self, experts: int = 3, dim: int = 8, hidden: int = 12, transposed: bool = False) -> None:
        super().__init__()
        self.is_transposed = transposed  # (E, in, out) instead of (E, out, in)
        up, down = (experts, 2 * hidden, dim), (experts, dim, hidden)
        if transposed:
            up, down = (experts, dim, 2 * hidden), (experts, hidden, dim)
        self.gate_up_proj = nn.Parameter(torch.randn(up) * 0.2)
        self.down_proj = nn.Parameter(torch.randn(down) * 0.2)

    def forward(self, x):
        out = 0
        for e in range(self.gate_up_proj.shape[0]):
            up, down = self.gate_up_proj[e], self.down_proj[e]
            if self.is_transposed:
                up, down = up.T, down.T
            gate, value = F.linear(x, up).chunk(2, dim=-1)
            out = out + F.linear(F.silu(gate) * value, down)
        return out / self.gate_up_proj.shape[0]


class MoE(nn.Module):
    def __init__(self, transposed: bool = False) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.experts = Experts(transposed=transposed)
        self.router = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.experts(self.proj(x)) + self.router(x))


def moe(transposed: bool = False) -> MoE:
    torch.manual_seed(0)
    return MoE(transposed)


def mlp() -> tiny_models.MLP:
    """Two linear layers, 10 → 20 → 4."""
    torch.manual_seed(0)
    return tiny_models.MLP((10, 20, 4))


def save_hf_lora(path, model_fn, seed: int, **config) -> str:
    """Save a randomly initialised HF PEFT LoRA of ``model_fn()`` to ``path``; returns it."""
    import peft

    model = model_fn()
    torch.manual_seed(seed)
    peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **config)).save_pretrained(str(path))
    return os.fspath(path)


class QO(nn.Module):
    """Two linear layers for the LoRA variants: ``q`` (16 -> 12) and ``o`` (12 -> 8), plus an
    embedding that only the refusal tests target."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(16, 12)
        self.o = nn.Linear(12, 8)
        self.emb = nn.Embedding(10, 16)

    def forward(self, x):
        return self.o(torch.relu(self.q(x)))


def qo() -> QO:
    torch.manual_seed(0)
    return QO()


#: the LoRA settings of the variant tests (scaling 2)
QO_CONFIG = dict(r=4, lora_alpha=8, target_modules=["q", "o"])


def variant_pair(field: str, sub_config, **extra):
    """``(hf, ours)`` in eval mode: HF PEFT's and our LoRA on :func:`qo` with ``field=sub_config``
    (ours; HF's sub-config of the same name is built from its fields), under the same seed."""
    import dataclasses

    import peft
    from peft.tuners.lora import config as hf_config

    from peft_kernel.testing.differential import make_pair
    from peft_plugin_lora import LoraConfig

    hf_sub = getattr(hf_config, type(sub_config).__name__)(**dataclasses.asdict(sub_config))
    return make_pair(qo, peft.LoraConfig(**QO_CONFIG, **{field: hf_sub}, **extra),
                     LoraConfig(**QO_CONFIG, **{field: sub_config}, **extra), perturb=False, seed=1)
