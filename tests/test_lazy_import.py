"""``import peft_kernel`` and plugin discovery never import torch; the API still works after.

The fresh-interpreter checks run in subprocesses (this test process has torch loaded
already). The in-process tests cover the lazy ``"module:QualName"`` classes of
:class:`~peft_kernel.plugins.MethodSpec` and the PEP 562 exports.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from importlib import metadata

import pytest
import torch

import peft_kernel
from peft_kernel import hookimpl
from peft_kernel.plugins import manager, register_peft_method, reset_manager

HEAVY = ("torch", "transformers", "accelerate", "safetensors", "numpy")


def run_fresh(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_import_and_discovery_do_not_import_torch_and_the_api_works_after():
    out = run_fresh(f"""
        import sys
        import peft_kernel
        from peft_kernel.plugins import manager

        methods = manager().methods()
        assert "LORA" in methods, sorted(methods)
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})
        assert not heavy, heavy
        assert not any(spec.is_resolved for spec in methods.values() if spec.source != "register_peft_method")

        from peft_plugin_lora import LoraConfig
        assert "torch" not in sys.modules

        import torch
        from torch import nn

        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 3))
        x = torch.randn(2, 4)
        expected = model(x)
        peft_model = peft_kernel.get_peft_model(model, LoraConfig(r=2, target_modules=["0"]))
        from peft_plugin_lora import Linear
        assert isinstance(peft_model.base_model.model[0], Linear)
        torch.testing.assert_close(peft_model(x), expected)
        assert isinstance(peft_model, peft_kernel.PeftModel)
        print("ok")
    """)
    assert out.strip().endswith("ok")


def test_plugins_cli_does_not_import_torch():
    out = run_fresh(f"""
        import sys
        from peft_kernel.cli import main

        rc = main(["plugins", "--json"])
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})
        assert not heavy, heavy
        sys.exit(rc)
    """)
    rows = {row["name"]: row for row in json.loads(out)}
    assert "LORA" in rows["lora"]["methods"] and rows["lora"]["error"] is None
    assert "ties_svd" in rows["peft_kernel.builtin"]["combinations"]


def test_every_entry_point_module_registers_without_torch():
    """Importing each installed plugin and calling its registration hooks stays torch-free."""
    names = sorted({ep.value.split(":")[0] for ep in metadata.entry_points(group="peft_kernel")})
    assert names
    run_fresh(f"""
        import importlib, sys
        for name in {names!r}:
            module = importlib.import_module(name)
            for hook in ("peft_kernel_register_methods", "peft_kernel_register_quant_backends",
                         "peft_kernel_register_combinations"):
                fn = getattr(module, hook, None)
                if fn is not None:
                    fn(register=lambda *a, **kw: None)
            assert "torch" not in sys.modules, f"{{name}} imports torch"
    """)


# -- PEP 562 exports -------------------------------------------------------------------------


def test_every_public_name_resolves_and_is_listed():
    for name in peft_kernel.__all__:
        assert getattr(peft_kernel, name) is not None, name
    assert peft_kernel.BaseTunerLayer is peft_kernel.AdapterLayer
    assert set(peft_kernel.__all__) <= set(dir(peft_kernel))
    from peft_kernel.mapping import get_peft_model

    assert peft_kernel.get_peft_model is get_peft_model
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        peft_kernel.nope  # noqa: B018


def test_submodules_are_attributes():
    import peft_kernel.layer

    assert peft_kernel.layer.AdapterLayer is peft_kernel.AdapterLayer
    assert peft_kernel.quant.QuantBackend.__name__ == "QuantBackend"
    assert peft_kernel.targeting.get_pattern_key(["a"], "x.a") == "a"


def test_plugin_packages_export_lazily():
    import peft_plugin_lora
    from peft_plugin_lora import LAYERS, Conv2d, Linear, LoraModel
    from peft_plugin_lora.layer import Linear as LayerLinear
    from peft_plugin_lora.model import LoraModel as ModelLoraModel

    assert Linear is LayerLinear and LoraModel is ModelLoraModel
    assert LAYERS[torch.nn.Conv2d] is Conv2d and peft_plugin_lora.LAYERS is LAYERS
    assert set(peft_plugin_lora.__all__) <= set(dir(peft_plugin_lora))
    with pytest.raises(AttributeError):
        peft_plugin_lora.nope  # noqa: B018


def test_builtin_combination_table_matches_combine():
    from peft_kernel import combine
    from peft_kernel.builtin_plugin import BUILTIN_COMBINATIONS

    direct = {}
    combine.register_builtin_combinations(lambda name, fn, *, svd=False: direct.__setitem__(name, (fn, svd)))
    assert BUILTIN_COMBINATIONS == {name: svd for name, (_, svd) in direct.items()}
    tensors, weights = [torch.tensor([1.0, -2.0, 3.0]), torch.tensor([2.0, 1.0, -1.0])], torch.tensor([0.5, 1.0])
    combos = manager().combinations()
    kw = {"density": 0.5, "majority_sign_method": "total"}
    for name, (fn, _) in direct.items():
        torch.manual_seed(0)  # DARE drops at random
        deferred = combos[name].fn(tensors, weights, **kw)
        torch.manual_seed(0)
        torch.testing.assert_close(deferred, fn(tensors, weights, **kw))


# -- lazy "module:QualName" classes in MethodSpec --------------------------------------------


@pytest.fixture
def lazy_module(tmp_path, monkeypatch):
    """An importable module ``lazy_method_mod`` with a config and a tuner (not imported yet)."""
    (tmp_path / "lazy_method_mod.py").write_text(textwrap.dedent("""
        from dataclasses import dataclass

        import peft_kernel
        from peft_kernel import TunerConfig
        from peft_plugin_lora.model import LoraModel


        @dataclass
        class LazyConfig(TunerConfig):
            def __post_init__(self):
                super().__post_init__()
                self.peft_type = "LAZYLORA"


        class Outer:
            class LazyModel(LoraModel):  # a LoRA variant: shares LoRA's layers and prefix
                prefix = "lora_"


        class WrongPrefix(peft_kernel.BaseTuner):
            prefix = "other_"
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "lazy_method_mod", raising=False)
    reset_manager()
    yield "lazy_method_mod"
    reset_manager()
    sys.modules.pop("lazy_method_mod", None)


