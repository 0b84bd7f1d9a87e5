"""Tensor-level functions for combining several task tensors into one.

Everything here works on plain tensors and knows nothing about adapters, layers or
methods. A *task tensor* is one contribution to be combined (a full delta, or one
factor of a low-rank delta); a combination takes a list of same-shaped task tensors and
one weight per task tensor and returns a single tensor of that shape.

Building blocks:

* :func:`prune` — sparsify one tensor, by magnitude or at random (optionally rescaled).
* :func:`calculate_majority_sign_mask` — per-entry sign election over a stack.
* :func:`disjoint_merge` — mean over the entries that agree with the elected sign.
* :func:`svd_factorize` — split a 2-D delta into two truncated factors.

Strategies (all ``fn(task_tensors, weights, ...) -> tensor``):

* :func:`task_arithmetic` — weighted sum.
* :func:`magnitude_prune` — magnitude pruning, then weighted sum.
* :func:`ties` — magnitude pruning, sign election, disjoint mean of the weighted tensors.
* :func:`dare_linear` — random drop with rescale, then weighted sum.
* :func:`dare_ties` — random drop with rescale, sign election, disjoint mean.

:func:`register_builtin_combinations` registers these strategies under their
``combination_type`` names.

The results agree with the corresponding functions of HF PEFT 0.21.2 for finite inputs,
including the random draws: the random variants draw one Bernoulli keep-mask per task
tensor, in list order, from the global torch generator (or from ``generator``), exactly
as many draws as the reference, so the same seed gives the same result. Deliberate
differences (all outside the reference's well-defined domain) are listed in
``docs/combining-adapters.md``.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Sequence
from typing import Literal

import torch

from .errors import PeftWarning, UnsupportedOptionError

__all__ = [
    "prune",
    "magnitude_prune",
    "calculate_majority_sign_mask",
    "disjoint_merge",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "svd_factorize",
    "register_builtin_combinations",
]

TensorList = Sequence[torch.Tensor]
Weights = torch.Tensor | Sequence[float] | float

_PRUNE_METHODS = ("magnitude", "random")
_SIGN_METHODS = ("total", "frequency")

# torch.quantile refuses inputs above this many elements.
_QUANTILE_MAX_NUMEL = 1 << 24


# -- validation helpers -----------------------------------------------------------------


def _check_density(density, *, what: str = "density") -> bool:
    """Validate ``density``; return True when pruning should actually happen.

    ``density >= 1`` keeps everything: warn and report that pruning is skipped.
    """
    if density is None:
        raise ValueError(
            f"{what} is required for this combination (the fraction of entries to keep, in [0, 1]); got None"
        )
    if isinstance(density, bool) or not isinstance(density, numbers.Real):
        raise ValueError(f"{what} must be a real number in [0, 1], got {density!r} ({type(density).__name__})")
    density = float(density)
    if math.isnan(density):
        raise ValueError(f"{what} must be a real number in [0, 1], got nan")
    if density < 0:
        raise ValueError(f"{what} must be >= 0 (the fraction of entries to keep), got {density}")
    if density >= 1:
        warnings.warn(
            f"{what}={density} is >= 1, so every entry is kept and no pruning is performed",
            PeftWarning,
            stacklevel=3,
        )
        return False
    return True


def _check_sign_method(method) -> None:
    if method not in _SIGN_METHODS:
        raise UnsupportedOptionError(f"majority_sign_method must be one of {list(_SIGN_METHODS)}, got {method!r}")


def _as_stack(task_tensors, *, what: str = "task_tensors") -> torch.Tensor:
    """Stack a list of same-shaped tensors on a new leading dim (a tensor passes through)."""
    if isinstance(task_tensors, torch.Tensor):
        if task_tensors.dim() == 0:
            raise ValueError(f"{what} must be a list of tensors or a stacked tensor with a leading dim")
        return task_tensors
    tensors = list(task_tensors)
    if not tensors:
        raise ValueError(f"{what} must contain at least one tensor")
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{what}[{i}] is a {type(t).__name__}, expected a torch.Tensor")
    first = tensors[0].shape
    for i, t in enumerate(tensors[1:], start=1):
        if t.shape != first:
            raise ValueError(
                f"all {what} must have the same shape; {what}[0] has {tuple(first)} but "
                f"{what}[{i}] has {tuple(t.shape)}"
            )
    return torch.stack(tensors, dim=0)


def _weights_for(stack: torch.Tensor, weights: Weights) -> torch.Tensor:
    """Turn ``weights`` into a tensor that broadcasts over ``stack`` along its leading dim.

    ``weights`` may be a scalar (the same weight for every task tensor), one weight per
    task tensor (list or 1-D tensor), or a tensor whose shape is a prefix of the stack's
    shape (finer-grained weights). Non-tensor weights become a tensor of the default
    dtype; tensor weights keep their dtype, so the result follows torch type promotion.
    """
    if isinstance(weights, torch.Tensor):
        w = weights.to(stack.device)
    else:
        if isinstance(weights, numbers.Real):
            w = torch.tensor(float(weights))
        else:
            try:
                w = torch.tensor([float(x) for x in weights])
            except (TypeError, ValueError) as exc:
                raise ValueError(f"weights must be a tensor or a sequence of numbers, got {weights!r}") from exc
        w = w.to(stack.device)
    if w.dim() == 0:
        return w
    n = stack.shape[0]
    if w.dim() > stack.dim() or tuple(w.shape) != tuple(stack.shape[: w.dim()]):
        raise ValueError(
            f"weights of shape {tuple(w.shape)} do not match {n} task tensors of shape "
            f"{tuple(stack.shape[1:])}: expected {n} weights (shape ({n},)) or a prefix of "
            f"{tuple(stack.shape)}"
        )
    return w.reshape(tuple(w.shape) + (1,) * (stack.dim() - w.dim()))


# -- building blocks --------------------------------------------------------------------


def _prune_by_magnitude(tensor: torch.Tensor, density: float) -> torch.Tensor:
    keep = int(density * tensor.numel())
    flat = tensor.reshape(-1)
    mask = torch.zeros(flat.shape, dtype=torch.bool, device=tensor.device)
    if keep > 0:
        idx = torch.topk(flat.abs(), k=keep, largest=True).indices
        mask[idx] = True
    return torch.where(mask, flat, torch.zeros_like(flat)).reshape(tensor.shape)


def _prune_at_random(
    tensor: torch.Tensor, density: float, rescale: bool, generator: torch.Generator | None
) -> torch.Tensor:
    # One Bernoulli draw per entry, from a probability tensor of the input's own shape,
    # dtype and device: this consumes the generator exactly like the reference does.
    keep = torch.bernoulli(torch.full_like(tensor, density), generator=generator).bool()
    kept = tensor / density if (rescale and density > 0) else tensor
    return torch.where(keep, kept, torch.zeros_like(kept))


def prune(
    tensor: torch.Tensor,
    density: float,
    method: Literal["magnitude", "random"] = "magnitude",
    rescale: bool = False,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Zero all but (about) a ``density`` fraction of ``tensor``'s entries.

    :param tensor: any shape.
    :param density: fraction of entries to keep. ``density >= 1`` warns
        (:class:`~peft_kernel.errors.PeftWarning`) and returns ``tensor`` unchanged;
        ``density < 0`` (or NaN / None) raises ``ValueError``.
    :param method: ``"magnitude"`` keeps the ``int(density * numel)`` entries of largest
        absolute value (ties resolved as ``torch.topk`` resolves them);
        ``"random"`` keeps each entry independently with probability ``density``.
    :param rescale: only for ``"random"``: divide the kept entries by ``density`` so
        that the expectation of the result equals ``tensor`` (the DARE rescale). Ignored
        by ``"magnitude"``. With ``density == 0`` nothing is kept and the result is
        all zeros (no division by zero).
    :param generator: optional ``torch.Generator`` for ``"random"``; default is the
        global generator.
    :returns: a new tensor of the same shape and dtype.
    """
    if method not in _PRUNE_METHODS:
        raise ValueError(f"prune method must be one of {list(_PRUNE_METHODS)}, got {method!r}")
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"prune expects a torch.Tensor, got {type(tensor).__name__}")
    if not _check_density(density):
        return tensor
    density = float(density)
    if method == "magnitude":
        return _prune_by_magnitude(tensor, density)
    return _prune_at_random(tensor, density, rescale, generator)


