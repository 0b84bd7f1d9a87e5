"""Target matching follows HF PEFT's rules exactly (reference §3)."""

import pytest
from torch import nn

from peft_kernel import get_peft_model
from peft_kernel.targeting import compress_targets, get_pattern_key, is_target, layer_index
from peft_plugin_lora import LoraConfig


def cfg(**kw):
    return LoraConfig(**kw)


@pytest.mark.parametrize(
    "targets,key,expected",
    [
        (["query"], "bar.0.query", True),
        (["query"], "foo_barquery", False),
        (["query"], "query", True),
        (["0.query"], "bar.0.query", True),
        ("bar\\.\\d\\.query", "bar.0.query", True),
        ("query", "bar.0.query", False),  # regex must match the full name
        (".*query", "bar.0.query", True),
    ],
)
def test_list_suffix_and_regex_full_match(targets, key, expected):
    assert is_target(cfg(target_modules=targets), key) is expected


def test_exclude_modules_list_and_regex():
    config = cfg(target_modules=["q", "v"], exclude_modules=["layers.1.q"])
    assert is_target(config, "model.layers.0.q") and not is_target(config, "model.layers.1.q")
    config = cfg(target_modules=["q", "v"], exclude_modules=r".*\.1\..*")
    assert not is_target(config, "model.layers.1.v") and is_target(config, "model.layers.2.v")


def test_modules_to_save_are_never_targets():
    config = cfg(target_modules=["dense"], modules_to_save=["classifier"])
    assert is_target(config, "encoder.dense")
    assert not is_target(config, "classifier.dense")


def test_layers_to_transform_with_and_without_pattern():
    config = cfg(target_modules=["q"], layers_to_transform=[0, 2])
    assert is_target(config, "model.layers.0.q") and not is_target(config, "model.layers.1.q")
    assert not is_target(config, "q")  # no index: dropped
    config = cfg(target_modules=["w"], layers_to_transform=1, layers_pattern="layers")
    assert is_target(config, "model.layers.1.experts.0.w")  # first numbered segment wins (MoE)
    assert not is_target(config, "model.layers.0.experts.1.w")
    assert layer_index("model.layers.3.mlp.up", None) == 3


def test_layer_options_rejected_with_regex_or_alone():
    with pytest.raises(ValueError, match="regex"):
        cfg(target_modules=".*q", layers_to_transform=[0])
    with pytest.raises(ValueError, match="layers_to_transform"):
        cfg(target_modules=["q"], layers_pattern="layers")


def test_pattern_keys():
    keys = ["foo", "module.foo", "^module.foo"]
    assert get_pattern_key(["foo"], "module.module.foo") == "foo"
    assert get_pattern_key(["foo"], "module.foobar") == "module.foobar"  # no match: the key itself
    assert get_pattern_key(["module.foo"], "module.module.foo") == "module.foo"
    assert get_pattern_key(["^module.foo"], "module.module.foo") == "module.module.foo"
    assert get_pattern_key(["^module.foo"], "module.foo") == "^module.foo"
    assert get_pattern_key(keys, "x.foo") == "foo"


def test_compression_keeps_exactly_the_same_targets():
    names = [f"blk.{i}.{n}" for i in range(10) for n in ("query", "key", "out")] + ["foo_bar.0.query", "bar.0.query"]
    targets = {f"blk.{i}.query" for i in range(10)} | {f"blk.{i}.key" for i in range(10)} | {"bar.0.query"}
    compressed = compress_targets(targets, names)
    assert len(compressed) < len(targets)

    def hits(t):
        return {n for n in names if any(n == e or n.endswith("." + e) for e in t)}

    assert hits(compressed) == hits(targets)
    assert "foo_bar.0.query" not in hits(compressed)
    assert compress_targets(targets, names) == compressed  # deterministic


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(4, 4)
        self.v = nn.Linear(4, 4)
        self.conv = nn.Conv2d(4, 4, 1)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block() for _ in range(3)])
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        for layer in self.layers:
            x = layer.v(layer.q(x))
        return self.out(x)


def test_all_linear_on_custom_model_keeps_output_layer_and_skips_convs():
    model = get_peft_model(Net(), cfg(target_modules="all-linear"))
    targets = set(model.peft_config["default"].target_modules)
    assert "out" in targets  # not a PreTrainedModel: the output layer stays targetable
    assert all("conv" not in t for t in targets)
    assert {"layers.0.q", "layers.2.v"} <= targets  # full names are saved


def test_all_linear_skips_transformers_output_embedding():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    model = get_peft_model(transformers.LlamaForCausalLM(config), cfg(target_modules="all-linear"))
    assert "lm_head" not in model.peft_config["default"].target_modules
    assert len(model.targeted_module_names) == 7


def test_regex_never_matches_inside_adapter_layers():
    model = get_peft_model(Net(), cfg(target_modules=r"layers\.0\.q.*"))
    model.add_adapter("second", cfg(target_modules=r"layers\.0\.q.*"))
    assert model.targeted_module_names == ["layers.0.q"]
    layer = model.base_model.model.layers[0].q
    assert set(layer.lora_A) == {"default", "second"}  # updated in place, never nested
    assert not any("lora_A" in n for n in model.targeted_module_names)
    assert type(model.base_model.model.layers[0].q.base_layer) is nn.Linear


def test_all_linear_in_add_adapter_does_not_target_lora_factors():
    model = get_peft_model(Net(), cfg(target_modules="all-linear"))
    model.add_adapter("second", cfg(target_modules="all-linear"))
    assert not any("lora_" in t for t in model.peft_config["second"].target_modules)


def test_dummy_target_creates_no_layers():
    model = get_peft_model(Net(), cfg(target_modules="dummy-target-modules"))
    assert model.targeted_module_names == []


def test_rank_and_alpha_patterns_apply_per_layer():
    model = get_peft_model(Net(), cfg(target_modules=["q"], r=2, rank_pattern={"layers.1.q": 6},
                                      alpha_pattern={"^layers.2.q": 12}))
    layers = model.base_model.model.layers
    assert layers[0].q.r["default"] == 2 and layers[1].q.r["default"] == 6
    assert layers[2].q.lora_alpha["default"] == 12 and layers[0].q.lora_alpha["default"] == 8


def test_exclude_everything_explains():
    with pytest.raises(ValueError, match="excluded"):
        get_peft_model(Net(), cfg(target_modules=["q"], exclude_modules=["q"]))


def test_a_tuner_may_select_its_targets_itself():
    """BaseTuner._select_targets replaces the target_modules match; exclusions still apply."""
    from peft_plugin_lora import LoraModel

    seen = []

    class LastTwoQ(LoraModel):
        def _select_targets(self, config, module_names):
            seen.extend(module_names)
            return set([n for n in module_names if n.endswith(".q")][-2:])

    model = LastTwoQ(Net(), cfg(target_modules=["v"]))
    assert model.targeted_module_names == ["layers.1.q", "layers.2.q"]
    assert seen[:3] == ["layers", "layers.0", "layers.0.q"]  # every module, in model order
    model = LastTwoQ(Net(), cfg(target_modules=["v"], exclude_modules=["layers.2.q"]))
    assert model.targeted_module_names == ["layers.1.q"]
