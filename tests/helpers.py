"""Shared test helpers: the tolerance policy of docs/design.md §4.1 and builders of realistic inputs.

Tolerance policy (docs/design.md §4.1; flash-attention / ml-cross-entropy style)::

    max |kernel − truth|  ≤  2 · max |pytorch − truth|  +  atol,     atol = 1e-6 · max |truth|

``truth`` is computed in float64 from the *same* (possibly bf16/fp16-rounded) inputs, and
``pytorch`` is ``var_loss_reference`` run on the inputs in their own dtype, so the bound is
"no worse than twice what plain PyTorch achieves in that dtype". The atol only absorbs the case
where PyTorch happens to be exact (a scalar loss, an all-zero gradient row); it is scaled by the
magnitude of the truth and is never widened to make a test pass. Sums of token log-probs (the
loss, policy_logps) have one justified floor on top, the absolute fp32 noise of log-sum-exp: see
``lp_atol``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from varkernels.reference import var_loss_reference

IGNORE_INDEX = -100
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BACKENDS = ("triton", "torch")
ATOL_SCALE = 1e-6  # atol = ATOL_SCALE · max|truth|: ~16 fp32 ulps of the largest value
FP32_EPS = 2.0**-23
LOGP_NOISE_ULPS = 4  # absolute fp32 noise of one token's lp = (z_y − m) − log s, in units of eps (see lp_atol)
# Relative error bound of CUDA's exp2: Triton lowers tl.exp2 on fp32 to ex2.approx.ftz.f32 on sm_80/sm_90
# (subnormal results flushed to zero), whose maximum relative error the PTX ISA gives as about 2^-22 (not
# re-checked here); 2^-21 is twice that, and the derivation is checked at 8x (tests/test_gpu_suite.py). The
# interpreter's exp2 (numpy) is correctly rounded: its term is 0 there.
# Derivation and the interpreter emulation that checks it: docs/design.md §4.6, tests/test_gpu_suite.py.
EXP2_APPROX_REL_ERR = 2.0**-21


# --------------------------------------------------------------------------------------------
# Tolerance policy
# --------------------------------------------------------------------------------------------


def lp_atol(token_weights: torch.Tensor) -> float:
    """Absolute noise floor of a weighted sum Σ_k a_k·lp_k of token log-probs.

    lp = (z_y − m) − log s with s = Σ_v e^(z_v − m) ≥ 1: s is a sum of V fp32 terms near or above
    1, so even a correct kernel carries an *absolute* error of a few eps in log s, whatever |lp|
    is. For a confident token (lp ≈ −0.01) that is far above 1e-6·|lp|, and PyTorch's own error
    on one or a few tokens is one random draw that can be ~0 (its cascade sum got lucky), so
    "2 × PyTorch's error" alone would fail a correct kernel by chance. The floor is
    LOGP_NOISE_ULPS·eps per unit of token weight |a_k|: for the loss a_k = w_i·c_i/B, for
    policy_logps a_k = c_i. It is several times below the error of computing lp as z_y − lse (off by up
    to ulp(lse)/2 ≈ 1e-6 for |logits| ≈ 20, 2e-6 at 40), which test_confident_tokens checks on enough
    tokens that PyTorch's max error is a stable yardstick.
    """
    return LOGP_NOISE_ULPS * FP32_EPS * float(token_weights.abs().sum())


def exp2_lp_atol(token_weights: torch.Tensor, rel_err: float, n_tiles: int = 1) -> float:
    """Extra absolute floor of Σ_k a_k·lp_k when every exp2 carries a relative error ≤ ``rel_err``
    (docs/design.md §4.6). A row's sum s = Σ_v 2^(..)·(1 + δ_v) is built over ``n_tiles`` BLOCK_V tiles,
    the running sum rescaled by one more exp2 per tile (the online max): each term of s carries at most
    n_tiles + 1 factors (1 + δ), so log s — hence lp — is off by at most (n_tiles + 1)·rel_err to first
    order, whatever the row: (n_tiles + 1)·rel_err·Σ|a_k|. n_tiles = 1 for the single-pass kernel."""
    return (n_tiles + 1) * rel_err * float(token_weights.abs().sum())


def exp2_grad_atol(truth: torch.Tensor, rel_err: float, n_tiles: int = 1) -> float:
    """Extra absolute floor of a gradient coef·(p − 1[v = y]) when every exp2 carries a relative error
    ≤ ``rel_err``: p = 2^((z − m − log s)·log2 e) takes rel_err from its own exp2 and (n_tiles + 1)·rel_err
    from log s (exp2_lp_atol), and the fp32 product and difference round twice more:
    ((n_tiles + 2)·rel_err + 2·eps)·max|truth|. 0 when rel_err is 0."""
    if not rel_err or truth.numel() == 0:
        return 0.0
    return ((n_tiles + 2) * rel_err + 2 * FP32_EPS) * float(truth.detach().abs().max())


def _describe(name, actual, ref, truth, bound, dtype) -> str:
    err = (actual.double() - truth).abs()
    ref_err = (ref.double() - truth).abs()
    flat = int(torch.nan_to_num(err, nan=float("inf")).flatten().argmax())
    idx = tuple(torch.unravel_index(torch.tensor(flat), err.shape)) if err.dim() else ()
    idx = tuple(int(i) for i in idx)
    scale = float(truth.abs().max()) if truth.numel() else 0.0
    at = truth[idx] if idx else truth
    return (
        f"{name}: max abs error {float(err.max()):.3e} > bound {bound:.3e} "
        f"(= 2 × PyTorch error {float(ref_err.max()):.3e} + atol); "
        f"relative error {float(err.max()) / max(scale, 1e-300):.3e} of max|truth| = {scale:.3e}; "
        f"worst index {idx}: kernel {float(actual.double()[idx] if idx else actual.double()):.9g}, "
        f"PyTorch {float(ref.double()[idx] if idx else ref.double()):.9g}, truth {float(at):.9g}; "
        f"shape {tuple(truth.shape)}, kernel dtype {dtype}"
    )


def assert_close(
    actual: torch.Tensor,
    ref: torch.Tensor,
    truth: torch.Tensor,
    *,
    name: str = "value",
    factor: float = 2.0,
    atol_floor: float = 0.0,
) -> None:
    """docs/design.md §4.1: ``max|actual − truth| ≤ factor·max|ref − truth| + atol``,
    ``atol = max(1e-6·max|truth|, atol_floor)``.

    Args:
        actual: the kernel's result (any dtype). ref: ``var_loss_reference`` in the input dtype.
        truth: float64 ground truth, same shape. Non-finite entries of ``truth`` must be
            reproduced exactly by ``actual`` (an impossible response has weight 0, not NaN).
        atol_floor: only for sums of token log-probs, see ``lp_atol``.
    On failure prints the max abs error, the relative error and the worst index.
    """
    assert actual.shape == truth.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(truth.shape)}"
    assert ref.shape == truth.shape, f"{name}: reference shape {tuple(ref.shape)} != {tuple(truth.shape)}"
    dtype = actual.dtype
    actual = actual.detach().double()
    ref = ref.detach().double()
    truth = truth.detach().double()
    finite = torch.isfinite(truth)
    if not bool(finite.all()):
        same = torch.equal(actual[~finite].nan_to_num(nan=1.5), truth[~finite].nan_to_num(nan=1.5))
        assert same, f"{name}: non-finite entries of the truth are not reproduced: {actual[~finite]}"
        actual, ref, truth = actual[finite], ref[finite], truth[finite]
    assert bool(torch.isfinite(actual).all()), f"{name}: kernel produced non-finite values where the truth is finite"
    if truth.numel() == 0:
        return
    atol = max(ATOL_SCALE * float(truth.abs().max()), atol_floor)
    bound = factor * float((ref - truth).abs().max()) + atol
    if float((actual - truth).abs().max()) > bound:
        raise AssertionError(_describe(name, actual, ref, truth, bound, dtype))


def require_backend(backend: str) -> None:
    """Skip (with the reason) a case on the C++ backend where it cannot be built here."""
    from varkernels._backend import cpu_extension_available

    if backend == "cpu" and not cpu_extension_available():
        import pytest

        pytest.skip("C++ CPU extension not built on this machine")


# --------------------------------------------------------------------------------------------
# Input builders
# --------------------------------------------------------------------------------------------


def make_labels(
    B: int,
    T: int,
    V: int,
    *,
    ignore_index: int = IGNORE_INDEX,
    ignored_rows: Sequence[int] = (),
    dtype: torch.dtype = torch.int64,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """[B, T] labels: a prompt prefix of random length (ignored), the response, right padding.

    Every row not in ``ignored_rows`` keeps at least one target token; rows in ``ignored_rows``
    are entirely ``ignore_index`` (n_i = 0).
    """
    labels = torch.randint(0, V, (B, T), generator=generator)
    for i in range(B):
        if i in ignored_rows:
            labels[i] = ignore_index
            continue
        if T == 1:
            continue
        prompt = int(torch.randint(0, max(1, T // 2), (1,), generator=generator))
        length = int(torch.randint(1, T - prompt + 1, (1,), generator=generator))
        labels[i, :prompt] = ignore_index
        labels[i, prompt + length:] = ignore_index
    return labels.to(dtype)


def make_logits(
    B: int,
    T: int,
    V: int,
    dtype: torch.dtype = torch.float32,
    *,
    labels: torch.Tensor | None = None,
    scale: float = 4.0,
    boost: float = 12.0,
    requires_grad: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """[B, T, V] leaf logits ~ N(0, scale²), rounded to ``dtype``.

    With ``labels``, the target logit of every other position is raised by ``boost`` so that
    targets span p(y) ≈ 1 (a confident policy: the 1 − p cancellation of the gradient) down to
    p(y) ≈ 1/V, as in a real language model.
    """
    x = torch.randn(B, T, V, generator=generator) * scale
    if labels is not None:
        safe = labels.long().clamp(min=0)
        bump = torch.zeros(B, T)
        bump[:, ::2] = boost
        x.scatter_add_(-1, safe.unsqueeze(-1), bump.unsqueeze(-1))
    return x.to(dtype).requires_grad_(requires_grad)


def response_lengths(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    return (labels != ignore_index).sum(dim=1)


def make_pairs(
    labels: torch.Tensor,
    *,
    form: str = "matrix",
    logp_reduction: str = "mean",
    ignore_index: int = IGNORE_INDEX,
    reward_scale: float = 1.0,
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards R and reference log-probs Q of realistic magnitude, (B, B) or (B,).

    R ~ N(0, reward_scale²) (a reward model's scores). Q[i, j] = log π_ref(y_j | x_i) is built
    from a per-token log-prob of −U(0.2, 1.5) (a fine-tuned reference model): the per-token
    mean for ``"mean"``, n_j times it for ``"sum"`` (n_j = length of response j; 0 when empty).
    """
    B = labels.shape[0]
    shape = (B, B) if form == "matrix" else (B,)
    if form not in ("matrix", "vector"):
        raise ValueError(form)
    rewards = torch.randn(shape, generator=generator) * reward_scale
    per_token = -(0.2 + 1.3 * torch.rand(shape, generator=generator))
    if logp_reduction == "sum":
        n = response_lengths(labels, ignore_index).to(torch.float32)
        per_token = per_token * n  # broadcasts over the last dim: column j scales with n_j
    return rewards.to(dtype), per_token.to(dtype)


# --------------------------------------------------------------------------------------------
# Reference runs
# --------------------------------------------------------------------------------------------


def reference_run(logits, labels, rewards, ref_logps, *, upstream: float = 1.0, float64: bool = False, **options):
    """``var_loss_reference`` with ``return_aux=True`` and the logits gradient of ``upstream·loss``.

    ``float64=True`` gives the ground truth: the same (already dtype-rounded) values in float64.
    Returns (VAROutput, grad or None).
    """
    x = logits.detach().clone()
    r, q = rewards, ref_logps
    if float64:
        x, r, q = x.double(), r.double(), q.double()
    x.requires_grad_(True)
    out = var_loss_reference(x, labels, r, q, return_aux=True, **options)
    (upstream * out.loss).backward()
    return out, x.grad
