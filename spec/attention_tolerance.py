r"""Error bounds for attention in float64, derived step by step.

(To be folded into :mod:`attnspec.spec.tolerance`.)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["gamma", "textbook_sdpa_bound"]

F64 = npt.NDArray[np.float64]
U = 2.0**-53


def gamma(n: int | F64) -> Any:
    r""":math:`\gamma_n = n u / (1 - n u)` (Higham 2002, Lemma 3.1), for float64."""
    nu = np.asarray(n, dtype=np.float64) * U
    if np.any(nu >= 1):
        raise ValueError(f"gamma_n needs n u < 1, got n = {n}")
    return nu / (1 - nu)


def textbook_sdpa_bound(
    q: F64,
    k: F64,
    v: F64,
    *,
    scale: float | None = None,
    mask: npt.NDArray[np.bool_] | None = None,
    bias: F64 | None = None,
    causal: bool = False,
    align: str | None = None,
) -> tuple[F64, F64]:
    r"""A rigorous bound on the error of float64 attention computed the textbook way.

    Returns ``(weighted, bound)``, both of the output's shape: ``weighted`` is
    :math:`\sum_j p_{ij} |v_{jk}|` and ``bound`` the bound on
    :math:`|\hat o_{ik} - o_{ik}|` for any implementation that computes, in float64
    with round-to-nearest (unit roundoff :math:`u = 2^{-53}`,
    :math:`\gamma_n = nu/(1-nu)`):

    1. the logits by a dot product of length :math:`E` and at most four roundings for the
       scale (torch multiplies q and k each by :math:`\mathrm{fl}(\sqrt\tau)`), then one
       addition of the bias: by Higham (2002, eq. 3.5),
       :math:`|\hat s_{ij} - s_{ij}| \le \varepsilon_i = \gamma_{E+4} |\tau| \max_j
       \sum_e |q_{ie} k_{je}| + u \max_j |s_{ij}|` (first order in u);
    2. softmax by subtracting the row maximum, :math:`\exp` with an error below one ulp
       (relative :math:`2u`), a sum of :math:`S` positive terms (:math:`\gamma_S`), at
       most :math:`S` online rescalings of three roundings each (:math:`\gamma_{3S}`), and a
       division (:math:`u`). A perturbation :math:`\delta` of the logits changes each weight
       by the factor :math:`e^{\delta_j} / \sum_l p_l e^{\delta_l} \in [e^{-2\|\delta\|_\infty},
       e^{2\|\delta\|_\infty}]`; the rounded shift :math:`\mathrm{fl}(s_j - m)` perturbs
       by at most :math:`u R_i`, :math:`R_i` the range of the visible logits. So
       :math:`\hat p_{ij} = p_{ij} (1 + \rho'_{ij})` with
       :math:`|\rho'| \le e^{2\varepsilon_i + 2uR_i}(1 + \gamma_{4S+4}) - 1`;
    3. :math:`\hat o = \mathrm{fl}(\hat P V)`: :math:`\gamma_S \sum_j \hat p_{ij} |v_{jk}|`.

    Together: :math:`|\hat o_{ik} - o_{ik}| \le \rho_i \sum_j p_{ij} |v_{jk}|` with
    :math:`\rho_i = e^{2\varepsilon_i + 2uR_i}(1+\gamma_{4S+4})(1+\gamma_S) - 1`.
    Only visible keys count; a row with nothing visible has bound 0.

    References
    ----------
    N. J. Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., SIAM, 2002,
    doi:10.1137/1.9780898718027 (Lemma 3.1, eq. 3.5).
    """
    import attnspec

    kw: dict[str, Any] = {"scale": scale, "mask": mask, "bias": bias, "causal": causal}
    if align is not None:
        kw["align"] = align
    # sum_j p_ij |v_jk|, itself within a relative rho_i of exact (a second-order effect)
    weighted = attnspec.sdpa(q, k, np.abs(v), precision="fast", **kw)

    hq, hkv = q.shape[-3], k.shape[-3]
    kk = np.repeat(k, hq // hkv, axis=-3)
    width, n_q, n_k = q.shape[-1], q.shape[-2], k.shape[-2]
    tau = 1.0 / np.sqrt(width) if scale is None else float(scale)
    logits = tau * (q @ np.swapaxes(kk, -1, -2))
    if bias is not None:
        logits = logits + bias
    magnitude = abs(tau) * (np.abs(q) @ np.swapaxes(np.abs(kk), -1, -2))
    seen = np.ones(logits.shape, dtype=bool)
    if mask is not None:
        seen = seen & mask
    if causal:
        from attnspec.reference.visibility import alignment_offset, visible

        offset = alignment_offset(n_q, n_k, align, "causal")
        pattern = visible(n_q, n_k, causal=True, offset=offset)
        assert pattern is not None
        seen = seen & pattern
    seen = seen & np.isfinite(logits)
    with np.errstate(invalid="ignore"):  # rows with nothing visible: max of nothing
        eps = gamma(width + 4) * np.max(np.where(seen, magnitude, 0.0), axis=-1) + U * np.max(
            np.where(seen, np.abs(logits), 0.0), axis=-1
        )
        top = np.max(np.where(seen, logits, -np.inf), axis=-1)
        low = np.min(np.where(seen, logits, np.inf), axis=-1)
        spread = np.where(np.any(seen, axis=-1), top - low, 0.0)
    rho = np.expm1(2 * eps + 2 * U * spread) * (1 + gamma(4 * n_k + 4)) * (1 + gamma(n_k))
    rho = rho + gamma(4 * n_k + 4) + gamma(n_k) + gamma(4 * n_k + 4) * gamma(n_k)
    return weighted, rho[..., None] * weighted
