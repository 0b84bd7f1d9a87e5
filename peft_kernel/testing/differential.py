"""Differential tests against HF PEFT (the oracle): the same config and the same weights must give
the same outputs, and checkpoints must load in both directions with the same keys, tensors and
config fields. HF PEFT (``import peft``) is needed only when these helpers run. The models come
from :mod:`peft_kernel.testing.tiny_models` (``M`` below); ``x`` is a model's input, a tensor or a
dict of keyword arguments; ``XConfig`` stands for a method's config class in both libraries.

A pair on two copies of one base, each adapter created right after seeding torch alike; HF's
trainable tensors moved away from their initial values and copied into ours (:func:`make_pair`);
a second adapter active in both (:func:`add_active_adapter`)::

    hf, ours = make_pair(lambda: M.build("mlp"), peft.XConfig(**kw), XConfig(**kw))
    hf, ours = make_pair(M.llama, peft.XConfig(**kw), XConfig(**kw), perturb=False)  # initial weights

Seeded noise on trainable tensors (:func:`perturb`, also ``peft_kernel.testing.perturb``)::

    perturb(hf, seed=5)
    ours.load_state_dict(hf.state_dict())

Outputs, compared (:func:`run`, :func:`output`, :func:`assert_close`, :func:`assert_differs`)::

    assert_close(run(ours, x), run(hf, x), "forward")                        # without gradients
    assert_close(output(ours(**inputs)), output(hf(**inputs)), "logits")     # with gradients
    assert_differs(run(ours, x), run(M.build("mlp"), x), "adapter")          # not an identity

Structure, initial state, outputs and losses, training (:func:`assert_same_structure`,
:func:`assert_same_initial_state`, :func:`assert_same_outputs`, :func:`assert_same_training`,
:func:`assert_same_config_defaults`)::

    assert_same_structure(hf, ours, ("num_virtual_tokens", "token_dim"))
    assert_same_outputs(hf, ours, {"input_ids": M.ids(), "labels": M.ids(seed=3)})
    assert_same_training(hf, ours, {"input_ids": M.ids(), "labels": M.ids(seed=3)}, steps=1)

The whole life of a weight adapter: unmerged, merged, unmerged, disabled and unloaded
(:func:`assert_matches_oracle`; :func:`assert_merge_keeps_outputs` for one model)::

    assert_matches_oracle(hf, ours, x, base_out=run(M.build("mlp"), x))

Checkpoints: both save, the files are the same, each library loads the other's
(:func:`assert_checkpoints_load_both_ways`); two saved directories compared
(:func:`assert_same_checkpoint`); one read (:func:`checkpoint_files`)::

    assert_checkpoints_load_both_ways(hf, ours, M.llama, {"input_ids": M.ids()}, tmp_path)
    config, tensors = checkpoint_files(tmp_path / "ours")

A layer method's whole table of cases against HF PEFT: :class:`OracleSuite`.

Where HF PEFT is wrong, test against the math instead and keep the comparison as a
``pytest.mark.xfail(strict=True, reason=...)``; conditions for such marks are feature-detected
(:func:`transformers_renamed_the_cache`).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: fp32 tolerance of output comparisons
ATOL = 1e-5
#: config fields that may differ between the two libraries' checkpoints: the version of the writer
KNOWN_CONFIG_DIFFERENCES = ("peft_version",)


# -- outputs ------------------------------------------------------------------------------


def output(out: Any) -> torch.Tensor:
    """The main output tensor of a model call: logits, question-answering start/end logits
    (stacked on a last dimension), the last hidden state, the first element of a tuple, or the
    tensor itself."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    if isinstance(out, torch.Tensor):
        return out
    if getattr(out, "start_logits", None) is not None:
        return torch.stack((out.start_logits, out.end_logits), dim=-1)
    if getattr(out, "logits", None) is not None:
        return out.logits
    return out.last_hidden_state


def _call(model: nn.Module, x: Any, **kwargs: Any) -> Any:
    return model(**x, **kwargs) if isinstance(x, dict) else model(x, **kwargs)


