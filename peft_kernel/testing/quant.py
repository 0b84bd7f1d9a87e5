"""The contract every quantization backend plugin runs against itself.

Two pytest-collectable base classes; subclass them in the backend plugin's tests.

:class:`QuantBackendConformance` checks an adapter method on the backend's quantized
layers. The kit owns a small float model (:func:`make_base`: ``lin0`` and ``lin1`` get
quantized, ``head`` stays float); the plugin describes how it quantizes that model, one
:class:`QuantCase` per quantization setting, and passes the adapter method to use as a
config factory ``config_fn(target_modules)``. Optionally ``reference_config_fn`` returns
the matching HF PEFT config: every case is then also compared with HF PEFT (the oracle)
on the same quantized base and the same adapter weights::

    from peft_kernel.testing.quant import QuantBackendConformance, QuantCase, quantize_layers

    class TestMyBackend(QuantBackendConformance):
        config_fn = staticmethod(lambda targets: MyConfig(target_modules=targets))
        reference_config_fn = staticmethod(lambda targets: peft.MyConfig(target_modules=targets))
        cases = [
            QuantCase("8bit", quantize_layers(to_my_8bit), backend="my-backend",
                      merged_tol=0.01, roundtrip_tol=0.01, reference_merge_tol=1e-5),
            QuantCase("act-quantized", quantize_layers(to_my_w8a8), backend="my-backend",
                      merge_refusal="forward only"),
        ]

A case with ``merge_refusal`` is forward-only: merging must raise a ``ValueError`` that
contains that text, before anything changes. Any other case must merge, within
``merged_tol`` of the float merge and ``roundtrip_tol`` after merge + unmerge.

:class:`QuantPluginContract` checks the plugin itself without its library: the hook
registers the backends, the entry point makes the kernel find them, ``available()``
names the pip command when the library is missing, plain layers never match,
importing or using the plugin never imports the library, and importing the plugin and
registering its backends never imports torch (plugin discovery stays torch-free).

The method under test is only ever reached through its config, the public API and the
:class:`~peft_kernel.layer.AdapterLayer` contract; these tests name no method.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from torch import nn

from .. import get_peft_model, quant
from ..delta import WeightDeltaLayer
from ..layer import AdapterLayer
from .toy_quant import ToyBackendPlugin, ToyInt8Linear

IN, HID, OUT = 128, 64, 8
#: the layers of :class:`MLP` a case quantizes and the adapter targets
TARGETS = ("lin0", "lin1")
ADAPTER = "default"


class MLP(nn.Module):
    """lin0 (128->64) and lin1 (64->128) get quantized; head stays a float nn.Linear."""

    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(IN, HID)
        self.lin1 = nn.Linear(HID, IN)
        self.head = nn.Linear(IN, OUT)

    def forward(self, x):
        return self.head(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


def make_base(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP()


def inputs(n: int = 32, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, IN, generator=g).to(dtype)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def quantize_layers(make: Callable[[nn.Linear], nn.Module]) -> Callable[[nn.Module], nn.Module]:
    """A model quantizer that replaces each of :data:`TARGETS` by ``make(linear)``."""

    def quantize(model: nn.Module) -> nn.Module:
        for name in TARGETS:
            setattr(model, name, make(getattr(model, name)))
        return model

    return quantize


@dataclasses.dataclass
class QuantCase:
    """One quantization setting of a backend."""

    name: str
    #: quantizes :data:`TARGETS` of a fresh :func:`make_base` model (in place or not) and returns it
    quantize: Callable[[nn.Module], nn.Module]
    #: ``QuantBackend.name`` that must recognise the quantized layers
    backend: str
    #: mergeable cases: bound on the merged model's relative error against the float merge
    merged_tol: float | None = None
    #: mergeable cases: bound on the relative change after merge + unmerge
    roundtrip_tol: float | None = None
    #: forward-only cases: text the ValueError refusing the merge must contain
    merge_refusal: str | None = None
    #: with a reference: also compare the merged models, within this relative tolerance
    reference_merge_tol: float | None = None
    #: ``"output"`` compares the merged outputs, ``"weight"`` the dequantized merged base weights
    reference_merged_compare: str = "output"
    #: adjusts the reference side's quantized base model before the oracle wraps it
    reference_prepare: Callable[[nn.Module], Any] | None = None
    #: why the oracle's merge is known to be wrong for this case: the forwards must still agree,
    #: and the merged comparison must fail (a strict xfail; it errors once the oracle is right)
    reference_merge_bug: str | None = None
    #: why the oracle's forward is known to be wrong for this case: the forward comparison must fail
    #: (a strict xfail; it errors once the oracle is right), and nothing after it is compared
    reference_forward_bug: str | None = None
    #: dtype of the inputs
    dtype: torch.dtype = torch.float32

    def __post_init__(self):
        if self.merge_refusal is None and (self.merged_tol is None or self.roundtrip_tol is None):
            raise ValueError(f"case {self.name!r}: a mergeable case needs merged_tol and roundtrip_tol "
                             "(set merge_refusal for a forward-only one)")
        if self.reference_merge_bug is not None and self.reference_merge_tol is None:
            raise ValueError(f"case {self.name!r}: reference_merge_bug needs reference_merge_tol (the comparison "
                             "that is expected to fail)")
        if self.reference_merged_compare not in ("output", "weight"):
            raise ValueError(f"case {self.name!r}: reference_merged_compare must be 'output' or 'weight'")

    @property
    def mergeable(self) -> bool:
        return self.merge_refusal is None

    def __repr__(self) -> str:
        return self.name


def adapter_layers(peft_model) -> dict[str, AdapterLayer]:
    root = peft_model.base_model.model
    return {name: getattr(root, name) for name in TARGETS}


def _container_names(model: nn.Module) -> set[str]:
    return {name for m in model.modules() if isinstance(m, AdapterLayer) for name in m.adapter_layer_names}


def adapter_parameters(peft_model, adapter: str = ADAPTER, names_from: nn.Module | None = None) -> dict:
    """``{name: parameter}`` of ``adapter``'s per-adapter containers (``adapter_layer_names``
    of the adapter layers of ``names_from``, by default ``peft_model`` itself)."""
    containers = _container_names(peft_model if names_from is None else names_from)
    return {n: p for n, p in peft_model.named_parameters()
            if adapter in n.split(".") and containers & set(n.split("."))}


def randomise(peft_model, seed: int = 3, scale: float = 0.05) -> None:
    """Random adapter tensors, so that the adapter actually changes the output (most
    methods start as an identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(adapter_parameters(peft_model).items()):
            p.copy_((torch.randn(p.shape, generator=g) * scale).to(p.dtype))


def _errors(errors: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" for k, v in errors.items())


def _cases(kind: str):
    """Which cases a contract test runs on (see ``pytest_generate_tests``)."""

    def mark(fn):
        fn._quant_cases = kind
        return fn

    return mark


_SELECT = {
    "all": (lambda case: True, "no case"),
    "mergeable": (lambda case: case.mergeable, "no mergeable case (every case is forward-only)"),
    "forward_only": (lambda case: not case.mergeable, "no forward-only case (every case merges)"),
}


class QuantBackendConformance:
    """Adapter-on-quantized-base contract; see the module docstring. Not collected by
    itself (no ``Test`` prefix)."""

    cases: Sequence[QuantCase] = ()
    #: ``config_fn(target_modules) -> config`` of the adapter method under test
    config_fn: Callable[[list], Any] | None = None
    #: ``reference_config_fn(target_modules) -> HF PEFT config`` for the same adapter; ``None``: no oracle
    reference_config_fn: Callable[[list], Any] | None = None
    #: optimizer steps of the training check
    training_steps: int = 15
    #: how far a fresh adapter may move the quantized model's output: 0 for methods that start as
    #: an exact identity, float rounding for those whose start cancels only in exact arithmetic
    #: (e.g. pairs of equal reflections)
    identity_atol: float = 0.0

    def pytest_generate_tests(self, metafunc):
        if "case" not in metafunc.fixturenames:
            return
        keep, why = _SELECT[getattr(metafunc.function, "_quant_cases", "all")]
        selected = [c for c in self.cases if keep(c)]
        if selected:
            metafunc.parametrize("case", selected, ids=[c.name for c in selected])
        else:
            metafunc.parametrize("case", [pytest.param(None, marks=pytest.mark.skip(reason=why), id="none")])

    # -- helpers ----------------------------------------------------------------------

    def make_config(self):
        factory = type(self).config_fn
        if factory is None:
            raise TypeError(f"{type(self).__name__} must set config_fn (the method's config factory)")
        return factory(list(TARGETS))

    def wrap(self, model: nn.Module):
        return get_peft_model(model, self.make_config())

    def reference_wrap(self, model: nn.Module):
        """The oracle's adapter model for ``model`` (skips without an oracle)."""
        factory = type(self).reference_config_fn
        if factory is None:
            pytest.skip(f"{type(self).__name__} sets no reference_config_fn")
        hf_peft = pytest.importorskip("peft")
        return hf_peft.get_peft_model(model, factory(list(TARGETS)))

    # -- the contract -----------------------------------------------------------------

    @_cases("all")
    def test_wraps_quantized_layers(self, case: QuantCase):
        """get_peft_model wraps the quantized layers, leaves them the base layer, trains only
        the adapter, and (at initialisation) reproduces the quantized model exactly (within
        ``identity_atol``)."""
        qmodel = case.quantize(make_base())
        x = inputs(dtype=case.dtype)
        with torch.no_grad():
            expected = qmodel(x)
        quantized_types = {n: type(getattr(qmodel, n)) for n in TARGETS}
        pm = self.wrap(qmodel)
        for name, layer in adapter_layers(pm).items():
            base = layer.get_base_layer()
            assert type(base) is quantized_types[name]
            backend = quant.find_backend(base)
            assert backend is not None and backend.name == case.backend
            assert (layer.in_features, layer.out_features) == backend.layer_shape(base)
        trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
        adapter = adapter_parameters(pm)
        assert trainable and all(n in adapter for n in trainable), trainable
        with torch.no_grad():
            got = pm(x)
        assert got.dtype == expected.dtype
        if self.identity_atol:
            torch.testing.assert_close(got, expected, atol=self.identity_atol, rtol=0)
        else:
            assert torch.equal(got, expected)

    @_cases("all")
    def test_training_lowers_loss(self, case: QuantCase):
        """A few Adam steps on a regression target lower the loss and leave the quantized
        base weights untouched."""
        pm = self.wrap(case.quantize(make_base()))
        pm.train()
        bases = {n: layer.get_base_layer() for n, layer in adapter_layers(pm).items()}
        before = {n: quant.base_weight(b).detach().clone() for n, b in bases.items()}
        x = inputs(dtype=case.dtype)
        target = torch.randn(x.shape[0], OUT, generator=torch.Generator().manual_seed(7))
        opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for _ in range(self.training_steps):
            loss = ((pm(x).float() - target) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < 0.9 * losses[0], losses
        for n, b in bases.items():
            assert torch.equal(quant.base_weight(b).detach(), before[n]), f"{n} base weight changed by training"
        print(f"\n[{case.name}] loss {losses[0]:.4f} -> {losses[-1]:.4f}")

    @_cases("mergeable")
    def test_merge_against_float_merge(self, case: QuantCase):
        """merge / unmerge / merge_and_unload against the float32 "ideal" merge.

        * ``unmerged_vs_fp32``: adapter forward vs a float model holding the dequantized base
          weight merged with the adapter (tests the forward path; ~0 for weight-only backends);
        * ``merged_vs_fp32``: merged quantized model vs the same float model (the
          requantization error of the merge), bounded by ``merged_tol``;
        * ``unmerge_roundtrip``: output after merge + unmerge vs before (two requantizations),
          bounded by ``roundtrip_tol``.
        """
        qmodel = case.quantize(make_base())
        pm = self.wrap(qmodel)
        randomise(pm)
        pm.eval()
        x = inputs(dtype=case.dtype)

        ref = make_base()  # float model: dequantized base + adapter, bias and head as the layers hold them
        for name, layer in adapter_layers(pm).items():
            base = layer.get_base_layer()
            lin = getattr(ref, name)
            bias = base.bias.detach().float()
            with torch.no_grad():
                lin.weight.copy_(layer.merge_weight(quant.base_weight(base).detach().float().clone(), ADAPTER).float())
                lin.bias.copy_(layer.transform_bias(bias, ADAPTER) if isinstance(layer, WeightDeltaLayer) else bias)
        ref.head.load_state_dict({k: v.float() for k, v in qmodel.head.state_dict().items()})

        with torch.no_grad():
            y_ref = ref(x.float())
            y_unmerged = pm(x)
            pm.merge_adapter()
            y_merged = pm(x)
            for layer in adapter_layers(pm).values():
                assert layer.merged
            pm.unmerge_adapter()
            y_roundtrip = pm(x)
        errors = {
            "unmerged_vs_fp32": rel(y_unmerged, y_ref),
            "merged_vs_fp32": rel(y_merged, y_ref),
            "merged_vs_unmerged": rel(y_merged, y_unmerged),
            "unmerge_roundtrip": rel(y_roundtrip, y_unmerged),
        }
        assert errors["merged_vs_fp32"] < case.merged_tol, errors
        assert errors["unmerge_roundtrip"] < case.roundtrip_tol, errors

        # merge_and_unload on an identical model hands back the quantized layers with the adapter
        # folded in, computing what merge_adapter computed. Identical includes the forward run so
        # far: a quantized layer may change how it stores its weight on its first inference forward.
        pm2 = self.wrap(case.quantize(make_base()))
        randomise(pm2)
        types = {n: type(layer.get_base_layer()) for n, layer in adapter_layers(pm2).items()}
        pm2.eval()
        with torch.no_grad():
            assert torch.equal(pm2(x), y_unmerged)
            unloaded = pm2.merge_and_unload()
            for name in TARGETS:
                layer = getattr(unloaded, name)
                assert type(layer) is types[name] and quant.find_backend(layer) is not None
            unloaded.eval()
            errors["merge_and_unload_vs_merge"] = rel(unloaded(x), y_merged)
        assert errors["merge_and_unload_vs_merge"] < 1e-5, errors
        print(f"\n[{case.name}] {_errors(errors)}")

    @_cases("forward_only")
    def test_merge_refused(self, case: QuantCase):
        """Forward-only base: merging raises a clear ValueError before anything changes."""
        pm = self.wrap(case.quantize(make_base()))
        randomise(pm)
        pm.eval()
        x = inputs(dtype=case.dtype)
        with torch.no_grad():
            before = pm(x)
        with pytest.raises(ValueError) as info:
            pm.merge_adapter()
        message = str(info.value)
        assert case.merge_refusal in message, message
        with pytest.raises(ValueError):
            pm.merge_and_unload()
        for layer in adapter_layers(pm).values():
            assert not layer.merged
        with torch.no_grad():
            assert torch.equal(pm(x), before)
        print(f"\n[{case.name}] merge refused: {message}")

    @_cases("all")
    def test_matches_reference(self, case: QuantCase):
        """Same quantized base, same adapter config and weights: our output equals the
        oracle's (HF PEFT). With ``reference_merge_tol`` the merged models are compared too
        (both requantize): their outputs, or with ``reference_merged_compare="weight"`` the
        dequantized merged base weights (for backends where the oracle's merge loses
        something else). ``reference_prepare(model)`` adjusts the oracle's base model first
        where the oracle needs more than the layer itself to pick its quantized wrapper. With
        ``reference_merge_bug`` the merged comparison is a strict expected failure, with
        ``reference_forward_bug`` the forward comparison."""
        ours = self.wrap(case.quantize(make_base()))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref_base = case.quantize(make_base())
            if case.reference_prepare is not None:
                case.reference_prepare(ref_base)
            ref = self.reference_wrap(ref_base)
        randomise(ours)
        ref_params = dict(ref.named_parameters())
        our_params = adapter_parameters(ours)
        assert set(our_params) == set(adapter_parameters(ref, names_from=ours))
        with torch.no_grad():
            for n, p in our_params.items():
                ref_params[n].copy_(p)
        ours.eval()
        ref.eval()
        x = inputs(dtype=case.dtype)
        with torch.no_grad():
            y_ours, y_ref = ours(x), ref(x)
        errors = {"forward_max_abs": (y_ours.float() - y_ref.float()).abs().max().item()}
        _check_agreement(torch.allclose(y_ours.float(), y_ref.float(), atol=1e-5, rtol=1e-5), case.name,
                         "reference_forward_bug", case.reference_forward_bug, errors)
        if case.reference_merge_tol is not None:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ours.merge_adapter()
                ref.merge_adapter()
                y_ours_m, y_ref_m = ours(x), ref(x)
            if case.reference_merged_compare == "weight":
                ref_root = ref.base_model.model
                errors["merged_weight_rel"] = max(
                    rel(quant.base_weight(layer.get_base_layer()),
                        quant.base_weight(getattr(ref_root, name).get_base_layer()))
                    for name, layer in adapter_layers(ours).items()
                )
                merged_agree = errors["merged_weight_rel"] <= case.reference_merge_tol
            else:
                errors["merged_rel"] = rel(y_ours_m, y_ref_m)
                errors["merged_max_abs"] = (y_ours_m.float() - y_ref_m.float()).abs().max().item()
                merged_agree = errors["merged_rel"] <= case.reference_merge_tol
            _check_agreement(merged_agree, case.name, "reference_merge_bug", case.reference_merge_bug, errors)
        print(f"\n[{case.name}] vs HF PEFT: {_errors(errors)}")


def _check_agreement(agree: bool, case: str, field: str, known_bug: str | None, errors: dict) -> None:
    """``agree`` must hold, unless the case names the oracle's ``known_bug`` in ``field``: then it
    must not (a strict xfail, which fails once the oracle is right)."""
    if known_bug is None:
        assert agree, errors
    elif agree:
        pytest.fail(f"[XPASS(strict)] the oracle now agrees with us on case {case!r}: drop its {field} "
                    f"({known_bug}); {_errors(errors)}")
    else:
        pytest.xfail(f"{known_bug} ({_errors(errors)})")


class ToyQuantConformance(QuantBackendConformance):
    """The backend kit for a *method* on the kit's toy int8 backend (:mod:`peft_kernel.testing.toy_quant`,
    registered while the class runs): subclass it with a ``Test`` name and set ``config_fn``, and the
    method is checked on a quantized base without any quantization library."""

    cases = [QuantCase("toy-int8", quantize_layers(ToyInt8Linear), backend="toy-int8", merged_tol=0.02,
                       roundtrip_tol=0.02)]

    @pytest.fixture(autouse=True, scope="class")
    def _toy_backend(self):
        from ..plugins import manager

        name = manager().register(ToyBackendPlugin(), name=f"toy-int8 for {type(self).__name__}")
        yield
        manager().unregister(name)


class QuantPluginContract:
    """Plugin-level contract of a quantization backend plugin; needs no quantization
    library, so it runs in every environment. Not collected by itself (no ``Test`` prefix).
    Skips when the plugin is not installed."""

    #: the plugin's importable module, e.g. ``"peft_plugin_x"``
    plugin: str = ""
    #: its distribution, named in the install hint (``pip install '<distribution>[backend]'``)
    distribution: str = ""
    #: ``QuantBackend.name`` of every backend the hook registers, in order
    backend_names: Sequence[str] = ()
    #: import names of the library; any one of them counts as installed
    libraries: Sequence[str] = ()
    #: what ``available()`` says when the library is missing, e.g. ``"x is not installed"``
    missing_reason: str = ""

    def _module(self):
        return pytest.importorskip(self.plugin)

    def _registered(self) -> list:
        got = []
        self._module().peft_kernel_register_quant_backends(register=got.append)
        return got

    def _installed(self) -> bool:
        for name in self.libraries:
            try:
                if importlib.util.find_spec(name) is not None:
                    return True
            except (ImportError, ValueError):
                pass
        return False

    def test_hook_registers_backends(self):
        got = self._registered()
        assert [b.name for b in got] == list(self.backend_names)
        for backend in got:
            ok, reason = backend.available()
            assert ok == self._installed()
            assert (reason == "") == ok

    def test_entry_point_makes_the_kernel_find_the_backends(self):
        self._module()
        from ..plugins import manager

        names = {b.name for b in manager().quant_backends()}
        assert set(self.backend_names) <= names

    def test_available_names_the_pip_command_when_missing(self, monkeypatch):
        backends = self._registered()
        roots = {n.split(".")[0] for n in self.libraries}
        for name in list(sys.modules):
            if name.split(".")[0] in roots:
                monkeypatch.delitem(sys.modules, name)
        real = importlib.util.find_spec
        libraries = set(self.libraries)
        monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n in libraries else real(n, *a))
        hint = f"pip install '{self.distribution}[backend]'"
        for backend in backends:
            ok, reason = backend.available()
            assert not ok, backend.name
            assert self.missing_reason in reason and hint in reason, reason

    def test_plain_layers_never_match(self):
        for backend in self._registered():
            assert not backend.matches(nn.Linear(4, 4))
            assert not backend.matches(nn.Conv1d(2, 2, 1))
            assert not backend.matches(nn.ReLU())

    def test_importing_and_registering_never_imports_torch(self):
        """Plugin discovery registers backends (``peft-kernel plugins``); it must stay torch-free."""
        self._module()
        code = (
            f"import sys, {self.plugin} as p; "
            "bs = []; p.peft_kernel_register_quant_backends(register=bs.append); "
            "[(b.name, b.available()) for b in bs]; "
            "assert 'torch' not in sys.modules, 'importing or registering the plugin imported torch'"
        )
        subprocess.run([sys.executable, "-c", code], check=True)

    def test_importing_and_using_the_plugin_never_imports_the_library(self):
        self._module()
        code = (
            f"import sys, torch, {self.plugin} as p; "
            "bs = []; p.peft_kernel_register_quant_backends(register=bs.append); "
            "[(b.matches(torch.nn.Linear(2, 2)), b.available()) for b in bs]; "
            f"libs = {tuple(self.libraries)!r}; "
            "loaded = [m for m in sys.modules if any(m == l or m.startswith(l + '.') for l in libs)]; "
            "assert not loaded, loaded"
        )
        subprocess.run([sys.executable, "-c", code], check=True)
