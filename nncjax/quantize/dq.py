"""Dependent quantization (DQ, dq_flag = 1) in JAX: state machine, level maps, rate-aware trellis, relaxation.

DQ codes a level ``q`` per weight; an 8-state machine driven by ``q & 1`` picks one of two quantizers
(even multiples of the step for even states; zero and odd multiples for odd states), and the decoder
reconstructs ``step * k`` with ``k = 2q - sgn(q) * (state & 1)`` (nnr-format.md §3.4). The codec's
level arrays hold ``k``.

* :func:`dq_states` -- the state before every element, for given ``k`` levels (associative scan of
  8-state maps, parallel).
* :func:`k_to_q` / :func:`q_to_k` -- level conversions.
* :func:`dq_trellis` -- Viterbi search over the 8 states minimising ``(|w|/step - |k|)^2 + lam * bits``
  (the candidate set and tie rules of NNCodec's TCQ). It is parallel: the tensor is cut into chunks of
  ``chunk`` elements, each chunk's 8x8 min-plus transfer matrix is built by a short scan vectorised
  over chunks, chunk start costs come from ``jax.lax.associative_scan`` in the min-plus semiring, and
  the backtrack composes per-chunk "end state -> start state" maps with a second associative scan.
* :func:`quantize_dq` -- hard levels + exact reconstruction, or a training relaxation: the state path is
  the hard trellis path (no gradient), and each weight is rounded onto the quantizer its state selects
  with the chosen surrogate (``ste`` / ``noise`` / ``soft``). This "frozen-path" surrogate is exact at
  the hard limit for every weight the trellis rounds to its nearest point on the selected quantizer.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from nncjax.kernels.tables import DQ_NEXT
from nncjax.quantize._checks import LEVEL_MAX, check_levels, check_step
from nncjax.quantize.uniform import relax_round

__all__ = ["dq_states", "dq_trellis", "k_to_q", "nncodec_lambda", "q_to_k", "quantize_dq"]

_NEXT = np.asarray(DQ_NEXT, dtype=np.int32)                      # (8, 2): next state by parity
# Each state has exactly two predecessors; _PRED[j] = ((state, parity), (state, parity)), lower state first.
_PRED = np.array([sorted((s, p) for s in range(8) for p in range(2) if _NEXT[s, p] == j) for j in range(8)],
                 dtype=np.int32)                                   # (8, 2, 2)


def nncodec_lambda(lambda_scale: float) -> float:
    """``lam`` of :func:`dq_trellis` (a float scalar) that matches NNCodec's ``lambda_scale`` for DQ
    (Quant.cpp factor ``4 ln 2 / 6 * 0.7``).

    >>> print(round(nncodec_lambda(1.0), 6), nncodec_lambda(0.0))
    0.323469 0.0
    """
    return float(lambda_scale) * 4.0 * math.log(2.0) / 6.0 * 0.7


def _pick(x: jax.Array, idx: jax.Array) -> jax.Array:
    """``x[..., idx]`` elementwise: x (..., 8) broadcastable against idx (...) int -> idx's shape.

    A one-hot sum, not a gather: XLA constant-folds the iota index arrays of large gathers, which made
    compilation take minutes. The sum keeps ``x``'s dtype: an integer sum would widen to int64 under
    ``jax_enable_x64`` and break the trellis scans' carries."""
    hot = idx[..., None] == jnp.arange(8, dtype=idx.dtype)
    return jnp.sum(jnp.where(hot, x, jnp.zeros((), x.dtype)), axis=-1, dtype=x.dtype)


def _compose(a: jax.Array, b: jax.Array) -> jax.Array:
    """State maps (..., 8): apply ``a`` then ``b``."""
    return _pick(b[..., None, :], a)


@jax.jit
def dq_states(k: jax.Array) -> jax.Array:
    """DQ state before each element, scanning ``k`` (any shape, int) in C order -> int32 of the same shape.

    >>> dq_states(jnp.array([2, 1, 0]))
    Array([0, 2, 1], dtype=int32)
    """
    flat = jnp.asarray(k, jnp.int32).reshape(-1)
    s = jnp.arange(8, dtype=jnp.int32)
    # parity of q = (k + sgn(k) * (s & 1)) >> 1 for every possible state s: (n, 8)
    q = (flat[:, None] + jnp.sign(flat)[:, None] * (s & 1)[None, :]) >> 1
    maps = jnp.where((q & 1) == 1, jnp.asarray(_NEXT[:, 1]), jnp.asarray(_NEXT[:, 0]))
    prefix = jax.lax.associative_scan(_compose, maps, axis=0)
    after = prefix[:, 0]
    before = jnp.concatenate([jnp.zeros((1,), jnp.int32), after[:-1]])
    return before.reshape(jnp.shape(k))


