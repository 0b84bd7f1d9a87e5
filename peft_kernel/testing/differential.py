"""Helpers for differential tests against HF PEFT (the oracle): tiny transformers models,
seeded perturbation, output and checkpoint comparison. Method plugins' test suites use them
so that each carries only its own models and cases::

    from peft_kernel.testing import differential as D

    hf = peft.get_peft_model(D.build(BUILDERS, "mlp"), peft.MyConfig(...))
    ours = peft_kernel.get_peft_model(D.build(BUILDERS, "mlp"), MyConfig(...))
    D.perturb(hf)
    ours.load_state_dict(hf.state_dict())
    D.assert_close(D.run(ours, x), D.run(hf, x), "forward")
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

VOCAB = 64


def tiny_llama() -> nn.Module:
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    return transformers.LlamaForCausalLM(cfg)


def tiny_gpt2() -> nn.Module:
    import transformers

    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    cfg._attn_implementation = "eager"
    return transformers.GPT2LMHeadModel(cfg)


def token_ids(batch: int = 3, length: int = 6, seed: int = 1) -> dict[str, torch.Tensor]:
    """``{"input_ids": ...}`` for the tiny transformers models."""
    return {"input_ids": torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))}


_CACHE: dict = {}


def build(builders: dict[str, Callable[[], nn.Module]], name: str, seed: int = 0) -> nn.Module:
    """A fresh copy of ``builders[name]()`` built under ``seed`` (built once, then copied), in eval mode."""
    key = (builders[name], seed)
    if key not in _CACHE:
        torch.manual_seed(seed)
        _CACHE[key] = builders[name]().eval()
    return copy.deepcopy(_CACHE[key])


def run(model: nn.Module, x: Any, **kwargs: Any) -> torch.Tensor:
    """The model's output (logits for transformers models) without gradients."""
    with torch.no_grad():
        out = model(**x, **kwargs) if isinstance(x, dict) else model(x, **kwargs)
    return out.logits if hasattr(out, "logits") else out


@torch.no_grad()
def perturb(model: nn.Module, seed: int = 1234, scale: float = 0.3) -> None:
    """Seeded noise on every trainable tensor, in name order (an identity adapter proves nothing)."""
    g = torch.Generator().manual_seed(seed)
    for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=g) * scale)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, atol: float = 1e-5) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite output"
    diff = (actual.double() - expected.double()).abs().max().item()
    assert diff <= atol, f"{what}: max abs diff {diff:.3e} > {atol}"


def assert_differs(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert (a - b).abs().max().item() > 1e-4, f"{what}: outputs are identical, the comparison would be vacuous"


def checkpoint_files(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(adapter_config.json as a dict, tensors of adapter_model.safetensors)``."""
    from safetensors.torch import load_file

    with open(Path(path) / "adapter_config.json") as fh:
        config = json.load(fh)
    return config, load_file(Path(path) / "adapter_model.safetensors")


def _canon(value: Any) -> Any:
    """Sets are written as lists in arbitrary order by HF and sorted by us."""
    return sorted(value) if isinstance(value, list) and all(isinstance(v, str) for v in value) else value


def assert_same_checkpoint(ours: Path, theirs: Path) -> None:
    """Both directories hold the same tensors under the same keys and the same config fields
    (``peft_version`` aside)."""
    our_config, our_tensors = checkpoint_files(ours)
    their_config, their_tensors = checkpoint_files(theirs)
    assert set(our_tensors) == set(their_tensors), sorted(set(our_tensors) ^ set(their_tensors))
    for key, value in their_tensors.items():
        assert torch.equal(our_tensors[key], value), key
    assert set(our_config) == set(their_config), sorted(set(our_config) ^ set(their_config))
    for key in their_config:
        if key != "peft_version":
            assert _canon(our_config[key]) == _canon(their_config[key]), (key, our_config[key], their_config[key])


def assert_matches_oracle(hf: nn.Module, ours: nn.Module, x: Any, base_out: torch.Tensor,
                          disabled_is_base: bool = True) -> None:
    """Same adapter weights in HF PEFT's model and ours: the same outputs unmerged, merged (and
    merged == unmerged within 1e-4), unmerged again, disabled (also == ``base_out``, the base
    model's output, unless the adapter trains base tensors such as biases: ``disabled_is_base``)
    and after ``merge_and_unload``. Both models are merged and unloaded on return."""
    expected = run(hf, x)
    assert_differs(expected, base_out, "adapter")
    assert_close(run(ours, x), expected, "forward")
    hf.merge_adapter(), ours.merge_adapter()
    assert_close(run(ours, x), run(hf, x), "merged forward")
    assert_close(run(ours, x), expected, "merged vs unmerged", atol=1e-4)
    hf.unmerge_adapter(), ours.unmerge_adapter()
    assert_close(run(ours, x), run(hf, x), "unmerged forward")
    with hf.disable_adapter(), ours.disable_adapter():
        assert_close(run(ours, x), run(hf, x), "disabled")
        if disabled_is_base:
            assert_close(run(ours, x), base_out, "disabled vs base")
    assert_close(run(ours.merge_and_unload(), x), run(hf.merge_and_unload(), x), "merge_and_unload")


def assert_checkpoints_load_both_ways(hf: nn.Module, ours: nn.Module, fresh_base: Callable[[], nn.Module], x: Any,
                                      tmp_path: Path) -> None:
    """Both save; the files are the same (:func:`assert_same_checkpoint`); ours loads HF's
    checkpoint and HF loads ours, each giving HF's outputs and the same config class."""
    import peft

    import peft_kernel

    expected = run(hf, x)
    hf.save_pretrained(tmp_path / "hf")
    ours.save_pretrained(tmp_path / "ours")
    assert_same_checkpoint(tmp_path / "ours", tmp_path / "hf")
    config_name = type(hf.peft_config["default"]).__name__
    assert type(peft_kernel.PeftConfig.from_pretrained(str(tmp_path / "hf"))).__name__ == config_name
    loaded = peft_kernel.PeftModel.from_pretrained(fresh_base(), str(tmp_path / "hf"))
    assert_close(run(loaded, x), expected, "ours loading HF's checkpoint")
    hf_loaded = peft.PeftModel.from_pretrained(fresh_base(), str(tmp_path / "ours"))
    assert_close(run(hf_loaded, x), expected, "HF loading our checkpoint")
    assert type(hf_loaded.peft_config["default"]).__name__ == config_name
