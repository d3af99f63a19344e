"""Expert compression fits (``tools/svd_fit.py``): PCA recovers experts that share a rank-r basis to the noise
level; the activation-aware fit beats PCA on held-out inputs from the calibration inputs' subspace.
"""
import pytest
import torch

from nanovllm.tools.svd_fit import activation_fit, pca_fit


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_pca_recovers_a_shared_basis_to_the_noise_level():
    g = torch.Generator().manual_seed(0)
    experts, out, inp, r, sigma = 6, 48, 40, 5, 1e-3
    basis = torch.randn(out, r, generator=g, dtype=torch.float64)
    clean = basis @ torch.randn(experts, r, inp, generator=g, dtype=torch.float64)
    noise = sigma * torch.randn(experts, out, inp, generator=g, dtype=torch.float64)
    w = clean + noise
    u, v = pca_fit(w, r)
    assert u.shape == (out, r) and v.shape == (experts, r, inp)
    noise_level = float(noise.norm() / clean.norm())
    err = _rel(u @ v, clean)  # U @ V broadcasts over experts
    assert err <= noise_level, (err, noise_level)  # the fit drops the noise outside the basis
    u1, v1 = pca_fit(w, r - 1)
    assert _rel(u1 @ v1, clean) > 100 * noise_level  # one direction short: far off


def test_activation_aware_beats_pca_on_held_out_activations_of_the_calibration_subspace():
    g = torch.Generator().manual_seed(1)
    experts, out, inp, sub, rank = 4, 32, 32, 2, 8  # the experts' outputs span experts * sub = rank dims
    w = torch.randn(experts, out, inp, generator=g, dtype=torch.float64)
    span = torch.linalg.qr(torch.randn(inp, sub, generator=g, dtype=torch.float64)).Q  # inputs live in sub dims
    calib = [torch.randn(200, sub, generator=g, dtype=torch.float64) @ span.T for _ in range(experts)]
    held = [torch.randn(100, sub, generator=g, dtype=torch.float64) @ span.T for _ in range(experts)]

    def output_error(u, v):
        return sum(float(((x @ (u @ v[e]).T) - x @ w[e].T).norm() ** 2) for e, x in enumerate(held)) / sum(
            float((x @ w[e].T).norm() ** 2) for e, x in enumerate(held))

    pca = output_error(*pca_fit(w, rank))
    act = output_error(*activation_fit(w, calib, rank, ridge=1e-4))
    assert pca > 0.3 and act < 1e-6, (pca, act)  # seen: 0.55 and 4e-11


def test_fits_at_full_rank_reproduce_the_weights():
    w = torch.randn(3, 8, 5, dtype=torch.float64)
    u, v = pca_fit(w, 8)
    assert torch.allclose(u @ v, w, atol=1e-10)
    u, v = activation_fit(w, [torch.randn(30, 5, dtype=torch.float64)] * 2 + [torch.empty(0, 5)], 99, ridge=0.0)
    assert u.shape == (8, 8) and torch.allclose(u @ v, w, atol=1e-8)


def test_bad_arguments_name_the_value():
    w = torch.zeros(2, 4, 4)
    with pytest.raises(ValueError, match="rank=0"):
        pca_fit(w, 0)
    with pytest.raises(ValueError, match="1 calibration input sets for 2 experts"):
        activation_fit(w, [torch.zeros(1, 4)], 2, 1e-4)
    with pytest.raises(ValueError, match="ridge=-1"):
        activation_fit(w, [torch.zeros(1, 4)] * 2, 2, -1)