def calculate_majority_sign_mask(
    tensor, method: Literal["total", "frequency"] = "total"
) -> torch.Tensor:
    """Elect a sign per entry across the task tensors and mark the entries that agree.

    :param tensor: the task tensors stacked on dim 0 (or a list of same-shaped tensors).
    :param method: ``"total"`` elects the sign of the per-entry sum of values;
        ``"frequency"`` elects the sign held by more task tensors (sum of signs). A tie
        (sum exactly 0) elects ``+``.
    :returns: boolean tensor shaped like the stack: True where the task tensor's entry
        has the elected sign. Zero entries never agree.
    """
    _check_sign_method(method)
    stack = _as_stack(tensor, what="tensor")
    signs = torch.sign(stack)
    score = stack.sum(dim=0) if method == "total" else signs.sum(dim=0)
    elected = torch.where(score < 0, -1, 1).to(signs.dtype)
    return signs == elected


def disjoint_merge(task_tensors, majority_sign_mask: torch.Tensor) -> torch.Tensor:
    """Average, per entry, only the task tensors that agree with the elected sign.

    :param task_tensors: stacked on dim 0 (or a list of same-shaped tensors); usually
        already weighted.
    :param majority_sign_mask: boolean mask of the stack's shape, e.g. from
        :func:`calculate_majority_sign_mask`.
    :returns: sum of the agreeing entries divided by how many agree (at least 1, so an
        entry where nothing agrees is 0).
    """
    stack = _as_stack(task_tensors)
    mask = majority_sign_mask
    if not isinstance(mask, torch.Tensor):
        raise ValueError("majority_sign_mask must be a tensor")
    if mask.shape != stack.shape:
        raise ValueError(
            f"majority_sign_mask has shape {tuple(mask.shape)} but the stacked task tensors have "
            f"{tuple(stack.shape)}"
        )
    mask = mask.to(device=stack.device, dtype=torch.bool)
    total = torch.where(mask, stack, torch.zeros_like(stack)).sum(dim=0)
    count = mask.sum(dim=0).clamp(min=1)
    return total / count


