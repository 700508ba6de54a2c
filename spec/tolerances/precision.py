r"""Error bounds for attention computed in a low precision, derived step by step.

A kernel that works in ``dtype`` (float32, float16, bfloat16, float8_e4m3fn,
float8_e5m2) and accumulates in ``accumulate`` (float32 by default) is compared with the
exact output of the definition (:mod:`attnspec.reference.attention`) on the same inputs,
which are already values of ``dtype``. Two criteria:

* :func:`forward_bound`, derived: a bound on :math:`|\hat o_{ik} - o_{ik}|` and on
  :math:`|\hat\ell_i - \ell_i|` for any kernel of the kind below, as a function of the
  actual inputs, componentwise where the analysis allows (:math:`|\tau| |Q||K|^T` for the
  logits, :math:`P|V|` for the output);
* :func:`empirical_bound`, the rule FlashAttention's tests use: twice the largest error
  of a naive same-dtype evaluation (:func:`attnspec.reference.emulate.emulated_sdpa`),
  plus a floor.

Notation: :math:`u` and :math:`\eta` are the unit roundoff and the smallest subnormal of
``dtype``, :math:`t` its smallest normal, :math:`\Omega` its largest finite value;
:math:`u_a`, :math:`\eta_a`, :math:`\Omega_a` those of ``accumulate``;
:math:`\gamma^a_n = n u_a / (1 - n u_a)` (Higham 2002, Lemma 3.1). A rounding to
``dtype`` of a real :math:`x` gives :math:`x(1 + \delta) + \zeta` with :math:`|\delta| \le
u`, :math:`|\zeta| \le \eta / 2` (Higham 2002, sec. 2.1, with gradual underflow).

The kernels covered
-------------------
Any kernel that computes, with round to nearest (``logits="dtype"``, the default, the
naive order; :math:`r` below is ``dtype``):

1. the logits :math:`\hat s_{ij}` from :math:`q_i \cdot k_j` accumulated in
   ``accumulate``, with q and k scaled first (one rounding each, PyTorch's math backend
   scales both by :math:`\sqrt\tau`) and at most three roundings to :math:`r` after (the
   dot product's result, the scale, the product); then, each rounded to :math:`r`, the
   softcap :math:`c\tanh(s/c)` (``tanh`` within ``TANH_ULPS`` ulps of :math:`r`, or within
   ``TANH_APPROX`` relative), the bias (itself rounded), the ALiBi term :math:`m_h|i + o -
   j|` (three roundings); the sink :math:`\sigma_h` rounded to :math:`r`;
2. the max-shifted softmax: the shifts :math:`\hat d_j = \hat s_j - \hat m` rounded to
   :math:`r`, also in base 2 (:math:`\hat s_j \log_2 e - \hat m\log_2 e` by one FMA before
   ``exp2``); ``exp`` in ``accumulate`` within ``EXP_ULPS`` ulps, rounded to ``dtype``
   (``logits="dtype"``) or kept (``"accumulate"``); the row sum :math:`l` in
   ``accumulate``, online or not: the running sum and output may be rescaled by
   :math:`e^{m_{\mathrm{old}} - m_{\mathrm{new}}}` each time the running maximum grows, at
   most ``rescalings`` times (default :math:`n_i - 1`, :math:`n_i` the visible keys and
   the sink); the weights divided by :math:`l` in ``accumulate`` and rounded to ``dtype``
   before :math:`PV`, or the unnormalised weights rounded to ``dtype`` and the division
   applied to the output (FlashAttention's order); dropout by the keep-mask and
   :math:`1/(1 - p)` in at most three roundings to ``dtype``;
3. :math:`PV` accumulated in ``accumulate``, the output rounded to ``dtype``; the lse
   :math:`\hat m + \log l` in ``accumulate`` (``log`` within ``LOG_ULPS`` ulps).

``logits="accumulate"`` is the claim of a fused kernel (FlashAttention): steps 1 and 2 in
the accumulation dtype (:math:`r` = ``accumulate``), only the weights and the output
rounded to ``dtype``; a tighter bound, which a naive kernel fails (docs/tolerances.md).
Not covered: a kernel that accumulates in a lower precision than it claims (what the
bound is meant to catch), that stores partial sums in ``dtype``, or whose ``exp``,
``log``, ``tanh`` are less accurate than assumed.

The derivation
--------------
**Logits.** For each visible :math:`(i, j)` let :math:`M_{ij} = |\tau| \sum_e |q_{ie}
k_{je}|` and :math:`s_{ij}` the float64 logit (within :math:`\gamma_{E+4}M_{ij}`,
:func:`~attnspec.spec.tolerances.attention.logit_data`). The dot product of the scaled q
and k in ``accumulate`` errs by at most :math:`\pi M_{ij}`, :math:`\pi = (1 + u_r)^2(1 +
\gamma^a_E) - 1` (Higham 2002, eq. 3.5, each product perturbed by the two scalings), plus
:math:`E\eta_a/2` for products that underflow; three roundings after add
:math:`(1 + u_r)^3 - 1` times :math:`\sigma_{ij} = |s_{ij}| + (\gamma_{E+4} + \pi)M_{ij}`:

.. math::

    |\hat s_{ij} - s_{ij}| \le \varepsilon_{ij} = \pi M_{ij} + ((1 + u_r)^3 - 1)
    \sigma_{ij} + (2\eta_r + E\eta_a)\max(1, |\tau|),
    \qquad |\hat s_{ij}| \le A_{ij} = |s_{ij}| + \gamma_{E+4}M_{ij} + \varepsilon_{ij}.

Softcap: :math:`c\tanh(x/c)` is 1-Lipschitz, so an error passes through; the division
adds :math:`u_r A`, ``tanh`` and the product :math:`(\tau_r - 1)\, c \tanh(A(1+u_r)/c)`
with :math:`\tau_r = (1 + \max(2u_r\mathrm{TANH\_ULPS}, \mathrm{TANH\_APPROX}))(1 + u_r)`,
and :math:`A \leftarrow \tau_r c\tanh(A(1 + u_r)/c)`. Bias: :math:`u_r|b|` (its rounding)
:math:`+\, u_r(A + |b|(1 + u_r))` (the sum's). ALiBi :math:`t = m_h|i + o - j|`:
:math:`((1 + u_r)^3 - 1)t` for the term, :math:`u_r(A + t(1 + u_r)^3)` for the
difference. Sink: :math:`u_r|\sigma_h| + \eta_r/2`. Each step grows :math:`A` by what it
adds, and each adds :math:`\eta_r` or :math:`2\eta_r` for underflow. A row where some
:math:`A_{ij}(1 + u_r)`, or the unscaled dot product :math:`(\sigma_{ij} +
\varepsilon_{ij})/|\tau|`, passes the largest value of :math:`r` may overflow in a
correct kernel: its bounds are :math:`\infty` (they say nothing).

**Arguments of exp.** With :math:`a_i` the row maximum and :math:`\varepsilon_i =
\max_j \varepsilon_{ij}` (visible keys and the sink), :math:`|\hat d_j| \le g_{ij} = a_i -
s_{ij} + \varepsilon_{ij} + \varepsilon_i`. The shift's rounding moves the argument by
:math:`u_r g_{ij} + \eta_r/2`; the base-2 form by :math:`u_a(|a_i| + \varepsilon_i +
g_{ij})`; the arguments :math:`m_{\mathrm{old}} - m_{\mathrm{new}}` of the rescalings,
each formed and scaled with two roundings in ``accumulate``, move the earlier terms by
:math:`2u_a\sum_t |m_{t-1} - m_t| \le 2u_a g_{ij}` (the running maximum only grows: the
sum telescopes). So the argument of key :math:`j` is :math:`s_{ij} - a_i + \delta_{ij}`
with

.. math::

    |\delta_{ij}| \le b_{ij} = \varepsilon_{ij} + (u_r + 3u_a) g_{ij} + u_a(|a_i| +
    \varepsilon_i) + \eta_r / 2,

and, componentwise, the softmax :math:`\tilde p` of the perturbed arguments satisfies
:math:`\tilde p_{ij} / p_{ij} = e^{\delta_{ij}} / \sum_l p_{il} e^{\delta_{il}} \in
[e^{-b_{ij}} / \Sigma^+_i,\ e^{b_{ij}} / \Sigma^-_i]` with :math:`\Sigma^\pm_i = \sum_l
p_{il} e^{\pm b_{il}}` (the sum over the visible keys and the sink, :math:`p` the exact
weights, here the float64 ones).

**Weights.** Each term :math:`e^{\hat d_j}` is evaluated with relative error at most
:math:`\alpha = (1 + 2u_a\,\mathrm{EXP\_ULPS})(1 + u) - 1` (``logits="dtype"``: rounded
to ``dtype``; the row sum may use the unrounded value, also within :math:`\alpha`) or
:math:`\alpha = 2u_a\,\mathrm{EXP\_ULPS}` (``"accumulate"``); the sum of :math:`n_i`
terms in ``accumulate`` has relative error :math:`\gamma^a_{n_i}`; each of :math:`r_i`
rescalings multiplies the earlier terms of the output and of the sum by
:math:`e^{m_{\mathrm{old}} - m_{\mathrm{new}}}` within :math:`2u_a\mathrm{EXP\_ULPS}`
and rounds, so every term carries a factor in :math:`[C^-_i, C^+_i]`, :math:`C^\pm_i =
((1 \pm 2u_a\mathrm{EXP\_ULPS})(1 \pm u_a))^{r_i}`; the division and the rounding of
the weight (or of the unnormalised weight) add :math:`(1 + u_a)(1 + u)`; dropout
:math:`D^\pm = (1 \pm u)^3` (1 without). So the computed weights are :math:`\hat p_{ij}
= p_{ij}(1 + \theta'_{ij}) + \zeta_{ij}` with :math:`|\theta'_{ij}| \le \theta_{ij}`,

.. math::

    \theta_{ij} = \max\Bigl(\frac{e^{b_{ij}}}{\Sigma^-_i} K^+_i - 1,\
    1 - \frac{e^{-b_{ij}}}{\Sigma^+_i} K^-_i\Bigr), \qquad
    K^\pm_i = \frac{(1 \pm \alpha)(1 \pm u_a)(1 \pm u)C^\pm_i D^\pm}
    {(1 \mp \alpha)(1 \mp \gamma^a_{n_i})C^\mp_i},

and :math:`\rho_i = \max_j \theta_{ij}`. :math:`\zeta` is the absolute error of results
that underflow, nonzero only for keys whose rounded weight may be subnormal in ``dtype``:
in the naive order the weight itself (:math:`p_{ij}(1 - \rho_i) < t`), :math:`|\zeta| \le
z = 2\eta/(1 - p_{\mathrm{drop}}) + \eta_a`; in the fused order the unnormalised weight
:math:`p_{ij} l_i` (:math:`l_i = 1/\max_j p_{ij} \ge 1`; :math:`p_{ij} l_i(1 - \rho_i) <
t`), whose error the division by :math:`\hat l_i \ge \max(l_i(1 - \rho_i), 1/2)` shrinks:
:math:`z = \eta(1/2 + [\mathrm{dropout}]) / (\max(l_i(1 - \rho_i), 1/2)(1 -
p_{\mathrm{drop}})) + \eta_a`.

**Output.** :math:`PV` in ``accumulate`` adds :math:`\gamma^a_{n_i} \sum_j |\hat
p_{ij}||v_{jk}|` and :math:`n_i\eta_a`, the final rounding :math:`u|\hat o| + \eta/2`.
With :math:`W_{ik} = \sum_j p_{ij}|v_{jk}|` (an upper bound: the float64 :math:`P|V|`
plus its textbook bound) and :math:`T_{ik} = \sum_j p_{ij}\theta_{ij}|v_{jk}|` (the
componentwise :math:`P|V|` of the weights' errors):

.. math::

    |\hat o_{ik} - o_{ik}| \le (1 + u)\Bigl((1 + \gamma^a_{n_i})\bigl(T_{ik} + z
    \sum_{j:\ \zeta_{ij} \ne 0} |v_{jk}|\bigr) + \gamma^a_{n_i} W_{ik} + n_i\eta_a\Bigr)
    + u W_{ik} + \eta/2,

:math:`\infty` where :math:`(1 + \rho_i)(1 + \gamma^a_{n_i})W_{ik}` could pass the
largest finite value of ``dtype`` or ``accumulate``, or where :math:`\gamma^a_{n_i} \ge
1` or :math:`\alpha \ge 1` (the lemmas say nothing).

**lse.** :math:`\log\sum_j e^{s_{ij} + \delta_{ij}} - \ell_i = \log\sum_j p_{ij}
e^{\delta_{ij}} \in [\log\Sigma^-_i, \log\Sigma^+_i]`; the terms' errors, the sum and
the rescalings add :math:`\max(\log((1 + \alpha)(1 + \gamma^a_{n_i})C^+_i), -\log((1 -
\alpha)(1 - \gamma^a_{n_i})C^-_i))` and underflow :math:`n_i(\eta_r + \eta_a)`: in all
:math:`\lambda_i`. ``log`` adds :math:`2u_a\mathrm{LOG\_ULPS}\,\Lambda_i` with
:math:`\Lambda_i = \log n_i + \lambda_i \ge |\log\hat l_i|`, the addition of :math:`\hat m`
:math:`u_a(|a_i| + \varepsilon_i + \Lambda_i)`:

.. math::

    |\hat\ell_i - \ell_i| \le \lambda_i + 2u_a\mathrm{LOG\_ULPS}\,\Lambda_i + u_a(1 +
    2u_a\mathrm{LOG\_ULPS})(|a_i| + \varepsilon_i + \Lambda_i).

Every bound is multiplied by ``SECOND_ORDER`` (1.01) for the rounding of its own float64
evaluation (of :math:`M`, :math:`P`, :math:`T` and the expressions above); :math:`T` is
also scaled by the ratio of :math:`W` to the float64 :math:`P|V|`, for the error of the
float64 weights.

**The reference.** The exact output is not computed: the reference is
:func:`attnspec.sdpa` with ``precision="fast"`` (float64; at every size), whose own error
is bounded by :func:`attnspec.spec.tolerances.attention.textbook_sdpa_bound` and
:func:`~attnspec.spec.tolerances.attention.textbook_lse_bound`; with ``against="fast"``
(the default) :func:`forward_bound` adds those bounds, so that it bounds
:math:`|\hat o - \mathrm{sdpa}_{\mathrm{fast}}|` directly. They are far below the
low-precision terms (:math:`2^{-53}` against :math:`2^{-24}` and more).

References
----------
N. J. Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., SIAM, 2002,
doi:10.1137/1.9780898718027 (sec. 2.1, Lemma 3.1, eq. 3.5).
P. Blanchard, D. J. Higham, N. J. Higham, Accurately computing the log-sum-exp and softmax
functions, IMA J. Numer. Anal. 41(4), 2021, doi:10.1093/imanum/draa038.
T. Dao, FlashAttention-2, 2023, arXiv:2307.08691 (Alg. 1: P rounded before PV, the
division by l after it). FlashAttention's test rule: Dao-AILab/flash-attention,
tests/test_flash_attn.py and hopper/test_flash_attn.py (``test_flash_attn_output``).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from attnspec.reference.emulate import (
    Format,
    emulated_sdpa,
    emulated_sdpa_backward,
    get_formats,
    round_to,
)
from attnspec.reference.inputs import as_real_float64
from attnspec.reference.visibility import alignment_offset, relative_position
from attnspec.spec.tolerances._core import SECOND_ORDER
from attnspec.spec.tolerances.attention import (
    logit_data,
    textbook_lse_bound,
    textbook_sdpa_bound,
)

__all__ = [
    "AGAINST",
    "EXP_ULPS",
    "FLASH_BACKWARD_FACTOR",
    "FLASH_FACTOR",
    "LOGITS",
    "LOG_ULPS",
    "TANH_APPROX",
    "TANH_ULPS",
    "backward_bound",
    "empirical_backward_bound",
    "empirical_bound",
    "forward_bound",
    "gamma_in",
]

F64 = npt.NDArray[np.float64]

#: ulps (of ``accumulate``) of ``exp`` / ``exp2`` assumed, before the rounding to
#: ``dtype`` (an ulp is at most :math:`2u` relative): the CUDA C++ Programming Guide's
#: table of single-precision functions gives 2 ulp for ``expf`` and ``exp2f`` (2.32 ulp
#: measured for CUDA 8's ``expf``: N. Juffa, NVIDIA developer forum, "A more accurate,
#: performance-competitive implementation of expf"); numpy documents 2.52 ulp for its
#: float32 SIMD ``exp`` (2.40 measured here on 2e6 arguments in [-87, 0]); PyTorch's CPU
#: kernels use Sleef's ``expf_u10`` (1.0 ulp) and ``exp_u20`` (2.0 ulp); glibc documents
#: 1 ulp for ``expf`` on x86_64. 3 covers all of them.
EXP_ULPS = 3.0
#: ulps (of ``accumulate``) of ``log`` assumed for the lse: numpy documents 3.83 ulp for
#: its float32 SIMD ``log`` (at 0x3f486945; 2.96 measured here); CUDA ``logf``, glibc and
#: Sleef ``logf_u10`` are within 1 ulp. 4 covers them.
LOG_ULPS = 4.0
#: ulps of ``dtype`` of ``tanh`` assumed for the softcap, its rounding to ``dtype``
#: included: glibc's ``tanhf`` is within 2 ulp; PTX ``tanh.approx.f32`` has a largest
#: relative error of 1.1e-5 (measured over all floats by N. Juffa, NVIDIA developer
#: forum, "Hardware-accelerated tanh() on Turing"), below 2 ulps of float16 and bfloat16
#: even after their rounding, but not of float32 (not covered there).
TANH_ULPS = 2.0
#: the factor of FlashAttention's forward rule (tests/test_flash_attn.py: ``(out -
#: out_ref).abs().max() <= 2 * (out_pt - out_ref).abs().max()``; hopper/: ``rtol = 2 if
#: softcap == 0.0 else 3``)
FLASH_FACTOR = 2.0
#: the factor of FlashAttention's rule for the gradients (tests/test_flash_attn.py,
#: ``test_flash_attn_output``: ``(dq - dq_ref).abs().max().item() <= 3 * (dq_pt -
#: dq_ref).abs().max().item()``, the same for dk and dv)
FLASH_BACKWARD_FACTOR = 3.0
#: the gradients' names, in the order of :class:`~attnspec.reference.backward.SdpaGradients`
GRADIENT_NAMES = ("dq", "dk", "dv", "dbias", "dsinks")
#: where the kernel rounds its logits and shifts (:func:`forward_bound`'s ``logits=``)
LOGITS = ("dtype", "accumulate")
#: relative error of ``tanh.approx.f32`` (PTX), 1.113e-5 measured over all floats by
#: N. Juffa (NVIDIA developer forum, "Hardware-accelerated tanh() on Turing"): what a
#: kernel's softcap may err by in float32 (FlashAttention's path) besides its rounding
TANH_APPROX = 2.0**-16
#: what :func:`forward_bound` bounds the distance to: "exact" (the exact output on the
#: given inputs) or "fast" (attnspec.sdpa(precision="fast"), its textbook bound added)
AGAINST = ("fast", "exact")


def gamma_in(n: Any, fmt: Format) -> Any:
    r""":math:`\gamma_n = n u / (1 - n u)` in the format ``fmt`` (Higham 2002, Lemma 3.1);
    :math:`\infty` where :math:`n u \ge 1` (the lemma says nothing)."""
    nu = np.asarray(n, dtype=np.float64) * fmt.u
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(nu < 1, nu / (1 - nu), np.inf)


def _check_in_format(x: object, name: str, fmt: Format) -> F64:
    """``x`` as float64, refused (ValueError) where a finite value is not one of ``fmt``."""
    a = as_real_float64(x, name)
    r = round_to(a, fmt)
    with np.errstate(invalid="ignore"):
        bad = np.isfinite(a) & (r != a)
    if bad.any():
        at = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{name} holds values that {fmt.name} cannot represent, e.g. {name}[{at}] = "
            f"{a[at]!r} (nearest {fmt.name}: {r[at]!r}): the bound is for the exact output "
            f"on the kernel's own inputs; round them first with "
            f"attnspec.reference.emulate.round_to({name}, {fmt.name!r})"
        )
    return a


def _options(kw: dict[str, Any]) -> dict[str, Any]:
    from attnspec.reference.attention import SdpaOptions

    if "precision" in kw:
        raise TypeError("precision is not an option here: the reference is precision='fast'")
    opts = SdpaOptions.from_kwargs({**kw, "return_lse": False})
    out = opts.as_kwargs()
    out.pop("return_lse")
    return out


def _logit_errors(q: F64, k: F64, kw: dict[str, Any], r: Format, acc: Format) -> tuple[F64, F64]:
    r""":math:`\varepsilon_{ij}` and :math:`A_{ij}` of the module docstring with the
    roundings of step 1 in the format ``r`` (``dtype`` or ``accumulate``), shape
    ``(..., Hq, L, S)`` as far as q, k and the options broadcast (no sink column)."""
    from attnspec.spec.tolerances.attention import gamma as gamma64

    u, eta = r.u, r.eta
    two_d = q.ndim == 2 and k.ndim == 2
    if two_d:
        q, k = q[None], k[None]
    hq, hkv = q.shape[-3], k.shape[-3]
    width, n_q, n_k = q.shape[-1], q.shape[-2], k.shape[-2]
    kk = np.repeat(k, hq // hkv, axis=-3)
    scale = kw.get("scale")
    tau = 1.0 / math.sqrt(width) if scale is None else float(scale)
    g = float(gamma_in(width, acc))
    pre = (1 + u) ** 2 * (1 + g) - 1  # q and k scaled first (one rounding each), the dot
    with np.errstate(invalid="ignore", over="ignore"):
        # |q|, |k| at hidden positions may be NaN or inf: only visible entries are read
        mag = abs(tau) * (np.abs(q) @ np.swapaxes(np.abs(kk), -1, -2))
        s = tau * (q @ np.swapaxes(kk, -1, -2))  # float64, within gamma64(E + 4) mag
        size = np.abs(s) + float(gamma64(width + 4)) * mag + pre * mag
        eps = (
            pre * mag + ((1 + u) ** 3 - 1) * size + (2 * eta + width * acc.eta) * max(1.0, abs(tau))
        )
        amp = np.abs(s) + float(gamma64(width + 4)) * mag + eps
        if tau != 0:  # the dot product before the scale is rounded too: it may overflow
            amp = np.maximum(amp, (size + eps) / abs(tau))
        softcap = kw.get("softcap")
        if softcap is not None:
            c = float(softcap)
            t_rel = (1 + max(2 * u * TANH_ULPS, TANH_APPROX)) * (1 + u)
            capped = c * np.tanh(amp * (1 + u) / c)
            eps = eps + u * amp + (t_rel - 1) * capped + 2 * eta
            amp = capped * t_rel
        bias = kw.get("bias")
        if bias is not None:
            b = np.abs(np.asarray(bias, dtype=np.float64))
            eps = eps + u * b + u * (amp + b * (1 + u)) + eta
            amp = (amp + b * (1 + u)) * (1 + u)
        slopes = kw.get("alibi_slopes")
        if slopes is not None:
            offset = alignment_offset(n_q, n_k, kw.get("align"), "alibi_slopes")
            m = np.abs(np.asarray(slopes, dtype=np.float64))[..., None, None]
            t = m * np.abs(relative_position(n_q, n_k, offset)).astype(np.float64)
            grown = t * (1 + u) ** 3
            eps = eps + (grown - t) + u * (amp + grown) + 2 * eta
            amp = (amp + grown) * (1 + u)
    return eps, amp


def forward_bound(
    q: npt.ArrayLike,
    k: npt.ArrayLike,
    v: npt.ArrayLike,
    *,
    dtype: object,
    accumulate: object = None,
    logits: str = "dtype",
    rescalings: int | None = None,
    against: str = "fast",
    **options: Any,
) -> tuple[F64, F64]:
    r"""The derived bounds on the output and the lse of a kernel in ``dtype``.

    Parameters
    ----------
    q, k, v : array_like
        The kernel's inputs: values of ``dtype`` (a ValueError names one that is not;
        round with :func:`attnspec.reference.emulate.round_to`). NaN and inf are taken
        as given (at hidden positions they change nothing).
    dtype, accumulate
        As for :func:`attnspec.reference.emulate.emulated_sdpa`.
    logits : {"dtype", "accumulate"}
        Where the kernel rounds its logits and shifts: "dtype" (default: every step
        rounded to ``dtype``, the naive kernel, which covers the others) or "accumulate"
        (a fused kernel that keeps them in the accumulation dtype, FlashAttention's
        design: tighter).
    rescalings : int, optional
        At most how many times the kernel rescales its running sum and output in a row
        (an online kernel over blocks of B keys: :math:`\lceil S/B \rceil - 1`; 0 for a
        kernel that takes the row maximum first). None (default): :math:`n_i - 1`, every
        key a block of its own, which covers every order.
    against : {"fast", "exact"}
        "fast" (default): bound :math:`|\hat o - \mathrm{sdpa}_{\mathrm{fast}}|`, the
        textbook bound of the float64 reference added; "exact": the distance to the exact
        output of the definition on these inputs.
    **options
        The keyword arguments of :func:`attnspec.sdpa` (but ``precision`` and
        ``return_lse``). The bias and the sinks need not be values of ``dtype``: their
        rounding is part of the bound.

    Returns
    -------
    out_bound : ndarray of float64, the output's shape ``(..., Hq, L, Ev)``
    lse_bound : ndarray of float64, ``(..., Hq, L)`` with the batch of q, k and the
        options (the lse is the same along batch dimensions only v has)

    The derivation is in the module docstring; ``inf`` marks what a correct kernel may
    overflow (the bound then says nothing).

    Examples
    --------
    >>> import numpy as np, attnspec
    >>> from attnspec.reference.emulate import emulated_sdpa, round_to
    >>> from attnspec.spec.tolerances.precision import forward_bound
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (round_to(rng.standard_normal((2, 8, 16)), "bfloat16") for _ in range(3))
    >>> out_bound, lse_bound = forward_bound(q, k, v, dtype="bfloat16")
    >>> err = np.abs(emulated_sdpa(q, k, v, dtype="bfloat16") - attnspec.sdpa(q, k, v))
    >>> bool((err <= out_bound).all())
    True
    """
    fmt, acc = get_formats(dtype, accumulate)
    if not isinstance(against, str) or against not in AGAINST:
        raise ValueError(f"against must be one of {AGAINST!r}, got {against!r}")
    if not isinstance(logits, str) or logits not in LOGITS:
        raise ValueError(f"logits must be one of {LOGITS!r}, got {logits!r}")
    if rescalings is not None and (
        isinstance(rescalings, bool) or not isinstance(rescalings, int) or rescalings < 0
    ):
        raise ValueError(f"rescalings must be None or an int >= 0, got {rescalings!r}")
    kw = _options(options)
    q64 = _check_in_format(q, "q", fmt)
    k64 = _check_in_format(k, "k", fmt)
    v64 = _check_in_format(v, "v", fmt)
    out, lse, _ = _forward(q64, k64, v64, fmt, acc, logits, rescalings, against, kw)
    return out, lse


class _ForwardParts(NamedTuple):
    """What :func:`backward_bound` reuses of the forward's derivation, in the layout of
    :func:`~attnspec.spec.tolerances.attention.logit_data` (2-D inputs with a head axis;
    the sink column last): the logit errors :math:`\\varepsilon_{ij}`, the relative
    errors :math:`\\theta_{ij}` of the weights, the absolute error :math:`z` of weights that
    may underflow (0 elsewhere), and the output's bound against the exact output."""

    eps: F64
    theta: F64
    floor: F64
    out: F64


