"""Property-based fuzzing of everything that takes outside input: configs (types, ranges,
target patterns), state dicts, safetensors files and config files, against ``get_peft_model``,
``load_adapter``, ``from_pretrained`` and ``peft-kernel inspect``.

The invariant: a call succeeds and leaves a consistent model (it runs, and saving and loading it
gives the same outputs), or raises one of the documented exception types (``ValueError``,
``TypeError``, ``NotImplementedError``) from a ``raise`` of our own, with a message, and
changes nothing. Never an internal exception, never a half-changed model.

The default suite runs a few examples per property, derandomised; ``tox -e fuzz``
(``PEFT_KERNEL_FUZZ=1``, ``PEFT_KERNEL_FUZZ_EXAMPLES`` to change the count) runs many more,
with fresh randomness.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import struct
import tempfile
import traceback
import types
import typing
import warnings

import hypothesis
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from peft_kernel import PeftModel, get_peft_model
from peft_kernel.plugins import manager

settings.register_profile("default", max_examples=12, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("fuzz", max_examples=int(os.environ.get("PEFT_KERNEL_FUZZ_EXAMPLES", 2000)),
                          deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("fuzz" if os.environ.get("PEFT_KERNEL_FUZZ") == "1" else "default")

DOCUMENTED = (ValueError, TypeError, NotImplementedError)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OURS = (os.path.join(ROOT, "peft_kernel") + os.sep, os.path.join(ROOT, "plugins") + os.sep)
METHODS = ("LORA", "IA3", "VERA")
MODULE_NAMES = ["emb", "lin0", "lin1", "norm", "blocks", "blocks.0", "blocks.0.lin", "blocks.1.lin", "lin", "nope"]


class Tiny(nn.Module):
    """Linear, embedding and unsupported (LayerNorm) layers, and numbered blocks."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.lin0 = nn.Linear(4, 8)
        self.blocks = nn.ModuleList([nn.Sequential() for _ in range(2)])
        for block in self.blocks:
            block.lin = nn.Linear(8, 8)
        self.lin1 = nn.Linear(8, 3)
        self.norm = nn.LayerNorm(3)

    def forward(self, ids):
        h = self.lin0(self.emb(ids))
        for block in self.blocks:
            h = torch.relu(block.lin(h))
        return self.norm(self.lin1(h))


def tiny():
    torch.manual_seed(0)
    return Tiny()


IDS = torch.tensor([[1, 2, 3], [4, 5, 9]])


# -- the invariant -------------------------------------------------------------------------


