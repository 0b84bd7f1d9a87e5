"""Tests for peft_kernel.combine (tensor-level combination functions).

Four groups:
  (a) against independent reference formulas written here (hand-computed examples and
      plain-Python re-implementations),
  (b) differential against HF PEFT's ``peft.utils.merge_utils`` (the oracle),
  (c) error cases,
  (d) ``svd_factorize``.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from peft_kernel import combine as C
from peft_kernel.errors import PeftWarning


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


# ---------------------------------------------------------------------------------------
# plain-Python reference formulas (no torch maths, no code under test)
# ---------------------------------------------------------------------------------------


def ref_sign(x):
    return (x > 0) - (x < 0)


def ref_magnitude_prune_list(values, density):
    """Keep the int(density*n) largest |values|; inputs have distinct magnitudes."""
    k = int(density * len(values))
    order = sorted(range(len(values)), key=lambda i: -abs(values[i]))
    keep = set(order[:k])
    return [v if i in keep else 0.0 for i, v in enumerate(values)]


def ref_elect(columns, method):
    """columns: list over entries of lists over task tensors. Returns elected sign per entry."""
    out = []
    for col in columns:
        score = sum(col) if method == "total" else sum(ref_sign(v) for v in col)
        out.append(1 if score >= 0 else -1)
    return out


def ref_disjoint(columns_weighted, columns_unweighted, elected):
    out = []
    for wcol, ucol, s in zip(columns_weighted, columns_unweighted, elected, strict=True):
        agree = [w for w, u in zip(wcol, ucol, strict=True) if ref_sign(u) == s]
        out.append(sum(agree) / max(len(agree), 1))
    return out


def ref_ties(lists, weights, density, method):
    pruned = [ref_magnitude_prune_list(v, density) for v in lists]
    cols = list(zip(*pruned, strict=True))
    elected = ref_elect(cols, method)
    wcols = [[w * v for w, v in zip(weights, col, strict=True)] for col in cols]
    return ref_disjoint(wcols, cols, elected)


def ref_weighted_sum(lists, weights):
    return [sum(w * v for w, v in zip(weights, col, strict=True)) for col in zip(*lists, strict=True)]


def T(values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


# ---------------------------------------------------------------------------------------
# (a) reference formulas
# ---------------------------------------------------------------------------------------


class TestPruneReference:
    def test_magnitude_three_elements_by_hand(self):
        out = C.prune(T([0.5, -3.0, 1.0]), 0.67, method="magnitude")
        assert out.tolist() == [0.0, -3.0, 1.0]

    def test_magnitude_keeps_floor_of_density_times_numel(self):
        x = T([0.1, -0.9, 0.3, 0.8, -0.2, 0.05, 0.7, -0.6, 0.4, 0.35])
        out = C.prune(x, 0.35, method="magnitude")  # int(3.5) == 3
        assert out.tolist() == ref_magnitude_prune_list(x.tolist(), 0.35)
        assert int((out != 0).sum()) == 3
        assert sorted(out[out != 0].tolist()) == [-0.9, 0.7, 0.8]

    def test_magnitude_multi_dim_is_global_not_per_row(self):
        x = T([[10.0, 9.0], [0.1, 0.2]])
        out = C.prune(x, 0.5, method="magnitude")
        assert out.tolist() == [[10.0, 9.0], [0.0, 0.0]]

    def test_magnitude_density_zero_gives_zeros(self):
        assert C.prune(T([1.0, -2.0]), 0.0, method="magnitude").tolist() == [0.0, 0.0]

    def test_default_method_is_magnitude(self):
        assert C.prune(T([0.5, -3.0, 1.0]), 0.34).tolist() == [0.0, -3.0, 0.0]

    def test_random_rescale_divides_kept_entries_exactly(self):
        x = torch.arange(1, 201, dtype=torch.float64)
        gen = torch.Generator().manual_seed(0)
        out = C.prune(x, 0.3, method="random", rescale=True, generator=gen)
        kept = out != 0
        assert 0 < int(kept.sum()) < 200
        # every kept entry is x / density, every other entry is 0
        assert torch.equal(out[kept], x[kept] / 0.3)
        assert torch.all(out[~kept] == 0)
        # and it really is not the unscaled value
        assert not torch.allclose(out[kept], x[kept])

    def test_random_without_rescale_keeps_values(self):
        x = torch.arange(1, 201, dtype=torch.float64)
        out = C.prune(x, 0.3, method="random", generator=torch.Generator().manual_seed(1))
        kept = out != 0
        assert 0 < int(kept.sum()) < 200
        assert torch.equal(out[kept], x[kept])

    def test_random_keep_fraction_is_density(self):
        x = torch.ones(100_000)
        out = C.prune(x, 0.25, method="random", generator=torch.Generator().manual_seed(2))
        frac = float((out != 0).double().mean())
        assert abs(frac - 0.25) < 0.01

    def test_random_density_zero_rescale_is_zero_not_nan(self):
        out = C.prune(T([1.0, 2.0, 3.0]), 0.0, method="random", rescale=True)
        assert out.tolist() == [0.0, 0.0, 0.0]

    def test_random_generator_reproducible(self):
        x = torch.randn(50)
        a = C.prune(x, 0.5, "random", generator=torch.Generator().manual_seed(7))
        b = C.prune(x, 0.5, "random", generator=torch.Generator().manual_seed(7))
        c = C.prune(x, 0.5, "random", generator=torch.Generator().manual_seed(8))
        assert torch.equal(a, b)
        assert not torch.equal(a, c)

    def test_does_not_modify_input(self):
        x = T([0.5, -3.0, 1.0])
        C.prune(x, 0.34)
        C.prune(x, 0.34, "random", rescale=True)
        assert x.tolist() == [0.5, -3.0, 1.0]


class TestSignAndDisjoint:
    # entries (columns) across three task tensors:
    #   e0: [ 1,  2, -4]  total -1 -> '-' ; frequency +1 -> '+'
    #   e1: [ 1, -1,  0]  total  0 -> tie '+' ; frequency 0 -> tie '+'
    #   e2: [ 0,  0,  0]  nothing agrees
    #   e3: [-1, -2,  3]  total  0 -> tie '+' ; frequency -1 -> '-'
    STACK = [[1.0, 1.0, 0.0, -1.0], [2.0, -1.0, 0.0, -2.0], [-4.0, 0.0, 0.0, 3.0]]

    def test_total_by_hand(self):
        mask = C.calculate_majority_sign_mask(T(self.STACK), method="total")
        assert mask.dtype == torch.bool
        assert mask.tolist() == [
            [False, True, False, False],
            [False, False, False, False],
            [True, False, False, True],
        ]

    def test_frequency_by_hand(self):
        mask = C.calculate_majority_sign_mask(T(self.STACK), method="frequency")
        assert mask.tolist() == [
            [True, True, False, True],
            [True, False, False, True],
            [False, False, False, False],
        ]

    def test_default_method_is_total(self):
        assert torch.equal(
            C.calculate_majority_sign_mask(T(self.STACK)),
            C.calculate_majority_sign_mask(T(self.STACK), method="total"),
        )

    def test_accepts_list(self):
        lst = [T(r) for r in self.STACK]
        assert torch.equal(
            C.calculate_majority_sign_mask(lst, "frequency"),
            C.calculate_majority_sign_mask(T(self.STACK), "frequency"),
        )

    def test_disjoint_mean_divides_by_count(self):
        stack = T([[2.0, 5.0, 1.0], [4.0, -1.0, -3.0], [9.0, 7.0, 0.0]])
        mask = torch.tensor([[True, True, False], [True, False, False], [False, True, False]])
        out = C.disjoint_merge(stack, mask)
        # e0: (2+4)/2 ; e1: (5+7)/2 ; e2: nothing -> 0 (count clamped to 1)
        assert out.tolist() == [3.0, 6.0, 0.0]

    def test_disjoint_single_agreeing_entry_not_halved(self):
        out = C.disjoint_merge(T([[3.0], [-8.0]]), torch.tensor([[False], [True]]))
        assert out.tolist() == [-8.0]


class TestStrategiesReference:
    A = [0.9, -0.2, 0.5, -0.05, 0.31]
    B = [-0.4, 0.6, 0.25, -0.8, 0.01]
    Cv = [0.15, -0.7, -0.33, 0.45, -0.12]
    W = [1.5, -0.5, 0.8]

    def lists(self):
        return [self.A, self.B, self.Cv]

    def tensors(self):
        return [T(v) for v in self.lists()]

    def test_task_arithmetic_by_hand(self):
        out = C.task_arithmetic([T([1.0, 2.0, 3.0]), T([4.0, 5.0, 6.0])], [0.5, -1.0])
        assert out.tolist() == [-3.5, -4.0, -4.5]

    def test_task_arithmetic_reference(self):
        out = C.task_arithmetic(self.tensors(), torch.tensor(self.W, dtype=torch.float64))
        assert out.tolist() == pytest.approx(ref_weighted_sum(self.lists(), self.W), abs=1e-12)

    def test_weights_list_tensor_scalar(self):
        ts = self.tensors()
        a = C.task_arithmetic(ts, [2.0, 2.0, 2.0])
        b = C.task_arithmetic(ts, torch.tensor([2.0, 2.0, 2.0], dtype=torch.float64))
        c = C.task_arithmetic(ts, 2.0)
        assert torch.allclose(a, b) and torch.allclose(b, c)
        assert b.tolist() == pytest.approx([2 * s for s in ref_weighted_sum(self.lists(), [1, 1, 1])])

    def test_per_row_weights_broadcast(self):
        ts = [T([[1.0, 2.0], [3.0, 4.0]]), T([[10.0, 20.0], [30.0, 40.0]])]
        w = T([[1.0, 0.0], [0.0, 2.0]])  # (n, rows)
        assert C.task_arithmetic(ts, w).tolist() == [[1.0, 2.0], [60.0, 80.0]]

    def test_magnitude_prune_reference(self):
        out = C.magnitude_prune(self.tensors(), T(self.W), 0.4)
        pruned = [ref_magnitude_prune_list(v, 0.4) for v in self.lists()]
        assert out.tolist() == pytest.approx(ref_weighted_sum(pruned, self.W), abs=1e-12)

    @pytest.mark.parametrize("method", ["total", "frequency"])
    @pytest.mark.parametrize("density", [0.2, 0.6, 0.8])
    def test_ties_reference(self, method, density):
        out = C.ties(self.tensors(), T(self.W), density, majority_sign_method=method)
        assert out.tolist() == pytest.approx(ref_ties(self.lists(), self.W, density, method), abs=1e-12)

    def test_ties_elects_on_unweighted_values(self):
        # unweighted column [2, -1]: total elects '+'; the weight 10 on the second
        # tensor does not change the election, so the result is 1*2 / 1
        out = _quiet(C.ties, [T([2.0]), T([-1.0])], [1.0, 10.0], 1.0)  # density 1: no pruning
        assert out.tolist() == [2.0]

    def test_ties_tie_goes_positive(self):
        out = _quiet(C.ties, [T([3.0]), T([-3.0])], [1.0, 1.0], 1.0, majority_sign_method="total")
        assert out.tolist() == [3.0]
        out = _quiet(C.ties, [T([3.0]), T([-5.0])], [1.0, 1.0], 1.0, majority_sign_method="frequency")
        assert out.tolist() == [3.0]

    @pytest.mark.parametrize("method", ["total", "frequency"])
    def test_dare_ties_reference_with_same_draws(self, method):
        density = 0.5
        ts = self.tensors()
        out = C.dare_ties(ts, T(self.W), density, method, generator=torch.Generator().manual_seed(11))
        # re-draw the keep-masks (one per task tensor, list order) and apply the formula
        g = torch.Generator().manual_seed(11)
        masks = [torch.bernoulli(torch.full_like(t, density), generator=g).tolist() for t in ts]
        dropped = [
            [v / density if m else 0.0 for v, m in zip(vals, mk, strict=True)]
            for vals, mk in zip(self.lists(), masks, strict=True)
        ]
        cols = list(zip(*dropped, strict=True))
        elected = ref_elect(cols, method)
        wcols = [[w * v for w, v in zip(self.W, col, strict=True)] for col in cols]
        assert out.tolist() == pytest.approx(ref_disjoint(wcols, cols, elected), abs=1e-12)

    def test_dare_linear_reference_with_same_draws(self):
        density = 0.4
        ts = self.tensors()
        out = C.dare_linear(ts, T(self.W), density, generator=torch.Generator().manual_seed(5))
        g = torch.Generator().manual_seed(5)
        masks = [torch.bernoulli(torch.full_like(t, density), generator=g).tolist() for t in ts]
        dropped = [
            [v / density if m else 0.0 for v, m in zip(vals, mk, strict=True)]
            for vals, mk in zip(self.lists(), masks, strict=True)
        ]
        assert out.tolist() == pytest.approx(ref_weighted_sum(dropped, self.W), abs=1e-12)

    def test_dare_linear_expectation_equals_unpruned(self):
        # many independent draws at once: N identical rows, each entry dropped independently
        n = 40_000
        a = T([1.0, -2.0, 0.5]).expand(n, 3).contiguous()
        b = T([0.25, 3.0, -1.0]).expand(n, 3).contiguous()
        w = [0.7, -1.2]
        torch.manual_seed(0)
        out = C.dare_linear([a, b], w, 0.3)
        mean = out.mean(dim=0)
        expected = torch.tensor(ref_weighted_sum([[1.0, -2.0, 0.5], [0.25, 3.0, -1.0]], w), dtype=torch.float64)
        # per-entry std of one draw <= sum |w x| * sqrt((1-p)/p) ~ 6; over 40k draws ~0.03
        assert torch.allclose(mean, expected, atol=0.12), (mean, expected)
        # without the rescale the mean would be density * expected: make sure we are far from it
        assert not torch.allclose(mean, 0.3 * expected, atol=0.3)

    def test_dare_variants_differ_between_draws(self):
        ts = [torch.randn(64), torch.randn(64)]
        torch.manual_seed(1)
        a = C.dare_linear(ts, [1.0, 1.0], 0.5)
        b = C.dare_linear(ts, [1.0, 1.0], 0.5)
        assert not torch.equal(a, b)


# ---------------------------------------------------------------------------------------
# (b) differential against HF PEFT (the oracle)
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf():
    pytest.importorskip("peft")
    from peft.utils import merge_utils

    return merge_utils


SHAPES = [(5,), (7, 6), (3, 4, 5), (2, 3, 2, 2)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _inputs(shape, dtype, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    ts = [torch.randn(shape, generator=g).to(dtype) for _ in range(n)]
    w = torch.tensor([1.3, -0.6, 0.45, 2.0][:n])
    return ts, w


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
class TestDifferentialHF:
    def test_task_arithmetic(self, hf, shape, dtype):
        ts, w = _inputs(shape, dtype)
        assert torch.equal(C.task_arithmetic(ts, w), hf.task_arithmetic(ts, w))

    @pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 0.9])
    def test_magnitude_prune(self, hf, shape, dtype, density):
        ts, w = _inputs(shape, dtype)
        assert torch.equal(C.magnitude_prune(ts, w, density), hf.magnitude_prune(ts, w, density))

    @pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
    @pytest.mark.parametrize("method", ["total", "frequency"])
    def test_ties(self, hf, shape, dtype, density, method):
        ts, w = _inputs(shape, dtype)
        assert torch.equal(C.ties(ts, w, density, method), hf.ties(ts, w, density, method))

    @pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
    def test_dare_linear_same_seed(self, hf, shape, dtype, density):
        ts, w = _inputs(shape, dtype)
        torch.manual_seed(1234)
        ours = C.dare_linear(ts, w, density)
        torch.manual_seed(1234)
        ref = hf.dare_linear(ts, w, density)
        assert torch.equal(ours, ref)

    @pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
    @pytest.mark.parametrize("method", ["total", "frequency"])
    def test_dare_ties_same_seed(self, hf, shape, dtype, density, method):
        ts, w = _inputs(shape, dtype)
        torch.manual_seed(99)
        ours = C.dare_ties(ts, w, density, method)
        ours_next = torch.rand(4)
        torch.manual_seed(99)
        ref = hf.dare_ties(ts, w, density, method)
        ref_next = torch.rand(4)
        assert torch.equal(ours, ref)
        # the global generator is left in the same state as well
        assert torch.equal(ours_next, ref_next)

    @pytest.mark.parametrize("method", ["total", "frequency"])
    def test_sign_mask_and_disjoint(self, hf, shape, dtype, method):
        ts, w = _inputs(shape, dtype)
        ts[1] = torch.where(ts[1].abs() < 0.5, torch.zeros_like(ts[1]), ts[1])  # some zeros
        stack = torch.stack(ts)
        m_ours = C.calculate_majority_sign_mask(stack, method)
        m_ref = hf.calculate_majority_sign_mask(stack, method)
        assert torch.equal(m_ours, m_ref)
        weighted = stack * w.view(-1, *([1] * len(shape)))
        assert torch.equal(C.disjoint_merge(weighted, m_ref), hf.disjoint_merge(weighted, m_ref))


@pytest.mark.parametrize("method,rescale", [("magnitude", False), ("random", False), ("random", True)])
@pytest.mark.parametrize("density", [0.0, 0.3, 0.75])
def test_prune_differential(hf, method, rescale, density):
    x = torch.randn(9, 8, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(42)
    ours = C.prune(x, density, method=method, rescale=rescale)
    torch.manual_seed(42)
    ref = hf.prune(x, density, method=method, rescale=rescale)
    if method == "random" and rescale and density == 0.0:
        # documented difference: the oracle divides 0 by 0 (NaN); we return zeros
        assert torch.isnan(ref).all() and torch.equal(ours, torch.zeros_like(x))
    else:
        assert torch.equal(ours, ref)


def test_density_one_differential(hf):
    ts, w = _inputs((4, 4), torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in ["magnitude_prune", "dare_linear"]:
            assert torch.equal(getattr(C, name)(ts, w, 1.0), getattr(hf, name)(ts, w, 1.0))
        for name in ["ties", "dare_ties"]:
            assert torch.equal(getattr(C, name)(ts, w, 1.5, "frequency"), getattr(hf, name)(ts, w, 1.5, "frequency"))


@pytest.mark.parametrize("combination_type", ["svd", "ties_svd", "magnitude_prune_svd", "dare_linear_svd"])
@pytest.mark.parametrize("svd_rank,clamp", [(3, None), (2, 0.9), (3, 0.3), (8, None)])
def test_svd_differential_against_oracle_model(combination_type, svd_rank, clamp, monkeypatch):
    """The oracle's SVD family = strategy on the full deltas + the truncated SVD."""
    peft = pytest.importorskip("peft")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 6)

        def forward(self, x):
            return self.lin(x)

    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lin"], init_lora_weights=False)
    model = peft.get_peft_model(Net(), cfg, adapter_name="first")
    model.add_adapter("second", peft.LoraConfig(r=4, lora_alpha=4, target_modules=["lin"], init_lora_weights=False))
    weights = [0.8, -0.6]
    layer = model.base_model.model.lin
    deltas = [layer.get_delta_weight(n).detach() for n in ("first", "second")]
    wt = torch.tensor(weights)
    density = 0.5
    kw = {} if combination_type == "svd" else {"density": density}
    # the oracle initialises the new adapter (consuming random numbers) before combining:
    # reseed right at the combination step so that both sides draw the same masks
    import peft.tuners.lora.model as oracle_model

    original = oracle_model.dare_linear

    def seeded(*args, **kwargs):
        torch.manual_seed(7)
        return original(*args, **kwargs)

    monkeypatch.setattr(oracle_model, "dare_linear", seeded)
    model.add_weighted_adapter(["first", "second"], weights, "m", combination_type=combination_type, svd_rank=svd_rank,
                               svd_clamp=clamp, **kw)
    ref_B = layer.lora_B["m"].weight.detach()
    ref_A = layer.lora_A["m"].weight.detach()

    fn = {"svd": C.task_arithmetic, "ties_svd": C.ties, "magnitude_prune_svd": C.magnitude_prune,
          "dare_linear_svd": C.dare_linear}[combination_type]
    torch.manual_seed(7)
    combined = fn(deltas, wt) if combination_type == "svd" else fn(deltas, wt, density)
    if svd_rank > min(combined.shape):
        # documented difference: the oracle cannot build factors above min(out, in)
        B, A = C.svd_factorize(combined, svd_rank, clamp=clamp)
        assert B.shape == (6, svd_rank) and A.shape == (svd_rank, 8)
        assert torch.allclose(B @ A, combined, atol=1e-5)
        return
    B, A = C.svd_factorize(combined, svd_rank, clamp=clamp)
    assert torch.allclose(B, ref_B, atol=1e-6) and torch.allclose(A, ref_A, atol=1e-6)


