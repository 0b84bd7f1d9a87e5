"""Tiny torch networks for layer-method tests (no transformers needed), each with a seeded input:

* ``"mlp"`` — :class:`MLP`, linear layers ``lin0`` (8→16), ``lin1`` (16→12), ``lin2`` (12→4);
* ``"conv3"`` / ``"conv2"`` — :class:`ConvNet`: ``conv0`` (padding 1) and ``conv1`` (stride 2),
  square kernels of 3 / 2, the convolutions every method adapts (fan-ins 18, 36 / 8, 16);
* ``"odd-conv3"`` / ``"odd-conv2"`` — :class:`OddConvNet`: a ``(k, 1)`` kernel with ``(1, 0)``
  padding, a grouped, dilated, reflect-padded ``k×k`` convolution and a ``Conv1d`` (fan-ins 6, 18,
  12 / 4, 8, 8), the ones implementations get wrong;
* ``"emb"`` — :class:`EmbeddingNet`, an embedding (12×8) and a head;
* ``"llama"`` — :func:`peft_kernel.testing.differential.tiny_llama`.

``build(name)`` gives a fresh copy of the same weights every time, ``inputs(name)`` the same batch.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from . import differential


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0, self.lin1, self.lin2 = nn.Linear(8, 16), nn.Linear(16, 12), nn.Linear(12, 4)

    def forward(self, x):
        return self.lin2(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


class _ConvHead(nn.Module):
    """Convolutions (``convs``), then a linear head sized by one dry run on a 7×7 input."""

    def __init__(self, *convs: nn.Module):
        super().__init__()
        for i, conv in enumerate(convs):
            self.add_module(f"conv{i}", conv)
        self.flatten_before = [isinstance(conv, nn.Conv1d) for conv in convs]  # a Conv1d reads (C, H·W)
        with torch.no_grad():
            features = self.features(torch.zeros(1, 2, 7, 7)).shape[1]
        self.head = nn.Linear(features, 4)

    def features(self, x):
        for i, flatten in enumerate(self.flatten_before):
            x = torch.relu(getattr(self, f"conv{i}")(x.flatten(2) if flatten else x))
        return x.flatten(1)

    def forward(self, x):
        return self.head(self.features(x))


class ConvNet(_ConvHead):
    def __init__(self, kernel: int = 3):
        super().__init__(nn.Conv2d(2, 4, kernel, padding=1), nn.Conv2d(4, 4, kernel, stride=2))


class OddConvNet(_ConvHead):
    def __init__(self, kernel: int = 3):
        super().__init__(nn.Conv2d(2, 4, (kernel, 1), padding=(1, 0)),
                         nn.Conv2d(4, 4, kernel, groups=2, dilation=2, padding=kernel - 1, padding_mode="reflect"),
                         nn.Conv1d(4, 4, kernel))


class EmbeddingNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(12, 8), nn.Linear(8, 4)

    def forward(self, ids):
        return self.head(self.emb(ids))


NETS = {"mlp": MLP, "conv3": ConvNet, "conv2": functools.partial(ConvNet, 2), "odd-conv3": OddConvNet,
        "odd-conv2": functools.partial(OddConvNet, 2), "emb": EmbeddingNet, "llama": differential.tiny_llama}


def build(name: str, seed: int = 0) -> nn.Module:
    """A fresh copy of ``NETS[name]()`` built under ``seed``, in eval mode."""
    return differential.build(NETS, name, seed)


def inputs(name: str, batch: int = 3, seed: int = 1):
    """The seeded input batch of a net (token ids for ``"emb"`` and ``"llama"``)."""
    if name == "llama":
        return differential.token_ids(batch, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    if name == "emb":
        return torch.randint(0, 12, (batch, 5), generator=generator)
    shape = (batch, 8) if name == "mlp" else (batch, 2, 7, 7)
    return torch.randn(*shape, generator=generator)