def fingerprint(model: nn.Module):
    return ([(n, type(m).__name__) for n, m in model.named_modules()],
            {k: v.detach().clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            sorted(getattr(model, "peft_config", {}) or {}))


def assert_unchanged(model, before) -> None:
    after = fingerprint(model)
    assert after[0] == before[0], "the module structure changed"
    assert after[2] == before[2] and after[3] == before[3]
    assert after[1].keys() == before[1].keys()
    for key, value in before[1].items():
        assert torch.equal(after[1][key], value) or (value.is_floating_point() and torch.equal(
            after[1][key].isnan(), value.isnan()) and value.isnan().any()), f"{key} changed"


def assert_ours(exc: BaseException) -> None:
    """Raised deliberately, by a ``raise`` in the kernel or a plugin, with a message."""
    frame = traceback.extract_tb(exc.__traceback__)[-1]
    where = f"{frame.filename}:{frame.lineno}"
    assert frame.filename.startswith(OURS) and (frame.line or "").lstrip().startswith("raise"), (
        f"internal {type(exc).__name__} at {where}: {exc}")
    assert str(exc).strip(), f"{type(exc).__name__} without a message at {where}"


def outcome(call, *models):
    """``call()``'s result, or ``None`` when it raised a documented error that changed nothing."""
    before = [fingerprint(m) for m in models]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return call()
    except DOCUMENTED as exc:
        assert_ours(exc)
        for model, snapshot in zip(models, before, strict=True):
            assert_unchanged(model, snapshot)
        return None


def run(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS)


def assert_same_output(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5, equal_nan=True)


# -- strategies ---------------------------------------------------------------------------

junk = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
module_name = st.sampled_from(MODULE_NAMES)
target_pattern = st.one_of(
    st.lists(st.sampled_from(["lin0", "lin1", "lin", "emb"]), min_size=1, max_size=3),  # adaptable layers
    st.lists(st.sampled_from(["lin0", "lin1", "lin", "emb"]), min_size=1, max_size=3),
    st.lists(module_name, max_size=4),  # suffix list (may be empty or match nothing)
    st.sampled_from(["all-linear", r".*lin\d?", r"blocks\.\d\.lin", "lin0|lin1", "(", "[a-", "emb", ".*", "norm"]),
    st.text(alphabet="lin0.*|()[]?+\\", max_size=8),  # regexes, many invalid
)


def value_for(name: str, annotation) -> st.SearchStrategy:
    """Mostly plausible values of the annotated type; sometimes anything."""
    if name in ("target_modules", "exclude_modules", "feedforward_modules"):
        plausible = target_pattern
    elif name == "modules_to_save":
        plausible = st.lists(module_name, max_size=2)
    elif name == "layers_to_transform":
        plausible = st.integers(-1, 3) | st.lists(st.integers(-1, 3), max_size=3)
    elif name == "layers_pattern":
        plausible = st.sampled_from(["blocks", "layers", ["blocks"]])
    elif name in ("rank_pattern", "alpha_pattern"):
        plausible = st.dictionaries(module_name | st.just("^lin.*"), st.integers(-1, 8) | st.floats(0, 64), max_size=2)
    elif name == "r":
        plausible = st.integers(-2, 12)  # sizes stay small: a huge rank is just a huge allocation
    else:
        plausible = _plausible(annotation)
    return st.one_of(plausible, plausible, plausible, plausible, junk)


def _plausible(annotation) -> st.SearchStrategy:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return st.one_of([_plausible(a) for a in args])
    if origin is typing.Literal:
        return st.sampled_from(args)
    if annotation is type(None):
        return st.none()
    if annotation is bool:
        return st.booleans()
    if annotation is int:
        return st.integers(-2, 64)
    if annotation is float:
        return st.floats(-2, 2) | st.sampled_from([0.0, 1.0, 1e30, math.inf, math.nan])
    if annotation is str:
        return st.text(max_size=12) | st.sampled_from(["gaussian", "pissa", "olora", "orthogonal", "pissa_niter_2",
                                                       "pissa_niter_x", "lora_only", "all", "none"])
    return junk


#: fields that change what the adapter computes: drawn more often than the rest
INTERESTING = ["r", "lora_alpha", "lora_dropout", "init_lora_weights", "use_rslora", "use_dora", "bias",
               "fan_in_fan_out", "rank_pattern", "alpha_pattern", "lora_bias", "layers_to_transform", "layers_pattern",
               "exclude_modules", "modules_to_save", "feedforward_modules", "init_ia3_weights", "d_initial",
               "projection_prng_key", "save_projection", "vera_dropout", "init_weights"]
FIXED = {"peft_type", "peft_version", "task_type", "base_model_name_or_path", "revision", "auto_mapping",
         "inference_mode", "runtime_config", "megatron_core"}


@st.composite
def configs(draw):
    peft_type = draw(st.sampled_from(METHODS))
    config_cls = manager().method(peft_type).config_cls
    hints = typing.get_type_hints(config_cls)
    fields = sorted(f.name for f in dataclasses.fields(config_cls) if f.init and f.name not in FIXED
                    and not f.name.startswith("_"))
    chosen = [f for f in INTERESTING if f in fields and draw(st.integers(0, 2)) == 0]
    chosen += sorted(draw(st.sets(st.sampled_from(sorted(set(fields) - set(INTERESTING))), max_size=1)))
    kwargs = {"target_modules": draw(target_pattern)}
    for name in chosen:
        kwargs[name] = draw(value_for(name, hints.get(name, typing.Any)))
    if peft_type == "VERA" and "r" not in kwargs:
        kwargs["r"] = 4
    return config_cls, kwargs


# -- properties -----------------------------------------------------------------------------


@given(configs())
def test_random_configs_give_a_working_adapter_or_a_clear_error(spec):
    config_cls, kwargs = spec
    config = outcome(lambda: config_cls(**kwargs))
    if config is None:
        hypothesis.event("config refused")
        return
    base = tiny()
    model = outcome(lambda: get_peft_model(base, config), base)
    if model is None:
        hypothesis.event("get_peft_model refused")
        return
    hypothesis.event("adapted")
    result = run(model)
    with tempfile.TemporaryDirectory() as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.save_pretrained(tmp)
            loaded = PeftModel.from_pretrained(tiny(), tmp)
        assert_same_output(run(loaded), result)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A LoRA adapter (plus a copy of ``lin1``) with random non-zero factors."""
    from peft_plugin_lora import LoraConfig

    model = get_peft_model(tiny(), LoraConfig(target_modules=["lin0", "blocks.0.lin", "emb"], r=2,
                                              modules_to_save=["lin1"], init_lora_weights=False))
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param))
    directory = tmp_path_factory.mktemp("saved") / "adapter"
    model.save_pretrained(directory)
    return directory


tensor_values = st.sampled_from(["same", "nan", "inf", "int", "half", "bool", "scalar", "wider", "empty"])


def _mutate_tensor(value: torch.Tensor, how: str):
    return {
        "same": value, "nan": torch.full_like(value, math.nan), "inf": torch.full_like(value, math.inf),
        "int": value.to(torch.int64), "half": value.half(), "bool": value > 0, "scalar": value.flatten()[0],
        "wider": torch.cat([value, value], dim=-1), "empty": value[:0],
    }[how]


@given(data=st.data())
def test_random_state_dicts_load_or_fail_cleanly(saved, data):
    from safetensors.torch import load_file

    state = load_file(str(saved / "adapter_model.safetensors"))
    keys = sorted(state)
    for key in data.draw(st.sets(st.sampled_from(keys), max_size=3)):
        state[key] = _mutate_tensor(state[key], data.draw(tensor_values))
    for key in data.draw(st.sets(st.sampled_from(keys), max_size=2)):
        del state[key]
    extra = data.draw(st.lists(st.sampled_from(["base_model.model.lin9.lora_A.weight", "x", "",
                                                 "base_model.model.lin0.weight"]), max_size=2))
    for key in extra:
        state[key] = torch.zeros(2, 2)
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(saved / "adapter_config.json", tmp)
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(tmp, "adapter_model.safetensors"))
        _load_both_ways(tmp)


def _load_both_ways(directory) -> None:
    base = tiny()
    loaded = outcome(lambda: PeftModel.from_pretrained(base, directory), base)
    if loaded is not None:
        run(loaded)
    from peft_plugin_lora import LoraConfig

    model = get_peft_model(tiny(), LoraConfig(target_modules=["lin0"], init_lora_weights=False))
    if outcome(lambda: model.load_adapter(directory, adapter_name="other"), model) is not None:
        model.set_adapter("other")
        run(model)


@given(data=st.data())
def test_corrupted_files_load_or_fail_cleanly(saved, data):
    weights = (saved / "adapter_model.safetensors").read_bytes()
    config = json.loads((saved / "adapter_config.json").read_text())
    target = data.draw(st.sampled_from(["weights", "header", "config", "config_bytes"]))
    if target == "weights":  # truncated or with flipped bytes
        cut = data.draw(st.integers(0, len(weights)))
        flips = data.draw(st.lists(st.integers(0, max(len(weights) - 1, 0)), max_size=4))
        damaged = bytearray(weights[:cut] if data.draw(st.booleans()) else weights)
        for i in flips:
            if i < len(damaged):
                damaged[i] ^= 0xFF
        weights = bytes(damaged)
    elif target == "header":  # a header that lies about shapes, dtypes or offsets
        (length,) = struct.unpack("<Q", weights[:8])
        header = json.loads(weights[8:8 + length])
        name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        header[name][data.draw(st.sampled_from(["shape", "dtype", "data_offsets"]))] = data.draw(
            junk | st.lists(st.integers(-1, 2**40), max_size=3) | st.sampled_from(["F64", "I8", "X"]))
        raw = json.dumps(header).encode()
        weights = struct.pack("<Q", len(raw)) + raw + weights[8 + length:]
    elif target == "config":  # fields set to anything, dropped, or another JSON value altogether
        for key in data.draw(st.sets(st.sampled_from(sorted(config)), max_size=3)):
            if data.draw(st.booleans()):
                del config[key]
            else:
                config[key] = data.draw(junk)
        if data.draw(st.integers(0, 9)) == 0:
            config = data.draw(junk)
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "adapter_model.safetensors"), "wb") as fh:
            fh.write(weights)
        with open(os.path.join(tmp, "adapter_config.json"), "wb") as fh:
            text = json.dumps(config).encode()
            fh.write(data.draw(st.binary(max_size=20)) + text if target == "config_bytes" else text)
        _load_both_ways(tmp)
        _inspect(tmp)


def _inspect(directory) -> None:
    from peft_kernel.cli._common import CLIError
    from peft_kernel.cli.inspect import describe

    try:
        info = describe(directory)
    except CLIError as exc:
        assert str(exc).strip()
        return
    assert info["parameters"] >= 0 and info["tensors"] >= 0