def run(model: nn.Module, x: Any, **kwargs: Any) -> torch.Tensor:
    """:func:`output` of ``model(**x)`` (``x`` a dict) or ``model(x)``, without gradients."""
    with torch.no_grad():
        return output(_call(model, x, **kwargs))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, atol: float = ATOL) -> None:
    """Same shape, finite, and no element further apart than ``atol``."""
    assert actual.shape == expected.shape, f"{what}: {tuple(actual.shape)} vs {tuple(expected.shape)}"
    assert torch.isfinite(actual).all() and torch.isfinite(expected).all(), f"{what}: non-finite values"
    diff = (actual.float() - expected.float()).abs().max().item() if actual.numel() else 0.0
    assert diff <= atol, f"{what}: max abs difference {diff:.3g} > {atol}"


def assert_differs(actual: torch.Tensor, expected: torch.Tensor, what: str, at_least: float = 1e-4) -> None:
    """Some element further apart than ``at_least``: a comparison between the two would prove something."""
    diff = (actual.float() - expected.float()).abs().max().item()
    assert diff > at_least, f"{what}: outputs did not change ({diff:.3g}); the comparison would be vacuous"


# -- pairs --------------------------------------------------------------------------------


@torch.no_grad()
def _add_noise(params: Iterable[nn.Parameter], seed: int, scale: float) -> None:
    generator = torch.Generator().manual_seed(seed)
    for param in params:
        if param.is_floating_point() and param.device.type != "meta":
            param.add_((torch.randn(param.shape, generator=generator) * scale).to(param.device, param.dtype))


def perturb(model: nn.Module, seed: int = 0, scale: float = 0.1, *, base_tensors: bool = False,
            inactive_adapters: bool = False) -> None:
    """Add seeded noise (``scale`` times a standard normal) to every trainable adapter tensor, in
    ``named_parameters`` order: methods often start as an identity, and a check on an identity
    proves nothing. Trainable tensors of the base model (biases an adapter trains, say) are left
    alone unless ``base_tensors``: a differential test moves them too, as training would. With
    ``inactive_adapters``, the frozen tensors of adapters that are not active move as well."""
    adapters = set(getattr(model, "peft_config", {}) or {})
    chosen = []
    for name, param in model.named_parameters():
        of_adapter = bool(adapters & set(name.split(".")))
        if adapters and not of_adapter and not base_tensors:
            continue
        if param.requires_grad or (inactive_adapters and of_adapter):
            chosen.append(param)
    _add_noise(chosen, seed, scale)


def perturb_into(hf: nn.Module, ours: nn.Module, seed: int = 1, scale: float = 0.5, *, adapter: str | None = None,
                 rename: Callable[[str], str] = str) -> None:
    """Seeded noise on HF's trainable tensors (or, with ``adapter``, on every tensor of that adapter,
    active or not), each copied into ours under ``rename(name)``: for pairs whose module trees name
    a tensor differently, where :func:`make_pair`'s copy of the whole state dict cannot be used.
    Both models end in eval mode."""
    chosen = [(name, param) for name, param in hf.named_parameters()
              if (param.requires_grad if adapter is None else adapter in name.split("."))]
    _add_noise([param for _, param in chosen], seed, scale)
    mine = dict(ours.named_parameters())
    with torch.no_grad():
        for name, param in chosen:
            mine[rename(name)].copy_(param)
    hf.eval(), ours.eval()


_perturb = perturb  # (make_pair's flag shadows the name)


