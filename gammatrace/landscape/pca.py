"""The plane of an optimization path: top-2 principal directions of its displacements.

Li et al. (2018, "Visualizing the Loss Landscape of Neural Nets", §7) show that random
directions miss an optimization path entirely (two random vectors in high dimension are
nearly orthogonal to it), and plot instead on the plane of the first two principal
components of the matrix of displacements M = [θ_0 − θ_n; …; θ_{n−1} − θ_n]. The
matrix is *not* centred: its rows are measured from the reference point θ_n, which is
the centre of the plot, so the plane passes through θ_n.

Pure NumPy; every quantity is float64.

Example:
    >>> import numpy as np
    >>> M = np.array([[2.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    >>> pca = path_pca(M)
    >>> round(float(pca.explained.sum()), 6)
    1.0
    >>> np.allclose(pca.coords @ pca.basis, M)
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gammatrace.errors import UserError


@dataclass(frozen=True)
class PathPCA:
    """Top-2 directions of a displacement matrix M (rows: θ_i − origin).

    ``basis`` (2, d): orthonormal rows u, v. ``explained`` (2,): σ_i² / Σ_j σ_j², the
    fraction of Σ‖θ_i − origin‖² the axis captures (what the plot's axis labels say).
    ``coords`` (n, 2): the projection M @ basisᵀ, so θ_i ≈ origin + coords_i @ basis.
    ``singular_values``: all σ_j of M.
    """

    basis: np.ndarray
    explained: np.ndarray
    coords: np.ndarray
    singular_values: np.ndarray

    def project(self, displacements: np.ndarray) -> np.ndarray:
        """Coordinates of further displacements (rows) on the plane.

        Example:
            >>> import numpy as np
            >>> pca = path_pca(np.array([[1.0, 0.0], [0.0, 2.0]]))
            >>> pca.project(np.array([[3.0, 4.0]])).round(6).tolist()
            [[4.0, 3.0]]
        """
        return np.asarray(displacements, dtype=np.float64) @ self.basis.T


def path_pca(displacements: np.ndarray) -> PathPCA:
    """First two principal directions of the (uncentred) displacement matrix.

    The sign of each direction is fixed so that the *first* row has a non-negative
    coordinate on it (for a path measured from its end point, the start lies in the
    upper-right quadrant), which makes figures reproducible across SVD
    implementations. A path of rank < 2 gets an arbitrary orthonormal completion
    with ``explained`` 0 on the missing axis.

    Example:
        >>> import numpy as np
        >>> pca = path_pca(np.array([[-3.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
        >>> pca.coords[:2, 0].round(6).tolist(), pca.explained.round(6).tolist()
        ([3.0, 1.0], [1.0, 0.0])
    """
    M = np.asarray(displacements, dtype=np.float64)
    if M.ndim != 2 or M.shape[1] < 2:
        raise ValueError(f"displacements must be an (n, d) matrix with d >= 2, got shape {M.shape}")
    if not np.isfinite(M).all():
        raise UserError("the path's displacements contain NaN or inf (a diverged run?)")
    # The thin SVD of the short, wide n×d matrix costs O(n² d): the path's PCA never
    # needs a d×d covariance.
    _, s, vt = np.linalg.svd(M, full_matrices=False)
    basis = np.zeros((2, M.shape[1]))
    k = min(2, len(s))
    basis[:k] = vt[:k]
    if k < 2:  # a single row: SVD gives one direction only
        basis[1] = _orthonormal_completion(basis[0], M.shape[1])
    coords = M @ basis.T
    for axis in range(2):
        if coords[0, axis] < 0:
            basis[axis] *= -1.0
            coords[:, axis] *= -1.0
    total = float((s**2).sum())
    explained = np.zeros(2)
    if total > 0:
        explained[:k] = s[:k] ** 2 / total
    return PathPCA(basis=basis, explained=explained, coords=coords, singular_values=s)


def _orthonormal_completion(u: np.ndarray, d: int) -> np.ndarray:
    # A deterministic unit vector orthogonal to u: Gram–Schmidt on the coordinate axis
    # least aligned with u.
    e = np.zeros(d)
    e[int(np.argmin(np.abs(u)))] = 1.0
    w = e - (e @ u) * u if np.linalg.norm(u) > 0 else e
    return w / np.linalg.norm(w)
