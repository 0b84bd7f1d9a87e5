"""Installing the plugin into a fresh environment is all it takes to get VeRA, and
uninstalling it takes VeRA away again: no kernel change, no registration call.

Slow (builds a virtual environment): runs only with ``PEFT_KERNEL_SLOW=1``. Wheels are
cached between runs in ``$PEFT_KERNEL_WHEEL_CACHE`` (default
``~/.cache/peft-kernel/test-wheels``) so a warm run takes well under two minutes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("PEFT_KERNEL_SLOW") != "1", reason="slow: set PEFT_KERNEL_SLOW=1 to run"),
]

PLUGIN_DIR = Path(__file__).resolve().parents[1]
REPO = PLUGIN_DIR.parents[1]
# torch first and pinned: an unpinned torch resolves to a multi-GB CUDA build
TORCH = "torch==2.13.0"
BUILD_TOOLS = ["setuptools>=68", "wheel"]


def _kernel_requirements() -> list[str]:
    import tomllib

    with open(REPO / "pyproject.toml", "rb") as fh:
        deps = tomllib.load(fh)["project"]["dependencies"]
    return [d for d in deps if not d.replace(" ", "").startswith("torch")]


def _sh(*args, env=None, check=True) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env, timeout=600)
    if check and result.returncode:
        command = " ".join(map(str, args))
        raise AssertionError(f"{command} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def _wheel_cache() -> Path:
    cache = Path(os.environ.get("PEFT_KERNEL_WHEEL_CACHE", Path.home() / ".cache" / "peft-kernel" / "test-wheels"))
    wanted = [TORCH, *BUILD_TOOLS, *_kernel_requirements()]
    marker = cache / f".complete-{hashlib.sha256(' '.join(wanted).encode()).hexdigest()[:12]}"
    if not marker.exists():
        cache.mkdir(parents=True, exist_ok=True)
        _sh(sys.executable, "-m", "pip", "download", "--quiet", "-d", cache, TORCH)
        _sh(sys.executable, "-m", "pip", "download", "--quiet", "-d", cache, *BUILD_TOOLS, *_kernel_requirements())
        marker.touch()
    return cache


# one interpreter start per check (importing torch dominates the run time): the plugin
# listing through the CLI's own entry function, and PeftConfig resolution
_CHECK = """
import contextlib, io, json, sys
from peft_kernel.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    main(["plugins", "--json"])
methods = sorted(m for row in json.loads(out.getvalue()) for m in row["methods"])
try:
    from peft_kernel import PeftConfig
    config = PeftConfig.from_pretrained(sys.argv[1])
    resolved = [type(config).__module__, type(config).__name__, config.r, sorted(config.target_modules)]
except Exception as exc:
    resolved = f"{type(exc).__name__}: {exc}"
print(json.dumps({"methods": methods, "resolved": resolved}))
"""


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory):
    wheels = _wheel_cache()
    root = tmp_path_factory.mktemp("venv")
    venv = root / "venv"
    _sh(sys.executable, "-m", "venv", "--without-pip", venv)  # this interpreter's pip drives it (--python)
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PEFT_KERNEL_", "VIRTUAL_ENV", "PIP_"))}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    pip = [sys.executable, "-m", "pip", "--python", python]
    install = [*pip, "install", "--quiet", "--no-compile", "--no-index", "--find-links", wheels]
    _sh(*install, TORCH, env=env)
    _sh(*install, *BUILD_TOOLS, env=env)
    _sh(*install, "--no-build-isolation", "-e", REPO, env=env)
    # build the plugin from a copy so no build/ or egg-info lands in the source tree
    plugin_copy = root / "peft-plugin-vera"
    shutil.copytree(PLUGIN_DIR, plugin_copy, ignore=shutil.ignore_patterns("*.egg-info", "__pycache__", "build"))
    return {"python": python, "cli": venv / "bin" / "peft-kernel", "env": env, "pip": pip, "install": install,
            "plugin": plugin_copy, "root": root}


def _check(venv, adapter: Path) -> dict:
    return json.loads(_sh(venv["python"], "-c", _CHECK, adapter, env=venv["env"]).stdout.strip().splitlines()[-1])


def test_pip_install_and_uninstall_toggle_vera(fresh_venv):
    venv = fresh_venv
    adapter = venv["root"] / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "VERA", "target_modules": ["lin0"], "r": 4}))

    # a kernel without the plugin does not know VERA, and says which package provides it
    before = _check(venv, adapter)
    assert "VERA" not in before["methods"]
    assert isinstance(before["resolved"], str) and "peft-plugin-vera" in before["resolved"]

    _sh(*venv["install"], "--no-build-isolation", venv["plugin"], env=venv["env"])
    rows = json.loads(_sh(venv["cli"], "plugins", "--json", env=venv["env"]).stdout)  # the console script itself
    vera = [row for row in rows if "VERA" in row["methods"]]
    assert vera and vera[0]["distribution"] == "peft-plugin-vera" and vera[0]["error"] is None
    after = _check(venv, adapter)
    assert "VERA" in after["methods"]
    assert after["resolved"] == ["peft_plugin_vera.config", "VeraConfig", 4, ["lin0"]]

    _sh(*venv["pip"], "uninstall", "--quiet", "-y", "peft-plugin-vera", env=venv["env"])
    gone = _check(venv, adapter)
    assert "VERA" not in gone["methods"] and isinstance(gone["resolved"], str)
