r"""The peers' conventions for softmax and attention, as named presets of plain data.

PyTorch, JAX, FlashAttention, xFormers and SciPy agree on
:math:`\operatorname{softmax}(\tau QK^\top)V` and disagree at the edges: where the causal
diagonal sits when :math:`L \ne S`, what a row with no visible key returns, whether a NaN
behind a mask reaches the output, how a sliding window is counted, which precision the
softmax runs in. This module writes each peer's choices down once, feature by feature, next
to the canonical definition of :mod:`attnspec.reference` (preset ``attnspec``), so that

* ``docs/conventions.md`` shows them side by side (its table is :func:`markdown_table`,
  and a test fails when the two drift apart), and
* a conformance check can test a peer against what that peer promises rather than against
  what attnspec would do.

Every :class:`Fact` carries its provenance:

``status="source"``
    read in the peer's own source or docstring, named as ``owner/repo path (function)``;
``status="measured"``
    observed by running the peer; the source names the library version and the test in
    ``tests/test_conventions.py`` that re-measures it whenever the library is importable;
``status="definition"``
    attnspec's own choice, named by the module that implements it;
``status="unverified"``
    a claim we could not check (no GPU, no source found); the note says what is missing;
``status="n/a"``
    the peer has no such feature; the source says where its API is defined.

Shape letters as in the reference: ``L`` queries, ``S`` keys, ``E`` query/key head dimension,
``Ev`` value head dimension, ``Hq = G * Hkv`` heads, query head ``h``; the alignment offset
``o`` is 0 (top-left) or ``S - L`` (bottom-right).

Examples
--------
>>> from attnspec.spec.conventions import PRESETS
>>> PRESETS["torch"].causal_alignment.value
'top-left'
>>> PRESETS["flash"].causal_alignment.value
'bottom-right'
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "FACT_ROWS",
    "HEADER_FIELDS",
    "PRESETS",
    "REPOSITORIES",
    "STATUSES",
    "Convention",
    "Fact",
    "get",
    "markdown_table",
    "measured_tests",
    "source_problems",
]

#: The provenance kinds a fact may have (see the module docstring).
STATUSES = ("source", "measured", "definition", "unverified", "n/a")

#: The repositories whose files a ``status="source"`` fact may cite.
REPOSITORIES = (
    "pytorch/pytorch",
    "jax-ml/jax",
    "Dao-AILab/flash-attention",
    "facebookresearch/xformers",
    "scipy/scipy",
)

# The library versions the measured facts were taken with (CPU builds).
MEASURED_TORCH = "measured: torch 2.13.0 CPU"
MEASURED_JAX = "measured: jax 0.10.2 CPU"
MEASURED_SCIPY = "measured: scipy 1.17.1"
_T = "tests/test_conventions.py"


@dataclass(frozen=True)
class Fact:
    """One convention of one peer.

    Attributes
    ----------
    value : str
        Short, table-ready statement (a few words); the detail goes in ``note``.
    sources : tuple of str
        Where it comes from: ``"owner/repo path (function)"``, ``"issue owner/repo#N"`` (or
        ``"pr owner/repo#N"``),
        ``"measured: <library> <version> CPU (tests/test_conventions.py::test_name)"`` or
        ``"attnspec: <path>"``.
    status : str
        One of :data:`STATUSES`.
    note : str
        Details, caveats, and for an unverified fact what would settle it.
    """

    value: str
    sources: tuple[str, ...]
    status: str = "source"
    note: str = ""


def _na(sources: str, note: str = "") -> Fact:
    return Fact("n/a", (sources,), "n/a", note)


@dataclass(frozen=True)
class Convention:
    """A peer's conventions, feature by feature (one :class:`Fact` per feature)."""

    name: str
    title: str
    api: str
    checked: str
    default_scale: Fact
    mask_semantics: Fact
    mask_dtypes: Fact
    mask_fill: Fact
    bias: Fact
    causal_alignment: Fact
    window: Fact
    fully_masked_output: Fact
    fully_masked_lse: Fact
    hidden_nan: Fact
    gqa: Fact
    value_head_dim: Fact
    softcap: Fact
    alibi: Fact
    sinks: Fact
    dropout: Fact
    lse: Fact
    input_dtypes: Fact
    accumulation: Fact
    empty_sequence: Fact
    softmax_default_axis: Fact
    softmax_posinf: Fact
    softmax_nan: Fact
    softmax_all_neginf: Fact
    softmax_empty_axis: Fact

    def facts(self) -> dict[str, Fact]:
        """The facts in table order, keyed by field name."""
        return {name: getattr(self, name) for name, _ in FACT_ROWS}


