"""Names that are no safe path component, refused merges, and the remaining bad inputs of the
fault audit: each is a clear error (what is wrong, what to do) that changes nothing. And a mixed
batch (``adapter_names=``) is per call: threads running different batches through one model each
get their own routing, and plain calls keep their specialised forwards."""

from __future__ import annotations

import json
import os
import random
import struct
import sys
import threading

import pytest
import torch
from torch import nn

from peft_kernel import AdapterLayer, PeftConfig, PeftModel, get_peft_model, inject_adapter_in_model
from peft_plugin_lora import LoraConfig


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(6, 8)
        self.lin1 = nn.Linear(8, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(self.lin1(torch.relu(self.lin0(x))))


def fresh():
    torch.manual_seed(0)
    return MLP()


def config(**kw):
    kw.setdefault("target_modules", ["lin0", "lin1"])
    return LoraConfig(init_lora_weights=False, **kw)


def fingerprint(model: nn.Module):
    """Structure, values and trainability of every parameter, and the model's own attributes."""
    return ([(n, type(m).__name__) for n, m in model.named_modules()],
            {k: v.detach().clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()}, sorted(model.__dict__))


def assert_same(model, before):
    after = fingerprint(model)
    assert after[0] == before[0] and after[2] == before[2] and after[3] == before[3]
    assert after[1].keys() == before[1].keys()
    for key, value in before[1].items():
        assert torch.equal(after[1][key], value), f"{key} changed"


BAD_NAMES = ["", "../escape", "/tmp/abs", "a/b", "a\\b", "..", "x.y", "c:evil", "tab\there", "__base__", 5, None]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("saved") / "adapter"
    get_peft_model(fresh(), config()).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_unsafe_adapter_names_are_refused_everywhere_before_any_change(name, saved, tmp_path):
    base = fresh()
    before = fingerprint(base)
    with pytest.raises(ValueError, match="adapter name"):
        get_peft_model(base, config(), adapter_name=name)
    with pytest.raises(ValueError, match="adapter name"):
        inject_adapter_in_model(config(), base, adapter_name=name)
    with pytest.raises(ValueError, match="adapter name"):
        PeftModel.from_pretrained(base, str(saved), adapter_name=name)
    assert_same(base, before)
    model = get_peft_model(fresh(), config())
    before = fingerprint(model)
    for call in (lambda: model.add_adapter(name, config()),
                 lambda: model.load_adapter(str(saved), adapter_name=name),
                 lambda: model.base_model.add_weighted_adapter(["default"], [1.0], name, combination_type="linear")):
        with pytest.raises(ValueError, match="adapter name"):
            call()
        assert_same(model, before)
        assert list(model.peft_config) == ["default"]
    assert list(tmp_path.iterdir()) == []


def test_save_never_writes_outside_save_directory(tmp_path):
    """A name smuggled into peft_config after the checks is refused again by the save."""
    model = get_peft_model(fresh(), config())
    model.peft_config["../../outside"] = model.peft_config["default"]
    target = tmp_path / "a" / "b"
    with pytest.raises(ValueError, match="adapter name"):
        model.save_pretrained(target)
    assert list(tmp_path.iterdir()) == []


def test_failed_get_peft_model_leaves_the_model_as_it_was():
    """The last check (modules_to_save matched nothing) runs after the layers were replaced."""
    base = fresh()
    before = fingerprint(base)
    with pytest.raises(ValueError, match="modules_to_save"):
        get_peft_model(base, config(modules_to_save=["no_such_module"]))
    assert_same(base, before)


def test_failed_from_pretrained_leaves_the_model_as_it_was(saved, tmp_path):
    wrong = tmp_path / "wrong_rank"
    wrong.mkdir()
    data = json.loads((saved / "adapter_config.json").read_text())
    (wrong / "adapter_config.json").write_text(json.dumps({**data, "r": 4, "modules_to_save": ["head"]}))
    (wrong / "adapter_model.safetensors").write_bytes((saved / "adapter_model.safetensors").read_bytes())
    base = fresh()
    before = fingerprint(base)
    with pytest.raises(ValueError, match="Size mismatch"):
        PeftModel.from_pretrained(base, str(wrong))
    assert_same(base, before)


def _poison(model, layer: str) -> None:
    with torch.no_grad():
        model.base_model.model.get_submodule(layer).lora_B["default"].weight[0, 0] = float("inf")


@pytest.mark.parametrize("how", ["merge_adapter", "merge_and_unload"])
def test_refused_safe_merge_changes_no_layer(how):
    """inf in the *last* layer: the layers before it must not be merged either."""
    model = get_peft_model(fresh(), config())
    _poison(model, "lin1")
    before = fingerprint(model)
    with pytest.raises(ValueError, match="NaNs or infs detected.*nothing was merged"):
        getattr(model, how)(safe_merge=True)
    assert_same(model, before)
    assert not any(getattr(m, "merged", False) for m in model.modules())


def test_safe_merge_of_finite_adapters_equals_plain_merge():
    x = torch.randn(3, 6)
    model = get_peft_model(fresh(), config())
    with torch.no_grad():
        model.base_model.model.lin0.lora_B["default"].weight.normal_()
        expected = model(x)
        model.merge_adapter(safe_merge=True)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5)