# -- strategies -------------------------------------------------------------------------


def _weighted_sum(stack: torch.Tensor, weights: Weights) -> torch.Tensor:
    return (stack * _weights_for(stack, weights)).sum(dim=0)


def _elect_and_merge(stack: torch.Tensor, weights: Weights, majority_sign_method: str) -> torch.Tensor:
    # The sign is elected on the (pruned) unweighted tensors; the weights enter the mean.
    mask = calculate_majority_sign_mask(stack, method=majority_sign_method)
    return disjoint_merge(stack * _weights_for(stack, weights), mask)


def task_arithmetic(task_tensors: TensorList, weights: Weights) -> torch.Tensor:
    """Weighted sum ``sum_i weights[i] * task_tensors[i]``."""
    return _weighted_sum(_as_stack(task_tensors), weights)


def magnitude_prune(task_tensors: TensorList, weights: Weights, density: float) -> torch.Tensor:
    """Magnitude-prune each task tensor to ``density``, then take the weighted sum."""
    stack = _as_stack(task_tensors)
    if _check_density(density):
        stack = torch.stack([_prune_by_magnitude(t, float(density)) for t in stack.unbind(0)], dim=0)
    return _weighted_sum(stack, weights)


def ties(
    task_tensors: TensorList,
    weights: Weights,
    density: float,
    majority_sign_method: Literal["total", "frequency"] = "total",
) -> torch.Tensor:
    """TIES: magnitude-prune each task tensor, elect a sign per entry, disjoint mean.

    The election uses the pruned, unweighted task tensors; the mean is over the weighted
    entries that agree with the elected sign, divided by their count.
    """
    _check_sign_method(majority_sign_method)
    stack = _as_stack(task_tensors)
    if _check_density(density):
        stack = torch.stack([_prune_by_magnitude(t, float(density)) for t in stack.unbind(0)], dim=0)
    return _elect_and_merge(stack, weights, majority_sign_method)