#: (field name, row label) in the order of the docs table.
FACT_ROWS: tuple[tuple[str, str], ...] = (
    ("default_scale", "default scale"),
    ("mask_semantics", "mask"),
    ("mask_dtypes", "mask dtypes"),
    ("mask_fill", "how a hidden key is removed"),
    ("bias", "additive bias"),
    ("causal_alignment", "causal when L != S"),
    ("window", "sliding window (left, right)"),
    ("fully_masked_output", "row with no visible key: output"),
    ("fully_masked_lse", "row with no visible key: lse"),
    ("hidden_nan", "NaN in a hidden key (K) / value (V)"),
    ("gqa", "GQA: kv head read by query head h"),
    ("value_head_dim", "Ev != E"),
    ("softcap", "softcap"),
    ("alibi", "ALiBi"),
    ("sinks", "sinks"),
    ("dropout", "dropout"),
    ("lse", "lse output"),
    ("input_dtypes", "input dtypes"),
    ("accumulation", "precision of logits and softmax"),
    ("empty_sequence", "L = 0 / S = 0"),
    ("softmax_default_axis", "softmax: default axis"),
    ("softmax_posinf", "softmax: +inf entries"),
    ("softmax_nan", "softmax: NaN entry"),
    ("softmax_all_neginf", "softmax: all -inf (or all excluded)"),
    ("softmax_empty_axis", "softmax: empty axis"),
)

#: The fields of :class:`Convention` that are not facts.
HEADER_FIELDS = ("name", "title", "api", "checked")


# ---------------------------------------------------------------------------------------------
# attnspec: the canonical definition (DESIGN.md, "The definition")
# ---------------------------------------------------------------------------------------------

_VIS = "attnspec: reference/visibility.py"
_ATT = "attnspec: reference/attention.py"
_SMX = "attnspec: reference/softmax.py"
_INP = "attnspec: reference/inputs.py"

ATTNSPEC = Convention(
    name="attnspec",
    title="attnspec (canonical)",
    api="attnspec.sdpa, attnspec.softmax / log_softmax / logsumexp",
    checked="this repository",
    default_scale=Fact("1/sqrt(E)", (_ATT,), "definition"),
    mask_semantics=Fact("bool, True = may attend", (_VIS,), "definition"),
    mask_dtypes=Fact("bool only", (_ATT,), "definition"),
    mask_fill=Fact(
        "weight exactly 0",
        (_ATT,),
        "definition",
        "Hidden keys are removed from the sum, not filled with a number.",
    ),
    bias=Fact(
        "separate `bias`, added",
        (_ATT,),
        "definition",
        "Added after softcap; a bias of -inf hides the key.",
    ),
    causal_alignment=Fact(
        "explicit align= required",
        (_VIS,),
        "definition",
        "align='top_left' (o = 0) or 'bottom_right' (o = S - L); causal, a "
        "window or ALiBi with L != S and no align= is a ValueError.",
    ),
    window=Fact(
        "i+o-left <= j <= i+o+right",
        (_VIS,),
        "definition",
        "None for a side means unbounded; o as for causal.",
    ),
    fully_masked_output=Fact("0", (_ATT,), "definition"),
    fully_masked_lse=Fact("-inf", (_ATT,), "definition"),
    hidden_nan=Fact(
        "K blocked, V blocked",
        (_ATT,),
        "definition",
        "p_ij is exactly 0 at a hidden key and whatever sits there never enters "
        "the output (DESIGN.md, step 6).",
    ),
    gqa=Fact("h // G", (_ATT,), "definition", "G = Hq / Hkv."),
    value_head_dim=Fact("allowed", (_ATT,), "definition"),
    softcap=Fact("c*tanh(s/c), before bias", (_ATT,), "definition"),
    alibi=Fact("-slope_h*abs(i+o-j)", (_ATT,), "definition"),
    sinks=Fact(
        "logit in normaliser and lse, no value",
        (_ATT,),
        "definition",
        "The sink logit is used as given (not multiplied by the scale).",
    ),
    dropout=Fact("explicit keep-mask, /(1-p)", (_ATT,), "definition"),
    lse=Fact("return_lse=True, (..., Hq, L), natural log", (_ATT,), "definition"),
    input_dtypes=Fact("real float or int; bool, complex refused", (_INP,), "definition"),
    accumulation=Fact("float64; 'accurate' or mpmath", (_ATT,), "definition"),
    empty_sequence=Fact(
        "L=0: empty; S=0: 0, lse -inf",
        (_ATT,),
        "definition",
        "S = 0 is the fully hidden row (DESIGN.md, step 8).",
    ),
    softmax_default_axis=Fact("-1", (_SMX,), "definition"),
    softmax_posinf=Fact(
        "1/k on the k +inf entries",
        (_SMX,),
        "definition",
        "The limit t -> inf of softmax(x + t*1_I); logsumexp +inf, log_softmax -log k.",
    ),
    softmax_nan=Fact("NaN slice", (_SMX,), "definition"),
    softmax_all_neginf=Fact("0; log_softmax -inf; lse -inf", (_SMX,), "definition"),
    softmax_empty_axis=Fact("empty; lse -inf", (_SMX,), "definition"),
)


# ---------------------------------------------------------------------------------------------
# PyTorch: torch.nn.functional.scaled_dot_product_attention and torch.softmax / logsumexp
# ---------------------------------------------------------------------------------------------

