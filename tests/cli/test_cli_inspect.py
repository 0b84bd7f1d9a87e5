"""``peft-kernel inspect`` and ``peft-kernel plugins``."""

from __future__ import annotations

import json
import shutil

from cli_helpers import call_cli, fails_cleanly, ok, run_cli


def test_inspect_json_fields(trained):
    info = json.loads(ok(run_cli("inspect", trained, "--json")).stdout)
    assert info["peft_type"] == "LORA" and info["task_type"] == "CAUSAL_LM"
    assert info["r"] == 8 and info["alpha"] == 8 and info["alpha_field"] == "lora_alpha"
    assert sorted(info["target_modules"]) == ["q_proj", "v_proj"]
    assert info["num_adapted_modules"] == 4
    assert all(m.startswith("model.layers.") for m in info["adapted_modules"])
    # q and v of 2 layers, each A (8x64) and B (64x8)
    assert info["parameters"] == 4 * 2 * 8 * 64 and info["tensors"] == 8
    assert info["dtypes"] == {"float32": 4096}
    assert info["weights_file"] == "adapter_model.safetensors"
    assert info["file_size"] == (trained / "adapter_model.safetensors").stat().st_size
    assert info["total_size"] >= info["file_size"]
    assert info["plugin"] == "peft-plugin-lora" and info["plugin_installed"] is True and info["provided_by"]
    assert info["trainer_state"]["step"] == 4


def test_inspect_human_output(trained):
    out = ok(run_cli("inspect", trained)).stdout
    for fragment in ("LORA", "q_proj, v_proj", "rank", "4,096", "float32", "peft-plugin-lora", "installed"):
        assert fragment in out, out


def test_inspect_names_a_missing_plugin(tmp_path, trained):
    copy = tmp_path / "foo"
    shutil.copytree(trained, copy)
    config = json.loads((copy / "adapter_config.json").read_text())
    config["peft_type"] = "NO_SUCH_METHOD"
    (copy / "adapter_config.json").write_text(json.dumps(config))
    info = json.loads(ok(run_cli("inspect", copy, "--json")).stdout)
    assert info["plugin"] is None and info["plugin_installed"] is False
    out = ok(call_cli("inspect", copy)).stdout
    assert "NOT available: no loaded plugin provides it, and no known plugin does" in out
    assert "pip install" not in out  # never a guessed package name
    config["peft_type"] = "VERA"  # a first-party method whose plugin is installed but disabled
    (copy / "adapter_config.json").write_text(json.dumps(config))
    info = json.loads(ok(run_cli("inspect", copy, "--json", env={"PEFT_KERNEL_DISABLE_PLUGINS": "vera"})).stdout)
    assert info["plugin"] == "peft-plugin-vera" and info["plugin_installed"] is False


def test_inspect_bad_input(tmp_path):
    fails_cleanly(run_cli("inspect", tmp_path / "missing"), "not found")
    fails_cleanly(call_cli("inspect", tmp_path), "no adapter_config.json")
    (tmp_path / "adapter_config.json").write_text("{not json")
    fails_cleanly(call_cli("inspect", tmp_path), "not valid JSON")


def test_plugins_command_unchanged():
    table = ok(run_cli("plugins")).stdout.splitlines()
    assert table[0].split() == ["plugin", "distribution", "version", "provides", "status"]
    assert set(table[1]) <= {"-", " "}
    rows = json.loads(ok(run_cli("plugins", "--json")).stdout)
    assert {"name", "distribution", "version", "methods", "backends", "combinations", "hooks", "error"} <= set(rows[0])
    assert any("LORA" in r["methods"] for r in rows)


def test_importing_the_cli_is_light():
    import subprocess
    import sys

    code = ("import sys, peft_kernel, peft_kernel.cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'accelerate')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