# ---------------------------------------------------------------------------------------
# (c) error cases
# ---------------------------------------------------------------------------------------


class TestErrors:
    @pytest.mark.parametrize("density", [-0.1, -1, float("nan"), None, "0.5", True])
    def test_bad_density_prune(self, density):
        with pytest.raises(ValueError, match="density"):
            C.prune(torch.ones(3), density)

    @pytest.mark.parametrize("fn", [C.magnitude_prune, C.ties, C.dare_linear, C.dare_ties])
    @pytest.mark.parametrize("density", [-0.5, None, float("nan")])
    def test_bad_density_strategies(self, fn, density):
        with pytest.raises(ValueError, match="density"):
            fn([torch.ones(3), torch.ones(3)], [1.0, 1.0], density)

    @pytest.mark.parametrize("density", [1, 1.0, 2.5])
    @pytest.mark.parametrize("method", ["magnitude", "random"])
    def test_density_at_least_one_warns_and_skips(self, density, method):
        x = torch.randn(10)
        with pytest.warns(PeftWarning, match="no pruning"):
            out = C.prune(x, density, method=method, rescale=True)
        assert torch.equal(out, x)

    @pytest.mark.parametrize("fn", [C.magnitude_prune, C.dare_linear])
    def test_density_one_strategy_equals_plain_sum(self, fn):
        ts = [torch.randn(6), torch.randn(6)]
        with pytest.warns(PeftWarning):
            out = fn(ts, [0.3, 0.9], 1.0)
        assert torch.allclose(out, 0.3 * ts[0] + 0.9 * ts[1])

    def test_density_one_does_not_consume_rng(self):
        torch.manual_seed(5)
        _quiet(C.dare_ties, [torch.randn(6), torch.randn(6)], [1.0, 1.0], 1.0)
        after = torch.rand(3)
        torch.manual_seed(5)
        torch.randn(6), torch.randn(6)
        assert torch.equal(after, torch.rand(3))

    def test_unknown_prune_method(self):
        with pytest.raises(ValueError, match="method"):
            C.prune(torch.ones(3), 0.5, method="topk")

    @pytest.mark.parametrize("fn", [C.ties, C.dare_ties])
    def test_unknown_sign_method(self, fn):
        with pytest.raises(ValueError, match="majority_sign_method"):
            fn([torch.ones(3)], [1.0], 0.5, majority_sign_method="mean")
        with pytest.raises(ValueError, match="majority_sign_method"):
            C.calculate_majority_sign_mask(torch.ones(2, 3), method="mean")

    def test_empty_list(self):
        with pytest.raises(ValueError, match="at least one"):
            C.task_arithmetic([], [])

    def test_shape_mismatch(self):
        with pytest.raises(ValueError, match="same shape"):
            C.task_arithmetic([torch.ones(3), torch.ones(4)], [1.0, 1.0])

    @pytest.mark.parametrize("weights", [[1.0], [1.0, 2.0, 3.0], torch.ones(2, 5), "ab"])
    def test_bad_weights(self, weights):
        with pytest.raises(ValueError, match="weights"):
            C.task_arithmetic([torch.ones(3), torch.ones(3)], weights)

    def test_disjoint_mask_shape(self):
        with pytest.raises(ValueError, match="shape"):
            C.disjoint_merge(torch.ones(2, 3), torch.ones(2, 4, dtype=torch.bool))

    @pytest.mark.parametrize("delta", [torch.ones(3), torch.ones(2, 2, 2)])
    def test_svd_not_2d(self, delta):
        with pytest.raises(ValueError, match="2-D"):
            C.svd_factorize(delta, 1)

    @pytest.mark.parametrize("rank", [0, -2, 1.5, None, True])
    def test_svd_bad_rank(self, rank):
        with pytest.raises(ValueError, match="rank"):
            C.svd_factorize(torch.ones(3, 3), rank)

    @pytest.mark.parametrize("clamp", [-0.1, 1.5, "x"])
    def test_svd_bad_clamp(self, clamp):
        with pytest.raises(ValueError, match="clamp"):
            C.svd_factorize(torch.ones(3, 3), 2, clamp=clamp)

    def test_svd_integer_delta(self):
        with pytest.raises(ValueError, match="floating"):
            C.svd_factorize(torch.ones(3, 3, dtype=torch.int64), 2)