_TA = "pytorch/pytorch aten/src/ATen/native/transformers/attention.cpp"

TORCH_PRESET = Convention(
    name="torch",
    title="PyTorch SDPA",
    api="torch.nn.functional.scaled_dot_product_attention; torch.softmax, torch.logsumexp",
    checked="torch 2.13.0 CPU (math and CPU flash backends); attention.cpp as indexed",
    default_scale=Fact(
        "1/sqrt(E)",
        (f"{MEASURED_TORCH} ({_T}::test_torch_default_scale)", f"{_TA} (sdp::calculate_scale)"),
        "measured",
        "The math backend multiplies q and k each by sqrt(scale) before the product.",
    ),
    mask_semantics=Fact(
        "bool True = attend; float added",
        (f"{_TA} (convert_boolean_attn_mask)",),
        note="A bool mask becomes an additive 0 / -inf tensor; a float mask is added as is.",
    ),
    mask_dtypes=Fact(
        "bool, float32 or q's dtype",
        (f"{MEASURED_TORCH} ({_T}::test_torch_mask_dtypes)", f"{_TA} (validate_sdpa_input)"),
        "measured",
        "An int64 mask is a RuntimeError; a float32 mask is accepted with float64 q.",
    ),
    mask_fill=Fact(
        "-inf added; cuDNN: -65504 added",
        (f"{_TA} (convert_boolean_attn_mask, convert_boolean_attn_mask_cudnn)",),
        note="The cuDNN backend (CUDA only, not measured here) adds a finite -65504 for a "
        "False entry: a fully hidden row then gets weights softmax(s - 65504), close to the "
        "unmasked row in float32 and near uniform in half precision, not 0.",
    ),
    bias=Fact("float attn_mask, added", (f"{_TA} (_scaled_dot_product_attention_math)",)),
    causal_alignment=Fact(
        "top-left",
        (
            f"{MEASURED_TORCH} ({_T}::test_torch_causal_alignment)",
            f"{_TA} (_scaled_dot_product_attention_math: ones(L, S).tril())",
        ),
        "measured",
        "Bottom-right via torch.nn.attention.bias.causal_lower_right(L, S) (measured). "
        "The CUDA flash backend refuses non-square causal (pytorch/pytorch#111007).",
    ),
    window=Fact(
        "none (explicit mask)",
        (f"{MEASURED_TORCH} ({_T}::test_torch_signature)",),
        "measured",
        "scaled_dot_product_attention has no window argument; flex_attention can express one.",
    ),
    fully_masked_output=Fact(
        "0 (-inf mask); mean of V (finite fill)",
        (
            f"{MEASURED_TORCH} ({_T}::test_torch_fully_masked_row)",
            f"{_TA} (_safe_softmax)",
            "pr pytorch/pytorch#133882",
        ),
        "measured",
        "_safe_softmax zeroes rows that are all -inf. A finite fill such as finfo.min gives "
        "equal logits, hence the mean of V. nn.MultiheadAttention(need_weights=True) still "
        "returns NaN for such a row (issue pytorch/pytorch#160064, measured).",
    ),
    fully_masked_lse=Fact(
        "not public; CPU flash op: 0.0",
        (f"{MEASURED_TORCH} ({_T}::test_torch_fully_masked_lse)",),
        "measured",
        "torch.ops.aten._scaled_dot_product_flash_attention_for_cpu returns lse 0.0 (not "
        "-inf) for a fully -inf row; flex_attention(return_lse=True) returns -inf.",
    ),
    hidden_nan=Fact(
        "K leaks, V leaks",
        (f"{MEASURED_TORCH} ({_T}::test_torch_hidden_nan)", "issue pytorch/pytorch#101967"),
        "measured",
        "NaN in a masked-out key or value makes the query row NaN (math and CPU flash "
        "backends). With is_causal, a NaN future key leaks in the math backend only.",
    ),
    gqa=Fact(
        "h // G (enable_gqa=True)",
        (
            f"{MEASURED_TORCH} ({_T}::test_torch_gqa)",
            f"{_TA} (pre_process_group_query_attention_input)",
        ),
        "measured",
        "repeat_interleave on dim -3; Hq != Hkv without enable_gqa is a RuntimeError.",
    ),
    value_head_dim=Fact(
        "allowed",
        (f"{MEASURED_TORCH} ({_T}::test_torch_value_head_dim)",),
        "measured",
        "The CPU flash kernel requires equal head sizes; dispatch then falls back to math.",
    ),
    softcap=Fact("no", (f"{MEASURED_TORCH} ({_T}::test_torch_signature)",), "measured"),
    alibi=Fact(
        "only as a float mask", (f"{MEASURED_TORCH} ({_T}::test_torch_signature)",), "measured"
    ),
    sinks=Fact("no", (f"{MEASURED_TORCH} ({_T}::test_torch_signature)",), "measured"),
    dropout=Fact(
        "dropout_p on P, /(1-p)",
        (f"{_TA} (_scaled_dot_product_attention_math)",),
        note="The private math op takes an explicit dropout_mask for testing (it warns).",
    ),
    lse=Fact(
        "not public; private ops (B, H, L)",
        (f"{MEASURED_TORCH} ({_T}::test_torch_fully_masked_lse)",),
        "measured",
        "The private CPU flash op returns lse in natural-log units of the scaled logits, in "
        "the accumulation dtype; flex_attention(return_lse=True) is the public route.",
    ),
    input_dtypes=Fact(
        "q, k, v same dtype",
        (f"{MEASURED_TORCH} ({_T}::test_torch_mixed_dtypes)", f"{_TA} (validate_sdpa_input)"),
        "measured",
    ),
    accumulation=Fact(
        "math: f16/bf16 upcast to f32",
        (f"{_TA} (_scaled_dot_product_attention_math)",),
        note="Unless torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True); the CPU "
        "flash kernel accumulates in toOpMathType (f32 for half types).",
    ),
    empty_sequence=Fact(
        "L=0: empty; S=0: zeros",
        (f"{MEASURED_TORCH} ({_T}::test_torch_empty_sequences)",),
        "measured",
    ),
    softmax_default_axis=Fact(
        "dim required",
        (f"{MEASURED_TORCH} ({_T}::test_torch_softmax_special_values)",),
        "measured",
        "torch.softmax(x) is a TypeError; F.softmax(x) picks a dim with a deprecation warning.",
    ),
    softmax_posinf=Fact(
        "NaN; logsumexp +inf",
        (f"{MEASURED_TORCH} ({_T}::test_torch_softmax_special_values)",),
        "measured",
    ),
    softmax_nan=Fact(
        "NaN slice", (f"{MEASURED_TORCH} ({_T}::test_torch_softmax_special_values)",), "measured"
    ),
    softmax_all_neginf=Fact(
        "NaN; log_softmax NaN; lse -inf",
        (f"{MEASURED_TORCH} ({_T}::test_torch_softmax_special_values)",),
        "measured",
        "Only SDPA's internal _safe_softmax returns 0 here.",
    ),
    softmax_empty_axis=Fact(
        "empty; lse -inf",
        (f"{MEASURED_TORCH} ({_T}::test_torch_softmax_special_values)",),
        "measured",
    ),
)


