"""Plugin discovery, isolation, selection, registration, and the `plugins` listing."""

import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import peft_kernel
from peft_kernel import PeftConfig, TunerConfig, get_peft_model, hookimpl, register_peft_method
from peft_kernel.plugins import manager, reset_manager


def run_cli(*args, env=None):
    import os

    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "peft_kernel.cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=120)


def test_entry_point_plugins_are_discovered():
    assert "LORA" in manager().methods()


def test_plugins_json_lists_distribution_methods_and_hooks():
    result = run_cli("plugins", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["lora"]["distribution"] == "peft-plugin-lora"
    assert rows["lora"]["methods"] == ["LORA"]
    assert "peft_kernel_dispatch_layer" in rows["lora"]["hooks"]
    assert rows["lora"]["error"] is None


def test_plugins_table():
    result = run_cli("plugins")
    assert result.returncode == 0 and "peft-plugin-lora" in result.stdout and "LORA" in result.stdout


def test_block_and_select_env_vars():
    blocked = run_cli("plugins", "--json", env={"PEFT_KERNEL_DISABLE_PLUGINS": "lora"})
    assert "lora" not in {r["name"] for r in json.loads(blocked.stdout)}
    none = run_cli("plugins", "--json", env={"PEFT_KERNEL_PLUGINS": ""})
    assert {r["name"] for r in json.loads(none.stdout)} == {"peft_kernel.builtin"}
    only = run_cli("plugins", "--json", env={"PEFT_KERNEL_PLUGINS": "peft-plugin-lora"})
    assert "lora" in {r["name"] for r in json.loads(only.stdout)}


def test_unknown_method_suggests_no_package_it_does_not_know(tmp_path):
    """A name no known plugin provides (a method registered from someone's script) gets no
    ``pip install`` suggestion: anyone could publish a package under a guessed name."""
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "FANCY_NEW", "r": 2}))
    with pytest.raises(ValueError, match=r"no known plugin does.*register_peft_method") as info:
        PeftConfig.from_pretrained(str(tmp_path))
    assert "pip install" not in str(info.value) and "peft-plugin-fancy" not in str(info.value)


def test_unknown_first_party_method_names_its_distribution(monkeypatch):
    monkeypatch.setattr(peft_kernel.plugins, "_entry_points", lambda: [])  # nothing installed
    reset_manager()
    try:
        with pytest.raises(ValueError, match=r"provided by the plugin peft-plugin-vera, which is not installed: "
                                             r"pip install peft-plugin-vera"):
            manager().method("VERA")
    finally:
        reset_manager()


def test_unknown_method_of_a_disabled_plugin_says_it_is_disabled(monkeypatch):
    monkeypatch.setenv("PEFT_KERNEL_DISABLE_PLUGINS", "vera")
    reset_manager()
    try:
        with pytest.raises(ValueError, match=r"plugin 'vera' \(peft-plugin-vera\), which is installed but not loaded"):
            manager().method("VERA")
    finally:
        reset_manager()


def test_first_party_method_table_matches_the_plugins():
    """peft_kernel/data/first_party_methods.json lists exactly the methods of plugins/*."""
    import pathlib
    import tomllib

    root = pathlib.Path(__file__).resolve().parents[1]
    first_party = {tomllib.loads(p.read_text())["project"]["name"] for p in root.glob("plugins/*/pyproject.toml")}
    registered = {r.distribution: sorted(r.methods) for r in manager().plugin_info()
                  if r.distribution in first_party and r.methods}
    assert {d: sorted(t) for d, t in peft_kernel.plugins.first_party_methods().items()} == registered


class BrokenPlugin:
    @hookimpl
    def peft_kernel_register_methods(self, register):
        raise RuntimeError("boom")


def test_broken_plugin_is_reported_and_isolated():
    reset_manager()
    try:
        name = manager().register(BrokenPlugin(), name="broken-test-plugin")
        with pytest.warns(peft_kernel.PeftWarning, match="broken-test-plugin"):
            methods = manager().methods()
        assert "LORA" in methods  # everyone else keeps working
        record = {r.name: r for r in manager().plugin_info()}[name]
        assert "boom" in record.error
    finally:
        reset_manager()


