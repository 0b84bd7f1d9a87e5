"""First-party plugins use only the documented plugin API (docs/plugin-api.md): every name they
import from peft_kernel, every attribute they read from a kernel module, and every kernel-private
name they touch or override must be on that page. What LoRA can do, a third party can do."""

from __future__ import annotations

import ast
import importlib
import inspect
import pathlib
import re
import textwrap

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "plugin-api.md"
PLUGIN_SOURCES = sorted(
    [p for p in (ROOT / "plugins").glob("*/src/**/*.py")]
    + [p for p in (ROOT / "contrib" / "peft-plugin-example" / "src").glob("**/*.py")]
    + [p for p in (ROOT / "compat").glob("*/src/**/*.py")]  # the `peft` name is held to the same API
)


def documented() -> set[str]:
    """Every dotted ``peft_kernel.…`` name written on the API page."""
    return set(re.findall(r"`(peft_kernel(?:\.[A-Za-z_]\w*)+)", DOC.read_text()))


def _is_module(dotted: str) -> bool:
    try:
        importlib.import_module(dotted)
    except ImportError:
        return False
    return True


#: the kernel classes a plugin subclasses or is handed; their underscore members are private
PLUGIN_FACING = ("peft_kernel.AdapterLayer", "peft_kernel.WeightDeltaLayer", "peft_kernel.BaseTuner",
                 "peft_kernel.TunerConfig", "peft_kernel.PromptLearningConfig", "peft_kernel.BufferDict",
                 "peft_kernel.ModulesToSaveWrapper", "peft_kernel.quant.QuantBackend")


def kernel_private_members() -> set[str]:
    """Underscore members of the plugin-facing kernel classes: methods, class attributes and the
    instance attributes their methods set (torch's own ``nn.Module`` internals such as
    ``_modules`` are torch's API, not ours)."""
    names: set[str] = set()
    for dotted in PLUGIN_FACING:
        module_name, _, class_name = dotted.rpartition(".")
        for cls in getattr(importlib.import_module(module_name), class_name).__mro__:
            if not cls.__module__.startswith("peft_kernel"):
                continue
            names.update(vars(cls))
            for node in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(cls)))):
                if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                    names.add(node.attr)
                elif isinstance(node, ast.keyword) and node.arg:  # set_plain_attributes(_x=...)
                    names.add(node.arg)
                elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):  # __dict__["_x"]
                    names.add(str(node.slice.value))
    torch_names = set(dir(torch.nn.Module())) | set(vars(torch.nn.Module))
    return {n for n in names if n.startswith("_") and not n.startswith("__") and n not in torch_names}


def plugin_uses(path: pathlib.Path):
    """``(kind, name, line)`` for each use of peft_kernel in a plugin file: imported names, module
    attributes read through an imported kernel module, and underscore attributes / methods."""
    tree = ast.parse(path.read_text())
    kernel_modules: dict[str, str] = {}  # local alias -> dotted kernel module
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "peft_kernel":
            for alias in node.names:
                dotted = f"{node.module}.{alias.name}"
                yield "import", dotted, node.lineno
                if _is_module(dotted):
                    kernel_modules[alias.asname or alias.name] = dotted
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "peft_kernel":
                    yield "import", alias.name, node.lineno
                    kernel_modules[alias.asname or alias.name.split(".")[0]] = (
                        alias.name if alias.asname else "peft_kernel")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id in kernel_modules:
                yield "attribute", f"{kernel_modules[node.value.id]}.{node.attr}", node.lineno
            if node.attr.startswith("_") and not node.attr.startswith("__"):
                yield "private", node.attr, node.lineno
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("_"):
            if not node.name.startswith("__"):
                yield "private", node.name, node.lineno


def violations(path: pathlib.Path, allowed: set[str], private: set[str]) -> list[str]:
    modules = {name for name in allowed if _is_module(name)}
    found = []
    for kind, name, line in plugin_uses(path):
        where = f"{path.name}:{line}"
        if kind in ("import", "attribute"):
            if name not in allowed and not (kind == "import" and name in modules):
                found.append(f"{where}: {name} is not in docs/plugin-api.md")
        elif name in private and not any(entry.endswith("." + name) for entry in allowed):
            found.append(f"{where}: uses the kernel-private name {name}")
    return found


def test_the_api_page_names_only_existing_things():
    for dotted in sorted(documented()):
        if _is_module(dotted):
            continue
        module_name, _, attr = dotted.rpartition(".")
        owner = None
        while module_name and owner is None:
            try:
                owner = importlib.import_module(module_name)
            except ImportError:
                module_name, _, parent = module_name.rpartition(".")
                attr = f"{parent}.{attr}"
        value = owner
        for part in attr.split("."):
            assert hasattr(value, part), f"docs/plugin-api.md lists {dotted}, which does not exist"
            value = getattr(value, part)


@pytest.mark.parametrize("path", PLUGIN_SOURCES, ids=[str(p.relative_to(ROOT)) for p in PLUGIN_SOURCES])
def test_plugin_uses_only_the_documented_api(path):
    assert not violations(path, documented(), kernel_private_members())


def test_the_check_catches_back_doors(tmp_path):
    """The scanner sees each kind of back door (so the test above can fail)."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from peft_kernel.tuner import _gc_paused\n"
        "from peft_kernel import quant\n"
        "quant._reset()\n"
        "quant.undocumented_helper\n"
        "class L:\n"
        "    def f(self):\n"
        "        self._active_adapter = []\n"
        "        self._specialise()\n"
    )
    found = "\n".join(violations(probe, documented(), kernel_private_members()))
    for needle in ("peft_kernel.tuner._gc_paused", "peft_kernel.quant._reset", "peft_kernel.quant.undocumented_helper",
                   "_active_adapter", "_specialise"):
        assert needle in found, f"the scanner missed {needle}:\n{found}"
