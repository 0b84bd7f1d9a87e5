"""Orthogonal matrices from few parameters, for methods that rotate or reflect a layer's weight.

Multiplying a weight by an orthogonal matrix keeps the norms of its neurons and the angles
between them. The methods that do so build the matrix from a handful of parameters, in one of
two ways, and this module holds both once:

* **Cayley transforms** of skew-symmetric matrices, usually one per diagonal block:
  :func:`skew_symmetric` builds the skew matrices, :func:`cayley` maps them to orthogonal ones
  (exactly, or with a truncated Neumann series instead of the matrix inverse), and
  :func:`block_diagonal_matmul` multiplies by the block-diagonal matrix without building it;
  :func:`drop_blocks` is their training-time dropout.
* **Householder reflections** ``I - 2uuᵀ``: :func:`householder_matmul` multiplies by a product of
  them, :func:`gram_schmidt` orthonormalises the vectors first where a method asks for it.

Every function is plain autograd on any float dtype, so gradients and ``gradcheck`` need nothing
else. Conventions: matrices act on the last dimension of ``x`` from the right (``x @ Q``), as
a linear layer's input rows do.
"""

from __future__ import annotations

import torch


def skew_symmetric(entries: torch.Tensor, size: int) -> torch.Tensor:
    """Skew-symmetric ``(…, size, size)`` matrices ``S = U - Uᵀ`` whose strictly upper triangle
    ``U`` holds ``entries`` (``…, size·(size-1)/2``) in row-major order."""
    rows, cols = torch.triu_indices(size, size, 1, device=entries.device)
    upper = entries.new_zeros(*entries.shape[:-1], size, size)
    upper[..., rows, cols] = entries
    return upper - upper.mT


def cayley(skew: torch.Tensor, neumann_terms: int | None = None) -> torch.Tensor:
    """The Cayley transform ``Q = (I - S)(I + S)⁻¹`` of skew-symmetric ``S`` (batched): orthogonal
    for every ``S``, and ``I`` for ``S = 0``.

    With ``neumann_terms = k`` the inverse is replaced by the first ``k`` terms of its Neumann
    series, ``I - S + S² - … + (-S)^(k-1)``: no linear solve, and orthogonal up to ``O(‖S‖^k)``
    (the inverse of such a ``Q`` is then not quite ``Qᵀ``; invert it to undo it). The product is
    computed expanded, ``I + 2(-S) + 2(-S)² + … + 2(-S)^(k-1) + (-S)^k``, one matrix product per
    term."""
    eye = torch.eye(skew.shape[-1], dtype=skew.dtype, device=skew.device)
    if neumann_terms is None:
        return torch.linalg.solve(eye + skew, eye - skew, left=False)
    if neumann_terms < 1:
        raise ValueError(f"neumann_terms must be at least 1, got {neumann_terms}")
    minus = -skew
    result, power = eye.expand_as(skew), minus
    for k in range(1, neumann_terms + 1):
        if k > 1:
            power = power @ minus
        result = result.add(power, alpha=2 if k < neumann_terms else 1)
    return result


def block_diagonal_matmul(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``x @ blockdiag(blocks)`` on the last dimension of ``x``, without building the matrix.

    ``blocks`` is ``(n, b, b)``; the last dimension of ``x`` is ``n·b``, or any multiple of ``b``
    when ``n`` is 1 (one block shared along the whole dimension)."""
    count, size = blocks.shape[0], blocks.shape[-1]
    chunks = x.shape[-1] // size
    if chunks * size != x.shape[-1] or count not in (1, chunks):
        raise ValueError(f"{count} blocks of size {size} do not tile a dimension of {x.shape[-1]}")
    blocks = blocks.expand(chunks, size, size)
    return torch.einsum("...nk,nkc->...nc", x.unflatten(-1, (chunks, size)), blocks).flatten(-2)


def drop_blocks(blocks: torch.Tensor, p: float) -> torch.Tensor:
    """Training-time dropout of a block-diagonal rotation: ``int(p·n)`` of the ``n`` blocks
    ``(n, b, b)``, chosen by one ``torch.randperm(n)`` from torch's global generator, become
    the identity (the rotation keeps its shape and stays orthogonal)."""
    count = blocks.shape[0]
    dropped = torch.arange(count) < int(p * count)
    dropped = dropped[torch.randperm(count)].to(blocks.device).view(count, 1, 1)
    eye = torch.eye(blocks.shape[-1], dtype=blocks.dtype, device=blocks.device)
    return torch.where(dropped, eye, blocks)


def householder_matmul(x: torch.Tensor, vectors: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """``x @ H₁ H₂ ⋯ Hₖ`` on the last dimension of ``x`` (``reverse``: ``x @ Hₖ ⋯ H₁``, the
    inverse), where ``Hᵢ = I - 2uᵢuᵢᵀ`` reflects along the ``i``-th column of ``vectors``
    ``(d, k)``, normalised to ``uᵢ``. Each reflection is a rank-one update of ``x``; no ``d×d``
    matrix is built."""
    units = vectors / vectors.norm(dim=0)
    order = range(units.shape[1] - 1, -1, -1) if reverse else range(units.shape[1])
    for i in order:
        u = units[:, i]
        x = x - 2 * (x @ u).unsqueeze(-1) * u
    return x


def gram_schmidt(vectors: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns ``(d, k)`` spanning the same nested subspaces as the columns of
    ``vectors`` (modified Gram-Schmidt). For orthonormal ``q₁…qₖ`` the reflections commute and
    their product is ``I - 2QQᵀ``."""
    basis: list[torch.Tensor] = []
    for i in range(vectors.shape[1]):
        v = vectors[:, i]
        for q in basis:
            v = v - (q @ v) * q
        basis.append(v / v.norm())
    return torch.stack(basis, dim=1)
