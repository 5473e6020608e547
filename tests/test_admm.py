"""ADMM pruning (dist_prune/admm.py): the maths on hand-computed matrices, the layer error below
SparseGPT's at exact counts, and the tensor owners of the reconstruction methods."""

from __future__ import annotations

import pytest
import torch

from dist_prune.admm import admm_prune, normalised, smallest, solve_on_support
from dist_prune.reconstruct import owners
from dist_prune.sparsegpt import sparsegpt_prune
from test_sparsegpt import correlated_inputs, hessian_of, one_thread, output_error, weight  # noqa: F401 (autouse)


def test_solve_on_support_known_answer():
    # H = tridiag(1, 2, 1), w0 = [1, 2, 3]: g = w0 H = [4, 8, 8]. On the support {0, 2}, H_SS = 2 I,
    # so w_S = g_S / 2 = [2, 4]: the kept weights absorb what the pruned middle one carried.
    H = torch.tensor([[2.0, 1.0, 0.0], [1.0, 2.0, 1.0], [0.0, 1.0, 2.0]])
    w0 = torch.tensor([[1.0, 2.0, 3.0]])
    keep = torch.tensor([[True, False, True]])
    solved = solve_on_support(w0.clone(), H, w0 @ H, keep, iterations=2)  # 2 unknowns: exact in 2
    torch.testing.assert_close(solved, torch.tensor([[2.0, 0.0, 4.0]]))


def test_solve_on_support_is_the_restricted_least_squares_of_every_row():
    x = correlated_inputs(512, 24)
    H = hessian_of(x).double()
    w0 = weight(5, 24).double()
    keep = torch.rand(5, 24, generator=torch.Generator().manual_seed(2)) > 0.4
    solved = solve_on_support(torch.zeros_like(w0), H, w0 @ H, keep, iterations=60)
    for i in range(5):
        s = keep[i]
        exact = torch.linalg.solve(H[s][:, s], (w0[i] @ H)[s])
        torch.testing.assert_close(solved[i, s], exact, rtol=1e-7, atol=1e-9)
        assert (solved[i, ~s] == 0).all()


def test_normalised_has_a_unit_diagonal_and_the_same_error():
    x = correlated_inputs(256, 8)
    x[:, 3] = 0  # a dead input: never seen non-zero
    H, w = hessian_of(x), weight(4, 8)
    Wn, Hn, d, damp = normalised(w, H, percdamp=0.0)
    assert damp == 0.0
    torch.testing.assert_close(Hn.diagonal(), torch.ones(8))
    assert (Wn[:, 3] == 0).all() and d[3] == 1
    delta = torch.randn(4, 8, generator=torch.Generator().manual_seed(3))
    delta[:, 3] = 0  # the dead input's weights are 0 on both sides
    # tr(dW H dW^T) = tr(dW' H' dW'^T) with dW' = dW D
    torch.testing.assert_close(((delta * d) @ Hn * (delta * d)).sum(), (delta @ H * delta).sum())


def test_smallest_counts_exactly_and_breaks_ties_by_index():
    values = torch.tensor([[3.0, 1.0, 1.0], [1.0, 2.0, 0.5]])
    assert smallest(values, 3).tolist() == [[False, True, True], [False, False, True]]
    assert smallest(values, 2).tolist() == [[False, True, False], [False, False, True]]
    assert not smallest(values, 0).any() and smallest(values, 6).all()


def test_no_iteration_is_wanda_mask_with_exact_weights():
    # iterations=0: the mask of Wanda's |w_ij| * ||X_j|| over the tensor, then the kept weights of
    # every row at the least-squares optimum on its support (closed form; admm_prune runs in float32)
    x = correlated_inputs(512, 16)
    H, w = hessian_of(x).double(), weight(6, 16).double()
    pruned, mask = admm_prune(w, H, 0.5, iterations=0, percdamp=0.0, cg_iterations=40)
    score = w.abs() * H.diagonal().sqrt()
    assert torch.equal(mask, score <= score.flatten().kthvalue(48).values)
    for i in range(6):
        s = ~mask[i]
        torch.testing.assert_close(pruned[i, s], torch.linalg.solve(H[s][:, s], (w[i] @ H)[s]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sparsity, n, m", [(0.5, 0, 0), (0.7, 0, 0), (0.0, 2, 4)])
def test_lower_layer_error_than_sparsegpt_at_exact_counts(sparsity, n, m):
    x = correlated_inputs(2048, 256)
    w, H = weight(64, 256), hessian_of(x)
    ours, mask = admm_prune(w, H, sparsity, prune_n=n, prune_m=m)
    theirs, their_mask = sparsegpt_prune(w, H, sparsity, prune_n=n, prune_m=m)
    expected = round(sparsity * w.numel()) if n == 0 else w.numel() * n // m
    assert int(mask.sum()) == expected  # 11469 at 70%; sparsegpt rounds per tile: 2 x 5734
    assert expected - 1 <= int(their_mask.sum()) <= expected
    assert torch.equal(mask, ours == 0)
    if n:
        assert (mask.view(64, -1, m).sum(2) == n).all()
    # measured (seeds above), ours / sparsegpt's ||(W - W')X||: 50% 0.459, 70% 0.517, 2:4 0.514
    assert output_error(w, ours, x) < 0.7 * output_error(w, theirs, x)


def test_given_count_is_exact_for_both_methods():
    # OWL hands each tensor its count: both reconstructions prune exactly that many
    x = correlated_inputs(512, 200)
    w, H = weight(24, 200), hessian_of(x)
    for count in (0, 1, 1111, 24 * 200):
        assert int(admm_prune(w, H, 0.5, pruned=count)[1].sum()) == count
        _, mask = sparsegpt_prune(w, H, 0.5, pruned=count, blocksize=64)
        assert int(mask.sum()) == count
        # the tiles share it out in proportion to their widths: 64, 64, 64, 8 columns
        for start in range(0, 200, 64):
            end = min(start + 64, 200)
            assert int(mask[:, start:end].sum()) == round(count * end / 200) - round(count * start / 200)


def test_dtype_kept_input_untouched_and_bad_arguments():
    x = correlated_inputs(256, 32)
    w16, H = weight(8, 32).to(torch.bfloat16), hessian_of(x)
    before = w16.clone()
    pruned, mask = admm_prune(w16, H, 0.5)
    assert pruned.dtype == torch.bfloat16 and torch.equal(w16, before)
    assert torch.equal(mask, pruned == 0)
    for kwargs in ({"prune_n": 2, "prune_m": 3}, {"pruned": 257}, {"rho": 0.0}):
        with pytest.raises(ValueError):
            admm_prune(w16, H, 0.5, **kwargs)
    with pytest.raises(ValueError, match="non-finite"):
        admm_prune(w16, H * float("nan"), 0.5)


def test_owners_balance_a_llama_layer():
    # q, k, v, o, gate, up, down of SmolLM2-135M: loads out * in^2 of 0.19, 0.06, 0.06, 0.19, 0.51,
    # 0.51, 1.36 G; down and k on rank 0 (1.42 G), the rest on rank 1 (1.47 G)
    shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
    assert owners(shapes, 2) == [1, 0, 1, 1, 1, 1, 0]
    assert owners(shapes, 1) == [0] * 7
    assert sorted(owners(shapes[:3], 4)) == [0, 1, 2]