def k_to_q(k: jax.Array, state: jax.Array) -> jax.Array:
    """Coded level from reconstruction index: ``q = (k + sgn(k) * (state & 1)) >> 1``.

    ``k``, ``state``: int arrays of broadcastable shapes -> int32 of the broadcast shape.

    >>> k_to_q(jnp.array([2, -3, 3, 0]), jnp.array([0, 1, 1, 0]))
    Array([ 1, -2,  2,  0], dtype=int32)
    """
    k = jnp.asarray(k, jnp.int32)
    return (k + jnp.sign(k) * (jnp.asarray(state, jnp.int32) & 1)) >> 1


def q_to_k(q: jax.Array, state: jax.Array) -> jax.Array:
    """Reconstruction index from coded level: ``k = 2q - sgn(q) * (state & 1)``; inverse of :func:`k_to_q`.

    ``q``, ``state``: int arrays of broadcastable shapes -> int32 of the broadcast shape.

    >>> q_to_k(jnp.array([1, -2, 2, 0]), jnp.array([0, 1, 1, 0]))
    Array([ 2, -3,  3,  0], dtype=int32)
    """
    q = jnp.asarray(q, jnp.int32)
    return 2 * q - jnp.sign(q) * (jnp.asarray(state, jnp.int32) & 1)


RateFn = Callable[[jax.Array, jax.Array], jax.Array]


def _state_candidates(u: jax.Array) -> jax.Array:
    """Nonzero candidate ``|k|`` of the parity-0 and parity-1 transitions out of each state.

    u: (..., 8) = |w| / step as seen from each state, or (..., 1) when every state sees the same
    value (plain DQ). Returns int32 (..., 8, 2): the candidates with ``|k| & 3 == r`` just above
    ``floor(u) - 1``;
    quantizer 0 (even states) takes slots r = (0, 2), quantizer 1 (odd states) slots (3, 1).
    """
    m = jnp.maximum(1, jnp.floor(u).astype(jnp.int32) - 1)
    slot = [m + (r - m) % 4 for r in range(4)]
    odd = (jnp.arange(8) & 1) == 1
    return jnp.stack([jnp.where(odd, slot[3], slot[0]), jnp.where(odd, slot[1], slot[2])], -1)


def _edges(u: jax.Array, lam, rate: RateFn | None):
    """Per element and state: cost and |k| of the parity-0 and parity-1 transitions.

    u: (n,) = |w| / step. Returns cost (n, 8, 2) float32, absk (n, 8, 2) int32. Parity 0 keeps the
    cheaper of the nonzero candidate and zero (ties to the nonzero one, as NNCodec does).
    """
    absk = _state_candidates(u[:, None])                                               # (n, 8, 2)
    cost = (u[:, None, None] - absk.astype(jnp.float32)) ** 2
    zero_cost = jnp.broadcast_to((u * u)[:, None], (u.shape[0], 8))
    if rate is not None:
        states = jnp.arange(8, dtype=jnp.int32)
        absq = (absk + (states & 1)[None, :, None]) >> 1
        cost = cost + lam * rate(absq, states[None, :, None])
        zero_cost = zero_cost + lam * rate(jnp.zeros_like(zero_cost, jnp.int32), states[None, :])
    take_zero = zero_cost < cost[:, :, 0]
    cost = jnp.stack([jnp.where(take_zero, zero_cost, cost[:, :, 0]), cost[:, :, 1]], -1)
    absk = jnp.stack([jnp.where(take_zero, 0, absk[:, :, 0]), absk[:, :, 1]], -1)
    return cost, absk


def _step_matrix(m: jax.Array, cost: jax.Array):
    """Min-plus product of matrices m (..., 8, 8) with one trellis step cost (..., 8, 2).

    Returns (new matrix (..., 8, 8), argmin predecessor slot (..., 8, 8) in {0, 1})."""
    pa, pb = _PRED[:, 0], _PRED[:, 1]                                     # (8, 2) each: (state, parity)
    ca = m[..., pa[:, 0]] + cost[..., None, pa[:, 0], pa[:, 1]]
    cb = m[..., pb[:, 0]] + cost[..., None, pb[:, 0], pb[:, 1]]
    return jnp.minimum(ca, cb), (cb < ca).astype(jnp.int8)


