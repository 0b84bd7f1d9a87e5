"""Plugin-level tests that need no quantization library: registration, entry point,
lazy imports and the "not installed" report. They run in every environment."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
from torch import nn

plugin = pytest.importorskip("peft_plugin_gptq")

LIBRARIES = ('gptqmodel', 'auto_gptq')


def _installed() -> bool:
    for name in LIBRARIES:
        try:
            if importlib.util.find_spec(name) is not None:
                return True
        except (ImportError, ValueError):
            pass
    return False


def test_hook_registers_backends():
    got = []
    plugin.peft_kernel_register_quant_backends(register=got.append)
    assert [b.name for b in got] == ['gptq']
    for backend in got:
        ok, reason = backend.available()
        assert ok == _installed()
        assert (reason == "") == ok


def test_entry_point_makes_the_kernel_find_the_backends():
    from peft_kernel.plugins import manager

    names = {b.name for b in manager().quant_backends()}
    assert set(['gptq']) <= names


def test_available_names_the_pip_command_when_missing(monkeypatch):
    for name in list(sys.modules):
        if name.split(".")[0] in {n.split(".")[0] for n in LIBRARIES}:
            monkeypatch.delitem(sys.modules, name)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n in LIBRARIES else real(n, *a))
    ok, reason = plugin.GptqBackend().available()
    assert not ok
    assert "gptqmodel is not installed" in reason and "pip install 'peft-plugin-gptq[backend]'" in reason


def test_plain_layers_never_match():
    for backend_cls in (plugin.GptqBackend,):
        backend = backend_cls()
        assert not backend.matches(nn.Linear(4, 4))
        assert not backend.matches(nn.Conv1d(2, 2, 1))
        assert not backend.matches(nn.ReLU())


def test_importing_and_using_the_plugin_never_imports_the_library():
    code = (
        "import sys, torch, peft_plugin_gptq as p; "
        "bs = []; p.peft_kernel_register_quant_backends(register=bs.append); "
        "[(b.matches(torch.nn.Linear(2, 2)), b.available()) for b in bs]; "
        "loaded = [m for m in sys.modules if m.split('.')[0] in ('auto_gptq', 'gptqmodel')]; "
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