# ---------------------------------------------------------------------------------------------
# JAX: jax.nn.dot_product_attention (implementation=None, i.e. "xla"), jax.nn.softmax
# ---------------------------------------------------------------------------------------------

_JF = "jax-ml/jax jax/_src/nn/functions.py"

JAX_PRESET = Convention(
    name="jax",
    title="JAX dot_product_attention",
    api="jax.nn.dot_product_attention (xla); jax.nn.softmax, jax.nn.logsumexp",
    checked="jax 0.10.2 CPU; functions.py as installed with it",
    default_scale=Fact(
        "1/sqrt(E)",
        (f"{MEASURED_JAX} ({_T}::test_jax_default_scale)", f"{_JF} (dot_product_attention)"),
        "measured",
        "JAX calls the head dimension H.",
    ),
    mask_semantics=Fact(
        "bool True = attend; separate bias",
        (f"{_JF} (dot_product_attention, _apply_masks)",),
    ),
    mask_dtypes=Fact(
        "bool only",
        (f"{MEASURED_JAX} ({_T}::test_jax_mask_dtypes)", f"{_JF} (_check_shape_and_dtype)"),
        "measured",
        "A float mask is a ValueError ('mask dtype should be bool').",
    ),
    mask_fill=Fact(
        "replaced by -0.7*f32 max",
        (f"{_JF} (_apply_masks, _get_large_negative)",),
        note="jnp.where(mask, logits, -0.7 * min(finfo(dtype).max, finfo(float32).max)): a "
        "finite fill that replaces the logit, after the bias was added.",
    ),
    bias=Fact("separate `bias`, added before masking", (f"{_JF} (_dot_product_attention_core)",)),
    causal_alignment=Fact(
        "top-left",
        (f"{MEASURED_JAX} ({_T}::test_jax_causal_alignment)", f"{_JF} (_get_causal_mask)"),
        "measured",
    ),
    window=Fact(
        "i-left <= j <= i+right (top-left)",
        (f"{MEASURED_JAX} ({_T}::test_jax_window)", f"{_JF} (_get_window_mask)"),
        "measured",
        "local_window_size=(left, right), an int means symmetric. Applied without a mask "
        "since jax-ml/jax#32357 (fixing #32300). implementation='cudnn' takes no right window "
        "unless causal.",
    ),
    fully_masked_output=Fact(
        "mean of V",
        (f"{MEASURED_JAX} ({_T}::test_jax_fully_masked_row)",),
        "measured",
        "All logits equal the finite fill, so the weights are uniform. Rows past "
        "query_seq_lengths are zeroed (_get_padding_mask_encoded).",
    ),
    fully_masked_lse=Fact(
        "finite: -0.7*f32 max + log S",
        (
            f"{MEASURED_JAX} ({_T}::test_jax_fully_masked_row)",
            f"{_JF} (_dot_product_attention_core)",
        ),
        "measured",
        "return_residual=True; about -2.38e38.",
    ),
    hidden_nan=Fact(
        "K blocked, V leaks",
        (f"{MEASURED_JAX} ({_T}::test_jax_hidden_nan)",),
        "measured",
        "jnp.where replaces a NaN logit; a NaN value row still meets a zero weight in the "
        "product (0 * NaN = NaN).",
    ),
    gqa=Fact(
        "h // G",
        (f"{MEASURED_JAX} ({_T}::test_jax_gqa)", f"{_JF} (_dot_product_attention_xla)"),
        "measured",
        "Query heads reshaped to (Hkv, G).",
    ),
    value_head_dim=Fact(
        "refused (Ev must equal E)",
        (f"{MEASURED_JAX} ({_T}::test_jax_value_head_dim)", f"{_JF} (dot_product_attention)"),
        "measured",
        "value must have the key's shape: ValueError 'value shape should be ...'.",
    ),
    softcap=Fact("no", (f"{MEASURED_JAX} ({_T}::test_jax_signature)",), "measured"),
    alibi=Fact("only as bias", (f"{MEASURED_JAX} ({_T}::test_jax_signature)",), "measured"),
    sinks=Fact("no", (f"{MEASURED_JAX} ({_T}::test_jax_signature)",), "measured"),
    dropout=Fact("no", (f"{MEASURED_JAX} ({_T}::test_jax_signature)",), "measured"),
    lse=Fact(
        "return_residual=True, (B, L, Hq)",
        (
            f"{MEASURED_JAX} ({_T}::test_jax_fully_masked_row)",
            f"{_JF} (_dot_product_attention_core)",
        ),
        "measured",
        "Natural log, computed in float32 and cast to the key dtype.",
    ),
    input_dtypes=Fact(
        "q, k, v same dtype",
        (f"{MEASURED_JAX} ({_T}::test_jax_mixed_dtypes)", f"{_JF} (_check_shape_and_dtype)"),
        "measured",
    ),
    accumulation=Fact(
        "softmax in float32, even for float64",
        (
            f"{MEASURED_JAX} ({_T}::test_jax_float64_softmax_in_float32)",
            f"{_JF} (_dot_product_attention_core)",
        ),
        "measured",
        "Logits in promote_types(q dtype, float32); 'Softmax ... is always carried out in "
        "fp32': float64 inputs come back with errors near 1e-7.",
    ),
    empty_sequence=Fact(
        "L=0: empty; S=0: zeros",
        (f"{MEASURED_JAX} ({_T}::test_jax_empty_sequences)",),
        "measured",
    ),
    softmax_default_axis=Fact(
        "-1 (logsumexp: None)",
        (f"{MEASURED_JAX} ({_T}::test_jax_signature)",),
        "measured",
        "jax.nn.logsumexp is jax.scipy.special.logsumexp, whose axis defaults to None.",
    ),
    softmax_posinf=Fact(
        "NaN; logsumexp +inf",
        (f"{MEASURED_JAX} ({_T}::test_jax_softmax_special_values)",),
        "measured",
    ),
    softmax_nan=Fact(
        "NaN slice", (f"{MEASURED_JAX} ({_T}::test_jax_softmax_special_values)",), "measured"
    ),
    softmax_all_neginf=Fact(
        "NaN; where= all False: 0",
        (f"{MEASURED_JAX} ({_T}::test_jax_softmax_special_values)",),
        "measured",
        "All -inf: softmax and log_softmax NaN, logsumexp -inf. With where= all False: "
        "softmax 0, log_softmax -inf, logsumexp -inf.",
    ),
    softmax_empty_axis=Fact(
        "empty; lse -inf",
        (f"{MEASURED_JAX} ({_T}::test_jax_softmax_special_values)",),
        "measured",
    ),
)