def _minplus(a: jax.Array, b: jax.Array) -> jax.Array:
    c = jnp.min(a[..., :, :, None] + b[..., None, :, :], axis=-2)
    # a constant offset changes no decision; keeping the minimum at 0 keeps float32 precision
    return c - jnp.min(c, axis=(-2, -1), keepdims=True)


def dq_trellis(w: jax.Array, step: jax.Array, *, lam: float = 0.0, rate: RateFn | None = None,
               chunk: int = 64) -> jax.Array:
    """Rate-distortion DQ trellis: the ``k`` levels (int32, shape of ``w``) that minimise
    ``sum((|w|/step - |k|)^2) + lam * sum(rate(|q|, state))`` over valid DQ state paths.

    ``rate(absq, state)``: bits of coding ``|q|`` in ``state`` (broadcasting int32 arrays -> float32), e.g.
    :func:`nncjax.rate.trellis_rate_fn`; ignored when ``lam == 0`` or None. Scan order is C order.
    The result is always parity-consistent with the state machine (``quantize_dq`` reconstructs it exactly).

    >>> from nncjax.steps import qp_to_step_jax
    >>> dq_trellis(jnp.array([0.01, -0.02, 0.003]), qp_to_step_jax(-38))
    Array([  8, -14,   2], dtype=int32)

    Raises:
        InputError: a concrete ``step`` is not finite and > 0, or a concrete ``w`` has a level beyond
            int32 (``max |w| / step`` >= 2**31; ``nncjax.encode`` would code such a tensor at a coarser
            QP, :func:`nncjax.quantize.reference.safe_qp`).

    Under tracing values cannot be checked: ``|w| / step`` then saturates just below 2**31 (so do the
    levels, and the reconstruction of those weights is wrong), and a step <= 0 gives meaningless levels.
    """
    check_step(step)
    w = jnp.asarray(w, jnp.float32)
    if w.size == 0:
        return jnp.zeros(w.shape, jnp.int32)
    step = jnp.asarray(step, jnp.float32)
    check_levels(w, step, lambda x: jnp.abs(x) / step, "max |w| / step")
    use_rate = rate is not None and not (isinstance(lam, (int, float)) and lam == 0)
    return _trellis(w, step, jnp.asarray(lam, jnp.float32), rate if use_rate else None, int(chunk))


@functools.partial(jax.jit, static_argnames=("rate", "chunk"))
def _trellis(w, step, lam, rate, chunk):
    shape = w.shape
    flat = w.reshape(-1)
    n = flat.shape[0]
    # the candidates reach floor(u) + 2: saturate u so that they stay inside int32
    u = jnp.minimum(jnp.abs(flat) / step, LEVEL_MAX)
    cost, absk = _edges(u, lam, rate)
    L = int(max(1, min(chunk, n)))
    nc = -(-n // L)
    pad = nc * L - n
    # padding steps cost nothing along parity 0 (their choice is discarded)
    cost = jnp.concatenate([cost, jnp.zeros((pad, 8, 2), cost.dtype)]).reshape(nc, L, 8, 2)
    inf = jnp.float32(jnp.inf)
    eye = jnp.where(jnp.eye(8, dtype=bool), 0.0, inf).astype(jnp.float32)

    # 1. transfer matrix of every chunk (sequential over L, vectorised over chunks)
    def build(mat, c):
        new, _ = _step_matrix(mat, c)
        return new - jnp.min(new, axis=(-2, -1), keepdims=True), None

    trans, _ = jax.lax.scan(build, jnp.broadcast_to(eye, (nc, 8, 8)), jnp.swapaxes(cost, 0, 1))
    # 2. cost vector at every chunk start: prefix products from state 0
    prefix = jax.lax.associative_scan(_minplus, trans, axis=0)
    start = jnp.concatenate([jnp.where(jnp.arange(8) == 0, 0.0, inf)[None].astype(jnp.float32),
                             prefix[:-1, 0, :]])                                        # (nc, 8)

    # 3. forward inside chunks with back pointers
    def fwd(alpha, c):
        new, arg = _step_matrix(alpha[:, None, :], c)
        new = new[:, 0]
        return new - jnp.min(new, axis=-1, keepdims=True), arg[:, 0]

    final, back = jax.lax.scan(fwd, start, jnp.swapaxes(cost, 0, 1))                    # back: (L, nc, 8)

    # 4. per chunk, the state at every position for each of the 8 possible end states
    def bwd(s_after, arg):
        slot = _pick(arg[..., None, :], s_after)
        s_before = jnp.where(slot == 1, _pick(jnp.asarray(_PRED[:, 1, 0]), s_after),
                             _pick(jnp.asarray(_PRED[:, 0, 0]), s_after))
        return s_before, s_before

    ends = jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (nc, 8))
    chunk_start_of_end, traj = jax.lax.scan(bwd, ends, back, reverse=True)             # traj: (L, nc, 8)
    # 5. end state of every chunk: compose "end -> start" maps from the last chunk backwards
    last_end = jnp.argmin(final[-1]).astype(jnp.int32)
    # state entering chunk c+1 = end state of chunk c; prefix of maps from the right
    maps = jax.lax.associative_scan(_compose, chunk_start_of_end, axis=0, reverse=True)
    entry = _pick(maps, jnp.broadcast_to(last_end, (nc,)))                              # state entering chunk c
    chunk_end = jnp.concatenate([entry[1:], last_end[None]])
    states = _pick(traj, jnp.broadcast_to(chunk_end[None, :], (L, nc)))
    padded = jnp.concatenate([jnp.swapaxes(states, 0, 1).reshape(-1), chunk_end[-1:]])  # (nc*L + 1,)
    states, after = padded[:n], padded[1:n + 1]                                        # before / after element
    parity = _pick(jnp.asarray(_NEXT[:, 1]), states) == after
    ak = jnp.where(parity, _pick(absk[..., 1], states), _pick(absk[..., 0], states))
    # a zero weight may take a non-zero level when the path needs its parity; it counts as positive
    return (jnp.where(flat < 0, -1, 1) * ak).reshape(shape)