def make_pair(model_fn: Callable[[], nn.Module], hf_config, config, *, perturb: bool = True, seed: int = 42,
              scale: float = 0.3, adapter_name: str = "default") -> tuple[nn.Module, nn.Module]:
    """``(hf, ours)``: HF PEFT's and our PeftModel, each on a fresh ``model_fn()``, each adapter
    created right after seeding torch with ``seed`` (so the initialisations agree when both
    libraries draw alike), in eval mode; their state dicts have the same keys. With ``perturb``,
    every trainable tensor of HF's, trained base tensors included, is moved away from its initial
    value (:func:`perturb` with ``seed`` and ``scale``) and copied into ours."""
    import peft

    from .. import get_peft_model

    hf_base, our_base = model_fn(), model_fn()  # before seeding: building may draw
    torch.manual_seed(seed)
    hf = peft.get_peft_model(hf_base, copy.deepcopy(hf_config), adapter_name=adapter_name)
    torch.manual_seed(seed)
    ours = get_peft_model(our_base, copy.deepcopy(config), adapter_name=adapter_name)
    hf_keys, our_keys = set(hf.state_dict()), set(ours.state_dict())
    assert our_keys == hf_keys, f"state-dict keys differ: {sorted(our_keys ^ hf_keys)[:10]}"
    if perturb:
        _perturb(hf, seed, scale, base_tensors=True)
        ours.load_state_dict(hf.state_dict())
    return hf.eval(), ours.eval()


def add_active_adapter(hf: nn.Module, ours: nn.Module, hf_config, config, name: str = "other") -> None:
    """Add adapter ``name`` to both models, make it active next to the first one, and give ours
    HF's tensors."""
    hf.add_adapter(name, hf_config)
    ours.add_adapter(name, config)
    for model in (hf, ours):
        model.base_model.set_adapter([next(iter(model.peft_config)), name])
    ours.load_state_dict(hf.state_dict())


def trainable_names(model: nn.Module) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


# -- comparisons ----------------------------------------------------------------------------


def assert_same_structure(hf: nn.Module, ours: nn.Module, fields: Iterable[str] = ()) -> None:
    """Same task class, state-dict keys, trainable tensors, parameter counts and config ``fields``."""
    assert type(ours).__name__ == type(hf).__name__
    assert set(ours.state_dict()) == set(hf.state_dict())
    assert trainable_names(ours) == trainable_names(hf)
    assert ours.get_nb_trainable_parameters() == hf.get_nb_trainable_parameters()
    ours_config, hf_config = ours.peft_config["default"], hf.peft_config["default"]
    for field in fields:
        assert getattr(ours_config, field) == getattr(hf_config, field), field


def assert_same_initial_state(hf: nn.Module, ours: nn.Module) -> None:
    """Both models hold bit-identical tensors under the same keys, and the same ones are trainable
    (for models created under the same seed: the initialisations draw alike)."""
    theirs, mine = hf.state_dict(), ours.state_dict()
    assert set(mine) == set(theirs), sorted(set(mine) ^ set(theirs))
    for key, value in theirs.items():
        assert torch.equal(mine[key], value), key
    assert trainable_names(ours) == trainable_names(hf)


def _canonical(value: Any) -> Any:
    """HF's enums as their values; sets of names, written as lists (by HF in arbitrary order, a task
    head's names even twice; by us sorted), as sets."""
    value = getattr(value, "value", value)
    return set(value) if isinstance(value, list) and all(isinstance(v, str) for v in value) else value


def assert_same_config_defaults(config_cls: type, hf_config_cls: type, **required: Any) -> None:
    """Our config class and HF PEFT's write the same fields with the same defaults and the same
    ``peft_type`` (so ``adapter_config.json`` files move both ways); ``required``: arguments both
    need."""
    ours, theirs = config_cls(**required).to_dict(), hf_config_cls(**required).to_dict()
    assert set(ours) == set(theirs), sorted(set(ours) ^ set(theirs))
    for key, value in theirs.items():
        if key not in KNOWN_CONFIG_DIFFERENCES:
            assert _canonical(ours[key]) == _canonical(value), (key, ours[key], value)


def assert_same_outputs(hf: nn.Module, ours: nn.Module, inputs: dict, atol: float = ATOL) -> None:
    """Same output (and loss, when there is one) for the same ``inputs``, without gradients."""
    with torch.no_grad():
        expected, actual = hf(**inputs), ours(**inputs)
    assert_close(output(actual), output(expected), "output", atol=atol)
    if getattr(expected, "loss", None) is not None:
        assert_close(actual.loss, expected.loss, "loss", atol=atol)