# ---------------------------------------------------------------------------------------------
# FlashAttention 2/3/4: flash_attn_func and the tests' attention_ref (CUDA only: from source)
# ---------------------------------------------------------------------------------------------

_FI = "Dao-AILab/flash-attention flash_attn/flash_attn_interface.py (flash_attn_func)"
_FR3 = "Dao-AILab/flash-attention hopper/test_util.py (attention_ref)"
_FR4 = "Dao-AILab/flash-attention flash_attn/cute/testing.py (attention_ref)"
_FS2 = "Dao-AILab/flash-attention csrc/flash_attn/src/softmax.h (normalize_softmax_lse)"
_FS3 = "Dao-AILab/flash-attention hopper/softmax.h (Softmax::finalize)"
_FS4 = "Dao-AILab/flash-attention flash_attn/cute/softmax.py (Softmax.finalize)"

FLASH_PRESET = Convention(
    name="flash",
    title="FlashAttention",
    api="flash_attn_func (FA2), hopper flash_attn_interface (FA3), flash_attn.cute (FA4)",
    checked="source only (CUDA); files as indexed, 2025-2026",
    default_scale=Fact(
        "1/sqrt(E)",
        (_FI, _FR3),
        note="With qv (FA3/FA4) the references use 1/sqrt(E + Ev).",
    ),
    mask_semantics=Fact(
        "no dense mask: causal, window, varlen",
        (_FI,),
        note="Padding via cu_seqlens (varlen); FA4 (cute) adds mask_mod / score_mod callables.",
    ),
    mask_dtypes=_na(_FI, "flash_attn_func takes no mask tensor."),
    mask_fill=Fact(
        "-inf",
        ("Dao-AILab/flash-attention csrc/flash_attn/src/softmax.h (apply_mask_causal)", _FR3),
    ),
    bias=Fact(
        "none; ref: added after the -inf fill",
        (_FI, _FR3),
        note="attention_ref adds attn_bias after the -inf fill.",
    ),
    causal_alignment=Fact(
        "bottom-right",
        (_FI, _FR3),
        note="Docstring: 'the causal mask is aligned to the bottom right corner'. Changed "
        "from top-left by flash-attention commit 9e5e8bc91e, cited in pytorch/pytorch#111007.",
    ),
    window=Fact(
        "i+o-left <= j <= i+o+right, o = S-L",
        (_FI, _FR4),
        note="window_size=(left, right); -1 is unbounded in FA2/FA3, None in FA4 (cute).",
    ),
    fully_masked_output=Fact(
        "0",
        (_FI, _FS2, _FS3, _FS4),
        note="Docstring: 'If the row of the mask is all zero, the output will be zero'.",
    ),
    fully_masked_lse=Fact(
        "FA2 +inf; FA3, FA4 -inf",
        (_FS2, _FS3, _FS4),
        note="FA2 returns -inf instead on its split-KV path (Split=true). With a learnable "
        "sink (FA4) an empty row has lse = sink.",
    ),
    hidden_nan=Fact(
        "not measured",
        (_FS2,),
        "unverified",
        "Masked scores are set to -inf before exp, so a NaN key logit is replaced; whether a "
        "NaN value behind a zero weight leaks (0 * NaN in the P @ V product) needs a GPU run.",
    ),
    gqa=Fact("h // G", (_FI, _FR3), note="'head 0, 1, 2 of Q will attention to head 0 of K, V'."),
    value_head_dim=Fact(
        "FA2: Ev = E; FA3/FA4: allowed",
        (_FI, _FR3),
        note="flash_attn_func's docstring gives v the shape (B, S, Hkv, headdim) of k; the "
        "FA3/FA4 references take a separate head_dim_v.",
    ),
    softcap=Fact(
        "c*tanh(s/c), after scale, before mask",
        (_FI, _FR3),
        note="softcap=0.0 disables it.",
    ),
    alibi=Fact(
        "-slope*abs(i+S-L-j)",
        (_FI, "Dao-AILab/flash-attention tests/test_flash_attn.py (attn_bias_from_alibi_slopes)"),
        note="alibi_slopes (Hq,) or (B, Hq), fp32. The causal test reference uses "
        "slope*(j-S+1) for every row: same weights (a per-row shift), different lse.",
    ),
    sinks=Fact(
        "FA4: learnable_sink, in normaliser and lse",
        (_FR4, _FS4),
        note="One logit per query head, not multiplied by the scale, no value (cute/softmax.py "
        "apply_learnable_sink). Not in FA2's flash_attn_func.",
    ),
    dropout=Fact(
        "dropout_p in kernel, /(1-p)",
        (_FI, _FR3),
        note="attention_ref takes an explicit dropout_mask.",
    ),
    lse=Fact(
        "softmax_lse (B, Hq, L), float32, natural log",
        (_FI, _FS2),
        note="Returned with return_attn_probs=True (FA2): the logsumexp of the rows of "
        "QK^T * scaling.",
    ),
    input_dtypes=Fact(
        "fp16, bf16 (FA3: + fp8)",
        ("Dao-AILab/flash-attention csrc/flash_attn/flash_api.cpp (mha_fwd)",),
        note="'FlashAttention only support fp16 and bf16 data type'; q, k, v same dtype.",
    ),
    accumulation=Fact("fp32 scores and softmax", (_FS2, _FR3)),
    empty_sequence=Fact(
        "not checked",
        (_FI,),
        "unverified",
        "Undocumented; needs a GPU run.",
    ),
    softmax_default_axis=_na(_FI, "FlashAttention has no standalone softmax."),
    softmax_posinf=_na(_FI),
    softmax_nan=_na(_FI),
    softmax_all_neginf=_na(_FI),
    softmax_empty_axis=_na(_FI),
)