# -- the audit's list 6-7 -------------------------------------------------------------


@pytest.mark.parametrize(("fields", "message"), [
    ({"lora_alpha": None}, "LoraConfig.lora_alpha must be a number, got None"),
    ({"target_modules": 5}, "LoraConfig.target_modules must be a list of str or str or None, got 5"),
    ({"target_modules": ["lin0", 3]}, "target_modules must be a list of str"),
    ({"modules_to_save": "head"}, "modules_to_save must be a list of str or None, got 'head'"),
    ({"r": "8"}, "LoraConfig.r must be a number"),
])
def test_wrongly_typed_config_fields_name_the_field(fields, message):
    with pytest.raises(TypeError, match=message.replace("(", r"\(").replace("[", r"\[")):
        LoraConfig(**fields)


def test_a_choice_outside_a_literal_is_a_value_error():
    with pytest.raises(ValueError, match="bias must be one of 'none', 'all', 'lora_only'"):
        LoraConfig(bias="some")


@pytest.mark.parametrize("content", [[1, 2], "just a string", 3, None])
def test_adapter_config_that_is_not_an_object(tmp_path, content):
    (tmp_path / "adapter_config.json").write_text(json.dumps(content))
    with pytest.raises(ValueError, match="JSON object of fields"):
        PeftConfig.from_pretrained(str(tmp_path))
    base = fresh()
    before = fingerprint(base)
    with pytest.raises(ValueError, match="JSON object of fields"):
        PeftModel.from_pretrained(base, str(tmp_path))
    assert_same(base, before)


@pytest.mark.parametrize("peft_type", [5, None, ["LORA"]])
def test_adapter_config_with_a_peft_type_that_is_no_name(tmp_path, peft_type):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type}))
    with pytest.raises(ValueError, match="peft_type must be the name of a method"):
        PeftConfig.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("content", [[torch.zeros(2)], {"w": [1, 2]}, {3: torch.zeros(2)}])
def test_bin_weights_that_are_not_named_tensors(saved, tmp_path, content):
    (tmp_path / "adapter_config.json").write_bytes((saved / "adapter_config.json").read_bytes())
    torch.save(content, tmp_path / "adapter_model.bin")
    base = fresh()
    before = fingerprint(base)
    with pytest.raises(ValueError, match="does not hold a dict of named tensors"):
        PeftModel.from_pretrained(base, str(tmp_path))
    assert_same(base, before)


