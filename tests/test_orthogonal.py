"""peft_kernel.orthogonal against the math: explicit matrices built by hand, orthogonality,
and the order of the Neumann approximation."""

from __future__ import annotations

import pytest
import torch

from peft_kernel.orthogonal import (
    block_diagonal_matmul,
    cayley,
    drop_blocks,
    gram_schmidt,
    householder_matmul,
    skew_symmetric,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_skew_symmetric_places_the_upper_triangle_row_major():
    skew = skew_symmetric(torch.tensor([[1.0, 2.0, 3.0]]), 3)
    assert torch.equal(skew[0], torch.tensor([[0.0, 1.0, 2.0], [-1.0, 0.0, 3.0], [-2.0, -3.0, 0.0]]))


def test_cayley_is_orthogonal_and_the_identity_at_zero():
    skew = skew_symmetric(torch.randn(4, 10, generator=_gen(), dtype=torch.float64), 5)
    q = cayley(skew)
    eye = torch.eye(5, dtype=torch.float64)
    torch.testing.assert_close(q @ q.mT, eye.expand_as(q), atol=1e-12, rtol=0)
    torch.testing.assert_close(q, (eye - skew) @ torch.linalg.inv(eye + skew))
    assert torch.equal(cayley(torch.zeros(2, 3, 3)), torch.eye(3).expand(2, 3, 3))


@pytest.mark.parametrize("terms", [1, 2, 4, 6])
def test_neumann_series_truncates_the_inverse_after_k_terms(terms):
    skew = skew_symmetric(torch.randn(3, 6, generator=_gen(1), dtype=torch.float64) * 0.1, 4)
    eye = torch.eye(4, dtype=torch.float64)
    inverse = sum(torch.linalg.matrix_power(-skew, k) for k in range(terms))
    torch.testing.assert_close(cayley(skew, neumann_terms=terms), (eye - skew) @ inverse)
    # the error against the exact transform shrinks like ‖S‖^k
    error = (cayley(skew, neumann_terms=terms) - cayley(skew)).abs().max()
    assert error < 3 * skew.abs().max() ** terms


def test_neumann_terms_must_be_positive():
    with pytest.raises(ValueError, match="at least 1"):
        cayley(torch.zeros(1, 2, 2), neumann_terms=0)


def test_block_diagonal_matmul_equals_the_built_matrix_and_shares_one_block():
    blocks = torch.randn(3, 4, 4, generator=_gen(2))
    x = torch.randn(2, 5, 12, generator=_gen(3))
    torch.testing.assert_close(block_diagonal_matmul(x, blocks), x @ torch.block_diag(*blocks))
    shared = blocks[:1]
    torch.testing.assert_close(block_diagonal_matmul(x, shared), x @ torch.block_diag(*shared.expand(3, 4, 4)))
    with pytest.raises(ValueError, match="do not tile"):
        block_diagonal_matmul(torch.randn(2, 10), blocks)


def test_drop_blocks_replaces_int_p_n_blocks_by_the_identity():
    blocks = torch.randn(8, 3, 3, generator=_gen(4)) + 5  # never the identity by chance
    torch.manual_seed(0)
    dropped = drop_blocks(blocks, 0.4)
    is_eye = [torch.equal(b, torch.eye(3)) for b in dropped]
    assert sum(is_eye) == 3  # int(0.4 * 8)
    kept = [i for i, e in enumerate(is_eye) if not e]
    assert torch.equal(dropped[kept], blocks[kept])
    torch.manual_seed(0)
    assert torch.equal(drop_blocks(blocks, 0.4), dropped)  # one draw of torch's generator decides


def test_householder_matmul_is_the_product_of_reflections_and_reverse_inverts_it():
    vectors = torch.randn(6, 3, generator=_gen(5), dtype=torch.float64)
    x = torch.randn(4, 6, generator=_gen(6), dtype=torch.float64)
    units = vectors / vectors.norm(dim=0)
    h = [torch.eye(6, dtype=torch.float64) - 2 * torch.outer(u, u) for u in units.T]
    torch.testing.assert_close(householder_matmul(x, vectors), x @ h[0] @ h[1] @ h[2])
    torch.testing.assert_close(householder_matmul(x, vectors, reverse=True), x @ h[2] @ h[1] @ h[0])
    torch.testing.assert_close(householder_matmul(householder_matmul(x, vectors), vectors, reverse=True), x)


def test_gram_schmidt_gives_orthonormal_columns_of_the_same_nested_spans():
    vectors = torch.randn(7, 4, generator=_gen(7), dtype=torch.float64)
    q = gram_schmidt(vectors)
    torch.testing.assert_close(q.T @ q, torch.eye(4, dtype=torch.float64))
    for k in range(1, 5):  # span(q₁…q_k) = span(v₁…v_k): the projection of v_k onto it is v_k
        torch.testing.assert_close(q[:, :k] @ (q[:, :k].T @ vectors[:, k - 1]), vectors[:, k - 1])
    x = torch.randn(3, 7, generator=_gen(8), dtype=torch.float64)
    torch.testing.assert_close(householder_matmul(x, q), x - 2 * (x @ q) @ q.T)


def test_every_function_passes_gradcheck():
    entries = torch.randn(2, 3, generator=_gen(9), dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 6, generator=_gen(10), dtype=torch.float64, requires_grad=True)
    vectors = torch.randn(6, 2, generator=_gen(11), dtype=torch.float64, requires_grad=True)
    for terms in (None, 3):
        assert torch.autograd.gradcheck(
            lambda e, x, terms=terms: block_diagonal_matmul(x, cayley(skew_symmetric(e, 3), terms)), (entries, x))
    assert torch.autograd.gradcheck(lambda v, x: householder_matmul(x, gram_schmidt(v)), (vectors, x))
