"""Mixed batches (``adapter_names=``) through a LoRA linear layer, all rows at once.

Rather than one sub-batch per adapter, the factors of the layer's adapters are stacked (ranks
zero-padded to the largest, the scaling folded into B) with one all-zero entry at the end for
the rows that get no adapter (``"__base__"``). Each row picks its own A and B from the stacks and
two batched matrix products add ``s·B A x`` to every row: the S-LoRA / Punica "BGMV" idea with
plain torch ops, whose cost does not grow with the number of distinct adapters in a batch.

The stacks hold every adapter of the layer, not only a batch's, so batches of any composition
share them; they are kept between calls (``AdapterLayer.kept``) until a factor or a scaling
changes. Where nothing is kept (autograd recording, training mode, torch.compile) only the
batch's adapters are stacked, on every call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from peft_kernel.layer import plain_call

#: the slot of the stacks in ``AdapterLayer.kept`` (an object: no adapter name can clash with it)
STACKS = object()


def _stackable(layer, name: str, A: nn.Module | None, B: nn.Module | None) -> bool:
    """Plain ``nn.Linear`` factors (no quantized ones) and none of the variants (DoRA, aLoRA,
    an Arrow router, those of ``variants.VARIANTS``), which have math of their own."""
    return (type(A) is nn.Linear and type(B) is nn.Linear and not layer.use_dora.get(name)
            and not layer.alora.get(name) and name not in layer.arrow_config and name not in layer.variant)


def takes_batch(layer, adapter_names: tuple[str, ...]) -> bool:
    """Whether the gathered path gives what the per-adapter one would for these adapters now:
    stackable factors, called without hooks, and no dropout active. Checked on every call (a
    hook or a train/eval switch changes no adapter state), reading the dicts directly."""
    modules_A, modules_B, dropouts = layer.lora_A._modules, layer.lora_B._modules, layer.lora_dropout._modules
    for name in adapter_names:
        A, B, dropout = modules_A.get(name), modules_B.get(name), dropouts.get(name)
        if not (_stackable(layer, name, A, B) and plain_call(A) and plain_call(B)
                and (type(dropout) is nn.Identity
                     or (type(dropout) is nn.Dropout and (not dropout.training or dropout.p == 0)))):
            return False
    return True


def factors(layer, adapter_names: tuple[str, ...] | None = None) -> tuple[tuple[str, ...], list[tuple]]:
    """The adapters to stack (``adapter_names``, or all the layer's stackable ones) with their
    ``(A weight, B weight, B bias or None, scaling)``."""
    modules_A, modules_B = layer.lora_A._modules, layer.lora_B._modules
    if adapter_names is None:
        adapter_names = tuple(name for name, A in modules_A.items()
                              if _stackable(layer, name, A, modules_B.get(name)))
    found = []
    for name in adapter_names:
        params = modules_B[name]._parameters
        found.append((modules_A[name]._parameters["weight"], params["weight"], params["bias"], layer.scaling[name]))
    return adapter_names, found


def stack_factors(factors: list[tuple]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """``(down, up, bias)``: A stacked as ``(n + 1, r, in)``, s·Bᵀ as ``(n + 1, r, out)`` and
    s·b_B as ``(n + 1, out)`` (``None`` when no adapter has a bias), ranks zero-padded to the
    largest r and a last all-zero entry for rows without adapter. Differentiable. ``None``
    when the factors do not share one dtype and device (nothing to stack them in)."""
    first = factors[0][0]
    if any(t is not None and (t.dtype != first.dtype or t.device != first.device) for f in factors for t in f[:3]):
        return None
    rank = max(A.shape[0] for A, *_ in factors)
    down = [F.pad(A, (0, 0, 0, rank - A.shape[0])) for A, *_ in factors]
    up = [F.pad((B * scaling).T, (0, 0, 0, rank - B.shape[1])) for _, B, _, scaling in factors]
    down.append(first.new_zeros(down[0].shape))
    up.append(first.new_zeros(up[0].shape))
    if all(bias is None for _, _, bias, _ in factors):
        return torch.stack(down), torch.stack(up), None
    zeros = first.new_zeros(up[0].shape[1])
    biases = [zeros if bias is None else bias * scaling for _, _, bias, scaling in factors]
    return torch.stack(down), torch.stack(up), torch.stack(biases + [zeros])


def add_rows(result: torch.Tensor, x: torch.Tensor, stacks: tuple, row_adapter: torch.Tensor,
             in_place: bool) -> torch.Tensor:
    """``result`` (``(rows, …, out)``) plus ``s·B A x`` of each row's adapter; ``in_place``:
    written into ``result`` (a fresh tensor that autograd does not record)."""
    down, up, bias = stacks
    rows = x.shape[0]
    tokens = x.reshape(rows, -1, x.shape[-1])
    if tokens.dtype != down.dtype:
        tokens = tokens.to(down.dtype)
    # (rows, r, in) @ (rows, in, tokens), read as (rows, tokens, r): faster on CPU than the
    # other orientation, whose output rows are only r wide
    hidden = torch.bmm(down.index_select(0, row_adapter), tokens.transpose(1, 2)).transpose(1, 2)
    up = up.index_select(0, row_adapter)  # (rows, r, out)
    flat = result.reshape(rows, -1, result.shape[-1])
    if flat.dtype != up.dtype:
        flat = flat + torch.bmm(hidden, up).to(flat.dtype)
    elif in_place:
        flat.baddbmm_(hidden, up)
    else:
        flat = torch.baddbmm(flat, hidden, up)
    if bias is not None:
        row_bias = bias.index_select(0, row_adapter).unsqueeze(1).to(flat.dtype)
        flat = flat.add_(row_bias) if in_place else flat + row_bias
    return flat.view(result.shape)
