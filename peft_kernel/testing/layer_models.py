"""For the tests of methods that adapt layers (weight deltas, weight transforms): tiny seeded
models with one kind of layer each, :class:`OracleSuite` (differential tests against HF PEFT) and
:func:`assert_gradcheck`. The same name and seed always give the same weights, so a test can
rebuild the base of an adapter, and HF PEFT's model and ours can start from one base.

    model = build("conv2d")             # a fresh copy, in eval mode
    out = model(inputs("conv2d"))

Names: ``"mlp"`` (three ``nn.Linear``: ``lin0`` 10→16, ``lin1`` 16→12, ``lin2`` 12→4),
``"conv1d"``, ``"conv2d"``, ``"conv3d"`` (kernels of 3 and of 1, a grouped one for 2-D), ``"conv1d_wide"``
(one Conv1d 64→64), ``"embedding"``
(``emb`` 20×8 with a padding index, then ``lin``), and the transformers models ``"llama"`` and
``"gpt2"`` of :mod:`peft_kernel.testing.differential` (token ids as inputs).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from . import differential as D


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0, self.lin1, self.lin2 = nn.Linear(10, 16), nn.Linear(16, 12), nn.Linear(12, 4)

    def forward(self, x):
        return self.lin2(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


class Conv1dNet(nn.Module):
    """Conv1d with a kernel of 3, then one with a kernel of 1."""

    def __init__(self):
        super().__init__()
        self.conv0, self.conv1 = nn.Conv1d(4, 6, 3, padding=1), nn.Conv1d(6, 6, 1)
        self.head = nn.Linear(6 * 9, 4)

    def forward(self, x):
        return self.head(torch.relu(self.conv1(torch.relu(self.conv0(x)))).flatten(1))


class WideConv1dNet(nn.Module):
    """One Conv1d 64→64 with a kernel of 3 (room for factorisations of the channels)."""

    def __init__(self):
        super().__init__()
        self.conv0, self.head = nn.Conv1d(64, 64, 3, padding=1), nn.Linear(64 * 5, 4)

    def forward(self, x):
        return self.head(torch.relu(self.conv0(x)).flatten(1))


class Conv2dNet(nn.Module):
    """Conv2d 3×3, a grouped 3×3 (stride 2) and a 1×1."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3)
        self.conv1 = nn.Conv2d(8, 8, 3, groups=2, stride=2)
        self.conv2 = nn.Conv2d(8, 4, 1)
        self.head = nn.Linear(4 * 3 * 3, 4)

    def forward(self, x):
        h = torch.relu(self.conv1(torch.relu(self.conv0(x))))
        return self.head(torch.relu(self.conv2(h)).flatten(1))


class Conv3dNet(nn.Module):
    """Conv3d 3×3×3, then a 1×1×1."""

    def __init__(self):
        super().__init__()
        self.conv0, self.conv1 = nn.Conv3d(2, 4, 3), nn.Conv3d(4, 4, 1)
        self.head = nn.Linear(4 * 2 * 2 * 2, 4)

    def forward(self, x):
        return self.head(torch.relu(self.conv1(torch.relu(self.conv0(x)))).flatten(1))


class EmbeddingNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8, padding_idx=0)
        self.lin = nn.Linear(8, 4)

    def forward(self, x):
        return self.lin(torch.tanh(self.emb(x))).mean(1)


BUILDERS = {"mlp": MLP, "conv1d": Conv1dNet, "conv1d_wide": WideConv1dNet, "conv2d": Conv2dNet, "conv3d": Conv3dNet,
            "embedding": EmbeddingNet, "llama": D.tiny_llama, "gpt2": D.tiny_gpt2}
_SHAPES = {"mlp": (10,), "conv1d": (4, 9), "conv1d_wide": (64, 5), "conv2d": (3, 9, 9), "conv3d": (2, 4, 4, 4)}


def build(name: str, seed: int = 0) -> nn.Module:
    """A fresh copy of the model ``name`` (built once under ``seed``), in eval mode."""
    return D.build(BUILDERS, name, seed)


def inputs(name: str, batch: int = 3, seed: int = 1) -> Any:
    """A seeded input batch for the model ``name``."""
    generator = torch.Generator().manual_seed(seed)
    if name in ("llama", "gpt2"):
        return D.token_ids(batch, seed=seed)
    if name == "embedding":
        return torch.randint(0, 20, (batch, 5), generator=generator)
    return torch.randn(batch, *_SHAPES[name], generator=generator)


def oracle_pair(name: str, hf_config, config, perturb: bool = True, seed: int = 42) -> tuple[nn.Module, nn.Module]:
    """``(hf, ours)``: HF PEFT's PeftModel and ours on two copies of :func:`build` ``(name)``,
    each created right after seeding torch with ``seed`` (so initialisations that draw alike
    agree), in eval mode, with the same state-dict keys. With ``perturb`` HF's trainable tensors
    get seeded noise (:func:`peft_kernel.testing.differential.perturb`) and ours load them."""
    import copy

    import peft

    from .. import get_peft_model

    hf_base, our_base = build(name), build(name)  # (before seeding: the first build draws)
    torch.manual_seed(seed)
    hf = peft.get_peft_model(hf_base, copy.deepcopy(hf_config))
    torch.manual_seed(seed)
    ours = get_peft_model(our_base, copy.deepcopy(config))
    hf.eval(), ours.eval()
    assert set(hf.state_dict()) == set(ours.state_dict()), sorted(set(hf.state_dict()) ^ set(ours.state_dict()))
    if perturb:
        D.perturb(hf)
        ours.load_state_dict(hf.state_dict())
    return hf, ours


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