def assert_same_training(hf: nn.Module, ours: nn.Module, x: Any, steps: int = 4, gradients: bool = True,
                         atol: float = ATOL) -> None:
    """In training mode, with torch's global generator seeded alike before each call, ``steps``
    forward passes give the same outputs (the training-time dropouts draw alike; some calls may
    skip every adapter) and, with ``gradients``, backward (of the model's ``loss``, else of the sum
    of squares of its output) gives every trainable tensor the same accumulated gradient (within
    ``atol``)."""
    hf.train(), ours.train()
    for seed in range(steps):
        torch.manual_seed(seed)
        expected = _call(hf, x)
        torch.manual_seed(seed)
        got = _call(ours, x)
        assert_close(output(got), output(expected), f"training forward, seed {seed}")
        losses = [out.loss if getattr(out, "loss", None) is not None else output(out).square().sum()
                  for out in (expected, got)]
        assert losses[1].requires_grad == losses[0].requires_grad
        if losses[0].requires_grad:
            losses[0].backward()
            losses[1].backward()
    if gradients:
        hf_grads = {name: p.grad for name, p in hf.named_parameters() if p.requires_grad}
        assert trainable_names(ours) == set(hf_grads)
        for name, param in ours.named_parameters():
            if param.requires_grad:
                assert_close(param.grad, hf_grads[name], f"gradient of {name}", atol=atol)


