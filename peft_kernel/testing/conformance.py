"""The contract every method plugin runs against itself.

Subclass :class:`MethodConformance` in your plugin's tests and list the cases it should
cover; pytest then runs every contract test for every case::

    from peft_kernel.testing import Case, MethodConformance

    class TestMyMethod(MethodConformance):
        cases = [Case("mlp", model_fn=make_mlp, config_fn=lambda: MyConfig(target_modules=["lin0"]),
                      input_fn=lambda: torch.randn(4, 10))]

The tests use nothing but the public API, so a third-party plugin passes them exactly
when peft-kernel can treat it like a first-party one. A method whose adapter is not an
identity at initialisation sets ``identity_at_init = False``; one that cannot merge sets
``supports_merge = False`` (and must then refuse to merge with an error).

Prompt-learning methods run the same contract: their outputs carry one extra position
per virtual token in front, so outputs are compared on the positions of the real tokens
(the last ones) whenever the adapted output is longer than the base output.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .. import PeftModel, get_peft_model
from ..layer import BASE_ADAPTER, AdapterLayer
from ..plugins import manager
from ..state_dict import SAFETENSORS_WEIGHTS_NAME, get_peft_model_state_dict, set_peft_model_state_dict
from .differential import assert_close, assert_differs, perturb, run
from .mixed_partner import can_partner, partner_method


@dataclasses.dataclass
class Case:
    """One model + config + input combination to check."""

    name: str
    model_fn: Callable[[], nn.Module]
    config_fn: Callable[[], Any]
    input_fn: Callable[[], Any]
    #: absolute tolerance for output comparisons
    atol: float = 1e-5

    def __repr__(self) -> str:
        return self.name


def _run(model: nn.Module, inputs: Any, **extra: Any) -> torch.Tensor:
    model.eval()
    out = run(model, inputs, **extra).detach().float()
    out.virtual_tokens = _virtual_tokens(model)
    return out


def assert_gradcheck(layer: nn.Module, x: torch.Tensor, adapter_name: str = "default") -> list[str]:
    """``torch.autograd.gradcheck`` of an adapter layer (already in float64) with respect to every
    tensor of ``adapter_name`` in its ``adapter_layer_names`` containers and, when it is floating
    point, the input ``x``. Returns the names of the tensors checked."""
    names = [f"{container}.{adapter_name}" for container in layer.adapter_layer_names
             if adapter_name in getattr(layer, container)]
    tensors = [layer.get_parameter(name).detach().clone().requires_grad_() for name in names]
    inputs = [x.detach().clone().requires_grad_()] if x.is_floating_point() else []

    def forward(*args):
        given = list(args)
        x_in = given.pop(0) if inputs else x
        return torch.func.functional_call(layer, dict(zip(names, given, strict=True)), (x_in,))

    assert torch.autograd.gradcheck(forward, (*inputs, *tensors), fast_mode=True)
    return names


def _base_weight_ids(model: nn.Module) -> set[int]:
    """Weights (not biases) held directly by the innermost base layer of each adapter layer."""
    return {id(param) for param in _base_weights(model)}


def _batch_size(inputs: Any) -> int | None:
    values = inputs.values() if isinstance(inputs, dict) else [inputs]
    for value in values:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    return None


def _edit_base_weights(model: nn.Module, seed: int) -> None:
    """Change every adapted layer's base weight in place (a base reloaded or fine-tuned in place)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in {id(p): p for p in _base_weights(model)}.values():  # tied weights once
            if param.is_floating_point() and param.device.type != "meta":
                param.add_((torch.randn(param.shape, generator=generator) * 0.05).to(param.device, param.dtype))


def _base_weights(model: nn.Module) -> list[torch.Tensor]:
    return [param for module in model.modules() if isinstance(module, AdapterLayer)
            for name, param in module.get_base_layer().named_parameters(recurse=False) if not name.endswith("bias")]