# ---------------------------------------------------------------------------------------
# (d) svd_factorize
# ---------------------------------------------------------------------------------------


def _orthonormal(n, seed):
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


class TestSvdFactorize:
    @pytest.mark.parametrize("shape", [(6, 4), (4, 6), (5, 5)])
    @pytest.mark.parametrize("full_matrices", [True, False])
    def test_full_rank_reproduces_delta(self, shape, full_matrices):
        delta = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        r = min(shape)
        B, A = C.svd_factorize(delta, r, full_matrices=full_matrices)
        assert B.shape == (shape[0], r) and A.shape == (r, shape[1])
        assert (B @ A - delta).abs().max() <= 1e-5

    def test_truncation_is_best_low_rank_with_known_spectrum(self):
        s = [5.0, 3.0, 1.0, 0.5]
        U, V = _orthonormal(6, 1)[:, :4], _orthonormal(4, 2)
        delta = U @ torch.diag(T(s)) @ V.T
        B, A = C.svd_factorize(delta, 2)
        expected = U[:, :2] @ torch.diag(T(s[:2])) @ V[:, :2].T
        assert torch.allclose(B @ A, expected, atol=1e-10)
        # B carries the singular values, A has orthonormal rows
        assert torch.allclose(A @ A.T, torch.eye(2, dtype=torch.float64), atol=1e-10)
        assert torch.allclose(B.norm(dim=0), T(s[:2]), atol=1e-10)
        assert math.isclose(float((delta - B @ A).norm()), math.sqrt(1.0**2 + 0.5**2), rel_tol=1e-9)

    def test_rank_above_min_dim_is_zero_padded(self):
        delta = torch.randn(6, 3, generator=torch.Generator().manual_seed(4))
        B, A = C.svd_factorize(delta, 5)
        assert B.shape == (6, 5) and A.shape == (5, 3)
        assert torch.all(B[:, 3:] == 0) and torch.all(A[3:] == 0)
        assert (B @ A - delta).abs().max() <= 1e-5

    def test_half_precision_roundtrip_dtype(self):
        delta = torch.randn(5, 4, generator=torch.Generator().manual_seed(5))
        B, A = C.svd_factorize(delta.to(torch.bfloat16), 4)
        assert B.dtype == A.dtype == torch.bfloat16
        assert torch.allclose((B.float() @ A.float()), delta.to(torch.bfloat16).float(), atol=0.1)

    @pytest.mark.parametrize("q", [0.8, 0.9, 0.97])
    def test_clamp_bounds_to_quantile_of_both_factors(self, q):
        delta = torch.randn(8, 6, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
        B0, A0 = C.svd_factorize(delta, 3)
        B, A = C.svd_factorize(delta, 3, clamp=q)
        # independent quantile (linear interpolation between order statistics)
        vals = sorted(B0.reshape(-1).tolist() + A0.reshape(-1).tolist())
        pos = q * (len(vals) - 1)
        lo = int(math.floor(pos))
        h = vals[lo] + (vals[min(lo + 1, len(vals) - 1)] - vals[lo]) * (pos - lo)
        assert h > 0
        for got, orig in ((B, B0), (A, A0)):
            expected = orig.clamp(-h, h)
            assert torch.allclose(got, expected, atol=1e-12)
            assert got.abs().max() <= h + 1e-12
        # something actually got clamped
        assert not torch.equal(B, B0) or not torch.equal(A, A0)

    def test_clamp_one_only_clips_negative_tail(self):
        delta = torch.randn(8, 6, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        B0, A0 = C.svd_factorize(delta, 3)
        B, A = C.svd_factorize(delta, 3, clamp=1.0)
        h = max(B0.max().item(), A0.max().item())
        assert torch.equal(B, B0.clamp(-h, h)) and torch.equal(A, A0.clamp(-h, h))

    def test_large_input_quantile_path_matches_torch(self, monkeypatch):
        vals = torch.randn(1001, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
        expected = torch.quantile(vals, 0.37)
        monkeypatch.setattr(C, "_QUANTILE_MAX_NUMEL", 10)
        assert torch.allclose(C._quantile(vals, 0.37), expected, atol=1e-12)
        assert torch.allclose(C._quantile(vals, 1.0), vals.max())
        assert torch.allclose(C._quantile(vals, 0.0), vals.min())


# ---------------------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------------------


def _registered():
    got = {}

    def register(name, fn, *, svd=False):
        assert name not in got
        got[name] = (fn, svd)

    C.register_builtin_combinations(register)
    return got


class TestRegistration:
    def test_names_and_svd_flags(self):
        got = _registered()
        assert {n: s for n, (_, s) in got.items()} == {
            "linear": False,
            "svd": True,
            "ties": False,
            "ties_svd": True,
            "dare_linear": False,
            "dare_linear_svd": True,
            "dare_ties": False,
            "dare_ties_svd": True,
            "magnitude_prune": False,
            "magnitude_prune_svd": True,
        }
        assert "cat" not in got

    def test_functions_match_direct_calls_and_ignore_extra_kwargs(self):
        got = _registered()
        ts, w = _inputs((5, 4), torch.float64)
        kw = {"density": 0.5, "majority_sign_method": "frequency", "svd_rank": 3, "unused": object()}
        assert torch.equal(got["linear"][0](ts, w, **kw), C.task_arithmetic(ts, w))
        assert torch.equal(got["svd"][0](ts, w, **kw), C.task_arithmetic(ts, w))
        assert torch.equal(got["ties"][0](ts, w, **kw), C.ties(ts, w, 0.5, "frequency"))
        assert torch.equal(got["magnitude_prune"][0](ts, w, **kw), C.magnitude_prune(ts, w, 0.5))
        torch.manual_seed(3)
        a = got["dare_ties_svd"][0](ts, w, **kw)
        torch.manual_seed(3)
        assert torch.equal(a, C.dare_ties(ts, w, 0.5, "frequency"))
        a = got["dare_linear"][0](ts, w, generator=torch.Generator().manual_seed(2), **kw)
        assert torch.equal(a, C.dare_linear(ts, w, 0.5, generator=torch.Generator().manual_seed(2)))

    def test_sign_method_defaults_to_total(self):
        got = _registered()
        ts, w = _inputs((5, 4), torch.float64)
        out = got["ties"][0](ts, w, density=0.5, majority_sign_method=None)
        assert torch.equal(out, C.ties(ts, w, 0.5, "total"))
        assert not torch.equal(out, C.ties(ts, w, 0.5, "frequency"))

    @pytest.mark.parametrize("name", ["ties", "dare_linear", "dare_ties_svd", "magnitude_prune"])
    def test_pruning_strategies_require_density(self, name):
        fn = _registered()[name][0]
        with pytest.raises(ValueError, match="density"):
            fn([torch.ones(2)], [1.0])