def quantize_dq(w: jax.Array, step: jax.Array, mode: str = "hard", *, lam: float = 0.0,
                rate: RateFn | None = None, rng: jax.Array | None = None, alpha: float = 4.0,
                chunk: int = 64) -> tuple[jax.Array, jax.Array]:
    """Dependent quantization of ``w`` (any shape, float32) with step ``step`` (scalar).

    Returns ``(k, w_hat)``. ``mode="hard"``: int32 ``k`` from :func:`dq_trellis` and
    ``w_hat = float32(step) * float32(k)``, bit-identical to the decoder. Training modes
    (``ste``/``noise``/``soft``): the state path of the hard trellis is frozen; each weight is relaxed onto
    its state's quantizer (step ``2 * step``, offset ``step`` for odd states) so gradients reach ``w``
    and ``step``; ``k`` is then the real-valued relaxed index. Every mode runs the hard trellis, so
    the checks of :func:`dq_trellis` (and its behaviour under tracing) apply to all of them.

    >>> from nncjax.steps import qp_to_step_jax
    >>> w, step = jnp.array([0.01, -0.02, 0.003]), qp_to_step_jax(-38)
    >>> k, w_hat = quantize_dq(w, step)                                # hard, exact
    >>> k.tolist(), w_hat.tolist()
    ([8, -14, 2], [0.01171875, -0.0205078125, 0.0029296875])
    >>> _, w_soft = quantize_dq(w, step, mode="ste")                   # forward == hard, grads flow
    >>> bool((w_soft == w_hat).all())
    True
    """
    w = jnp.asarray(w, jnp.float32)
    step = jnp.asarray(step, jnp.float32)
    k_hard = dq_trellis(jax.lax.stop_gradient(w), jax.lax.stop_gradient(step), lam=lam, rate=rate, chunk=chunk)
    if mode == "hard":
        return k_hard, jax.lax.stop_gradient(step) * k_hard.astype(jnp.float32)
    odd = (dq_states(k_hard) & 1).astype(jnp.float32)
    u = w / step
    if mode == "ste":
        # forward is the trellis decision itself; gradient of the identity as for uniform STE
        k = u + jax.lax.stop_gradient(k_hard.astype(jnp.float32) - u)
    else:
        # odd quantizer: points 0, +-1, +-3, ...; below 1 it is plain rounding onto {0, 1}
        even = 2.0 * relax_round(u / 2.0, mode, rng=rng, alpha=alpha)
        a = jnp.abs(u)
        oddk = jnp.sign(u) * jnp.where(a < 1.0, relax_round(a, mode, rng=rng, alpha=alpha),
                                       2.0 * relax_round((a - 1.0) / 2.0, mode, rng=rng, alpha=alpha) + 1.0)
        k = jnp.where(odd > 0, oddk, even)
    return k, step * k
