"""Error feedback at equal layer-output error: :func:`with_error_feedback` trades the codec's
quantizer of each linear layer (and of lookup tables) for GPTQ at the coarsest QP whose output error
stays within the quantizer's, where the real coder then spends fewer bits.

Example:
    >>> import nncjax, nncjax.models
    >>> from nncjax.models.digits_mlp import load_digits_split
    >>> m = nncjax.models.get("digits_mlp"); x_calib = load_digits_split("train")[0][:256]
    >>> rd = nncjax.optimize(m.params, m.apply, x_calib, lam=3e-3, init="sensitivity", steps=0, progress=False)
    >>> h = nncjax.quantize.gptq.input_moments(m.apply, m.params, x_calib, progress=False)
    >>> p_g, rd_g = with_error_feedback(m.params, rd, h, progress=False)
    >>> rd_g.qp_overrides["params/fc1/kernel"] > rd.qp_overrides["params/fc1/kernel"]   # a coarser step
    True
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from nncjax.arguments import check_flag, check_int
from nncjax.coded_tensor import code_tensor, levels_bits, qp_delta_bits
from nncjax.errors import InputError
from nncjax.ioq import qp_limits
from nncjax.pytree_names import flatten_named
from nncjax.quantize.gptq import _checked_factor as _gptq_factor
from nncjax.quantize.gptq import _quantize_ordered as _gptq_quantize
from nncjax.quantize.gptq import _quantize_trellis as _gptq_trellis
from nncjax.quantize.gptq import layer_output_error
from nncjax.quantize.reference import quantize_tensor, reconstruct
from nncjax.rd_settings import (
    LS_SUFFIX,
    RDSettings,
    divide_rows,
    exact_cast,
    from_rows_first,
    multiply_rows,
    rows_axis,
    to_rows_first,
)
from nncjax.reduce._tree import replace_named
from nncjax.steps import qp_to_step

__all__ = ["with_error_feedback"]


def _moment_matrix(what: str, name: str, m: Any, rows_first: tuple[int, int]) -> np.ndarray:
    """``m`` (``moments[name]`` or ``check_moments[name]``) as a float32 ``(columns, columns)`` array
    for tensor ``name`` of ``rows_first`` shape ``(rows, columns)``, else InputError naming it."""
    try:
        a = np.asarray(m)
        ok = any(jnp.issubdtype(a.dtype, t) for t in (jnp.floating, jnp.integer, jnp.bool_))  # bfloat16 too
    except (TypeError, ValueError):  # e.g. ragged nested lists
        ok = False
    if not ok:
        raise InputError(f"{what}[{name!r}] must be a real-valued (columns, columns) array, got "
                         f"{getattr(m, 'dtype', type(m).__name__)}")
    if a.shape != (rows_first[1],) * 2:
        raise InputError(f"{what}[{name!r}] has shape {a.shape}; {name!r} coded rows first is {rows_first}")
    a = a.astype(np.float32)
    if not np.all(np.isfinite(a)):
        raise InputError(f"{what}[{name!r}] holds NaN or Inf (or values beyond float32)")
    if np.any(np.diag(a) < 0):  # E[x_j^2] < 0: no second moment (GPTQ would take such inputs for dead ones)
        raise InputError(f"{what}[{name!r}] has a negative diagonal: not positive semi-definite")
    return a


class _LinearView:
    """A kernel's rows-first (NNR) form as the ``(outputs, inputs)`` matrix its moments are over.

    The columns of the rows-first form are the kernel's inputs for a Dense or Conv kernel (a
    convolution's patches) and for a lookup table; ``DenseGeneral`` with several feature axes
    (attention's ``(D, heads, d)`` projections) has moments over its ``D`` inputs only
    (:func:`nncjax.quantize.gptq.input_moments`), and its outputs are all the other axes: rows are
    independent in GPTQ, so each ``(head, d)`` output is one row of ``D`` columns."""

    def __init__(self, x_full: np.ndarray, flax_shape: tuple[int, ...], axis: int, moments: Any) -> None:
        self.shape, self.flax_shape, self.axis = x_full.shape, tuple(flax_shape), axis
        self.input_axes = None  # leading Flax axes that are inputs, where the rows-first columns are not
        columns = math.prod(x_full.shape[1:])
        try:
            m = np.shape(moments)
        except (TypeError, ValueError):  # ragged: _moment_matrix names it
            m = ()
        n = m[0] if len(m) == 2 and m[0] == m[1] else columns
        if n != columns and axis == len(flax_shape) - 1:
            self.input_axes = next((a for a in range(1, len(flax_shape) - 1) if math.prod(flax_shape[:a]) == n), None)

    def matrix(self, t: np.ndarray) -> np.ndarray:
        """Rows-first ``t`` (the kernel's NNR shape) as ``(outputs, inputs)``."""
        if self.input_axes is None:
            return t.reshape(t.shape[0], -1)
        n = math.prod(self.flax_shape[:self.input_axes])
        return np.ascontiguousarray(from_rows_first(t, self.axis).reshape(n, -1).T)

    def rows_first(self, m: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`matrix`."""
        if self.input_axes is None:
            return m.reshape(self.shape)
        return to_rows_first(np.ascontiguousarray(m.T).reshape(self.flax_shape), self.axis)

    def row_scales(self, s: np.ndarray) -> np.ndarray:
        """The local scales ``s`` (one per NNR row, the kernel's last axis) of each matrix row."""
        if self.input_axes is None:
            return s
        return np.ascontiguousarray(np.broadcast_to(s, self.flax_shape[self.input_axes:]).reshape(-1))


def _coarsest_gptq(x: np.ndarray, h: np.ndarray, h_check: np.ndarray, s: np.ndarray, x_ref: np.ndarray, q0: int, *,
                   qpd: int, hi: int, max_offset: int, damp: float, act_order: bool,
                   dq: bool) -> tuple[int, np.ndarray] | None:
    """The coarsest QP in ``q0 .. q0 + max_offset`` (at most ``hi``) whose GPTQ reconstruction of ``x``
    (rows first, fitted on ``h``; on the DQ trellis if ``dq``) has a layer-output error on
    ``h_check`` within the reference reconstruction ``x_ref``'s, with that reconstruction; None when
    even ``q0``'s exceeds it. The errors are in the weights' units (row scales ``s`` multiplied back)."""
    s_rows = jnp.asarray(s)[:, None]

    def out_err(x_hat):
        return float(layer_output_error(s_rows * x, s_rows * x_hat, h_check))

    order, u = _gptq_factor(h, damp, act_order and not dq)  # shared by every QP tried
    x_dev = jnp.asarray(x)

    def gptq_at(q):
        step = jnp.full((x.shape[0],), qp_to_step(q, qpd), jnp.float32)
        x_hat = _gptq_trellis(x_dev, u, step) if dq else _gptq_quantize(x_dev, order, u, step)
        return np.asarray(x_hat[1], np.float32)

    budget = out_err(x_ref)
    x_g = gptq_at(q0)
    err0 = out_err(x_g)
    if not err0 <= budget:
        return None
    # error ~ step**2: it doubles every 2**qpd / 2 QPs; start at the predicted offset, step down
    guess = int(np.floor((1 << qpd) / 2 * np.log2(budget / err0))) if err0 > 0 else max_offset
    for q in range(min(q0 + min(guess, max_offset), hi), q0, -1):
        x_q = gptq_at(q)
        if out_err(x_q) <= budget:
            return q, x_q
    return q0, x_g


def with_error_feedback(params: Any, settings: RDSettings, moments: Mapping[str, Any], *,
                        check_moments: Mapping[str, Any] | None = None, damp: float = 0.01,
                        act_order: bool = True, max_offset: int | None = None, dq: bool | str = False,
                        progress: bool = True) -> tuple[Any, RDSettings]:
    """Trades each linear layer's quantizer for GPTQ at equal layer-output error and fewer bits.

    For every optimised tensor with moments ``H`` (:func:`nncjax.quantize.gptq.input_moments`:
    a Dense layer's inputs, a convolution's input patches; :func:`nncjax.sensitivity.row_moments`:
    what a lookup table's row errors cost at the output),
    the reference is what ``settings`` codes: ``W / s`` at its QP with the codec's quantizer (DQ
    unless ``settings.dq`` is False), output error ``e^T H e``. GPTQ
    (:func:`nncjax.quantize.gptq.quantize_gptq`, uniform, or on the DQ trellis with ``dq``) cancels
    most of that error across correlated inputs, so the same output error is reached with a coarser
    step: the coarsest QP (up to ``max_offset`` above the reference, default two octaves) whose GPTQ
    output error does not exceed the reference is taken, if the real coder then spends fewer bits
    on the tensor. Other tensors, local scales and QPs are kept.

    Args:
      params: the model parameters ``settings`` was optimised for (same names).
      settings: :func:`nncjax.optimize`'s result.
      moments: ``{name: (columns, columns)}``, the quadratic form of a row's error that GPTQ fits:
        for a Dense, DenseGeneral, Einsum, Conv or ConvTranspose kernel the second moments of its inputs
        (:func:`nncjax.quantize.gptq.input_moments`); for a lookup table (a token embedding) the
        output-side :func:`nncjax.sensitivity.row_moments`. The tensor's rows-first form
        (:func:`nncjax.rd_settings.rows_axis`; NNR layout ``(outputs, inputs, *kernel)`` for Flax
        kernels), flattened to rows, must have that many columns, or, for a Flax kernel with several
        output axes (a ``DenseGeneral`` of features ``(heads, d)``), as many as its leading input
        axes hold: each output ``(head, d)`` is then a row (uniform GPTQ only, as the DQ trellis
        runs along the codec's rows).
      check_moments: moments of *other* inputs (same names) on which the output errors are compared
        (default: ``moments``). GPTQ hides error in the directions its inputs rarely take, so an
        error budget checked on the inputs it was fitted to is optimistic; held-out inputs keep the
        substitution honest.
      damp, act_order: GPTQ's diagonal regularisation and column order
        (:func:`nncjax.quantize.gptq.quantize_gptq`; the DQ trellis always runs in column order).
        max_offset: largest QP increase tried.
      dq: False: uniform GPTQ (coded with ``dq_flag = 0``). True: GPTQ on the DQ trellis
        (``dq_flag = 1``) for every tensor the codec scans row by row (scaled ones, and any whose
        own layout is rows first), uniform GPTQ for the others. ``"auto"``: both, and each tensor
        keeps the one the real coder codes in fewer bits (the trellis wins on most MiniLM-L6
        kernels, 0.04-0.18 bit per weight at equal output error; its 36 Dense kernels take 21 s
        instead of 4 s on a 2-core CPU). The trellis path
        is the codec's for its raster scan (``scan_order=0``, as :meth:`RDSettings.encode_kwargs`
        encodes); a block scan would visit the levels in another order.
      progress: tqdm bar over the tensors.

    Returns:
      ``(params_gptq, settings_gptq)``: ``params`` with the substituted tensors replaced by their
      GPTQ reconstructions (so that :meth:`RDSettings.params_for_encoding` puts them exactly on the
      codec's grid; float32 where the tensor's own dtype, e.g. bfloat16, cannot hold them exactly),
      and ``settings`` with their new QPs, ``dq_overrides`` (False for uniform GPTQ, True for the
      trellis), and updated ``estimated_bits``. ``verify(params_gptq, settings_gptq)`` encodes and
      decodes them.

    Raises:
      InputError: ``settings`` not from :func:`nncjax.optimize` (or of another model), ``moments`` or
        ``check_moments`` not a mapping, naming a tensor that is not optimised, or holding a matrix of
        the wrong size, not real-valued, not finite or not positive semi-definite; a ``dq`` other than
        True, False and ``"auto"``.

    Example:
      >>> import nncjax, nncjax.models
      >>> from nncjax import verify
      >>> from nncjax.models.digits_mlp import load_digits_split
      >>> m = nncjax.models.get("digits_mlp"); x_calib = load_digits_split("train")[0][:256]
      >>> rd = nncjax.optimize(m.params, m.apply, x_calib, lam=3e-3, init="sensitivity", steps=0, progress=False)
      >>> h = nncjax.quantize.gptq.input_moments(m.apply, m.params, x_calib, progress=False)
      >>> p_g, rd_g = with_error_feedback(m.params, rd, h, progress=False)
      >>> verify(p_g, rd_g).nbytes < verify(m.params, rd).nbytes
      True
    """
    if not isinstance(settings, RDSettings):
        raise InputError("settings must be the RDSettings returned by nncjax.optimize")
    qpd = settings.qp_density
    _, hi = qp_limits(qpd)
    max_offset = 2 << qpd if max_offset is None else max_offset
    max_offset = check_int(max_offset, "max_offset", lo=0)
    progress = check_flag(progress, "progress")
    if not (isinstance(dq, (bool, np.bool_)) or (isinstance(dq, str) and dq == "auto")):
        raise InputError(f"dq must be True, False or 'auto', got {dq!r}")
    if not isinstance(moments, Mapping) or not isinstance(check_moments, (Mapping, type(None))):
        raise InputError(f"moments and check_moments must map tensor names to (columns, columns) arrays (check_moments "
                         f"may be None), got {type(moments).__name__} and {type(check_moments).__name__}")
    check_moments = check_moments or {}
    named = flatten_named(params)
    for what, m in (("moments", moments), ("check_moments", check_moments)):
        # a check_moments name that matches nothing would silently check on the fitted moments
        unknown = [n for n in m if n not in settings.qp_overrides or n not in named]
        if unknown:
            raise InputError(f"{what} name tensors that settings does not optimise: {unknown[:5]}")
    qps, dqs, bits = dict(settings.qp_overrides), dict(settings.dq_overrides), settings.estimated_bits
    tensor_bits = dict(settings.tensor_bits)
    overhead = qp_delta_bits(qpd)  # a tensor's QP delta: the same whichever QP it codes
    candidates = []
    # the real coder (numba, GIL released) codes candidates on the other cores while GPTQ goes on
    with ThreadPoolExecutor(max_workers=max(1, (os.cpu_count() or 2) - 1)) as coder:
        for name in tqdm(list(moments), desc="GPTQ", disable=not progress, leave=False):
            w = np.asarray(named[name], np.float32)
            if w.ndim < 2:
                raise InputError(f"moments[{name!r}]: error feedback needs a weight with inputs, {name!r} is {w.shape}")
            axis = rows_axis(name, w.ndim, settings.scale_axis)
            s = settings.row_scales(name, w.shape)
            x_full = to_rows_first(divide_rows(w, s, axis), axis)  # what the codec codes: NNR layout
            view = _LinearView(x_full, w.shape, axis, moments[name])
            x = view.matrix(x_full)  # (outputs, inputs); a conv's inputs are its patches
            h = _moment_matrix("moments", name, moments[name], x.shape)
            h_check = (_moment_matrix("check_moments", name, check_moments[name], x.shape) if name in check_moments
                       else h)
            q0, dq0 = qps[name], dqs.get(name, settings.dq)
            # encode codes a scaled weight rows first (W / s), any other in its own layout; DQ's
            # levels and the bits depend on the layout, so both come from the coded one
            scaled = name in settings.local_scales
            coded = x_full if scaled else w
            levels_ref, used = quantize_tensor(coded, q0, qp_density=qpd, dq=dq0)
            x_ref = reconstruct(levels_ref, used, qp_density=qpd).reshape(coded.shape)
            x_ref = view.matrix(x_ref if scaled else to_rows_first(x_ref, axis))
            # the trellis follows the codec's scan, which runs along these rows only in rows-first layouts
            rows_scan = (scaled or axis == 0) and view.input_axes is None
            kinds = (False,) if dq is False or not rows_scan else (True,) if dq is True else (False, True)
            if name in tensor_bits:  # optimize() coded it already
                bits_ref = Future()
                bits_ref.set_result(tensor_bits[name])
            else:
                bits_ref = coder.submit(lambda lv, dq: levels_bits(lv, dq=dq) + overhead, levels_ref, dq0)
            for trellis in kinds:
                found = _coarsest_gptq(x, h, h_check, view.row_scales(s), x_ref, q0, qpd=qpd, hi=hi,
                                       max_offset=max_offset, damp=damp, act_order=act_order, dq=trellis)
                if found is None:
                    continue
                q, x_g = found
                x_g = view.rows_first(x_g)
                # the real coder re-quantizes the reconstruction, which lies on its grid (or trellis path)
                bits_g = coder.submit(lambda a, q, t: code_tensor(a, q, qp_density=qpd, dq=t)[1] + overhead,
                                      x_g if scaled else from_rows_first(x_g, axis), q, trellis)
                candidates.append((name, q, trellis, x_g, s, axis, bits_ref, bits_g))

    best: dict[str, tuple] = {}  # per tensor, the candidate with the fewest bits below the reference's
    for name, q, trellis, x_g, s, axis, bits_ref, bits_g in candidates:
        bits_ref, bits_g = bits_ref.result(), bits_g.result()
        if bits_g < (best[name][-1] if name in best else bits_ref):  # best's bits are below bits_ref
            best[name] = (q, trellis, x_g, s, axis, bits_ref, bits_g)
    updates = {}
    for name, (q, trellis, x_g, s, axis, bits_ref, bits_g) in best.items():
        updates[name] = exact_cast(multiply_rows(from_rows_first(x_g, axis), s, axis), named[name])
        dq_old = dqs.get(name, settings.dq)
        if name in settings.local_scales and trellis != dq_old:  # its LS member shares the unit's dq_flag
            ls, ls_qp = np.asarray(s, np.float32), qps[name + LS_SUFFIX]
            bits += (code_tensor(ls, ls_qp, qp_density=qpd, dq=trellis)[1]
                     - code_tensor(ls, ls_qp, qp_density=qpd, dq=dq_old)[1])
        qps[name], dqs[name], tensor_bits[name] = q, trellis, bits_g
        bits += bits_g - bits_ref
    return (replace_named(params, {n: jnp.asarray(v) for n, v in updates.items()}),
            dataclasses.replace(settings, qp_overrides=qps, dq_overrides=dqs, estimated_bits=float(bits),
                                tensor_bits=tensor_bits))