# ---------------------------------------------------------------------------------------------
# xFormers: xformers.ops.memory_efficient_attention (CUDA only: from source)
# ---------------------------------------------------------------------------------------------

_XI = "facebookresearch/xformers xformers/ops/fmha/__init__.py (memory_efficient_attention)"
_XB = "facebookresearch/xformers xformers/ops/fmha/attn_bias.py"

XFORMERS_PRESET = Convention(
    name="xformers",
    title="xFormers",
    api="xformers.ops.memory_efficient_attention",
    checked="source only (CUDA); files as indexed",
    default_scale=Fact("1/sqrt(E)", (_XI,), note="'q.shape[-1]**-0.5'."),
    mask_semantics=Fact(
        "attn_bias: AttentionBias or tensor",
        (_XI, f"{_XB} (AttentionBias)"),
        note="An AttentionBias is a log(0/1) mask the kernel need not materialise.",
    ),
    mask_dtypes=Fact(
        "tensor bias: not checked",
        (_XI,),
        "unverified",
        "Which tensor dtypes a bias may have was not read.",
    ),
    mask_fill=Fact("-inf (log 0)", (f"{_XB} (_materialize_causal_mask)",)),
    bias=Fact("tensor attn_bias, added", (_XI,)),
    causal_alignment=Fact(
        "both: separate classes",
        (f"{_XB} (LowerTriangularMask, LowerTriangularFromBottomRightMask)",),
        note="LowerTriangularMask is top-left; LowerTriangularFromBottomRightMask is bottom-right.",
    ),
    window=Fact(
        "bottom-right classes",
        (f"{_XB} (LocalAttentionFromBottomRightMask, _materialize_causal_mask)",),
        note="LocalAttentionFromBottomRightMask(window_left, window_right): "
        "i+o-left <= j <= i+o+right, o = S-L. The causal local masks take one window_size w "
        "that counts the diagonal: left = w - 1.",
    ),
    fully_masked_output=Fact(
        "not checked",
        (_XI,),
        "unverified",
        "No statement found in the docstrings; needs a GPU run.",
    ),
    fully_masked_lse=Fact("not checked", (_XI,), "unverified", "Needs a GPU run."),
    hidden_nan=Fact("not checked", (_XI,), "unverified", "Needs a GPU run."),
    gqa=Fact(
        "5-D [B, M, G, H, K], forward only",
        (_XI,),
        note="K and V are expanded by the caller; query heads of group g read kv head g, "
        "i.e. h // G.",
    ),
    value_head_dim=Fact("allowed (Kv)", (_XI,), note="value is [B, Mkv, H, Kv]."),
    softcap=Fact("no", (_XI,)),
    alibi=Fact("only as a tensor bias", (_XI,)),
    sinks=Fact("no", (_XI,)),
    dropout=Fact("p, as F.dropout: /(1-p)", (_XI,)),
    lse=Fact(
        "forward_requires_grad: (B, H, M)",
        (
            "facebookresearch/xformers xformers/ops/fmha/__init__.py "
            "(memory_efficient_attention_forward_requires_grad)",
        ),
        note="Units not stated in the docstring.",
    ),
    input_dtypes=Fact("f16, bf16, f32", (_XI,), note="'Supported hardware' section."),
    accumulation=Fact("not checked", (_XI,), "unverified", "Kernel-dependent; not read."),
    empty_sequence=Fact("not checked", (_XI,), "unverified", "Undocumented."),
    softmax_default_axis=_na(_XI, "xFormers has no standalone softmax."),
    softmax_posinf=_na(_XI),
    softmax_nan=_na(_XI),
    softmax_all_neginf=_na(_XI),
    softmax_empty_axis=_na(_XI),
)