def each_row_alone(model: nn.Module, x: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
    """What a mixed batch (``adapter_names=``) must give: each row of ``x`` run alone with only
    its adapter active (none for ``"__base__"``), on a copy of the model, so that the model
    under test keeps its state and whatever its layers keep between calls."""
    model = copy.deepcopy(model)
    rows = []
    for row, name in zip(x, adapter_names, strict=True):
        if name == "__base__":
            with model.disable_adapter():
                rows.append(run(model, row[None]))
        else:
            model.set_adapter(name)
            rows.append(run(model, row[None]))
    return torch.cat(rows)


def record_batched_forward(monkeypatch: Any, layer_cls: type) -> list[bool]:
    """Record, per call of ``layer_cls.batched_forward`` (with pytest's ``monkeypatch``), whether it
    took the mixed batch (``True``) or left it to the per-adapter path (``False``)."""
    taken: list[bool] = []
    batched_forward = layer_cls.batched_forward

    def recording(self, *args, **kwargs):
        out = batched_forward(self, *args, **kwargs)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(layer_cls, "batched_forward", recording)
    return taken


@torch.no_grad()


def assert_matches_oracle(hf: nn.Module, ours: nn.Module, x: Any, base_out: torch.Tensor,
                          disabled_is_base: bool = True) -> None:
    """Same adapter weights in HF PEFT's model and ours: the same outputs unmerged, merged (and
    merged == unmerged within 1e-4), unmerged again, disabled (also == ``base_out``, the base
    model's output, unless the adapter trains base tensors such as biases: ``disabled_is_base``)
    and after ``merge_and_unload``. Both models are merged and unloaded on return."""
    expected = run(hf, x)
    assert_differs(expected, base_out, "adapter")
    assert_close(run(ours, x), expected, "forward")
    hf.merge_adapter(), ours.merge_adapter()
    assert_close(run(ours, x), run(hf, x), "merged forward")
    assert_close(run(ours, x), expected, "merged vs unmerged", atol=1e-4)
    hf.unmerge_adapter(), ours.unmerge_adapter()
    assert_close(run(ours, x), run(hf, x), "unmerged forward")
    with hf.disable_adapter(), ours.disable_adapter():
        assert_close(run(ours, x), run(hf, x), "disabled")
        if disabled_is_base:
            assert_close(run(ours, x), base_out, "disabled vs base")
    assert_close(run(ours.merge_and_unload(), x), run(hf.merge_and_unload(), x), "merge_and_unload")


def assert_merge_keeps_outputs(model: nn.Module, x: Any, atol: float = 1e-4) -> None:
    """The adapter changes the model's output, and merging it keeps the output within ``atol``."""
    unmerged = run(model, x)
    with model.disable_adapter():
        assert_differs(unmerged, run(model, x), "adapter")
    model.merge_adapter()
    assert_close(run(model, x), unmerged, "merged vs unmerged", atol=atol)


# -- checkpoints ----------------------------------------------------------------------------


def checkpoint_files(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(adapter_config.json as a dict, tensors of adapter_model.safetensors)`` of a saved adapter."""
    from safetensors.torch import load_file

    with open(Path(path) / "adapter_config.json", encoding="utf-8") as fh:
        config = json.load(fh)
    return config, load_file(Path(path) / "adapter_model.safetensors")


def assert_same_checkpoint(ours, hf, *, may_differ: Iterable[str] = KNOWN_CONFIG_DIFFERENCES,
                           atol: float = 0.0) -> None:
    """The two saved adapters (directories) hold the same tensors (within ``atol``; by default
    equal) under the same keys, and the same config fields with the same values (lists of names
    compared sorted), but for the fields in ``may_differ``."""
    our_config, our_tensors = checkpoint_files(ours)
    hf_config, hf_tensors = checkpoint_files(hf)
    assert set(our_tensors) == set(hf_tensors), sorted(set(our_tensors) ^ set(hf_tensors))
    for key, tensor in hf_tensors.items():
        if atol:
            assert_close(our_tensors[key], tensor, f"saved tensor {key}", atol=atol)
        else:
            assert torch.equal(our_tensors[key], tensor), f"saved tensor {key}"
    assert set(our_config) == set(hf_config), sorted(set(our_config) ^ set(hf_config))
    differ = {key for key in hf_config if _canonical(our_config[key]) != _canonical(hf_config[key])}
    assert differ <= set(may_differ), {key: (our_config[key], hf_config[key]) for key in differ}


def assert_checkpoints_load_both_ways(hf: nn.Module, ours: nn.Module, fresh_base: Callable[[], nn.Module], x: Any,
                                      tmp_path, *, may_differ: Iterable[str] = KNOWN_CONFIG_DIFFERENCES,
                                      atol: float = ATOL, tensor_atol: float = 0.0) -> None:
    """Both save (to ``tmp_path/"hf"`` and ``tmp_path/"ours"``); the files are the same
    (:func:`assert_same_checkpoint`; saved tensors equal, or within ``tensor_atol`` where each
    library computes them at save time); each library reads the other's config as the same config
    class, loads the other's checkpoint onto ``fresh_base()`` as the same task class, and gives
    HF's output on ``x`` (within ``atol``); an adapter we load is frozen."""
    import peft

    import peft_kernel

    hf_dir, our_dir = Path(tmp_path) / "hf", Path(tmp_path) / "ours"
    expected = run(hf, x)
    hf.save_pretrained(hf_dir)
    ours.save_pretrained(our_dir)
    assert_same_checkpoint(our_dir, hf_dir, may_differ=may_differ, atol=tensor_atol)
    config_class = type(hf.peft_config["default"]).__name__
    assert type(peft_kernel.PeftConfig.from_pretrained(str(hf_dir))).__name__ == config_class
    ours_from_hf = peft_kernel.PeftModel.from_pretrained(fresh_base(), str(hf_dir)).eval()
    hf_from_ours = peft.PeftModel.from_pretrained(fresh_base(), str(our_dir)).eval()
    assert_close(run(ours_from_hf, x), expected, "ours loading HF's checkpoint", atol=atol)
    assert_close(run(hf_from_ours, x), expected, "HF loading our checkpoint", atol=atol)
    assert type(hf_from_ours.peft_config["default"]).__name__ == config_class
    assert type(ours_from_hf).__name__ == type(hf_from_ours).__name__
    assert not trainable_names(ours_from_hf), "a loaded adapter must be frozen"


# -- HF PEFT's known limits -----------------------------------------------------------------


def transformers_renamed_the_cache() -> bool:
    """Whether transformers takes the key/value cache as ``cache`` (5.2x) rather than
    ``past_key_values``, the only name HF PEFT 0.21.2 knows: its prompt-learning generation and
    its prefix tuning on task heads go wrong when this is true. Feature-detected."""
    import inspect

    from transformers.generation.utils import GenerationMixin

    return "past_key_values" not in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters


# -- a layer method's table of cases ----------------------------------------------------------


class OracleSuite:
    """Differential tests of a layer method against HF PEFT's (the oracle) on the models of
    :mod:`peft_kernel.testing.tiny_models`; subclass it with a ``Test`` name and set:

    * ``config_cls``, and ``hf_config``: the name of HF PEFT's config class (``peft.<name>``);
    * ``cases``: ``(id, model name, config kwargs)``: HF PEFT's model and ours, same base, same
      (perturbed) adapter tensors, give the same outputs unmerged, merged (also == unmerged within
      1e-4), unmerged again, disabled (== the base, unless the case trains biases: a ``bias``
      other than ``"none"``) and after ``merge_and_unload``;
    * ``scale``: the size of the seeded noise on the adapter tensors (:func:`make_pair`'s, and the
      second adapter's of ``two_adapter_cases``); smaller for methods whose outputs are all rounding
      when their tensors are large (OFT's Neumann series);
    * ``init_values``: the ``init_weights`` values with which, created under the same seed, both
      hold bit-identical tensors (on every case but the transformers models; a case that sets
      ``init_weights`` itself is compared with that value only; ``()``: none);
    * ``training``: ``(case id, extra kwargs)`` (e.g. dropouts): a few seeded training steps give
      the same outputs and, unless the id is in ``gradients_differ``, the same gradients;
    * ``checkpoint_cases``: case ids whose checkpoints are the same files and load both ways (both
      models run once before saving: methods that update their tensors on use save what they used);
    * ``two_adapter_cases``: case ids where a second adapter of the same config, both active,
      gives HF's outputs unmerged and merged (within ``two_merged_atol``), and merged == unmerged
      within 1e-4;
    * ``hf_mixed_batch_bug``: why HF PEFT gets mixed batches (``adapter_names=``) wrong for the method,
      if it does: the comparison on the first case is then a strict xfail (ours is the kit's
      ``MethodConformance.test_mixed_batch``).

    Where HF PEFT is wrong, leave the case out and test it separately, against the math, with
    the HF comparison as a strict xfail.
    """

    config_cls: type | None = None
    hf_config: str = ""
    cases: Sequence[tuple[str, str, dict]] = ()
    scale: float = 0.3
    init_values: Sequence[Any] = (True, False)
    training: Sequence[tuple[str, dict]] = ()
    gradients_differ: Sequence[str] = ()
    checkpoint_cases: Sequence[str] = ()
    two_adapter_cases: Sequence[str] = ()
    two_merged_atol: float = 1e-4
    hf_mixed_batch_bug: str | None = None

    def pytest_generate_tests(self, metafunc):
        from .tiny_models import TRANSFORMERS

        by_id = {case[0]: case for case in self.cases}
        inits = [(case, value) for case in self.cases if case[1] not in TRANSFORMERS and self.init_values
                 for value in ((case[2]["init_weights"],) if "init_weights" in case[2] else self.init_values)]
        choices = {
            "case": [(case[0], case) for case in self.cases],
            "init_case": [(f"{case[0]}-{value!r}", (case, value)) for case, value in inits],
            "training_case": [(f"{name}-{i}", (name, by_id[name][1], {**by_id[name][2], **extra}))
                              for i, (name, extra) in enumerate(self.training)],
            "checkpoint_case": [(name, by_id[name]) for name in self.checkpoint_cases],
            "two_adapter_case": [(name, by_id[name]) for name in self.two_adapter_cases],
        }
        wanted = [argument for argument in choices if argument in metafunc.fixturenames]
        empty = [argument for argument in wanted if not choices[argument]]
        if empty:  # one skipped test rather than a product of skips
            import pytest

            skip = pytest.mark.skip(reason=f"this suite sets no {empty[0]}")
            skipped = pytest.param(*[None] * len(wanted), marks=skip)
            metafunc.parametrize(wanted, [skipped], ids=["none"])
            return
        for argument in wanted:
            metafunc.parametrize(argument, [v for _, v in choices[argument]], ids=[i for i, _ in choices[argument]])

    def pair(self, model: str, kwargs: dict, perturb: bool = True) -> tuple[nn.Module, nn.Module]:
        """:func:`make_pair` on the tiny model ``model`` for this method's configs."""
        from .tiny_models import TRANSFORMERS, build

        if model in TRANSFORMERS:
            import pytest

            pytest.importorskip("transformers")
        return make_pair(lambda: build(model), self.hf_config_cls()(**kwargs), self.config_cls(**kwargs),
                         perturb=perturb, scale=self.scale)

    def hf_config_cls(self) -> type:
        import pytest

        return getattr(pytest.importorskip("peft"), self.hf_config)

    def test_same_seed_same_initial_state(self, init_case):
        (_, model, kwargs), init_weights = init_case
        assert_same_initial_state(*self.pair(model, {**kwargs, "init_weights": init_weights}, perturb=False))

    def test_outputs_merge_unmerge(self, case):
        from .tiny_models import build, inputs

        _, model, kwargs = case
        hf, ours = self.pair(model, kwargs)
        x = inputs(model)
        trains_biases = kwargs.get("bias", "none") != "none"
        assert_matches_oracle(hf, ours, x, run(build(model), x), disabled_is_base=not trains_biases)

    def test_training_matches(self, training_case):
        from .tiny_models import inputs

        name, model, kwargs = training_case
        hf, ours = self.pair(model, kwargs)
        assert_same_training(hf, ours, inputs(model), gradients=name not in self.gradients_differ, atol=1e-4)

    def test_checkpoints_load_both_ways(self, checkpoint_case, tmp_path):
        from .tiny_models import build, inputs

        _, model, kwargs = checkpoint_case
        hf, ours = self.pair(model, kwargs)
        run(ours, inputs(model))  # (HF's model runs before saving too)
        assert_checkpoints_load_both_ways(hf, ours, lambda: build(model), inputs(model), tmp_path)

    def two_adapter_pair(self, model: str, kwargs: dict) -> tuple[nn.Module, nn.Module]:
        """:meth:`pair` with a second adapter ``"other"`` of the same config, both active, perturbed."""
        hf, ours = self.pair(model, kwargs, perturb=False)
        add_active_adapter(hf, ours, self.hf_config_cls()(**kwargs), self.config_cls(**kwargs))
        perturb(hf, seed=1, scale=self.scale, base_tensors=True)
        ours.load_state_dict(hf.state_dict())
        return hf, ours

    def test_two_active_adapters(self, two_adapter_case):
        from .tiny_models import inputs

        _, model, kwargs = two_adapter_case
        hf, ours = self.two_adapter_pair(model, kwargs)
        x = inputs(model)
        unmerged = run(ours, x)
        assert_close(unmerged, run(hf, x), "two active adapters")
        hf.merge_adapter(), ours.merge_adapter()
        assert_close(run(ours, x), run(hf, x), "two merged adapters", atol=self.two_merged_atol)
        assert_close(run(ours, x), unmerged, "two merged vs unmerged", atol=1e-4)

    def test_mixed_batch_matches_hf(self, request):
        """The first case with two adapters, one per sample and one sample without (``adapter_names=``)."""
        import pytest

        from .tiny_models import inputs

        if self.hf_mixed_batch_bug:
            request.applymarker(pytest.mark.xfail(strict=True, reason=self.hf_mixed_batch_bug))
        _, model, kwargs = self.cases[0]
        hf, ours = self.two_adapter_pair(model, kwargs)
        x, names = inputs(model), ["other", "__base__", "default"]
        assert_close(run(ours, x, adapter_names=names), run(hf, x, adapter_names=names), "mixed batch")

    def test_config_fields_and_defaults_match_hf(self):
        assert_same_config_defaults(self.config_cls, self.hf_config_cls())
