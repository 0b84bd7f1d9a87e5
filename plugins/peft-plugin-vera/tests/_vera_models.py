"""Tiny models and helpers for the VeRA tests (ours versus HF PEFT as the oracle)."""

from __future__ import annotations

import copy

import torch
from torch import nn

VOCAB = 64


class MLP(nn.Module):
    def __init__(self, bias: bool = True):
        super().__init__()
        self.lin0 = nn.Linear(10, 20, bias=bias)
        self.lin1 = nn.Linear(20, 30, bias=bias)
        self.lin2 = nn.Linear(30, 4, bias=bias)

    def forward(self, x):
        return self.lin2(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


def gpt2():
    import transformers

    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    cfg._attn_implementation = "eager"
    return transformers.GPT2LMHeadModel(cfg)


def llama():
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    return transformers.LlamaForCausalLM(cfg)


BUILDERS = {"mlp": MLP, "mlp_nobias": lambda: MLP(bias=False), "gpt2": gpt2, "llama": llama}

_CACHE: dict = {}


def build(name: str, seed: int = 0) -> nn.Module:
    """A fresh copy of base model ``name`` (same weights for the same seed), in eval mode."""
    if (name, seed) not in _CACHE:
        torch.manual_seed(seed)
        _CACHE[(name, seed)] = BUILDERS[name]().eval()
    return copy.deepcopy(_CACHE[(name, seed)])


def inputs(name: str, batch: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    if name in ("gpt2", "llama"):
        return {"input_ids": torch.randint(0, VOCAB, (batch, 6), generator=g)}
    return torch.randn(batch, 10, generator=g)


def run(model: nn.Module, x, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**x, **kwargs) if isinstance(x, dict) else model(x, **kwargs)
    return out.logits if hasattr(out, "logits") else out


@torch.no_grad()
def perturb(model: nn.Module, seed: int = 1234, scale: float = 0.3) -> None:
    """Seeded noise on every trainable tensor (an identity adapter proves nothing)."""
    g = torch.Generator().manual_seed(seed)
    for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=g) * scale)


def assert_close(actual, expected, what: str, atol: float = 1e-5):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite output"
    diff = (actual.double() - expected.double()).abs().max().item()
    assert diff <= atol, f"{what}: max abs diff {diff:.3e} > {atol}"


def assert_differs(a, b, what: str):
    assert (a - b).abs().max().item() > 1e-4, f"{what}: outputs are identical, the comparison would be vacuous"
