"""contrib/register_method_script.py: a method the kernel never saw, from a plain script."""

import json
import subprocess
import sys

import pytest
import torch
from _contrib import CONTRIB, load
from torch import nn

import peft_kernel
from peft_kernel.plugins import reset_manager
from peft_kernel.testing import Case, MethodConformance

script = load("register_method_script.py", "contrib_register_method_script")


@pytest.fixture
def diagonal_method():
    reset_manager()
    script.register()
    try:
        yield
    finally:
        peft_kernel.unregister_layer_mapping(nn.Linear, method="DIAGONAL")
        reset_manager()


@pytest.mark.usefixtures("diagonal_method")
class TestDiagonalConformance(MethodConformance):
    cases = [
        Case("sequential", script.base_model, lambda: script.DiagonalConfig(target_modules=["0", "2", "4"]),
             lambda: torch.randn(4, 8)),
        Case("non-square", lambda: nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 4)),
             lambda: script.DiagonalConfig(target_modules=["0", "2"]), lambda: torch.randn(3, 6)),
    ]


def test_script_runs_in_a_fresh_process(tmp_path):
    result = subprocess.run([sys.executable, str(CONTRIB / "register_method_script.py"), "--output-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "peft_type DIAGONAL" in result.stdout
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "DIAGONAL" and saved["init_value"] == 0.0


def test_main_trains_and_reloads(diagonal_method, tmp_path):
    result = script.main(str(tmp_path))
    assert result["losses"][-1] < result["losses"][0] - 0.1
    assert result["trainable"] == ["base_model.model.0.diagonal_vector.default",
                                   "base_model.model.2.diagonal_vector.default"]
    assert result["max_reload_diff"] == 0.0 and result["max_merge_diff"] <= 1e-5


def test_loading_without_registration_names_the_remedy(diagonal_method, tmp_path):
    script.main(str(tmp_path))
    reset_manager()
    with pytest.raises(ValueError, match="register_peft_method"):
        peft_kernel.PeftModel.from_pretrained(script.base_model(), tmp_path)
