"""Fitting a layer's experts ``W_e`` [out, in] (stacked [E, out, in]) by a shared basis U [out, R] with
orthonormal columns and per-expert factors V_e [R, in], ``W_e ≈ U V_e``.

* ``pca_fit``: U spans the top-R left singular vectors of ``[W_1 | ... | W_E]`` (the eigenvectors of
  ``Σ W_e W_eᵀ``), and ``V_e = Uᵀ W_e``.  It minimises the weights' error, wherever the inputs lie.
* ``activation_fit``: given calibration inputs X_e [n_e, in] each expert saw, U spans the top-R eigenvectors of
  the experts' output covariance ``Σ_e W_e C_e W_eᵀ / n_e`` (``C_e = X_eᵀ X_e``), and V_e is the ridge
  regression of the outputs: ``argmin ‖V X_eᵀ − Uᵀ W_e X_eᵀ‖² + λ‖V‖² = Uᵀ W_e C_e (C_e + λ I)⁻¹`` with λ =
  ``ridge`` times the mean of C_e's diagonal.  It minimises the outputs' error on inputs like the calibration
  ones.  An expert with no calibration row counts with ``C_e = I`` (its PCA fit).

Both compute in float64 on the CPU and float32 elsewhere, on the weights' device; ``rank`` is capped at ``out``.
"""
import torch


def _work_dtype(device: torch.device) -> torch.dtype:
    return torch.float64 if device.type == "cpu" else torch.float32


def _top_eigvecs(gram: torch.Tensor, rank: int) -> torch.Tensor:
    """The eigenvectors of the symmetric ``gram`` [out, out] of its ``rank`` largest eigenvalues, as columns."""
    _, vecs = torch.linalg.eigh(gram)  # ascending
    return vecs[:, -rank:].flip(-1).contiguous()


def pca_fit(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U [out, R], V [E, R, in]) of experts ``w`` [E, out, in], in the working dtype (module docstring)."""
    _check(w, rank)
    wd = w.to(_work_dtype(w.device))
    rank = min(rank, w.shape[1])
    gram = torch.einsum("eoi,epi->op", wd, wd)
    u = _top_eigvecs(gram, rank)
    return u, torch.einsum("or,eoi->eri", u, wd)


def activation_fit(w: torch.Tensor, inputs: list, rank: int, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(U [out, R], V [E, R, in]) of experts ``w`` [E, out, in] fitted to calibration ``inputs`` (one [n_e, in]
    tensor per expert, possibly empty) with relative ``ridge`` (module docstring)."""
    _check(w, rank)
    if len(inputs) != w.shape[0]:
        raise ValueError(f"{len(inputs)} calibration input sets for {w.shape[0]} experts")
    if not ridge >= 0:
        raise ValueError(f"ridge={ridge!r} must be >= 0")
    dt = _work_dtype(w.device)
    wd = w.to(dt)
    num_in = w.shape[2]
    eye = torch.eye(num_in, dtype=dt, device=w.device)
    covs = []
    for e, x in enumerate(inputs):
        if x is None or x.shape[0] == 0:
            covs.append(eye)
            continue
        if x.shape[1] != num_in:
            raise ValueError(f"expert {e}'s calibration inputs have width {x.shape[1]}, its weight {num_in}")
        x = x.to(device=w.device, dtype=dt)
        covs.append(x.T @ x / x.shape[0])
    rank = min(rank, w.shape[1])
    gram = sum(wd[e] @ c @ wd[e].T for e, c in enumerate(covs))
    u = _top_eigvecs(gram, rank)
    vs = []
    for e, c in enumerate(covs):
        lam = ridge * float(c.diagonal().mean())
        target = u.T @ wd[e] @ c  # [R, in];  V (C + λI) = Uᵀ W C
        vs.append(torch.linalg.solve(c + lam * eye, target.T).T if lam > 0 else target @ torch.linalg.pinv(c))
    return u, torch.stack(vs)


def _check(w: torch.Tensor, rank: int) -> None:
    if w.dim() != 3:
        raise ValueError(f"experts must be stacked [E, out, in], got shape {tuple(w.shape)}")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"rank={rank!r} must be a positive int")
