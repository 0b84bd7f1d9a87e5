"""Differential tests against HF PEFT (the oracle): the same config and the same weights must give
the same outputs, and checkpoints must load in both directions with the same keys and config
fields. HF PEFT (``import peft``) is needed only when these helpers run.

    hf, ours = make_pair(M.llama, peft.PrefixTuningConfig(**kw), PrefixTuningConfig(**kw))
    assert_close(output(ours(**inputs)), output(hf(**inputs)), "logits")
    assert_checkpoints_interchangeable(hf, ours, M.llama, inputs, tmp_path)

Where HF PEFT is wrong, test against the math instead and keep the comparison as a
``pytest.mark.xfail(strict=True, reason=...)``.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

#: fp32 tolerance of output comparisons
ATOL = 1e-5


def output(out: Any) -> torch.Tensor:
    """The main output tensor of a model call: logits, question-answering start/end logits
    (stacked on a last dimension), the last hidden state, or the tensor itself."""
    if isinstance(out, torch.Tensor):
        return out
    if getattr(out, "start_logits", None) is not None:
        return torch.stack((out.start_logits, out.end_logits), dim=-1)
    if getattr(out, "logits", None) is not None:
        return out.logits
    return out.last_hidden_state


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, atol: float = ATOL) -> None:
    assert actual.shape == expected.shape, f"{what}: {tuple(actual.shape)} vs {tuple(expected.shape)}"
    assert torch.isfinite(actual).all() and torch.isfinite(expected).all(), f"{what}: non-finite values"
    diff = (actual.float() - expected.float()).abs().max().item()
    assert diff <= atol, f"{what}: max abs difference {diff:.3g} > {atol}"


def make_pair(model_fn: Callable[[], nn.Module], hf_config, config, *, seed: int = 1, perturb: bool = True,
              scale: float = 0.5) -> tuple[nn.Module, nn.Module]:
    """``(hf, ours)``: HF PEFT's and our PeftModel on two fresh bases, built under the same seed
    (so their initial adapters agree when the initialisations do). With ``perturb``, HF's
    trainable tensors are moved away from their initial values and copied into ours."""
    import peft

    from .. import get_peft_model

    torch.manual_seed(seed)
    hf = peft.get_peft_model(model_fn(), copy.deepcopy(hf_config))
    torch.manual_seed(seed)
    ours = get_peft_model(model_fn(), copy.deepcopy(config))
    if perturb:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, param in hf.named_parameters():
                if param.requires_grad:
                    param.add_(torch.randn(param.shape, generator=generator).to(param.dtype) * scale)
        ours.load_state_dict(hf.state_dict())
    return hf.eval(), ours.eval()


def trainable_names(model: nn.Module) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


def assert_same_structure(hf: nn.Module, ours: nn.Module, fields: Iterable[str] = ()) -> None:
    """Same task class, state-dict keys, trainable tensors, parameter counts and config ``fields``."""
    assert type(ours).__name__ == type(hf).__name__
    assert set(ours.state_dict()) == set(hf.state_dict())
    assert trainable_names(ours) == trainable_names(hf)
    assert ours.get_nb_trainable_parameters() == hf.get_nb_trainable_parameters()
    ours_config, hf_config = ours.peft_config["default"], hf.peft_config["default"]
    for field in fields:
        assert getattr(ours_config, field) == getattr(hf_config, field), field


def saved_files(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(adapter_config.json as a dict, adapter_model.safetensors tensors)`` of a saved adapter."""
    from safetensors.torch import load_file

    with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as fh:
        config = json.load(fh)
    return config, load_file(os.path.join(path, "adapter_model.safetensors"))


def assert_checkpoints_interchangeable(hf: nn.Module, ours: nn.Module, model_fn: Callable[[], nn.Module],
                                       inputs: Callable[[], dict], tmp_path, *,
                                       config_may_differ: Iterable[str] = ("peft_version", "modules_to_save"),
                                       atol: float = ATOL) -> None:
    """Both save; the files hold the same keys, tensors and config fields; each library loads the
    other's checkpoint onto a fresh base and reproduces HF's output on ``inputs()``; loaded
    adapters are frozen."""
    import peft

    from .. import PeftModel

    hf.save_pretrained(os.path.join(tmp_path, "hf"))
    ours.save_pretrained(os.path.join(tmp_path, "ours"))
    hf_config, hf_tensors = saved_files(os.path.join(tmp_path, "hf"))
    our_config, our_tensors = saved_files(os.path.join(tmp_path, "ours"))
    assert sorted(our_tensors) == sorted(hf_tensors)
    for key, tensor in hf_tensors.items():
        assert_close(our_tensors[key], tensor, f"saved tensor {key}", atol=atol)
    assert set(our_config) == set(hf_config)
    differ = {key for key in hf_config if hf_config[key] != our_config[key]}
    assert differ <= set(config_may_differ), f"config fields differ: {sorted(differ)}"
    with torch.no_grad():
        expected = output(hf(**inputs()))
        ours_from_hf = PeftModel.from_pretrained(model_fn(), os.path.join(tmp_path, "hf")).eval()
        hf_from_ours = peft.PeftModel.from_pretrained(model_fn(), os.path.join(tmp_path, "ours")).eval()
        assert_close(output(ours_from_hf(**inputs())), expected, "ours loading HF's checkpoint", atol=atol)
        assert_close(output(hf_from_ours(**inputs())), expected, "HF loading our checkpoint", atol=atol)
    assert type(ours_from_hf).__name__ == type(hf_from_ours).__name__
    assert not trainable_names(ours_from_hf), "a loaded adapter must be frozen"


def transformers_renamed_the_cache() -> bool:
    """Whether transformers takes the key/value cache as ``cache`` (5.2x) rather than
    ``past_key_values``, the only name HF PEFT 0.21.2 knows: its prompt-learning generation and
    its prefix tuning on task heads go wrong when this is true. Feature-detected."""
    import inspect

    from transformers.generation.utils import GenerationMixin

    return "past_key_values" not in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters


def assert_same_outputs(hf: nn.Module, ours: nn.Module, inputs: dict, atol: float = ATOL) -> None:
    """Same output (and loss, when there is one) for the same ``inputs``, without gradients."""
    with torch.no_grad():
        expected, actual = hf(**inputs), ours(**inputs)
    assert_close(output(actual), output(expected), "output", atol=atol)
    if getattr(expected, "loss", None) is not None:
        assert_close(actual.loss, expected.loss, "loss", atol=atol)


def assert_same_gradients(hf: nn.Module, ours: nn.Module, inputs: dict, atol: float = ATOL) -> None:
    """In training mode (dropout seeded alike), the loss of ``inputs`` gives every trainable tensor
    the same gradient in both."""
    for model in (hf, ours):
        model.train()
        torch.manual_seed(3)
        model(**inputs).loss.backward()
    hf_params = dict(hf.named_parameters())
    for name, param in ours.named_parameters():
        if param.requires_grad:
            assert_close(param.grad, hf_params[name].grad, f"gradient of {name}", atol=atol)