def test_lazy_classes_are_imported_on_first_use_and_cached(lazy_module):
    register_peft_method(name="lazy_thing", config_cls=f"{lazy_module}:LazyConfig",
                         model_cls=f"{lazy_module}:Outer.LazyModel", prefix="lazy_")
    spec = manager().method("LAZY_THING")
    assert not spec.is_resolved and lazy_module not in sys.modules
    assert "lazy_method_mod:Outer.LazyModel" in repr(spec)
    config_cls = spec.config_cls
    assert lazy_module in sys.modules and config_cls is sys.modules[lazy_module].LazyConfig
    assert spec.config_cls is config_cls and not spec.is_prompt_learning
    # the tuner's prefix is checked when the class is imported
    with pytest.raises(ValueError, match=r"prefix 'lazy_' of method 'lazy_thing'.*does not match LazyModel.prefix"):
        _ = spec.model_cls


def test_lazy_variant_may_share_a_prefix_with_its_base_method(lazy_module):
    class LazyPlugin:
        @hookimpl
        def peft_kernel_register_methods(self, register):
            register(name="lazylora", config_cls=f"{lazy_module}:LazyConfig",
                     model_cls=f"{lazy_module}:Outer.LazyModel", prefix="lora_")

    manager().register(LazyPlugin(), name="lazy-plugin")
    spec = manager().method("LAZYLORA")
    assert spec.source == "lazy-plugin" and spec.prefix == "lora_"
    # sharing LoRA's prefix is allowed for a subclass of LoraModel: checked by importing both
    assert spec.model_cls is sys.modules[lazy_module].Outer.LazyModel and spec.is_resolved


def test_lazy_class_that_cannot_be_imported_names_the_plugin(lazy_module):
    class Broken:
        @hookimpl
        def peft_kernel_register_methods(self, register):
            register(name="ghost", config_cls=f"{lazy_module}:LazyConfig", model_cls="no_such_module_xyz:GhostModel")
            register(name="ghost2", config_cls=f"{lazy_module}:LazyConfig", model_cls=f"{lazy_module}:Missing")

    manager().register(Broken(), name="broken-plugin")
    with pytest.raises(ImportError, match=r"model_cls 'no_such_module_xyz:GhostModel' of PEFT method 'GHOST' "
                                          r"\(registered by plugin 'broken-plugin'\).*No module named"):
        _ = manager().method("GHOST").model_cls
    with pytest.raises(ImportError, match=r"'lazy_method_mod:Missing'.*broken-plugin.*AttributeError"):
        _ = manager().method("GHOST2").model_cls
    register_peft_method(name="ghost3", config_cls=f"{lazy_module}:LazyConfig", model_cls="no_such_module_xyz:X")
    with pytest.raises(ImportError, match=r"registered with register_peft_method\(\)"):
        _ = manager().method("GHOST3").model_cls


@pytest.mark.parametrize("ref", ["no_colon.Model", "mod:", ":Model", "mod:Bad-Name", "a b:C"])
def test_malformed_lazy_reference_is_rejected_at_registration(lazy_module, ref):
    with pytest.raises(ValueError, match="model_cls of method 'odd' must be a class or a lazy"):
        register_peft_method(name="odd", config_cls=f"{lazy_module}:LazyConfig", model_cls=ref)


def test_eager_prefix_mismatch_is_still_checked_at_registration(lazy_module):
    import importlib

    wrong = importlib.import_module(lazy_module).WrongPrefix
    with pytest.raises(ValueError, match="does not match WrongPrefix.prefix"):
        register_peft_method(name="wrong", config_cls=f"{lazy_module}:LazyConfig", model_cls=wrong)


def test_lazy_attributes_resolve_once_and_name_missing_attributes():
    import sys
    import types

    from peft_kernel.lazy import lazy_attributes

    module = types.ModuleType("lazy_probe")
    module.__all__ = ["TaskType", "Alias", "answer"]
    sys.modules["lazy_probe"] = module
    calls = []
    try:
        module.__getattr__, module.__dir__ = lazy_attributes(
            "lazy_probe", {"TaskType": "peft_kernel.config", "Alias": "peft_kernel.config:PeftConfig"},
            computed={"answer": lambda: calls.append(1) or 42}, submodules=("errors",))
        from peft_kernel.config import PeftConfig, TaskType

        assert module.TaskType is TaskType and module.Alias is PeftConfig
        assert module.answer == 42 and module.answer == 42 and calls == [1]  # stored after the first access
        assert {"TaskType", "Alias", "answer", "errors"} <= set(dir(module))
        with pytest.raises(AttributeError, match="lazy_probe.*has no attribute 'nothing'"):
            _ = module.nothing
    finally:
        del sys.modules["lazy_probe"]
