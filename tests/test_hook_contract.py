"""Meta-tests: every hook spec is documented, rendered into docs/hooks.md, and exercised by a test."""

import importlib.util
import inspect
import pathlib

from peft_kernel import hookspecs

ROOT = pathlib.Path(__file__).resolve().parent.parent
HOOKS = [name for name, _ in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("peft_kernel_")]


def test_every_hook_has_a_docstring():
    for name in HOOKS:
        doc = inspect.getdoc(getattr(hookspecs, name)) or ""
        assert len(doc) > 80, f"{name} needs a docstring that documents it"


def test_docs_hooks_md_is_up_to_date():
    spec = importlib.util.spec_from_file_location("gen", ROOT / "scripts" / "gen_hook_docs.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert (ROOT / "docs" / "hooks.md").read_text() == gen.render(), "run scripts/gen_hook_docs.py"


def test_every_hook_is_implemented_somewhere_under_test():
    sources = "\n".join(p.read_text() for p in ROOT.glob("**/*.py") if ".venv" not in p.parts and "tests" in p.parts
                        or p.parent.name.startswith("peft_plugin_") or p.name == "builtin_plugin.py")
    missing = [name for name in HOOKS if f"def {name}(" not in sources]
    assert not missing, f"hooks without any implementation in plugins or tests: {missing}"
