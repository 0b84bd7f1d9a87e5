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
from pathlib import Path
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


def assert_same_gradients(hf: nn.Module, ours: nn.Module, inputs: Any, atol: float = ATOL) -> None:
    """In training mode (dropout seeded alike), the loss of ``inputs`` (a dict of keyword inputs or
    one tensor; the model's ``loss``, else the sum of squares of its output) gives every trainable
    tensor the same gradient in both."""
    for model in (hf, ours):
        model.train()
        torch.manual_seed(3)
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
        (out.loss if getattr(out, "loss", None) is not None else output(out).square().sum()).backward()
    hf_params = dict(hf.named_parameters())
    for name, param in ours.named_parameters():
        if param.requires_grad:
            assert_close(param.grad, hf_params[name].grad, f"gradient of {name}", atol=atol)


# -- layer methods: tiny models, seeded perturbation, the full oracle comparison ----------

VOCAB = 64


def tiny_llama(tied: bool = False) -> nn.Module:
    """A seeded-by-the-caller 2-layer Llama; ``tied``: its output head shares the input embeddings' weight."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   tie_word_embeddings=tied)
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
        with torch.random.fork_rng(devices=[]):  # the first build leaves torch's generator as it was
            torch.manual_seed(seed)
            _CACHE[key] = builders[name]().eval()
    return copy.deepcopy(_CACHE[key])


def run(model: nn.Module, x: Any, **kwargs: Any) -> torch.Tensor:
    """The model's output (logits for transformers models) without gradients."""
    with torch.no_grad():
        out = model(**x, **kwargs) if isinstance(x, dict) else model(x, **kwargs)
    return out.logits if hasattr(out, "logits") else out


def each_row_alone(model: nn.Module, x: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
    """What a mixed batch (``adapter_names=``) must give: each row of ``x`` run alone with only
    its adapter active (none for ``"__base__"``), on a copy of the model, so that the model
    under test keeps its state and whatever its layers keep between calls."""
    model = copy.deepcopy(model)
    rows = []
    for row, name in zip(x, adapter_names, strict=True):
        if name == "__base__":
            with model.disable_adapter():
                rows.append(run(model, row[None]))
        else:
            model.set_adapter(name)
            rows.append(run(model, row[None]))
    return torch.cat(rows)


def record_batched_forward(monkeypatch: Any, layer_cls: type) -> list[bool]:
    """Record, per call of ``layer_cls.batched_forward`` (with pytest's ``monkeypatch``), whether it
    took the mixed batch (``True``) or left it to the per-adapter path (``False``)."""
    taken: list[bool] = []
    batched_forward = layer_cls.batched_forward

    def recording(self, *args, **kwargs):
        out = batched_forward(self, *args, **kwargs)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(layer_cls, "batched_forward", recording)
    return taken


@torch.no_grad()
def perturb(model: nn.Module, seed: int = 1234, scale: float = 0.3) -> None:
    """Seeded noise on every trainable tensor, in name order (an identity adapter proves nothing)."""
    g = torch.Generator().manual_seed(seed)
    for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=g) * scale)


def assert_same_tensors(hf: nn.Module, ours: nn.Module) -> None:
    """The same state-dict keys and bit-identical tensors (e.g. what the same seed initialised)."""
    hf_state, our_state = hf.state_dict(), ours.state_dict()
    assert set(our_state) == set(hf_state), sorted(set(our_state) ^ set(hf_state))
    for key, value in hf_state.items():
        assert torch.equal(our_state[key], value), key


def assert_config_matches(config_cls: type, hf_config_cls: type) -> None:
    """``config_cls`` has the fields of HF PEFT's ``hf_config_cls`` with the same defaults (so
    ``adapter_config.json`` files move both ways) and the same ``peft_type``."""
    ours, theirs = config_cls().to_dict(), hf_config_cls().to_dict()
    assert set(ours) == set(theirs), sorted(set(ours) ^ set(theirs))
    for key in theirs:
        if key not in ("peft_version", "peft_type"):
            assert ours[key] == theirs[key], key
    assert str(ours["peft_type"]) == str(getattr(theirs["peft_type"], "value", theirs["peft_type"]))


def add_active_adapter(hf: nn.Module, ours: nn.Module, hf_config, config, name: str = "other") -> None:
    """Add adapter ``name`` to both models, make it active next to the first one, and give ours
    HF's tensors."""
    hf.add_adapter(name, hf_config)
    ours.add_adapter(name, config)
    for model in (hf, ours):
        model.base_model.set_adapter([next(iter(model.peft_config)), name])
    ours.load_state_dict(hf.state_dict())


def assert_merge_keeps_outputs(model: nn.Module, x: Any, atol: float = 1e-4) -> None:
    """The adapter changes the model's output, and merging it keeps the output within ``atol``."""
    unmerged = run(model, x)
    with model.disable_adapter():
        assert_differs(unmerged, run(model, x), "adapter")
    model.merge_adapter()
    assert_close(run(model, x), unmerged, "merged vs unmerged", atol=atol)


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


def assert_same_initial_state(hf: nn.Module, ours: nn.Module) -> None:
    """Both models hold bit-identical tensors under the same keys, and the same ones are trainable
    (for models created under the same seed: the initialisations draw alike)."""
    theirs, mine = hf.state_dict(), ours.state_dict()
    assert set(mine) == set(theirs), sorted(set(mine) ^ set(theirs))
    for key, value in theirs.items():
        assert torch.equal(mine[key], value), key
    assert trainable_names(ours) == trainable_names(hf)


def assert_same_training(hf: nn.Module, ours: nn.Module, x: Any, steps: int = 4, gradients: bool = True,
                         atol: float = 1e-4) -> None:
    """In training mode, with torch's global generator seeded alike before each call, ``steps``
    forward passes give the same outputs (the training-time dropouts draw alike; some calls may
    skip every adapter) and, with ``gradients``, backward gives every trainable tensor the same
    accumulated gradient."""
    hf.train(), ours.train()
    for seed in range(steps):
        torch.manual_seed(seed)
        expected = hf(**x) if isinstance(x, dict) else hf(x)
        torch.manual_seed(seed)
        got = ours(**x) if isinstance(x, dict) else ours(x)
        expected, got = output(expected), output(got)
        assert_close(got, expected, f"training forward, seed {seed}")
        assert got.requires_grad == expected.requires_grad
        if expected.requires_grad:
            expected.square().sum().backward()
            got.square().sum().backward()
    if gradients:
        hf_grads = {name: p.grad for name, p in hf.named_parameters() if p.requires_grad}
        for name, param in ours.named_parameters():
            if param.requires_grad:
                assert_close(param.grad, hf_grads[name], f"gradient of {name}", atol=atol)


def assert_same_config_defaults(config_cls: type, hf_config_cls: type, **required: Any) -> None:
    """Our config class and HF PEFT's write the same fields with the same defaults
    (``required``: arguments both need)."""
    ours, theirs = config_cls(**required).to_dict(), hf_config_cls(**required).to_dict()
    assert set(ours) == set(theirs), sorted(set(ours) ^ set(theirs))
    for key, value in theirs.items():
        value = getattr(value, "value", value)  # HF's enums
        if key != "peft_version":
            assert _canon(ours[key]) == _canon(value), (key, ours[key], value)