class OracleSuite:
    """Differential tests of a layer method against HF PEFT's (the oracle); subclass it with a
    ``Test`` name and set:

    * ``config_cls``, and ``hf_config``: the name of HF PEFT's config class (``peft.<name>``);
    * ``cases``: ``(id, model name, config kwargs)``: HF PEFT's model and ours, same base, same
      (perturbed) adapter tensors, give the same outputs unmerged, merged (also == unmerged within
      1e-4), unmerged again, disabled (== the base) and after ``merge_and_unload``;
    * ``init_values``: the ``init_weights`` values with which, created under the same seed, both
      hold bit-identical tensors (on every case but the transformers models; ``()``: none);
    * ``training``: ``(case id, extra kwargs)`` (e.g. dropouts): a few seeded training steps give
      the same outputs and, unless the id is in ``gradients_differ``, the same gradients;
    * ``checkpoint_cases``: case ids whose checkpoints are the same files and load both ways;
    * ``two_adapter_cases``: case ids where a second adapter of the same config, both active,
      gives HF's outputs unmerged and merged;
    * ``hf_mixed_batch_bug``: why HF PEFT gets mixed batches (``adapter_names=``) wrong for the method,
      if it does: the comparison on the first case is then a strict xfail (ours is the kit's
      ``MethodConformance.test_mixed_batch``).

    Where HF PEFT is wrong, leave the case out and test it separately, against the math, with
    the HF comparison as a strict xfail.
    """

    config_cls: type | None = None
    hf_config: str = ""
    cases: Sequence[tuple[str, str, dict]] = ()
    init_values: Sequence[Any] = (True, False)
    training: Sequence[tuple[str, dict]] = ()
    gradients_differ: Sequence[str] = ()
    checkpoint_cases: Sequence[str] = ()
    two_adapter_cases: Sequence[str] = ()
    hf_mixed_batch_bug: str | None = None

    def pytest_generate_tests(self, metafunc):
        by_id = {case[0]: case for case in self.cases}
        choices = {
            "case": [(case[0], case) for case in self.cases],
            "init_case": [(case[0], case) for case in self.cases if case[1] not in ("llama", "gpt2")],
            "training_case": [(f"{name}-{i}", (name, by_id[name][1], {**by_id[name][2], **extra}))
                              for i, (name, extra) in enumerate(self.training)],
            "checkpoint_case": [(name, by_id[name]) for name in self.checkpoint_cases],
            "two_adapter_case": [(name, by_id[name]) for name in self.two_adapter_cases],
            "init_weights": [(repr(value), value) for value in self.init_values],
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
        """:func:`oracle_pair` for this method's configs."""
        if model in ("llama", "gpt2"):
            import pytest

            pytest.importorskip("transformers")
        return oracle_pair(model, self.hf_config_cls()(**kwargs), self.config_cls(**kwargs), perturb)

    def hf_config_cls(self) -> type:
        import pytest

        return getattr(pytest.importorskip("peft"), self.hf_config)

    def test_same_seed_same_initial_state(self, init_case, init_weights):
        _, model, kwargs = init_case
        D.assert_same_initial_state(*self.pair(model, {**kwargs, "init_weights": init_weights}, perturb=False))

    def test_outputs_merge_unmerge(self, case):
        _, model, kwargs = case
        hf, ours = self.pair(model, kwargs)
        x = inputs(model)
        D.assert_matches_oracle(hf, ours, x, D.run(build(model), x))

    def test_training_matches(self, training_case):
        name, model, kwargs = training_case
        hf, ours = self.pair(model, kwargs)
        D.assert_same_training(hf, ours, inputs(model), gradients=name not in self.gradients_differ)

    def test_checkpoints_load_both_ways(self, checkpoint_case, tmp_path):
        _, model, kwargs = checkpoint_case
        hf, ours = self.pair(model, kwargs)
        D.assert_checkpoints_load_both_ways(hf, ours, lambda: build(model), inputs(model), tmp_path)

    def two_adapter_pair(self, model: str, kwargs: dict) -> tuple[nn.Module, nn.Module]:
        """:meth:`pair` with a second adapter ``"other"`` of the same config, both active, perturbed."""
        hf, ours = self.pair(model, kwargs, perturb=False)
        hf.add_adapter("other", self.hf_config_cls()(**kwargs))
        ours.add_adapter("other", self.config_cls(**kwargs))
        for peft_model in (hf, ours):
            peft_model.base_model.set_adapter(["default", "other"])
        D.perturb(hf)
        ours.load_state_dict(hf.state_dict())
        return hf, ours

    def test_two_active_adapters(self, two_adapter_case):
        _, model, kwargs = two_adapter_case
        hf, ours = self.two_adapter_pair(model, kwargs)
        x = inputs(model)
        D.assert_close(D.run(ours, x), D.run(hf, x), "two active adapters")
        hf.merge_adapter(), ours.merge_adapter()
        D.assert_close(D.run(ours, x), D.run(hf, x), "two merged adapters", atol=1e-4)

    def test_mixed_batch_matches_hf(self, request):
        """The first case with two adapters, one per sample and one sample without (``adapter_names=``)."""
        import pytest

        if self.hf_mixed_batch_bug:
            request.applymarker(pytest.mark.xfail(strict=True, reason=self.hf_mixed_batch_bug))
        _, model, kwargs = self.cases[0]
        hf, ours = self.two_adapter_pair(model, kwargs)
        x, names = inputs(model), ["other", "__base__", "default"]
        D.assert_close(D.run(ours, x, adapter_names=names), D.run(hf, x, adapter_names=names), "mixed batch")

    def test_config_fields_and_defaults_match_hf(self):
        D.assert_same_config_defaults(self.config_cls, self.hf_config_cls())