def test_save_after_deleting_every_adapter(tmp_path):
    model = get_peft_model(fresh(), config())
    model.delete_adapter("default")
    with pytest.raises(ValueError, match="no adapter left to save"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_selected_adapters(tmp_path):
    model = get_peft_model(fresh(), config())
    model.add_adapter("other", config(r=4))
    with pytest.raises(ValueError, match="selected_adapters is empty"):
        model.save_pretrained(tmp_path / "none", selected_adapters=[])
    assert not (tmp_path / "none").exists()
    model.save_pretrained(tmp_path / "one", selected_adapters="other")  # a string names one adapter
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["README.md", "other"]
    with pytest.raises(ValueError, match=r"unknown adapters \['nope'\]"):
        model.save_pretrained(tmp_path / "bad", selected_adapters="nope")


def test_next_save_removes_what_killed_saves_left(tmp_path):
    model = get_peft_model(fresh(), config())
    model.save_pretrained(tmp_path)
    debris = [tmp_path / ".tmp-k2j4-adapter_model.safetensors", tmp_path / ".peft-stage-x1"]
    debris[0].write_bytes(b"\0" * 1000)
    debris[1].mkdir()
    (debris[1] / "adapter_model.safetensors").write_bytes(b"\0" * 1000)
    keep = tmp_path / ".tmp-notes.txt"  # not ours: kept
    keep.write_text("mine")
    model.save_pretrained(tmp_path)
    assert not any(p.exists() for p in debris) and keep.exists()


def test_switching_format_removes_the_other_weights_file(tmp_path):
    """A left-over safetensors file would shadow the new .bin (both readers prefer it)."""
    model = get_peft_model(fresh(), config())
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.bin"]


# -- mixed batches from threads -------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    """Two adapters (and two copies of ``head``) that give different outputs."""
    model = get_peft_model(fresh(), LoraConfig(target_modules=["lin0", "lin1"], modules_to_save=["head"],
                                             init_lora_weights=False), adapter_name="a")
    model.add_adapter("b", LoraConfig(target_modules=["lin0", "lin1"], modules_to_save=["head"], lora_alpha=64,
                                      init_lora_weights=False))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".b." in name or name.endswith(".b.weight"):
                param.add_(torch.randn_like(param))
    return model.eval()


BATCHES = [["a", "b", "__base__", "a"], ["b", "b", "a", "__base__"], ["__base__", "a", "b", "b"], None]


def test_threads_running_different_mixed_batches_each_get_their_own(model):
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = [model(x, adapter_names=names) if names else model(x) for names in BATCHES]
    assert not torch.equal(expected[0], expected[1])
    failures = []

    def worker(seed):
        rng = random.Random(seed)
        with torch.no_grad():
            for _ in range(40):
                i = rng.randrange(len(BATCHES))
                try:
                    got = model(x, adapter_names=BATCHES[i]) if BATCHES[i] else model(x)
                except Exception as exc:  # noted below, with the batch that raised it
                    failures.append(f"{BATCHES[i]}: {exc!r}")
                    continue
                if not torch.equal(got, expected[i]):
                    failures.append(f"{BATCHES[i]}: wrong output")

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: a race shows up at once
    try:
        threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not failures, f"{len(failures)} of 320 calls went wrong, e.g. {failures[:3]}"


def test_mixed_batch_leaves_no_state_and_keeps_specialised_forwards(model):
    x = torch.randn(4, 6)
    with torch.no_grad():
        model(x)
        layers = [m for m in model.modules() if isinstance(m, AdapterLayer)]
        specialised = [m.__dict__.get("_fast_forward") for m in layers]
        assert all(f is not None for f in specialised)
        model(x, adapter_names=BATCHES[0])
        assert [m.__dict__.get("_fast_forward") for m in layers] == specialised  # not dropped per call
        assert all(m.batch_adapter_names is None for m in model.modules() if hasattr(m, "batch_adapter_names"))
        with pytest.raises(ValueError, match="entries but the batch has"):
            model(x, adapter_names=["a"] * 3)
        assert all(m.batch_adapter_names is None for m in layers)  # a failed call leaves nothing behind


# -- the command line ---------------------------------------------------------------------


def _safetensors(path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize("entry", [
    {"dtype": "F32", "shape": [2**31, 2**31], "data_offsets": [0, 16]},  # shape far beyond the data
    {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 4000]},  # offsets beyond the file
    {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]},
    {"dtype": "F32", "shape": "big", "data_offsets": [0, 16]},
    {"shape": [4], "data_offsets": [0, 16]},
])
def test_inspect_refuses_a_header_that_does_not_match_the_data(tmp_path, entry):
    from peft_kernel.cli._common import CLIError
    from peft_kernel.cli.inspect import describe

    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    _safetensors(tmp_path / "adapter_model.safetensors", {"base_model.model.x.lora_A.weight": entry}, b"\0" * 16)
    with pytest.raises(CLIError, match="not a readable safetensors file"):
        describe(str(tmp_path))


def test_inspect_reads_an_honest_header(tmp_path):
    from peft_kernel.cli.inspect import describe

    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    entry = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
    _safetensors(tmp_path / "adapter_model.safetensors", {"base_model.model.x.lora_A.weight": entry}, b"\0" * 16)
    assert describe(str(tmp_path))["parameters"] == 4


def test_data_that_is_a_directory(tmp_path):
    from peft_kernel.cli._common import CLIError
    from peft_kernel.cli._models import load_texts

    with pytest.raises(CLIError, match="is a directory; give one JSONL file"):
        load_texts(str(tmp_path))
    assert os.listdir(tmp_path) == []