# ---------------------------------------------------------------------------------------------
# SciPy: scipy.special.softmax / log_softmax / logsumexp (no attention)
# ---------------------------------------------------------------------------------------------

_SL = "scipy/scipy scipy/special/_logsumexp.py"

_SCIPY_NA = _na(_SL, "scipy.special has no attention.")

SCIPY_PRESET = Convention(
    name="scipy",
    title="SciPy",
    api="scipy.special.softmax, log_softmax, logsumexp",
    checked="scipy 1.17.1",
    default_scale=_SCIPY_NA,
    mask_semantics=_SCIPY_NA,
    mask_dtypes=_SCIPY_NA,
    mask_fill=_SCIPY_NA,
    bias=_SCIPY_NA,
    causal_alignment=_SCIPY_NA,
    window=_SCIPY_NA,
    fully_masked_output=_SCIPY_NA,
    fully_masked_lse=_SCIPY_NA,
    hidden_nan=_SCIPY_NA,
    gqa=_SCIPY_NA,
    value_head_dim=_SCIPY_NA,
    softcap=_SCIPY_NA,
    alibi=_SCIPY_NA,
    sinks=_SCIPY_NA,
    dropout=_SCIPY_NA,
    lse=_SCIPY_NA,
    input_dtypes=_SCIPY_NA,
    accumulation=_SCIPY_NA,
    empty_sequence=_SCIPY_NA,
    softmax_default_axis=Fact(
        "None (all axes)",
        (f"{MEASURED_SCIPY} ({_T}::test_scipy_default_axis)", f"{_SL} (softmax)"),
        "measured",
    ),
    softmax_posinf=Fact(
        "NaN; log_softmax NaN/-inf; lse +inf",
        (f"{MEASURED_SCIPY} ({_T}::test_scipy_posinf)",),
        "measured",
        "softmax([inf, 1]) = [NaN, NaN] and log_softmax([inf, 1]) = [NaN, -inf], both with "
        "a RuntimeWarning (inf - inf).",
    ),
    softmax_nan=Fact("NaN slice", (f"{MEASURED_SCIPY} ({_T}::test_scipy_nan)",), "measured"),
    softmax_all_neginf=Fact(
        "NaN + RuntimeWarning; lse -inf",
        (f"{MEASURED_SCIPY} ({_T}::test_scipy_all_neginf)",),
        "measured",
        "logsumexp(b=...) with b = 0 ignores an entry even when it is inf or NaN (measured).",
    ),
    softmax_empty_axis=Fact(
        "ValueError; lse -inf",
        (f"{MEASURED_SCIPY} ({_T}::test_scipy_empty_axis)",),
        "measured",
        "softmax and log_softmax raise 'zero-size array to reduction operation maximum'.",
    ),
)


