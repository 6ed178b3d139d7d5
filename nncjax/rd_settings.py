"""What a rate-distortion optimiser hands the codec: :class:`RDSettings` (per-tensor QPs, local
scales, DQ choices), the row layout local scales use (:func:`rows_axis`), and :func:`verify`, the
real encode -> bytes -> decode -> evaluate check of a result.

:func:`nncjax.optimize` produces the settings; :func:`nncjax.with_error_feedback`,
:func:`nncjax.with_fine_tuning` and :func:`nncjax.with_bias_correction` take them and return them
updated.

Example:
    >>> rd = nncjax.optimize(m.params, m.apply, x, lam=3e-3)                   # doctest: +SKIP
    >>> data = nncjax.encode(rd.params_for_encoding(m.params), **rd.encode_kwargs())   # doctest: +SKIP
    >>> verify(m.params, rd, lambda p: m.eval(p)["top1"]).nbytes == len(data)  # doctest: +SKIP
    True
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from nncjax.arguments import check_array_kind, check_int
from nncjax.coded_tensor import SCALING_SUFFIX
from nncjax.errors import InputError
from nncjax.pytree_names import flatten_named, is_kernel_name, unflatten_like
from nncjax.ready import cast_leaf
from nncjax.reduce.layout import flax_to_nnr_perm, nnr_to_flax_perm
from nncjax.tensor_policy import is_float_like

__all__ = ["LS_SUFFIX", "RDSettings", "VerifyResult", "rows_axis", "verify"]

#: Name suffix of a scaled tensor's local scales (the LS member of its block unit; NNCodec's name).
LS_SUFFIX = SCALING_SUFFIX


@dataclasses.dataclass(frozen=True)
class RDSettings:
    """What :func:`nncjax.optimize` found: per-tensor QPs and local scales, ready for :func:`nncjax.encode`.

    Attributes:
      qp_overrides: ``{name: int qp}`` for every optimised weight and every ``"<name>_scaling"``
        tensor; names as :func:`nncjax.pytree_names.flatten_named` gives them (``"params/fc1/kernel"``).
      local_scales: ``{name: float32 (rows,)}`` the decoded scales ``LS_hat`` (exact float32 values
        the decoder reconstructs); empty without ``learn_scales``.
      scale_axis: -1 (Flax: kernels scaled along their output axis, other tensors along axis 0) or 0
        (every tensor along axis 0); see :func:`rows_axis`.
      history: ``{"loss", "distortion", "rate_bits"}`` -> float64 ``(steps,)`` (training relaxation).
      estimated_bits: payload bits of all float tensors with the final settings, from the codec's
        quantizer and the real DeepCABAC coder (QP deltas included; unit headers, tensor names and
        integer tensors are not): the bitstream is this plus a few bytes per tensor.
      qp, qp_density, nonweight_qp, dq: the global encode settings used while optimising.
      dq_overrides: ``{name: False}`` for tensors coded without DQ (:func:`with_error_feedback`).
      tensor_bits: ``{name: bits}`` each optimised weight's share of ``estimated_bits`` (its payload
        and QP delta at its final settings; its LS tensor not included).

    Example:
      >>> data = nncjax.encode(rd.params_for_encoding(params), **rd.encode_kwargs())   # doctest: +SKIP
    """

    qp_overrides: dict[str, int]
    local_scales: dict[str, np.ndarray]
    scale_axis: int
    history: dict[str, np.ndarray]
    estimated_bits: float
    qp: int
    qp_density: int
    nonweight_qp: int
    dq: bool
    dq_overrides: dict[str, bool] = dataclasses.field(default_factory=dict)
    tensor_bits: dict[str, float] = dataclasses.field(default_factory=dict)

    def encode_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`nncjax.encode` reproducing these settings.

        >>> nncjax.encode(rd.params_for_encoding(p), **rd.encode_kwargs())      # doctest: +SKIP
        """
        self._check_fields()
        kw = {"qp": self.qp, "qp_density": self.qp_density, "nonweight_qp": self.nonweight_qp, "dq": self.dq,
              "qp_overrides": dict(self.qp_overrides)}
        if self.local_scales:
            kw["blocks"] = {name: {"ls": name + LS_SUFFIX} for name in self.local_scales}
        if self.dq_overrides:
            kw["dq_overrides"] = dict(self.dq_overrides)
        return kw

    def params_for_encoding(self, params: Any) -> dict[str, np.ndarray]:
        """Flat ``{name: array}`` to pass to :func:`nncjax.encode` with :meth:`encode_kwargs`: every leaf
        of ``params`` (in :func:`~nncjax.pytree_names.flatten_named` order); a scaled weight becomes
        ``W / s`` in NNR layout (rows first, float32) followed by its ``"<name>_scaling"`` tensor ``s``
        (shape ``(rows,)``); the two are written as one block unit.

        >>> flat = rd.params_for_encoding({"d": {"kernel": w}})                   # doctest: +SKIP
        >>> list(flat)                                                           # doctest: +SKIP
        ['d/kernel', 'd/kernel_scaling']
        """
        self._check_fields()
        named = flatten_named(params)
        missing = set(self.local_scales) - set(named)
        if missing:
            raise InputError(f"params lack the scaled tensors {sorted(missing)}")
        for n in self.local_scales:
            if self.scale_axis == 0 and is_kernel_name(n):
                # decode(like=) takes a block weight named like a Flax kernel to be in NNR layout
                raise InputError(f"{n!r} is named like a Flax kernel but scaled along axis 0: optimize Flax "
                                 "params with scale_axis=-1")
            if n + LS_SUFFIX in named:  # the scales would overwrite it, or it the scales
                raise InputError(f"params already hold a tensor {n + LS_SUFFIX!r}, the name of {n!r}'s local "
                                 "scales: rename it, or pass the model's params, not params_for_encoding's output")
        out: dict[str, np.ndarray] = {}
        for name, leaf in named.items():
            arr = np.asarray(leaf)
            if name in self.local_scales:
                if not is_float_like(arr.dtype):  # as floats an integer tensor would be coded lossily
                    raise InputError(f"settings scale {name!r}, a tensor of dtype {arr.dtype}: local scales apply to "
                                     "float tensors only (integer and bool tensors are coded losslessly)")
                if arr.ndim == 0:  # the codec's block weight needs rows
                    raise InputError(f"settings scale {name!r}, a 0-d tensor: local scales need a tensor with rows")
                s = self.row_scales(name, arr.shape)
                axis = rows_axis(name, arr.ndim, self.scale_axis)
                w = arr.astype(np.float32)
                with np.errstate(over="ignore"):
                    x = divide_rows(w, s, axis)
                if not np.all(np.isfinite(x)) and np.all(np.isfinite(w)):
                    raise InputError(f"{name!r} divided by its local scales (smallest |scale| "
                                     f"{float(np.min(np.abs(s))):.3g}) overflows float32: scales of another model?")
                out[name] = to_rows_first(x, axis)
                out[name + LS_SUFFIX] = s
            else:
                out[name] = arr
        return out

    def row_scales(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """Float32 ``(rows,)``: the local scales of tensor ``name`` of ``shape``, one per row along
        :func:`rows_axis` (ones where it has none).

        Raises:
          InputError: scales of another length than the tensor's rows (settings of another model), scales
            that are not real numbers, or are NaN, infinite or 0 (a row divided by them is lost).

        >>> rd = RDSettings({"d/kernel": -30}, {"d/kernel": np.array([1.0, 2.0])}, -1, {}, 0.0, -30, 2, -75, True)
        >>> rd.row_scales("d/kernel", (3, 2)).tolist(), rd.row_scales("d/bias", (2,)).tolist()
        ([1.0, 2.0], [1.0, 1.0])
        """
        self._check_fields()
        try:
            dims = tuple(shape)
        except TypeError:
            raise InputError(f"shape must be a tuple of integers, got {shape!r}") from None
        shape = tuple(check_int(d, f"shape {shape!r}: each dimension", lo=0) for d in dims)
        rows = shape[rows_axis(name, len(shape), self.scale_axis)] if shape else 1  # a scalar: one row
        if name not in self.local_scales:
            return np.ones(rows, np.float32)
        what = f"local_scales[{name!r}]"
        s = np.asarray(check_array_kind(self.local_scales[name], "iuf", f"{what} must be real numbers"), np.float32)
        if s.shape != (rows,):
            raise InputError(f"settings scale {name!r} with {s.shape} local scales, but {name!r} of shape {shape} "
                             f"has {rows} rows: settings of another model?")
        if not np.all(np.isfinite(s) & (s != 0)):
            raise InputError(f"{what} holds NaN, infinite or zero scales (a row divided by them is lost): "
                             f"{s[~(np.isfinite(s) & (s != 0))][:5].tolist()}")
        return s

    def restore(self, decoded: Mapping[str, Any], like: Any = None) -> Any:
        """Model params from :func:`nncjax.decode` output without ``like`` (flat ``{name: array}``,
        ready or ``raw=True``): applies the local scales where they are still separate and puts scaled
        Flax kernels back in Flax layout. With ``like`` (e.g. the original params) the result has its
        structure and dtypes, else it is a flat dict. ``nncjax.decode(data, like=params)`` gives the
        same model directly.

        >>> params_hat = rd.restore(nncjax.decode(data), like=params)             # doctest: +SKIP

        Raises:
          InputError: ``decoded`` lacks a scaled tensor or a leaf of ``like``, a scaled tensor or its
            scales do not fit each other, or a tensor does not fit ``like``'s leaf (shape, or a value
            its dtype cannot hold: as :func:`nncjax.decode` with ``like``).
        """
        self._check_fields()
        if not isinstance(decoded, Mapping):
            raise InputError(f"decoded must be nncjax.decode's flat {{name: array}} output, got "
                             f"{type(decoded).__name__}")
        flat = dict(decoded)
        for name in self.local_scales:
            if name not in flat:
                hint = ("; decode(data, like=...) already gives the model's params (local scales applied, "
                        "Flax layout): restore takes decode's flat output"
                        if any(isinstance(v, Mapping) for v in flat.values()) else "")
                raise InputError(f"decoded tensors lack the scaled tensor {name!r}{hint}")
            x = np.asarray(check_array_kind(flat[name], "iuf", f"decoded tensor {name!r} must be real"), np.float32)
            if name + LS_SUFFIX in flat:  # raw: the scales are still a tensor of their own
                ls = np.asarray(check_array_kind(flat.pop(name + LS_SUFFIX), "iuf",
                                                 f"decoded tensor {name + LS_SUFFIX!r} must be real"), np.float32)
                if x.ndim == 0 or ls.shape != x.shape[:1]:
                    raise InputError(f"decoded tensor {name!r} of shape {x.shape} (NNR layout, rows first) does not "
                                     f"fit its {ls.shape} local scales {name + LS_SUFFIX!r}")
                x = multiply_rows(x, ls, 0)
            flat[name] = from_rows_first(x, rows_axis(name, x.ndim, self.scale_axis))
        if like is None:
            return flat
        return unflatten_like(like, flat, cast_leaf)

    def _check_fields(self) -> None:
        """InputError for fields no method can use: hand-built settings of the wrong types."""
        for what in ("qp_overrides", "local_scales", "dq_overrides"):
            if not isinstance(getattr(self, what), Mapping):
                raise InputError(f"RDSettings.{what} must be a mapping {{tensor name: value}}, got "
                                 f"{type(getattr(self, what)).__name__}")
        bad = [n for n in self.local_scales if not isinstance(n, str)]
        if bad:
            raise InputError(f"RDSettings.local_scales keys must be tensor names (str), got {bad[:5]}")
        _check_scale_axis(self.scale_axis)


def _check_scale_axis(scale_axis: Any) -> int:
    """``scale_axis`` as an int after checking it is -1 (Flax) or 0 (NNR layout): any other axis
    would silently act as 0."""
    return check_int(scale_axis, "scale_axis (-1: Flax, 0: NNR layout)", lo=-1, hi=0)


def rows_axis(name: str, ndim: int, scale_axis: int = -1) -> int:
    """The axis of a tensor that local scales (NNR rows) run along.

    ``scale_axis=-1`` (Flax): a kernel (name ending in ``"kernel"``, ``ndim >= 2``) is scaled along
    its output (last) axis and coded transposed; any other tensor along axis 0. ``scale_axis=0``:
    axis 0 of every tensor (PyTorch / NNR layout).

    >>> rows_axis("params/fc1/kernel", 2), rows_axis("params/embed/embedding", 2), rows_axis("fc.weight", 2, 0)
    (1, 0, 0)
    """
    if not isinstance(name, str):
        raise InputError(f"name must be a tensor name (str), got {type(name).__name__} {name!r}")
    ndim = check_int(ndim, "ndim", lo=0)
    scale_axis = _check_scale_axis(scale_axis)
    if scale_axis == -1 and ndim >= 2 and is_kernel_name(name):
        return ndim - 1
    return 0


def to_rows_first(x: np.ndarray, axis: int) -> np.ndarray:
    """``x`` in NNR layout (rows first) when its rows run along ``axis != 0`` (a Flax kernel)."""
    return np.ascontiguousarray(np.transpose(x, flax_to_nnr_perm(x.ndim))) if axis else x


def from_rows_first(x: np.ndarray, axis: int) -> np.ndarray:
    """Inverse of :func:`to_rows_first`."""
    return np.ascontiguousarray(np.transpose(x, nnr_to_flax_perm(x.ndim))) if axis else x


def row_shape(ndim: int, axis: int) -> tuple[int, ...]:
    """Shape that broadcasts a ``(rows,)`` vector along ``axis`` of an ``ndim`` tensor."""
    ax = axis % ndim
    return tuple(-1 if i == ax else 1 for i in range(ndim))


def divide_rows(w: np.ndarray, s: np.ndarray, axis: int) -> np.ndarray:
    """``w / s`` row by row along ``axis`` (float32)."""
    return (w / s.reshape(row_shape(w.ndim, axis))).astype(np.float32)


def multiply_rows(w: np.ndarray, s: np.ndarray, axis: int) -> np.ndarray:
    """``w * s`` row by row along ``axis`` (float32)."""
    return (w * s.reshape(row_shape(w.ndim, axis))).astype(np.float32)


def exact_cast(x: np.ndarray, leaf: Any) -> np.ndarray:
    """Grid values ``x`` (float32, any shape) in the dtype of the parameter ``leaf`` they replace when
    that dtype holds every value exactly, else float32: rounded to bfloat16 or float16, values at fine
    steps leave the codec's grid, and the codec would code other levels than the ones chosen.

    >>> import ml_dtypes
    >>> exact_cast(np.array([0.5, -0.25], np.float32), np.zeros(2, ml_dtypes.bfloat16)).dtype.name
    'bfloat16'
    >>> exact_cast(np.array([1.00390625], np.float32), np.zeros(1, ml_dtypes.bfloat16)).dtype.name
    'float32'
    """
    cast = x.astype(np.asarray(leaf).dtype)
    return cast if np.array_equal(cast.astype(np.float32), x) else x


@dataclasses.dataclass(frozen=True)
class VerifyResult:
    """What :func:`verify` measured: ``nbytes`` (bitstream size), ``metric`` (``eval_fn``'s result),
    ``params`` (the decoded, restored model) and ``bitstream`` itself."""

    nbytes: int
    metric: Any
    params: Any
    bitstream: bytes


def verify(params: Any, settings: RDSettings, eval_fn: Callable[[Any], Any] | None = None,
           **encode_kwargs) -> VerifyResult:
    """Real check of ``settings``: :func:`nncjax.encode` -> bytes -> ``nncjax.decode(bytes, like=params)``
    (ready weights: local scales applied, Flax layout) -> ``eval_fn(params_hat)``.

    ``encode_kwargs`` override :meth:`RDSettings.encode_kwargs` (e.g. ``workers``, ``scan_order``).
    ``eval_fn`` may be None (``metric`` is then None).

    Example:
      >>> res = verify(m.params, rd, lambda p: m.eval(p)["top1"])                # doctest: +SKIP
      >>> res.nbytes, res.metric                                                 # doctest: +SKIP
    """
    from nncjax.codec import decode, encode
    if not isinstance(settings, RDSettings):
        raise InputError("settings must be the RDSettings returned by nncjax.optimize")
    if eval_fn is not None and not callable(eval_fn):
        raise InputError("eval_fn must be callable or None")
    known = set(inspect.signature(encode).parameters) - {"params"}
    unknown = sorted(set(encode_kwargs) - known)
    if unknown:
        raise InputError(f"verify passes encode_kwargs to nncjax.encode, which takes no {unknown}; "
                         f"it takes {sorted(known)}")
    blocks = encode_kwargs.get("blocks", {})
    for name in settings.local_scales if "blocks" in encode_kwargs else ():
        roles = blocks.get(name) if isinstance(blocks, Mapping) else None
        if not isinstance(roles, Mapping) or roles.get("ls") != name + LS_SUFFIX:
            # without its block unit, W / s would be decoded as the weight: wrong, silently so if square
            raise InputError(f"blocks must keep each scaled tensor's local scales: {name!r} needs "
                             f"{{'ls': {name + LS_SUFFIX!r}}} (settings.encode_kwargs()['blocks'])")
    kwargs = settings.encode_kwargs()
    kwargs.update(encode_kwargs)
    bitstream = encode(settings.params_for_encoding(params), **kwargs)
    params_hat = decode(bitstream, like=params, bn_pairs=None)
    return VerifyResult(len(bitstream), None if eval_fn is None else eval_fn(params_hat), params_hat, bitstream)
