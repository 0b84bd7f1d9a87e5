"""contrib/peft-plugin-example: a minimal out-of-tree plugin package.

In-process: when the package is installed (``pip install -e contrib/peft-plugin-example``,
done by scripts/setup.sh), its own tests run here unchanged. Slow: a fresh virtual
environment with only torch, the kernel and the example installed runs them too.
"""

import json
import os
import subprocess
import sys

import pytest
from _contrib import CONTRIB, load

EXAMPLE = CONTRIB / "peft-plugin-example"
ROOT = CONTRIB.parent

if __import__("importlib.util").util.find_spec("peft_plugin_example") is not None:
    _conformance = load("peft-plugin-example/tests/test_conformance.py", "peft_plugin_example_tests_conformance")
    _behaviour = load("peft-plugin-example/tests/test_ssf.py", "peft_plugin_example_tests_ssf")
    TestSSFConformance = _conformance.TestSSFConformance
    test_found_through_the_entry_point = _behaviour.test_found_through_the_entry_point
    test_scale_and_shift = _behaviour.test_scale_and_shift
    test_merge_needs_a_bias = _behaviour.test_merge_needs_a_bias
else:  # pragma: no cover - depends on the environment
    def test_example_plugin_installed():
        pytest.skip("peft-plugin-example is not installed (pip install -e contrib/peft-plugin-example)")


@pytest.mark.slow
def test_fresh_virtualenv_install_runs_the_kit(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")

    def pip(*args):
        result = subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", *args],
                                capture_output=True, text=True, timeout=1200)
        assert result.returncode == 0, result.stdout + result.stderr

    pip("torch==2.13.0")  # first and pinned: an unpinned torch pulls a multi-GB CUDA build
    pip("-e", str(ROOT), "-e", str(EXAMPLE), "pytest")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PEFT_KERNEL_")}
    listing = subprocess.run([python, "-m", "peft_kernel.cli", "plugins", "--json"], capture_output=True, text=True,
                             env=env, timeout=300)
    assert listing.returncode == 0, listing.stderr
    rows = {row["name"]: row for row in json.loads(listing.stdout)}
    assert rows["example"]["methods"] == ["SSF"] and rows["example"]["error"] is None
    assert "lora" not in rows, "the fresh environment must hold only the kernel and the example"
    tests = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")],
                           capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=1200)
    assert tests.returncode == 0, tests.stdout[-4000:] + tests.stderr[-2000:]
    assert " passed" in tests.stdout and "failed" not in tests.stdout