def _forward(
    q64: F64,
    k64: F64,
    v64: F64,
    fmt: Format,
    acc: Format,
    logits: str,
    rescalings: int | None,
    against: str,
    kw: dict[str, Any],
) -> tuple[F64, F64, _ForwardParts]:
    """The body of :func:`forward_bound` on validated inputs; also its parts."""
    import attnspec

    u, ua = fmt.u, acc.u
    r = fmt if logits == "dtype" else acc  # the format of the logits and shifts
    two_d = q64.ndim == 2 and k64.ndim == 2 and v64.ndim == 2

    weighted, reference = textbook_sdpa_bound(q64, k64, v64, **kw)
    data = logit_data(q64, k64, **kw)
    eps, amp = _logit_errors(q64, k64, kw, r, acc)
    n_k = k64.shape[-2]
    no_sink = (*data.logits.shape[:-1], n_k)
    eps = np.broadcast_to(eps, no_sink)
    amp = np.broadcast_to(amp, no_sink)
    if kw.get("sinks") is not None:
        sig = np.abs(np.broadcast_to(data.logits[..., n_k:], (*no_sink[:-1], 1)))
        eps = np.concatenate([eps, r.u * sig + r.eta / 2], axis=-1)
        amp = np.concatenate([amp, sig * (1 + r.u)], axis=-1)
    seen = data.seen
    with np.errstate(invalid="ignore", over="ignore"):
        eps = np.where(seen, eps, 0.0)
        eps = np.where(np.isnan(eps), np.inf, eps)
        eps_row = np.max(eps, axis=-1, initial=0.0)
        amp_row = np.max(np.where(seen, amp, 0.0), axis=-1, initial=0.0)
    overflow = ~(amp_row * (1 + r.u) <= r.max)

    # the perturbation b_ij of each argument of exp (logit, shift, base 2, rescalings)
    n = data.count
    top = np.where(np.isfinite(data.top), data.top, 0.0)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        gap = np.where(seen, top[..., None] - data.logits, 0.0) + eps + eps_row[..., None]
        b = eps + (r.u + 3 * ua) * gap + (ua * (np.abs(top) + eps_row) + r.eta / 2)[..., None]
        b = np.where(seen, np.where(np.isnan(b), np.inf, b), 0.0)
        p = attnspec.softmax(data.logits, where=seen, precision="fast")
        up_b, lo_b = np.exp(np.minimum(b, 700.0)), np.exp(-b)
        sum_up = np.sum(p * up_b, axis=-1)  # sum_l p_l e^{b_l}
        sum_lo = np.sum(p * lo_b, axis=-1)  # sum_l p_l e^{-b_l}

        exp_rel = 2 * ua * EXP_ULPS
        alpha = (1 + exp_rel) * (1 + u) - 1 if logits == "dtype" else exp_rel
        g_n = gamma_in(n, acc)
        steps = np.maximum(n - 1, 0.0)
        if rescalings is not None:
            steps = np.minimum(steps, float(rescalings))
        c_up = ((1 + exp_rel) * (1 + ua)) ** steps
        c_lo = ((1 - exp_rel) * (1 - ua)) ** steps
        dropout = kw.get("dropout_mask") is not None
        d_up, d_lo = ((1 + u) ** 3, (1 - u) ** 3) if dropout else (1.0, 1.0)
        k_up = (1 + alpha) * (1 + ua) * (1 + u) * c_up * d_up / ((1 - alpha) * (1 - g_n) * c_lo)
        k_lo = (1 - alpha) * (1 - ua) * (1 - u) * c_lo * d_lo / ((1 + alpha) * (1 + g_n) * c_up)
        theta = SECOND_ORDER * np.maximum(
            up_b / sum_lo[..., None] * k_up[..., None] - 1,
            1 - lo_b / sum_up[..., None] * k_lo[..., None],
        )
        # gamma_n >= 1 (n u_a >= 1/2) or alpha >= 1: the lemmas say nothing
        hopeless = (g_n >= 1) | (alpha >= 1)
        theta = np.where(np.isnan(theta) | hopeless[..., None], np.inf, theta)
        theta = np.where(seen, theta, 0.0)
        rho = np.max(theta, axis=-1, initial=0.0)  # for the weights that may underflow

    rows = (lambda a: a[0]) if two_d else (lambda a: a)
    # weights that may underflow in dtype: an absolute error z each. Naive order: the
    # weight p_ij itself is rounded; fused order: the unnormalised e^{d_j} = p_ij l_i
    # (l_i = 1 / max_j p_ij >= 1), which the division by l_i then shrinks.
    keep_p = 1 - float(kw["dropout_p"])
    with np.errstate(divide="ignore", invalid="ignore"):
        if logits == "dtype":
            lift = np.ones(rho.shape)
            z = np.full(rho.shape, 2 * fmt.eta / keep_p + acc.eta)
        else:
            lift = 1 / np.max(p, axis=-1, initial=0.0)
            lift = np.where(np.isfinite(lift), lift, 1.0)
            l_lo = np.maximum(lift * (1 - rho), 0.5)
            z = fmt.eta * (0.5 + float(dropout)) / (l_lo * keep_p) + acc.eta
    pv, tiny = _weighted_errors(
        p, theta, lift * np.maximum(1 - rho, 0.0), data, fmt, v64, kw, two_d
    )
    g_o = rows(g_n)[..., None]
    n_o = rows(n)[..., None]
    z_row = z  # (..., Hq, L), before it takes the output's shape
    z = rows(z)[..., None]
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        w_exact = weighted + reference  # an upper bound on the exact sum_j p_ij |v_jk|
        fix = np.where(weighted > 0, w_exact / weighted, 1.0)  # P in float64, not exact
        out = (
            SECOND_ORDER
            * (
                (1 + u) * ((1 + g_o) * (pv * fix + z * tiny) + g_o * w_exact + n_o * acc.eta)
                + u * w_exact
            )
            + fmt.eta / 2
        )
        big = (1 + rows(rho)[..., None]) * (1 + g_o) * w_exact
        out = np.where(np.isnan(out) | ~(big <= min(fmt.max, acc.max)), np.inf, out)
    out = np.where(rows(overflow)[..., None], np.inf, out)
    out_exact = np.asarray(out, dtype=np.float64)
    if against == "fast":
        out = out + reference

    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        pert = np.maximum(np.log(sum_up), -np.log(sum_lo))  # the arguments' perturbations
        log_k = np.maximum(
            np.log((1 + alpha) * (1 + g_n) * c_up), -np.log((1 - alpha) * (1 - g_n) * c_lo)
        )
        lam = pert + log_k + n * (r.eta + acc.eta)
        big_l = np.log(np.maximum(n, 1.0)) + lam
        log_rel = 2 * ua * LOG_ULPS
        lse = SECOND_ORDER * (
            lam + log_rel * big_l + ua * (1 + log_rel) * (np.abs(top) + eps_row + big_l)
        )
    lse = np.where(overflow | hopeless | np.isnan(lse), np.inf, lse)
    lse = np.where(n > 0, lse, 0.0)
    lse = rows(lse)
    if against == "fast":
        lse = lse + textbook_lse_bound(q64, k64, **kw)
    out = np.asarray(out, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        small = seen & (p * (lift * np.maximum(1 - rho, 0.0))[..., None] < fmt.tiny)
    floor = np.where(small, z_row[..., None], 0.0)
    parts = _ForwardParts(eps, theta, floor, out_exact)
    return out, np.asarray(lse, dtype=np.float64), parts


def _weighted_errors(
    p: F64,
    theta: F64,
    low: F64,
    data: Any,
    fmt: Format,
    v: F64,
    kw: dict[str, Any],
    two_d: bool,
) -> tuple[F64, F64]:
    r""":math:`\sum_j p_{ij}\theta_{ij}|v_{jk}|` and :math:`\sum_j |v_{jk}|` over the
    visible keys whose rounded weight may be below the normal range of ``dtype``
    (:math:`p_{ij} \lambda_i < t`, ``low`` :math:`= \lambda_i`), both of the output's
    shape (the sink has no value; the weights carry the dropout factor)."""
    n_k = v.shape[-2]
    seen = data.seen[..., :n_k]
    p = p[..., :n_k]
    keep = kw.get("dropout_mask")
    with np.errstate(invalid="ignore", over="ignore"):
        if keep is not None:
            p = p * np.asarray(keep, dtype=np.float64) / (1 - float(kw["dropout_p"]))
            seen = seen & np.asarray(keep, dtype=bool)
        small = (seen & (p * low[..., None] < fmt.tiny)).astype(np.float64)
        pt = np.where(seen, p * theta[..., :n_k], 0.0)
    vv = v[None] if two_d else v
    hq, hkv = seen.shape[-3], vv.shape[-3]
    vv = np.repeat(np.abs(vv), hq // hkv, axis=-3)
    vv = np.where(np.isfinite(vv), vv, 0.0)  # a visible non-finite value: W is inf already
    with np.errstate(invalid="ignore", over="ignore"):
        pv = pt @ vv
        tiny = small @ vv
    if two_d:
        pv, tiny = pv[0], tiny[0]
    return np.asarray(pv, dtype=np.float64), np.asarray(tiny, dtype=np.float64)


def empirical_bound(
    q: npt.ArrayLike,
    k: npt.ArrayLike,
    v: npt.ArrayLike,
    *,
    dtype: object,
    accumulate: object = None,
    factor: float = FLASH_FACTOR,
    floor: float | None = None,
    **options: Any,
) -> tuple[F64, F64]:
    r"""FlashAttention's criterion: ``factor`` times the largest error of a naive
    same-dtype evaluation, plus a floor.

    :math:`\mathrm{tol} = f \max |\tilde o - o_{\mathrm{ref}}| + \mathrm{floor}`, one
    number for the whole output (the maximum runs over every entry, as in
    FlashAttention's tests), with :math:`\tilde o` =
    :func:`attnspec.reference.emulate.emulated_sdpa` and :math:`o_{\mathrm{ref}}` =
    :func:`attnspec.sdpa` (``precision="fast"``). The default floor is FlashAttention's
    ``fwd_atol = 2 * (out_ref + 0.3 - 0.3 - out_ref).abs().max()`` (hopper/
    test_flash_attn.py) evaluated in ``dtype`` (the rounding error of arithmetic on the
    output at its own scale), plus the largest textbook bound of the float64 reference.
    The lse: the same rule with the lse of the emulation, and the floor in the
    accumulation dtype (FlashAttention states no lse rule; this one is ours).

    Where the emulation is not finite but the reference is (it overflowed), the
    criterion says nothing: ``inf``. Both tolerances are returned broadcast to the
    shapes of the output and the lse of :func:`attnspec.sdpa`, to compare elementwise.
    """
    import attnspec

    fmt, acc = get_formats(dtype, accumulate)
    if isinstance(factor, bool) or not isinstance(factor, int | float) or not factor >= 0:
        raise ValueError(f"factor must be a number >= 0, got {factor!r}")
    kw = _options(options)
    q64 = _check_in_format(q, "q", fmt)
    k64 = _check_in_format(k, "k", fmt)
    v64 = _check_in_format(v, "v", fmt)
    emu, emu_lse = emulated_sdpa(
        q64, k64, v64, dtype=fmt.name, accumulate=acc.name, return_lse=True, **kw
    )
    ref, ref_lse = attnspec.sdpa(q64, k64, v64, precision="fast", return_lse=True, **kw)
    _, tb = textbook_sdpa_bound(q64, k64, v64, **kw)
    tl = textbook_lse_bound(q64, k64, **kw)

    def rule(approx: F64, exact: F64, own: F64, rounding: Format) -> F64:
        finite = np.isfinite(exact)
        if not finite.any():
            return np.zeros(exact.shape)
        if not np.isfinite(approx[finite]).all():
            return np.full(exact.shape, np.inf)
        worst = float(np.max(np.abs(approx[finite] - exact[finite])))
        if floor is None:
            e = exact[finite]
            again = round_to(round_to(e + 0.3, rounding) - 0.3, rounding)
            base = 2 * float(np.max(np.abs(again - e))) + float(np.max(own, initial=0.0))
        else:
            base = float(floor)
        return np.full(exact.shape, factor * worst + base)

    own_l = np.broadcast_to(tl, ref_lse.shape)
    return rule(emu, ref, tb, fmt), rule(emu_lse, ref_lse, own_l, acc)


# -- the backward pass ------------------------------------------------------------------


def _rounded(x: F64, e: F64, fmt: Format) -> F64:
    r"""The error bound after rounding to ``fmt`` a computed value within ``e`` of the
    exact ``x``: :math:`e + u(|x| + e) + \eta/2` (Higham 2002, sec. 2.1)."""
    return e + fmt.u * (np.abs(x) + e) + fmt.eta / 2


def _scaled(x: F64, e: F64, rel: float) -> F64:
    r"""The error bound after multiplying a computed value within ``e`` of ``x`` by a
    factor :math:`1 + \delta`, :math:`|\delta| \le` ``rel``: :math:`e + \mathrm{rel}(|x| +
    e)`."""
    return e + rel * (np.abs(x) + e)


def _dot_error(
    ea: F64, a: F64, eb: F64, b: F64, n: int, acc: Format, rounding: Format | None = None
) -> F64:
    r"""The error bound of :math:`\hat a \hat b` (matrices, the last two axes) accumulated
    in ``acc``: :math:`|a| e_b + e_a (|b| + e_b) + \gamma^a_n (|a| + e_a)(|b| + e_b) +
    n\eta_a` (Higham 2002, eq. 3.5, each product and partial sum rounded, products that
    underflow :math:`\eta_a` each), then rounded to ``rounding`` (none: kept)."""
    ma, mb = np.abs(a) + ea, np.abs(b) + eb
    g = float(gamma_in(n, acc))
    e = np.abs(a) @ eb + ea @ mb + g * (ma @ mb) + n * acc.eta
    if rounding is None:
        return np.asarray(e, dtype=np.float64)
    return _rounded(a @ b, e, rounding)


def backward_bound(
    q: npt.ArrayLike,
    k: npt.ArrayLike,
    v: npt.ArrayLike,
    dout: npt.ArrayLike,
    *,
    dlse: npt.ArrayLike | None = None,
    dtype: object,
    accumulate: object = None,
    logits: str = "dtype",
    rescalings: int | None = None,
    **options: Any,
) -> dict[str, F64]:
    r"""Componentwise bounds on the gradients of a kernel in ``dtype`` against the exact
    gradients of the definition on the same inputs: ``{"dq", "dk", "dv"}`` and
    ``"dbias"``, ``"dsinks"`` where the forward has them, each the shape of its input.

    The kernels covered. The forward as :func:`forward_bound` covers it (``logits`` the
    same claim), recomputed or stored; then, with :math:`r` = ``dtype`` (``logits=
    "dtype"``, the naive order: every step stored in ``dtype``) or ``accumulate`` (a
    fused kernel, FlashAttention-2's backward, Dao 2023, Alg. 2: :math:`dP`, :math:`D`,
    :math:`dS` in the float32 registers):

    1. :math:`dP = \mathrm{fl}_r(dO\, V^\top)` accumulated in ``accumulate``; through
       dropout, :math:`\kappa` and :math:`1/(1 - p_{\mathrm{drop}})` in three roundings to
       ``dtype``;
    2. :math:`D_i` either from the output (:math:`\sum_e dO_{ie}\hat O_{ie}`, each product
       rounded to :math:`r`, the sum in ``accumulate``, rounded to :math:`r`:
       FlashAttention, cuDNN, the emulation) or from the weights (:math:`\sum_j \hat P_{ij}
       dP_{ij}`, the same roundings: the autograd of a materialised softmax); the bound
       takes the larger of the two;
    3. :math:`dZ = \mathrm{fl}_r(\hat P\, \mathrm{fl}_r(\mathrm{fl}_r(dP - D) + d\ell))`
       (:math:`d\ell` lifted to :math:`r`); the sink's :math:`dZ` the same with
       :math:`dP = 0`; through a softcap :math:`dS = \mathrm{fl}_r(dZ\,
       \mathrm{fl}_r(1 - \mathrm{fl}_r(\rho^2)))`, :math:`\rho = \mathrm{fl}_r(\hat t /
       \hat c)`;
    4. :math:`dS` rounded to ``dtype`` before its products (FlashAttention's ``dS`` in
       the input dtype), :math:`dQ = \tau\, dS\, K`, :math:`dK = \tau\, dS^\top Q` and
       :math:`dV = \hat{\tilde P}^\top dO` accumulated in ``accumulate`` (over the keys,
       or over every query row, in one sum or in blocks of rows whose partial sums are
       added in :math:`r`), rounded to :math:`r`, the scale :math:`\mathrm{fl}_r(\tau)`
       applied with one more rounding to :math:`r`;
    5. the sums over GQA groups and broadcast axes (:math:`n` terms) in :math:`r` or in
       ``accumulate``; every gradient finally rounded to ``dtype``.

    Not covered: a kernel that accumulates a product in a lower precision than it claims,
    that drops or mis-scales a term (what the bound is meant to catch).

    The derivation. Every quantity :math:`\hat x` is carried with a bound :math:`e_x \ge
    |\hat x - x|` (:math:`x` exact); :math:`|\hat x| \le |x| + e_x`. The rules, exact
    inequalities (Higham 2002, sec. 2.1 and eq. 3.5):

    * a rounding to format :math:`f`: :math:`e \leftarrow e + u_f(|x| + e) + \eta_f/2`;
    * a factor within :math:`1 \pm \delta`: :math:`e \leftarrow e + \delta(|x| + e)`;
    * a product: :math:`|\hat x\hat y - xy| \le |x| e_y + e_x(|y| + e_y)`;
    * a sum of :math:`n` products in ``accumulate``: the sum of the products' errors plus
      :math:`\gamma^a_n \sum |\hat x||\hat y| + n\eta_a`.

    The weights: :math:`e_{P,ij} = \theta_{ij} P_{ij} + z_{ij}` with :math:`\theta`, the
    underflow floor :math:`z` and the logit errors :math:`\varepsilon_{ij}` (which bound
    the error of :math:`\hat t`) of :func:`forward_bound`'s derivation, and the output
    within :math:`\delta O` of the exact one (its bound, ``against="exact"``). Then, in
    order: :math:`e_{dP} = \gamma^a_{E_v} B + E_v\eta_a` (:math:`B = |dO||V|^\top`) rounded,
    times :math:`\kappa r` with the factor :math:`(1 + u)^2 / ((1 - u)(1 - u\,
    p_{\mathrm{drop}}/(1 - p_{\mathrm{drop}})))`; :math:`e_D = \max(e^O_D, e^P_D)`,
    :math:`e^O_D = \sum_e |dO_{ie}|\delta O_{ie} + ((1 + u_r)(1 + \gamma^a_{E_v}) - 1)
    \sum_e |dO_{ie}|(W_{ie} + \delta O_{ie}) + E_v(\eta_a + \eta_r/2)` and :math:`e^P_D` the
    product rule over the keys, each rounded to :math:`r`; the subtraction, the addition
    of :math:`d\ell` (:math:`e_{d\ell} = u_r|d\ell| + \eta_r/2`) and the product with
    :math:`\hat P` by the rules; the softcap's factor: :math:`e_\rho = ((|t| +
    \varepsilon)/c)(1 + u_r)/(1 - u_r) - |t|/c + \eta_r/2`, :math:`e_{\rho^2} = e_\rho(2
    |\rho| + e_\rho)` rounded, :math:`1 - \rho^2` rounded; then the products of step 4,
    the scale (the factor :math:`(1 + u_r)^2`), the sums of step 5 (:math:`\gamma^r_n`,
    which covers both orders: :math:`n \le 8` additions in ``dtype`` or a product with
    ones in ``accumulate`` rounded once), the sum of the partial sums of :math:`B_r`
    blocks of rows (:math:`\gamma^r_{B_r - 1}`, :math:`B_r` as the reference blocks its
    rows) and the final rounding to ``dtype``. The magnitudes :math:`|x|` are the float64
    values of :func:`~attnspec.spec.tolerances.backward.quantities`; :math:`W = \tilde P
    |V|`. Everything is multiplied by ``SECOND_ORDER`` (1.01) for the float64 evaluation
    of the bound and of those magnitudes. Where a magnitude :math:`|x| + e_x` could pass
    the largest finite value of ``dtype`` or ``accumulate``, or the forward's bound is
    infinite, the bounds of the problem are :math:`\infty` (they say nothing).

    Parameters
    ----------
    q, k, v, dout : array_like
        The kernel's inputs, values of ``dtype`` (a ValueError names one that is not).
    dlse : array_like, optional
        The lse's gradient (any float64; its rounding to :math:`r` is part of the bound).
    dtype, accumulate, logits, rescalings
        As for :func:`forward_bound`: the claim of the forward the kernel recomputes
        (or stored); ``rescalings=0`` for a kernel that takes the row maximum first.
    **options
        The keyword arguments of :func:`attnspec.sdpa_backward` (but ``precision``).

    Examples
    --------
    >>> import numpy as np, attnspec
    >>> from attnspec.reference.emulate import emulated_sdpa_backward, round_to
    >>> from attnspec.spec.tolerances.precision import backward_bound
    >>> rng = np.random.default_rng(0)
    >>> q, k, v, do = (round_to(rng.standard_normal((2, 8, 16)), "bfloat16") for _ in range(4))
    >>> bound = backward_bound(q, k, v, do, dtype="bfloat16")
    >>> got = emulated_sdpa_backward(q, k, v, do, dtype="bfloat16")
    >>> ref = attnspec.sdpa_backward(q, k, v, do)
    >>> all(bool((np.abs(got[i] - ref[i]) <= bound[n]).all()) for i, n in enumerate(bound))
    True
    """
    fmt, acc = get_formats(dtype, accumulate)
    if not isinstance(logits, str) or logits not in LOGITS:
        raise ValueError(f"logits must be one of {LOGITS!r}, got {logits!r}")
    if rescalings is not None and (
        isinstance(rescalings, bool) or not isinstance(rescalings, int) or rescalings < 0
    ):
        raise ValueError(f"rescalings must be None or an int >= 0, got {rescalings!r}")
    kw = _options(options)
    q64 = _check_in_format(q, "q", fmt)
    k64 = _check_in_format(k, "k", fmt)
    v64 = _check_in_format(v, "v", fmt)
    do64 = _check_in_format(dout, "dout", fmt)
    dl64 = None if dlse is None else as_real_float64(dlse, "dlse")
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        out = _backward(q64, k64, v64, do64, dl64, fmt, acc, logits, rescalings, kw)
    return {name: np.where(np.isnan(b), np.inf, b) for name, b in out.items()}


def _backward(
    q: F64,
    k: F64,
    v: F64,
    dout: F64,
    dlse: F64 | None,
    fmt: Format,
    acc: Format,
    logits: str,
    rescalings: int | None,
    kw: dict[str, Any],
) -> dict[str, F64]:
    """The body of :func:`backward_bound` (validated inputs, warnings silenced)."""
    from attnspec.reference.attention import _BLOCK_ELEMENTS
    from attnspec.spec.tolerances.backward import (
        _count_to,
        _finite,
        _shaped,
        quantities,
        sum_to,
    )

    bq = quantities(q, k, v, dout, dlse, **kw)
    _, _, parts = _forward(q, k, v, fmt, acc, logits, rescalings, "exact", kw)
    r = fmt if logits == "dtype" else acc
    u = fmt.u
    n_k, n_q = bq.p.shape[-1], bq.p.shape[-2]
    width_v = bq.v.shape[-1]
    full = (*bq.p.shape[:-1], n_k + (bq.p_sink is not None))
    theta = np.broadcast_to(parts.theta, full)
    floor = np.broadcast_to(parts.floor, full)
    eps = np.broadcast_to(parts.eps, full)
    d_o = parts.out[None] if bq.two_d else parts.out
    d_o = np.broadcast_to(d_o, bq.dout.shape)
    keys = slice(0, n_k)
    p, pd = bq.p, bq.pd
    e_p = np.where(bq.seen, theta[..., keys] * p + floor[..., keys], 0.0)
    e_pd = np.where(bq.seen & (pd != 0), theta[..., keys] * pd + floor[..., keys], 0.0)
    vv, kk, qq = _finite(bq.v), _finite(bq.k), _finite(bq.q)
    vt = np.swapaxes(vv, -1, -2)
    zeros_do = np.zeros(bq.dout.shape)

    # 1. dP = dO V^T (kappa r)
    dpd = bq.dout @ vt
    e_dp = _dot_error(zeros_do, bq.dout, np.zeros(vt.shape), vt, width_v, acc, r)
    if kw.get("dropout_mask") is not None:
        drop = float(kw["dropout_p"])
        keep = np.asarray(kw["dropout_mask"], dtype=np.float64) / (1 - drop)
        rel = (1 + u) ** 2 / ((1 - u) * (1 - u * drop / (1 - drop))) - 1
        e_dp = keep * _scaled(dpd, e_dp, rel) + 2 * fmt.eta
    e_dp = np.where(bq.seen, e_dp, 0.0)
    dp = bq.dp

    # 2. D from the output or from the weights: the larger bound
    w = pd @ np.abs(vv)
    ones = np.ones((width_v, 1))
    g_v = float(gamma_in(width_v, acc))
    e_d_out = (
        (np.abs(bq.dout) * d_o) @ ones
        + ((1 + r.u) * (1 + g_v) - 1) * ((np.abs(bq.dout) * (w + d_o)) @ ones)
        + width_v * (acc.eta + r.eta / 2)
    )
    g_k = float(gamma_in(max(n_k, 1), acc))
    m_p, m_dp = p + e_p, np.abs(dp) + e_dp
    e_d_p = (
        np.sum(p * e_dp + e_p * m_dp, axis=-1, keepdims=True)
        + ((1 + r.u) * (1 + g_k) - 1) * np.sum(m_p * m_dp, axis=-1, keepdims=True)
        + n_k * (acc.eta + r.eta / 2)
    )
    big_d = bq.big_d
    e_d = _rounded(big_d, np.maximum(e_d_out, e_d_p), r)

    # 3. dZ = P (dP - D + dlse); the sink's with dP = 0
    def shifted(x_dp: F64, e_x: F64) -> tuple[F64, F64]:
        y = x_dp - big_d
        e_y = _rounded(y, e_x + e_d, r)
        if dlse is not None:
            e_l = r.u * np.abs(bq.dlse) + r.eta / 2
            y = y + bq.dlse
            e_y = _rounded(y, e_y + e_l, r)
        return y, e_y

    y, e_y = shifted(dp, e_dp)
    dz = p * y
    e_dz = np.where(bq.seen, _rounded(dz, p * e_y + e_p * (np.abs(y) + e_y), r), 0.0)
    if bq.p_sink is not None:
        y_s, e_ys = shifted(np.zeros(big_d.shape), np.zeros(big_d.shape))
        e_ps = theta[..., n_k:] * bq.p_sink + floor[..., n_k:]
        dz_s = bq.p_sink * y_s
        e_dzs = _rounded(dz_s, bq.p_sink * e_ys + e_ps * (np.abs(y_s) + e_ys), r)
    ds, e_ds = dz, e_dz
    if bq.capped is not None:
        c = float(kw["softcap"])
        t = bq.capped
        rho = t / c
        e_rho = (np.abs(t) + eps[..., keys]) / c * (1 + r.u) / (1 - r.u) - np.abs(rho) + r.eta / 2
        e_sq = _rounded(rho * rho, e_rho * (2 * np.abs(rho) + e_rho), r)
        factor = 1 - rho * rho
        e_f = _rounded(factor, e_sq, r)
        ds = dz * factor
        e_ds = _rounded(ds, np.abs(factor) * e_dz + (np.abs(dz) + e_dz) * e_f, r)
        ds = np.where(bq.seen, ds, 0.0)
        e_ds = np.where(bq.seen, e_ds, 0.0)
    if r is not fmt:  # dS in dtype before its products
        e_ds = _rounded(ds, e_ds, fmt)

    # 4. the products, the scale
    tau = abs(bq.tau)
    zk, zq, zdo = np.zeros(kk.shape), np.zeros(qq.shape), np.zeros(bq.dout.shape)
    ds_t, e_ds_t = np.swapaxes(ds, -1, -2), np.swapaxes(e_ds, -1, -2)
    scale_rel = (1 + r.u) ** 2 - 1
    pd_t, e_pd_t = np.swapaxes(pd, -1, -2), np.swapaxes(e_pd, -1, -2)
    rows_per_block = max(1, _BLOCK_ELEMENTS // max(1, math.prod(bq.p.shape[:-2]) * n_k))
    blocks = math.ceil(n_q / rows_per_block) if n_q else 0
    across = float(gamma_in(max(blocks - 1, 0), r))

    def scaled_product(x: F64, e: F64) -> tuple[F64, F64]:  # tau fl_r(tau)-scaled, rounded
        return tau * x, tau * _scaled(x, e, scale_rel) + r.eta / 2

    grads: dict[str, tuple[F64, F64, int, float]] = {
        "dq": (*scaled_product(ds @ kk, _dot_error(e_ds, ds, zk, kk, n_k, acc, r)), 1, 0.0),
        "dk": (
            *scaled_product(ds_t @ qq, _dot_error(e_ds_t, ds_t, zq, qq, n_q, acc, r)),
            1,
            across,
        ),
        "dv": (pd_t @ bq.dout, _dot_error(e_pd_t, pd_t, zdo, bq.dout, n_q, acc, r), 1, across),
    }
    if "dbias" in bq.shapes:
        bias_rows = len(bq.shapes["dbias"]) >= 2 and bq.shapes["dbias"][-2] == n_q > 1
        grads["dbias"] = (dz, e_dz, 1, 0.0 if bias_rows else across)
    if bq.p_sink is not None:  # summed over the query rows first
        grads["dsinks"] = (dz_s[..., 0].sum(-1), e_dzs[..., 0].sum(-1), n_q, across)

    # 5. the sums over GQA groups and broadcast axes, the final rounding
    out = {}
    for name, (x, e, inner, a) in grads.items():
        shape = bq.shapes[name]
        n = inner * _count_to(x.shape, shape)
        mag = np.abs(x) if inner == 1 else np.abs(dz_s[..., 0]).sum(-1)
        if name in ("dk", "dv"):  # the GQA groups first
            hkv, hq = shape[-3], x.shape[-3]
            grouped = (*x.shape[:-3], hkv, hq // hkv, *x.shape[-2:])
            x, e, mag = (y.reshape(grouped).sum(axis=-3) for y in (x, e, mag))
        x_sum, e_sum, m_sum = (
            sum_to(x, shape),
            sum_to(e, shape),
            sum_to(mag, shape) + sum_to(e, shape),
        )
        g_sum = float(gamma_in(n, r)) if n > 1 else 0.0
        e_sum = e_sum + ((1 + g_sum) * (1 + a) - 1) * m_sum
        bound = SECOND_ORDER * _rounded(x_sum, e_sum, fmt)
        out[name] = np.where(~(m_sum <= min(fmt.max, acc.max)), np.inf, bound)
    hopeless = not all(bool(np.all(np.isfinite(x))) for x in (e_d, e_dz, e_ds)) or not bool(
        np.all(np.abs(dp) + e_dp <= min(r.max, acc.max))
    )
    if hopeless:  # an intermediate may overflow in a correct kernel: the bound says nothing
        out = {name: np.full(b.shape, np.inf) for name, b in out.items()}
    return _shaped(bq, out)


def empirical_backward_bound(
    q: npt.ArrayLike,
    k: npt.ArrayLike,
    v: npt.ArrayLike,
    dout: npt.ArrayLike,
    *,
    dlse: npt.ArrayLike | None = None,
    dtype: object,
    accumulate: object = None,
    factor: float = FLASH_BACKWARD_FACTOR,
    floor: float | None = None,
    **options: Any,
) -> dict[str, F64]:
    r"""FlashAttention's criterion for the gradients: ``factor`` (3) times the largest
    error of a naive same-dtype backward, plus a floor, one number per gradient.

    :math:`\mathrm{tol}_g = f \max |\tilde g - g_{\mathrm{ref}}| + \mathrm{floor}_g` with
    :math:`\tilde g` from :func:`attnspec.reference.emulate.emulated_sdpa_backward` and
    :math:`g_{\mathrm{ref}}` from :func:`attnspec.sdpa_backward` (``precision="fast"``);
    the factor is FlashAttention's (``FLASH_BACKWARD_FACTOR``, tests/test_flash_attn.py,
    ``test_flash_attn_output``: ``(dq - dq_ref).abs().max() <= 3 * (dq_pt -
    dq_ref).abs().max()``). The default floor is that of :func:`empirical_bound`: twice
    the rounding error of :math:`g_{\mathrm{ref}} + 0.3 - 0.3` in ``dtype`` (hopper/
    test_flash_attn.py's ``dq_atol``), plus the largest
    :func:`~attnspec.spec.tolerances.backward.fast_backward_bound` of the reference. Where
    the emulation is not finite but the reference is, ``inf``. Each tolerance is returned
    broadcast to its gradient's shape; keys as :func:`backward_bound`'s.
    """
    import attnspec
    from attnspec.spec.tolerances.backward import fast_backward_bound

    fmt, acc = get_formats(dtype, accumulate)
    if isinstance(factor, bool) or not isinstance(factor, int | float) or not factor >= 0:
        raise ValueError(f"factor must be a number >= 0, got {factor!r}")
    kw = _options(options)
    q64 = _check_in_format(q, "q", fmt)
    k64 = _check_in_format(k, "k", fmt)
    v64 = _check_in_format(v, "v", fmt)
    do64 = _check_in_format(dout, "dout", fmt)
    emu = emulated_sdpa_backward(
        q64, k64, v64, do64, dlse=dlse, dtype=fmt.name, accumulate=acc.name, **kw
    )
    ref = attnspec.sdpa_backward(q64, k64, v64, do64, dlse=dlse, precision="fast", **kw)
    own = fast_backward_bound(q64, k64, v64, do64, dlse, **kw)
    out: dict[str, F64] = {}
    for name, approx, exact in zip(GRADIENT_NAMES, emu, ref, strict=True):
        if exact is None:
            continue
        exact = np.asarray(exact, dtype=np.float64)
        finite = np.isfinite(exact)
        if not finite.any():
            out[name] = np.zeros(exact.shape)
            continue
        if not np.isfinite(approx[finite]).all():
            out[name] = np.full(exact.shape, np.inf)
            continue
        worst = float(np.max(np.abs(approx[finite] - exact[finite])))
        if floor is None:
            e = exact[finite]
            again = round_to(round_to(e + 0.3, fmt) - 0.3, fmt)
            base = 2 * float(np.max(np.abs(again - e))) + float(np.max(own[name], initial=0.0))
        else:
            base = float(floor)
        out[name] = np.full(exact.shape, factor * worst + base)
    return out
