"""The user's path through transformers, for the quantization backend plugins' tests.

:func:`run_transformers_flow` saves a tiny ``LlamaForCausalLM``, loads it back with
``AutoModelForCausalLM.from_pretrained(..., quantization_config=...)``, then runs
``prepare_model_for_kbit_training`` -> ``get_peft_model(LoraConfig("all-linear"))`` -> a few
training steps -> ``save_pretrained`` -> ``PeftModel.from_pretrained`` on a freshly loaded
quantized model -> ``merge_and_unload``, asserting along the way. It needs transformers and
transformers; it imports it only when it runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from peft_kernel import PeftModel, get_peft_model, prepare_model_for_kbit_training, quant

VOCAB = 128
STEPS = 5


@dataclasses.dataclass
class FlowResult:
    losses: list[float]
    reload_err: float          # max |logits| difference: reloaded adapter vs trained model
    adapter_effect: float      # max |logits| difference: adapter on vs off
    merged_err: float | None  # max |logits| difference: merge_and_unload vs unmerged


def save_tiny_llama(path: Path, seed: int = 0, hidden_size: int = 32, intermediate_size: int = 64) -> Path:
    """Save a tiny random LlamaForCausalLM (by default hidden 32; 2 layers, 4 heads, 2 key/value
    heads) from a fixed seed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def run_transformers_flow(tmp_path: Path, quantization_config: Callable[[], Any], backend: str,
                          merged_tol: float | None = None, lr: float = 1e-2, hidden_size: int = 32,
                          intermediate_size: int = 64) -> FlowResult:
    """Run the whole user flow for one ``quantization_config`` factory (called once per load).

    ``backend`` is the name :func:`peft_kernel.quant.find_backend` must give every layer the
    adapter wraps. With ``merged_tol`` the reloaded adapter is merged with ``merge_and_unload``
    and the merged logits must lie within ``merged_tol`` of the unmerged ones; the base layers
    must still be ``backend`` layers afterwards. ``hidden_size`` and ``intermediate_size`` size
    the model, for libraries whose kernels need larger layers.
    """
    from transformers import AutoModelForCausalLM

    from .config import LoraConfig

    base_dir = save_tiny_llama(tmp_path / "base", hidden_size=hidden_size, intermediate_size=intermediate_size)
    adapter_dir = tmp_path / "adapter"

    def load():
        return AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=quantization_config(),
                                                    dtype=torch.float32)

    model = load()
    model = prepare_model_for_kbit_training(model)
    model = get_peft_model(model, LoraConfig(target_modules="all-linear", task_type="CAUSAL_LM"))

    wrapped = {name: m.get_base_layer() for name, m in model.named_modules() if hasattr(m, "get_base_layer")}
    assert len(wrapped) == 2 * 7, sorted(wrapped)  # q,k,v,o + gate,up,down per layer; never lm_head
    for name, base in wrapped.items():
        found = quant.find_backend(base)
        assert found is not None and found.name == backend, (name, type(base), found)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable), trainable

    ids = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(STEPS):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0], losses

    model.eval()
    trained = _logits(model, ids)
    model.save_pretrained(adapter_dir)

    reloaded = PeftModel.from_pretrained(load(), adapter_dir)
    reloaded.eval()
    got = _logits(reloaded, ids)
    reload_err = (got - trained).abs().max().item()
    assert reload_err <= 1e-5, reload_err
    with reloaded.disable_adapter():
        adapter_effect = (_logits(reloaded, ids) - got).abs().max().item()
    assert adapter_effect > 1e-3, adapter_effect  # the training really changed the output

    merged_err = None
    if merged_tol is not None:
        merged = reloaded.merge_and_unload()
        for name, _ in wrapped.items():
            layer = merged.get_submodule(name.removeprefix("base_model.model."))
            found = quant.find_backend(layer)
            assert found is not None and found.name == backend, (name, type(layer))
        merged_err = (_logits(merged, ids) - got).abs().max().item()
        assert merged_err <= merged_tol, (merged_err, merged_tol)
        assert merged_err < 0.25 * adapter_effect, (merged_err, adapter_effect)
    print(f"\n[{backend}] losses {[round(x, 4) for x in losses]} reload_err {reload_err:.3g} "
          f"adapter_effect {adapter_effect:.3g} merged_err {merged_err}")
    return FlowResult(losses, reload_err, adapter_effect, merged_err)