def _virtual_tokens(model: nn.Module) -> int:
    """Virtual tokens a prompt-learning PeftModel puts in front of the input (else 0)."""
    if not getattr(model, "_is_prompt_learning", False):
        return 0
    return int(model.active_peft_config.num_virtual_tokens)


def _align(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """Outputs of prompt learning have one extra leading position per virtual token (when
    the output is per input token): compare the positions of the real tokens."""
    n = getattr(actual, "virtual_tokens", 0)
    if n and actual.dim() >= 2 and actual.dim() == expected.dim() and actual.shape[1] == expected.shape[1] + n:
        return actual[:, n:]
    return actual


def _assert_close(actual, expected, atol, what):
    assert_close(_align(actual, expected), expected, what, atol=atol)


def _assert_differs(actual, expected, what):
    assert_differs(_align(actual, expected), expected, what, at_least=1e-6)


class MethodConformance:
    """Contract tests; see the module docstring. Not collected by itself (no ``Test`` prefix)."""

    cases: list[Case] = []
    identity_at_init: bool = True
    supports_merge: bool = True
    adapter_name_2: str = "other"

    def pytest_generate_tests(self, metafunc):
        if "case" in metafunc.fixturenames:
            metafunc.parametrize("case", self.cases, ids=[c.name for c in self.cases])

    # -- helpers ----------------------------------------------------------------------

    def _fresh(self, case: Case) -> nn.Module:
        torch.manual_seed(0)
        return case.model_fn()

    def _peft(self, case: Case, seed: int = 1, **kwargs) -> tuple[nn.Module, PeftModel]:
        base = self._fresh(case)
        reference = copy.deepcopy(base)
        model = get_peft_model(base, case.config_fn(), **kwargs)
        perturb(model, seed=seed)
        return reference, model

    # -- the contract -----------------------------------------------------------------

    def test_identity_at_init(self, case: Case):
        if not self.identity_at_init:
            return
        base = self._fresh(case)
        reference = copy.deepcopy(base)
        inputs = case.input_fn()
        model = get_peft_model(base, case.config_fn())
        _assert_close(_run(model, inputs), _run(reference, inputs), case.atol, "new adapter changed outputs")

    def test_trainable_parameters_are_adapter_only(self, case: Case):
        base = self._fresh(case)
        model = get_peft_model(base, case.config_fn())
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable, "the adapter has no trainable parameters"
        base_weights = _base_weight_ids(model)
        wrong = [n for n, p in model.named_parameters() if p.requires_grad and id(p) in base_weights]
        assert not wrong, f"base weights are trainable: {wrong}"
        if model.peft_config["default"].is_prompt_learning:
            # no adapter layers to tell base from adapter: every trainable tensor must be the adapter's
            wrong = [n for n, p in model.named_parameters() if p.requires_grad and "default" not in n.split(".")]
            assert not wrong, f"tensors outside the adapter are trainable: {wrong}"

    def test_save_load_round_trip(self, case: Case, tmp_path):
        reference, model = self._peft(case)
        inputs = case.input_fn()
        expected = _run(model, inputs)
        model.save_pretrained(tmp_path)
        assert os.path.isfile(tmp_path / "adapter_config.json")
        assert os.path.isfile(tmp_path / SAFETENSORS_WEIGHTS_NAME)
        loaded = PeftModel.from_pretrained(self._fresh(case), tmp_path)
        _assert_close(_run(loaded, inputs), expected, case.atol, "reloaded adapter differs")
        assert not any(p.requires_grad for p in loaded.parameters()), "loaded adapter must be frozen by default"

    def test_checkpoint_keys_are_hf_format(self, case: Case, tmp_path):
        from safetensors.torch import load_file

        _, model = self._peft(case)
        model.save_pretrained(tmp_path)
        keys = list(load_file(tmp_path / SAFETENSORS_WEIGHTS_NAME))
        assert keys, "nothing was saved"
        for key in keys:
            if not model.peft_config["default"].is_prompt_learning:
                assert key.startswith("base_model."), f"{key} lacks the base_model. prefix"
            assert "default" not in key.split("."), f"{key} still carries the adapter name"
            assert not key.endswith(".base_layer.weight") and ".original_module." not in key, f"{key} is a base weight"

    def test_merged_equals_unmerged(self, case: Case):
        if not self.supports_merge:
            return
        _, model = self._peft(case)
        inputs = case.input_fn()
        expected = _run(model, inputs)
        model.merge_adapter()
        _assert_close(_run(model, inputs), expected, case.atol * 10, "merged output differs from unmerged")
        model.unmerge_adapter()
        _assert_close(_run(model, inputs), expected, case.atol * 10, "unmerged output differs")

    def test_unmerge_restores_base(self, case: Case):
        if not self.supports_merge:
            return
        reference, model = self._peft(case)
        before = {k: v.detach().clone() for k, v in model.get_base_model().state_dict().items() if ".base_layer." in k}
        model.merge_adapter()
        model.unmerge_adapter()
        for key, value in model.get_base_model().state_dict().items():
            if key in before:
                _assert_close(value.float(), before[key].float(), 1e-5, f"unmerge did not restore {key}")

    def test_merge_and_unload(self, case: Case):
        if not self.supports_merge:
            return
        _, model = self._peft(case)
        inputs = case.input_fn()
        expected = _run(model, inputs)
        plain = model.merge_and_unload()
        assert not any(isinstance(m, AdapterLayer) for m in plain.modules()), "adapter layers remain after unload"
        _assert_close(_run(plain, inputs), expected, case.atol * 10, "merge_and_unload changed outputs")

    def test_merge_refused(self, case: Case):
        if self.supports_merge:
            return
        _, model = self._peft(case)
        inputs = case.input_fn()
        expected = _run(model, inputs)
        for call in (model.merge_adapter, model.merge_and_unload):
            try:
                call()
            except (TypeError, ValueError, NotImplementedError):
                pass
            else:
                raise AssertionError(f"{call.__name__} must raise for a method that cannot merge")
        _assert_close(_run(model, inputs), expected, case.atol, "a refused merge changed outputs")

    def test_unload_gives_base(self, case: Case):
        reference, model = self._peft(case)
        inputs = case.input_fn()
        config = model.peft_config["default"]
        if not config.is_prompt_learning and not getattr(config, "modules_to_save", None):
            plain = model.unload()  # (modules_to_save copies are kept by unload, by design)
            _assert_close(_run(plain, inputs), _run(reference, inputs), case.atol, "unload changed the base model")

    def test_disable_adapter(self, case: Case):
        reference, model = self._peft(case)
        inputs = case.input_fn()
        adapted = _run(model, inputs)
        base_out = _run(reference, inputs)
        _assert_differs(adapted, base_out, "perturbed adapter")
        with model.disable_adapter():
            _assert_close(_run(model, inputs), base_out, case.atol, "disable_adapter did not give base outputs")
        _assert_close(_run(model, inputs), adapted, case.atol, "adapter not restored after disable_adapter")

    def _second_config(self, case: Case):
        """The case's config for a second adapter: only one adapter may train biases."""
        config = case.config_fn()
        if getattr(config, "bias", "none") not in ("none", None):
            config.bias = "none"
        return config

    def test_two_adapters(self, case: Case):
        _, model = self._peft(case, seed=1)
        inputs = case.input_fn()
        first = _run(model, inputs)
        model.add_adapter(self.adapter_name_2, self._second_config(case))
        assert model.active_adapter == "default", "a new adapter must not become active"
        _assert_close(_run(model, inputs), first, case.atol, "adding an adapter changed outputs")
        model.set_adapter(self.adapter_name_2)
        perturb(model, seed=2)
        second = _run(model, inputs)
        _assert_differs(second, first, "second adapter")
        names = set(model.peft_config)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad and names & set(n.split("."))}
        assert trainable and all(self.adapter_name_2 in n.split(".") for n in trainable), (
            f"only the active adapter may train, got {sorted(trainable)}")
        model.set_adapter("default")
        _assert_close(_run(model, inputs), first, case.atol, "switching back did not restore outputs")

    def test_delete_adapter(self, case: Case):
        _, model = self._peft(case)
        inputs = case.input_fn()
        first = _run(model, inputs)
        model.add_adapter(self.adapter_name_2, self._second_config(case))
        model.set_adapter(self.adapter_name_2)
        model.delete_adapter(self.adapter_name_2)
        assert self.adapter_name_2 not in model.peft_config
        assert model.active_adapters == ["default"]
        assert not any(self.adapter_name_2 in n.split(".") for n, _ in model.named_parameters())
        _assert_close(_run(model, inputs), first, case.atol, "outputs changed after deleting another adapter")
        try:
            model.delete_adapter("does-not-exist")
        except ValueError:
            pass
        else:
            raise AssertionError("deleting an unknown adapter must raise ValueError")

    def test_low_cpu_mem_usage(self, case: Case, tmp_path):
        _, model = self._peft(case)
        inputs = case.input_fn()
        expected = _run(model, inputs)
        model.save_pretrained(tmp_path)
        empty = get_peft_model(self._fresh(case), case.config_fn(), low_cpu_mem_usage=True)
        metas = [n for n, p in empty.named_parameters() if p.device.type == "meta"]
        assert metas, "low_cpu_mem_usage=True should create adapter weights on the meta device"
        loaded = PeftModel.from_pretrained(self._fresh(case), tmp_path, low_cpu_mem_usage=True)
        assert not any(p.device.type == "meta" for p in loaded.parameters()), "meta tensors left after loading"
        _assert_close(_run(loaded, inputs), expected, case.atol, "low_cpu_mem_usage load differs")

    # -- state the layers may cache -------------------------------------------------------

    def test_mixed_batch(self, case: Case):
        """``adapter_names=`` gives every sample its own adapter's output, or is refused with
        a clear error (TypeError / ValueError) before anything runs: never a shape error."""
        _, model = self._peft(case)
        if model.peft_config["default"].is_prompt_learning:
            return  # no adapter layers to route
        inputs = case.input_fn()
        batch = _batch_size(inputs)
        if batch is None:
            return
        model.add_adapter(self.adapter_name_2, self._second_config(case))
        model.set_adapter(self.adapter_name_2)
        perturb(model, seed=2)
        model.set_adapter("default")
        choices = ["default", self.adapter_name_2, BASE_ADAPTER]
        names = [choices[i % len(choices)] for i in range(batch)]
        try:
            mixed = _run(model, inputs, adapter_names=names)
        except (TypeError, ValueError, NotImplementedError) as refusal:
            assert "mixed" in str(refusal) or "adapter_names" in str(refusal), (
                f"a refused mixed batch must say so, got {type(refusal).__name__}: {refusal}")
            return
        for name in dict.fromkeys(names):
            rows = [i for i, n in enumerate(names) if n == name]
            if name == BASE_ADAPTER:
                with model.disable_adapter():
                    expected = _run(model, inputs)
            else:
                model.set_adapter(name)
                expected = _run(model, inputs)
            _assert_close(mixed[rows], expected[rows], case.atol, f"mixed-batch rows of {name!r}")

    def test_no_stale_state(self, case: Case):
        """Nothing a layer derives from its tensors or its adapters outlives a change:

        * editing adapter and base tensors in place (an optimizer step, a reload) changes the
          next output exactly as a fresh model with those tensors computes it;
        * an adapter deleted and added again under the same name computes with its new
          tensors: what a layer keeps per adapter must be dropped on state changes
          (``adapter_state_changed``), not only when tensors are edited.
        """
        _, model = self._peft(case)
        other = self.adapter_name_2
        model.add_adapter(other, self._second_config(case))
        fresh = get_peft_model(self._fresh(case), case.config_fn())
        fresh.add_adapter(other, self._second_config(case))
        inputs = case.input_fn()
        before = _run(model, inputs)  # the first call builds whatever a layer caches
        _run(model, inputs)
        perturb(model, seed=3)
        _edit_base_weights(model, seed=4)
        after = _run(model, inputs)
        _assert_differs(after, before, "in-place edits")
        fresh.load_state_dict(model.state_dict())
        _assert_close(after, _run(fresh, inputs), case.atol, "outputs after in-place edits (stale cache?)")

        model.set_adapter(other)
        perturb(model, seed=2)
        old = _run(model, inputs)
        _run(model, inputs)
        model.set_adapter("default")
        model.delete_adapter(other)
        model.add_adapter(other, self._second_config(case))
        model.set_adapter(other)
        perturb(model, seed=5)
        new = _run(model, inputs)
        _assert_differs(new, old, "the re-added adapter")
        fresh.load_state_dict(model.state_dict())
        fresh.set_adapter(other)
        _assert_close(new, _run(fresh, inputs), case.atol, "re-added adapter (state kept from the deleted one?)")

    # -- mixed models ---------------------------------------------------------------------

    def test_mixes_with_other_methods(self, case: Case, tmp_path):
        """A method registered with ``is_mixed_compatible=True`` works in a mixed model next to
        the layers of another method (the kit's partner, a rank-one weight delta), inside them
        and around them: its adapter alone computes what its own model computes; both active,
        they differ from it, merged == unmerged, disabled == base; the adapter saves in its
        own format. An adapter that cannot act through other layers (e.g. it reads the base
        weight alone) may refuse to wrap them with a ``ValueError`` that leaves the model as it
        was; being wrapped it cannot refuse. Other methods, and configs a mixed model refuses,
        skip this check."""
        config = case.config_fn()
        if (config.is_prompt_learning or getattr(config, "target_parameters", None)
                or not manager().method(config.peft_type).is_mixed_compatible):
            return
        reference, own = self._peft(case)
        inner = own.get_base_model()
        targets = [n for n in own.targeted_module_names if can_partner(inner.get_submodule(n))]
        if not targets:
            return
        inputs = case.input_fn()
        alone, base_out, state = _run(own, inputs), _run(reference, inputs), get_peft_model_state_dict(own)
        with partner_method() as partner_config:
            for partner_first in (True, False):
                where = "inside the partner's layers" if partner_first else "around the partner's layers"
                adapters = [("partner", partner_config(target_modules=targets)), ("default", case.config_fn())]
                (first, first_config), (second, second_config) = adapters if partner_first else adapters[::-1]
                model = get_peft_model(self._fresh(case), first_config, first, mixed=True)
                if partner_first:
                    keys = set(model.state_dict())
                    try:
                        model.add_adapter(second, second_config)
                    except ValueError:
                        assert set(model.peft_config) == {"partner"} and set(model.state_dict()) == keys, (
                            "a refused adapter must leave the model as it was")
                        continue
                else:
                    model.add_adapter(second, second_config)
                set_peft_model_state_dict(model, state, adapter_name="default")
                model.set_adapter("partner")
                perturb(model, seed=7)
                model.set_adapter("default")
                _assert_close(_run(model, inputs), alone, case.atol, f"{where}: the adapter alone")
                model.set_adapter(["default", "partner"])
                both = _run(model, inputs)
                _assert_differs(both, alone, f"{where}: both adapters")
                with model.disable_adapter():
                    _assert_close(_run(model, inputs), base_out, case.atol, f"{where}: disabled")
                if self.supports_merge:
                    model.merge_adapter()
                    _assert_close(_run(model, inputs), both, case.atol * 10, f"{where}: merged vs unmerged")
                if not partner_first:  # inside another layer, its keys must still be its own model's
                    model.save_pretrained(tmp_path, selected_adapters=["default"])
                    loaded = PeftModel.from_pretrained(self._fresh(case), tmp_path)
                    _assert_close(_run(loaded, inputs), alone, case.atol, f"{where}: its checkpoint loaded alone")