def test_plugin_that_fails_to_import_is_reported(tmp_path):
    pkg = tmp_path / "site"
    (pkg / "bad_plugin_dist-0.1.dist-info").mkdir(parents=True)
    (pkg / "bad_plugin_dist-0.1.dist-info" / "METADATA").write_text("Name: bad-plugin-dist\nVersion: 0.1\n")
    (pkg / "bad_plugin_dist-0.1.dist-info" / "entry_points.txt").write_text("[peft_kernel]\nbad = bad_plugin_mod\n")
    (pkg / "bad_plugin_mod.py").write_text("raise ImportError('needs a missing library')\n")
    code = textwrap.dedent(f"""
        import sys, json, warnings
        sys.path.insert(0, {str(pkg)!r})
        from peft_kernel.plugins import manager
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            info = {{r.name: r.error for r in manager().plugin_info()}}
        print(json.dumps({{"info": info, "warned": any("bad" in str(w.message) for w in caught),
                          "lora": "LORA" in manager().methods()}}))
    """)
    out = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                    timeout=120).stdout)
    assert "missing library" in out["info"]["bad"] and out["warned"] and out["lora"]


# -- register_peft_method from plain code: a method the kernel has never seen -----------------


@dataclass
class ScaleConfig(TunerConfig):
    init_scale: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = "OUTSCALE"


class ScaleLayer(peft_kernel.AdapterLayer):
    adapter_layer_names = ("outscale_vector",)

    def __init__(self, base_layer, adapter_name, config=None, **kwargs):
        super().__init__(base_layer, adapter_name=adapter_name)
        self.outscale_vector = nn.ParameterDict()
        self.update_layer(adapter_name, config=config)

    def update_layer(self, adapter_name, config=None, **kwargs):
        self.outscale_vector[adapter_name] = nn.Parameter(torch.full((self.out_features,), config.init_scale))

    def adapter_forward(self, x, result, adapter_name, *args, **kwargs):
        return result * self.outscale_vector[adapter_name]

    def merge_weight(self, weight, adapter_name):
        return weight * self.outscale_vector[adapter_name][:, None]

    def unmerge_weight(self, weight, adapter_name):
        return weight / self.outscale_vector[adapter_name][:, None]


class ScaleModel(peft_kernel.BaseTuner):
    prefix = "outscale_"
    layer_cls = ScaleLayer


class ScaleDispatch:
    @hookimpl(trylast=True)
    def peft_kernel_dispatch_layer(self, target, target_name, adapter_name, config):
        if config.peft_type == "OUTSCALE" and isinstance(target, nn.Linear) and target.bias is None:
            return ScaleLayer(target, adapter_name, config=config)


def test_register_peft_method_accepts_new_names_and_rejects_duplicates(tmp_path):
    reset_manager()
    try:
        register_peft_method(name="outscale", config_cls=ScaleConfig, model_cls=ScaleModel)
        manager().register(ScaleDispatch(), name="outscale-dispatch")
        with pytest.raises(KeyError):
            register_peft_method(name="outscale", config_cls=ScaleConfig, model_cls=ScaleModel)
        with pytest.raises(ValueError, match="prefix"):
            register_peft_method(name="other", config_cls=ScaleConfig, model_cls=ScaleModel)
        class Clash(peft_kernel.BaseTuner):
            prefix = "lora_"

        with pytest.raises(ValueError, match="already used"):
            register_peft_method(name="clash", config_cls=ScaleConfig, model_cls=Clash, prefix="lora_")
        model = nn.Sequential(nn.Linear(4, 4, bias=False))
        x = torch.randn(2, 4)
        expected = model(x) * 2
        peft_model = get_peft_model(model, ScaleConfig(target_modules=["0"], init_scale=2.0))
        torch.testing.assert_close(peft_model(x), expected)
        peft_model.save_pretrained(tmp_path)
        saved = json.loads((tmp_path / "adapter_config.json").read_text())
        assert saved["peft_type"] == "OUTSCALE"
        loaded = peft_kernel.PeftModel.from_pretrained(nn.Sequential(nn.Linear(4, 4, bias=False)), tmp_path)
        assert isinstance(loaded.peft_config["default"], ScaleConfig)
    finally:
        reset_manager()
