"""A LoRA layer for ``nn.LSTM``, written the way a user or third party would: outside the
LoRA plugin, registered with one call.

Each adapter holds two low-rank updates, one for the input-to-hidden weights and one for
the hidden-to-hidden weights of the (single-layer, unidirectional) LSTM::

    W_ih' = W_ih + s · B_ih A_ih        W_hh' = W_hh + s · B_hh A_hh        s = lora_alpha / r

The forward pass runs the LSTM with the adapted weights through
``torch.func.functional_call``, so the module is never mutated and gradients reach the
factors; merging adds the deltas to the weights in place.

Register it once per process, before creating or loading an adapter::

    import peft_kernel
    peft_kernel.register_layer_mapping(nn.LSTM, LoraLSTM, method="LORA")

The mapping is never saved with the adapter (a checkpoint must not decide which code
runs); a process that loads the adapter registers it again first.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from peft_kernel import PeftWarning
from peft_plugin_lora import LoraLayer


class LoraLSTM(LoraLayer):
    # the two factors of W_ih use LoRA's own containers; W_hh gets two more. Every name
    # starts with "lora_", so trainability, saving and loading need nothing else.
    adapter_layer_names = LoraLayer.adapter_layer_names + ("lora_A_hh", "lora_B_hh")
    supports_mixed_batch = False  # the adapter changes the recurrence for the whole batch

    def __init__(self, base_layer: nn.LSTM, adapter_name: str, r: int = 0, lora_alpha: float = 1,
                 config=None, **kwargs: Any) -> None:
        if not isinstance(base_layer, nn.LSTM):
            raise TypeError(f"LoraLSTM adapts nn.LSTM, got {type(base_layer).__name__}")
        if base_layer.num_layers != 1 or base_layer.bidirectional or base_layer.proj_size:
            raise ValueError("LoraLSTM supports single-layer, unidirectional LSTMs without proj_size")
        if getattr(config, "use_dora", False) or getattr(config, "lora_bias", False):
            raise ValueError("LoraLSTM supports neither DoRA nor lora_bias")
        if getattr(config, "lora_dropout", 0.0):
            warnings.warn("LoraLSTM ignores lora_dropout (the update is applied to the weights).", PeftWarning,
                          stacklevel=2)
        super().__init__(base_layer, adapter_name=adapter_name, **kwargs)
        self.in_features, self.out_features = base_layer.input_size, base_layer.hidden_size
        self.lora_A_hh = nn.ModuleDict({})
        self.lora_B_hh = nn.ModuleDict({})
        self.update_layer(adapter_name, r, lora_alpha, config=config, **kwargs)

    # -- parameters -------------------------------------------------------------------

    def make_factors(self, adapter_name: str, r: int, lora_bias: bool) -> None:
        lstm = self.get_base_layer()
        gates = 4 * lstm.hidden_size  # input, forget, cell and output gates, stacked
        self.lora_A[adapter_name] = nn.Linear(lstm.input_size, r, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r, gates, bias=False)
        self.lora_A_hh[adapter_name] = nn.Linear(lstm.hidden_size, r, bias=False)
        self.lora_B_hh[adapter_name] = nn.Linear(r, gates, bias=False)

    def initialise(self, adapter_name: str, init) -> None:
        """``True``: Kaiming-uniform A, zero B (a new adapter changes nothing);
        ``"gaussian"``: normal A; ``False``: random B too (for tests)."""
        if init not in (True, False, "gaussian"):
            raise ValueError(f"LoraLSTM supports init_lora_weights True, False or 'gaussian', not {init!r}")
        super().initialise(adapter_name, init)  # the W_ih pair
        if init is False:
            return
        with torch.no_grad():
            A = self.lora_A_hh[adapter_name].weight
            if init == "gaussian":
                nn.init.normal_(A, std=1 / self.r[adapter_name])
            else:
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B_hh[adapter_name].weight)

    def deltas(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(ΔW_ih, ΔW_hh) of one adapter, scaled."""
        s = self.scaling[adapter_name]
        d_ih = self.lora_B[adapter_name].weight @ self.lora_A[adapter_name].weight
        d_hh = self.lora_B_hh[adapter_name].weight @ self.lora_A_hh[adapter_name].weight
        return d_ih * s, d_hh * s

    # -- forward ----------------------------------------------------------------------

    def forward_active(self, x, adapter_names, *args: Any, **kwargs: Any):
        lstm = self.base_layer
        if not adapter_names:
            return lstm(x, *args, **kwargs)
        w_ih, w_hh = lstm.weight_ih_l0, lstm.weight_hh_l0
        for name in adapter_names:
            d_ih, d_hh = self.deltas(name)
            w_ih = w_ih + d_ih.to(w_ih.dtype)
            w_hh = w_hh + d_hh.to(w_hh.dtype)
        return functional_call(lstm, {"weight_ih_l0": w_ih, "weight_hh_l0": w_hh}, (x, *args), kwargs)

    # -- merging (two weights, so the single-weight default does not apply) ----------

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        lstm = self.get_base_layer()
        for name in self.adapters_to_merge(adapter_names):
            if not self.has_adapter(name):
                continue
            with torch.no_grad():
                d_ih, d_hh = self.deltas(name)
                new_ih, new_hh = lstm.weight_ih_l0 + d_ih, lstm.weight_hh_l0 + d_hh
                if safe_merge and not (torch.isfinite(new_ih).all() and torch.isfinite(new_hh).all()):
                    raise ValueError(f"NaNs or infs detected when merging adapter {name!r}; nothing was changed")
                lstm.weight_ih_l0.copy_(new_ih)
                lstm.weight_hh_l0.copy_(new_hh)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", PeftWarning, stacklevel=2)
            return
        lstm = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if self.has_adapter(name):
                with torch.no_grad():
                    d_ih, d_hh = self.deltas(name)
                    lstm.weight_ih_l0.sub_(d_ih)
                    lstm.weight_hh_l0.sub_(d_hh)