def _dare_drop(stack: torch.Tensor, density, generator) -> torch.Tensor:
    if not _check_density(density):
        return stack
    # One independent keep-mask per task tensor, drawn in list order.
    return torch.stack(
        [_prune_at_random(t, float(density), True, generator) for t in stack.unbind(0)], dim=0
    )


def dare_linear(
    task_tensors: TensorList,
    weights: Weights,
    density: float,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DARE: drop entries at random (keep probability ``density``), divide the kept ones
    by ``density``, then take the weighted sum. Unbiased: its expectation is
    :func:`task_arithmetic` of the same inputs."""
    return _weighted_sum(_dare_drop(_as_stack(task_tensors), density, generator), weights)


def dare_ties(
    task_tensors: TensorList,
    weights: Weights,
    density: float,
    majority_sign_method: Literal["total", "frequency"] = "total",
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DARE drop and rescale, then the TIES sign election and disjoint mean."""
    _check_sign_method(majority_sign_method)
    stack = _dare_drop(_as_stack(task_tensors), density, generator)
    return _elect_and_merge(stack, weights, majority_sign_method)


# -- re-factorisation -------------------------------------------------------------------


def _quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile`` (linear interpolation), also for inputs above its size limit."""
    if values.numel() <= _QUANTILE_MAX_NUMEL:
        return torch.quantile(values, q)
    ordered = torch.sort(values).values
    pos = q * (ordered.numel() - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, ordered.numel() - 1)
    return torch.lerp(ordered[lo], ordered[hi], torch.tensor(pos - lo, dtype=ordered.dtype, device=ordered.device))


def svd_factorize(
    delta: torch.Tensor,
    rank: int,
    clamp: float | None = None,
    full_matrices: bool = True,
    driver: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a 2-D ``delta`` (out × in) into ``B`` (out × rank) and ``A`` (rank × in)
    with ``B @ A`` the best rank-``rank`` approximation of ``delta``.

    ``B = U[:, :rank] · diag(S[:rank])`` and ``A = Vh[:rank]`` from
    ``torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)``.

    :param rank: target rank, >= 1. If it exceeds ``min(out, in)`` the factors are
        padded with zero columns / rows so the shapes are still (out, rank) and
        (rank, in) (the product is then exactly ``delta``).
    :param clamp: optional quantile ``q`` in [0, 1]: ``h`` = the ``q``-quantile of all
        entries of both (unpadded) factors together, and both factors are clamped to
        ``[-h, h]``.
    :param full_matrices, driver: passed to ``torch.linalg.svd`` (``driver`` is CUDA-only).
    :returns: ``(B, A)`` in ``delta``'s dtype. Half-precision deltas are factorised in
        float32 (``torch.linalg.svd`` has no half kernels) and cast back.
    """
    if not isinstance(delta, torch.Tensor) or delta.dim() != 2:
        shape = tuple(delta.shape) if isinstance(delta, torch.Tensor) else type(delta).__name__
        raise ValueError(f"svd_factorize expects a 2-D tensor, got {shape}")
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    rank = int(rank)
    if clamp is not None:
        if isinstance(clamp, bool) or not isinstance(clamp, numbers.Real) or not 0 <= float(clamp) <= 1:
            raise ValueError(f"clamp must be a quantile in [0, 1] or None, got {clamp!r}")
    if not (delta.is_floating_point() or delta.is_complex()):
        raise ValueError(f"svd_factorize expects a floating-point delta, got {delta.dtype}")
    out_dtype = delta.dtype
    work = delta.float() if delta.dtype in (torch.float16, torch.bfloat16) else delta

    U, S, Vh = torch.linalg.svd(work, full_matrices=full_matrices, driver=driver)
    k = min(rank, S.shape[0])
    B = U[:, :k] @ torch.diag(S[:k]).to(U.dtype)
    A = Vh[:k, :]
    if clamp is not None:
        h = _quantile(torch.cat([B.reshape(-1), A.reshape(-1)]), float(clamp))
        B = B.clamp(-h, h)
        A = A.clamp(-h, h)
    if k < rank:
        B = torch.cat([B, B.new_zeros(B.shape[0], rank - k)], dim=1)
        A = torch.cat([A, A.new_zeros(rank - k, A.shape[1])], dim=0)
    return B.to(out_dtype), A.to(out_dtype)


# -- registration -----------------------------------------------------------------------


def _strategy(fn: Callable[..., torch.Tensor], *, uses_density: bool, uses_sign: bool, random: bool):
    """Adapt a strategy to the hook signature ``fn(tensors, weights, **kw)``."""

    def combine(tensors, weights, **kw):
        args = {}
        if uses_density:
            args["density"] = kw.get("density")
        if uses_sign:
            msm = kw.get("majority_sign_method")
            args["majority_sign_method"] = "total" if msm is None else msm
        if random and kw.get("generator") is not None:
            args["generator"] = kw["generator"]
        return fn(tensors, weights, **args)

    combine.__name__ = fn.__name__
    combine.__qualname__ = fn.__name__
    combine.__doc__ = fn.__doc__
    return combine


def register_builtin_combinations(register: Callable[..., None]) -> None:
    """Register the tensor strategies of this module under their ``combination_type``
    names, each plain and with ``svd=True`` (``_svd`` suffix; the plain weighted sum is
    ``linear`` / ``svd``).

    :param register: ``register(name, fn, *, svd=False)``; each ``fn`` is called as
        ``fn(tensors, weights, **kw)`` and reads ``density`` / ``majority_sign_method``
        (and ``generator`` for the random ones) from ``kw``, ignoring anything else.
    """
    linear = _strategy(task_arithmetic, uses_density=False, uses_sign=False, random=False)
    mag = _strategy(magnitude_prune, uses_density=True, uses_sign=False, random=False)
    ties_fn = _strategy(ties, uses_density=True, uses_sign=True, random=False)
    dl = _strategy(dare_linear, uses_density=True, uses_sign=False, random=True)
    dt = _strategy(dare_ties, uses_density=True, uses_sign=True, random=True)

    register("linear", linear, svd=False)
    register("svd", linear, svd=True)
    register("ties", ties_fn, svd=False)
    register("ties_svd", ties_fn, svd=True)
    register("dare_linear", dl, svd=False)
    register("dare_linear_svd", dl, svd=True)
    register("dare_ties", dt, svd=False)
    register("dare_ties_svd", dt, svd=True)
    register("magnitude_prune", mag, svd=False)
    register("magnitude_prune_svd", mag, svd=True)


_builtin: dict[str, Callable[..., torch.Tensor]] | None = None


def builtin_combination(name: str) -> Callable[..., torch.Tensor]:
    """The function :func:`register_builtin_combinations` registers as ``name`` (the kernel's
    plugin registers deferred stand-ins that call this, so discovery does not import torch)."""
    global _builtin
    if _builtin is None:
        found: dict[str, Callable[..., torch.Tensor]] = {}

        def register(combo_name, fn, *, svd=False):
            found[combo_name] = fn

        register_builtin_combinations(register)
        _builtin = found
    return _builtin[name]