#: The presets by name.
PRESETS: dict[str, Convention] = {
    c.name: c
    for c in (ATTNSPEC, TORCH_PRESET, JAX_PRESET, FLASH_PRESET, XFORMERS_PRESET, SCIPY_PRESET)
}


def get(name: str) -> Convention:
    """The preset called ``name``; a KeyError lists the known names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"no convention preset {name!r}; known: {sorted(PRESETS)}") from None


# ---------------------------------------------------------------------------------------------
# Checks and rendering
# ---------------------------------------------------------------------------------------------

_MEASURED = re.compile(
    r"^measured: (torch|jax|scipy) \d+\.\d+\.\d+( CPU)? \(tests/test_conventions\.py::(test_\w+)\)$"
)
_ISSUE = re.compile(r"^(issue|pr) [\w.-]+/[\w.-]+#\d+$")
_REPO_FILE = re.compile(r"^(?P<repo>[\w.-]+/[\w.-]+) (?P<path>[\w./-]+\.\w+)( \(.+\))?$")
_ATTNSPEC = re.compile(r"^attnspec: (reference|spec|attnspec)/[\w/]+\.py$")


def source_problems(fact: Fact) -> list[str]:
    """What is wrong with a fact's provenance (empty when it is well formed)."""
    problems: list[str] = []
    if fact.status not in STATUSES:
        problems.append(f"status {fact.status!r} not in {STATUSES}")
    if not fact.sources:
        problems.append("no source")
    if not fact.value or "\n" in fact.value or len(fact.value) > 48:
        problems.append(f"value {fact.value!r} is not a short one-line statement")
    kinds = set()
    for s in fact.sources:
        if _MEASURED.match(s):
            kinds.add("measured")
        elif _ISSUE.match(s):
            kinds.add("issue")
        elif _ATTNSPEC.match(s):
            kinds.add("attnspec")
        elif (m := _REPO_FILE.match(s)) and m["repo"] in REPOSITORIES:
            kinds.add("repo")
        else:
            problems.append(
                f"source {s!r} is not 'owner/repo path (function)', "
                "'issue owner/repo#N', 'measured: ...' or 'attnspec: path'"
            )
    need = {"measured": "measured", "source": "repo", "definition": "attnspec", "n/a": "repo"}
    if fact.status in need and need[fact.status] not in kinds:
        problems.append(f"status {fact.status!r} needs a {need[fact.status]!r} source")
    if fact.status == "unverified" and not fact.note:
        problems.append("an unverified fact must say in its note what would settle it")
    return problems


def measured_tests(fact: Fact) -> list[str]:
    """The names of the tests in ``tests/test_conventions.py`` that re-measure ``fact``."""
    return [m.group(3) for s in fact.sources if (m := _MEASURED.match(s))]


def _cell(fact: Fact, refs: dict[str, int]) -> str:
    text = fact.value.replace("|", "\\|")
    if fact.status == "unverified":
        text += " (unverified)"
    marks = "".join(f"[^{refs[s]}]" for s in fact.sources)
    return f"{text} {marks}"


def markdown_table(names: tuple[str, ...] | None = None) -> str:
    """The conventions table of ``docs/conventions.md``, with a numbered list of sources.

    Rows are :data:`FACT_ROWS`, columns the presets ``names`` (default: all, canonical
    first); each cell is the fact's value followed by footnote marks for its sources, and
    the footnotes (one per distinct source) follow the table. Notes are not rendered: the
    docs explain the differences in prose.
    """
    chosen = [get(n) for n in (names or tuple(PRESETS))]
    refs: dict[str, int] = {}
    for c in chosen:
        for fact in c.facts().values():
            for s in fact.sources:
                refs.setdefault(s, len(refs) + 1)
    lines = [
        "| feature | " + " | ".join(c.title for c in chosen) + " |",
        "|---|" + "---|" * len(chosen),
    ]
    for field_name, label in FACT_ROWS:
        cells = [_cell(getattr(c, field_name), refs) for c in chosen]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.extend(f"[^{n}]: {s}" for s, n in refs.items())
    return "\n".join(lines) + "\n"
