"""The "BN folding + IOQ + LSA" encoder pipeline as one function: :func:`optimize_ioq`.

Stages (each one of the existing tools, in the order an NNR encoder applies them):

1. **Coding layout.** The Flax variables become a flat, ordered dict of the tensors to code
   (:class:`CodingLayout`): kernels in NNR layout (output rows first, :func:`nncjax.reduce.flax_to_nnr`),
   other leaves as they are. Every (layer, BatchNorm) pair is folded
   (:func:`nncjax.reduce.fold_batchnorm`) into ``W`` (unscaled), ``W_scaling`` (LS, per row) and the
   layer's bias ``BI``: four BN vectors become two. Models without BN pairs (MiniLM) skip folding.
2. **QP allocation.** One QP per weight tensor (ndim > 1) minimising ``D + lam * R_bits / n_weights``
   with ``D`` the output distortion on a small tuning set (relative MSE of the outputs, as
   :func:`nncjax.optimize.optimize` uses, so the two are comparable at equal ``lam``) and ``R`` the
   real DeepCABAC payload bits of the codec's own quantizer (DQ trellis) and coder.
   ``allocation="ioq"``: :func:`nncjax.ioq.ioq_initial_qps` then the greedy
   :func:`nncjax.ioq.ioq_search`. ``allocation="sensitivity"``: the closed-form allocation of
   :mod:`nncjax.sensitivity` on the folded tensors (``nncjax.optimize(init="sensitivity",
   steps=0)``), which also gives per-row steps: they are coded as local scales, merged into LS.
3. **LSA.** The weights are frozen at their decoded values; per-row scales and all biases are
   fine-tuned with optax on the same output-matching loss (:func:`nncjax.reduce.fit_local_scales`).
   The scales merge into LS (``LS = s * g``) for folded blocks; other kernels get a
   ``<name>_scaling`` tensor.

The result is coded with :func:`nncjax.encode` with per-tensor ``qp_overrides`` and ``blocks``: each
folded layer is one NNR_PT_BLOCK unit carrying ``W``, its local scales ``LS`` (``W_scaling``) and
``BI`` (cpt LS|BI), as the standard's batch-norm folding signals it. ``nncjax.decode(data,
like=variables)`` maps the decoded tensors back onto the model's own Flax structure
(:func:`nncjax.reduce.unfold_batchnorm` for BN layers) without the encoder's result object, so the
decoded model is evaluated by the unchanged ``apply``; :meth:`IOQResult.restore` does the same from
``decode(data, raw=True)``.

Example (a toy Dense -> BatchNorm -> ReLU -> Dense; ``nncjax.models.get("fashion_cnn")`` with
``bn_pairs=[(("conv1",), ("bn1",))]`` runs the same way, only slower):
    >>> import flax.linen as nn, nncjax
    >>> model = nn.Sequential([nn.Dense(32, use_bias=False), nn.BatchNorm(use_running_average=True), nn.relu,
    ...                        nn.Dense(4)])
    >>> x_tune = jax.random.normal(jax.random.PRNGKey(0), (128, 16))
    >>> variables = model.init(jax.random.PRNGKey(1), x_tune)
    >>> res = optimize_ioq(variables, model.apply, x_tune, lam=1e-3, base_qp=-30,
    ...                    bn_pairs=[(("layers_0",), ("layers_1",))])
    >>> data = nncjax.encode(res.tensors, **res.encode_kwargs())
    >>> variables_hat = nncjax.decode(data, like=variables)
    >>> res.encode_kwargs()["blocks"]["params/layers_0/kernel"]       # the folded layer: W, LS and BI
    {'ls': 'params/layers_0/kernel_scaling', 'bi': 'params/layers_0/bias'}
    >>> y = model.apply(variables, x_tune)
    >>> bool(jnp.mean((model.apply(variables_hat, x_tune) - y) ** 2) < 1e-2 * jnp.var(y))
    True
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nncjax.arguments import check_flag, check_int
from nncjax.coded_tensor import (
    SCALING_SUFFIX,
    code_tensor,
    codec_reconstruct,
    coded_tensor_bits,
)
from nncjax.distortion import check_finite_outputs, relative_output_mse
from nncjax.error_feedback import with_error_feedback
from nncjax.errors import InputError
from nncjax.ioq import ioq_initial_qps, ioq_search, qp_limits
from nncjax.optimize import check_lam, default_qp, optimize
from nncjax.reduce import (
    BNPair,
    FoldedBlock,
    block_names,
    find_bn_pairs,
    fit_local_scales,
    flax_to_nnr,
    fold_batchnorm,
    kernel_rows,
    named_leaves,
    nnr_to_flax,
    replace_named,
    unfold_batchnorm,
)
from nncjax.reduce._tree import default_weight_select
from nncjax.reduce.bnfold import as_bn_pairs
from nncjax.steps import check_qp_density

_ALLOCATIONS = ("ioq", "sensitivity")

__all__ = ["CodingLayout", "IOQResult", "code_tensor", "codec_reconstruct", "coded_tensor_bits", "optimize_ioq"]


# ------------------------------------------------------------------------------------------------
# coding layout: Flax variables <-> flat dict of coded tensors


@dataclasses.dataclass(frozen=True)
class CodingLayout:
    """How a Flax variable dict is coded as a flat, ordered dict of tensors, and back.

    Attributes:
      template: the model's variables (structure and dtypes only are used by :meth:`to_variables`).
      pairs: the folded (layer, BatchNorm) pairs (module paths inside ``params``).
      eps: the BatchNorm epsilon used for folding.
      entries: ordered ``(coded name, kind, source)``; kind is ``"block_w"`` / ``"block_ls"`` /
        ``"block_bi"`` (source: the block's weight name, relative to ``params``), ``"kernel"`` (a Flax
        kernel: stored in NNR layout when it has a scaling, so that its LS block's rows are its outputs;
        else as is, so that an unmarked plain tensor is never transposed), ``"scaling"`` (per-row scale
        of the ``"kernel"`` or ``"leaf"`` named by source), or ``"leaf"`` (any other leaf as is; source =
        its full variables path).

    Coded names are full variable paths (``"params/conv1/kernel"``); LS is ``"<weight>_scaling"``.

    Example:
      >>> lay = CodingLayout.build({"params": {"d": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}})
      >>> [e[:2] for e in lay.entries]
      [('params/d/bias', 'leaf'), ('params/d/kernel', 'kernel')]
      >>> lay.to_coded(lay.template)["params/d/kernel"].shape   # unscaled: as is
      (3, 2)
      >>> lay.with_scalings(["params/d/kernel"]).to_coded(lay.template)["params/d/kernel"].shape  # rows first
      (2, 3)
    """

    template: Any
    pairs: tuple[BNPair, ...]
    eps: float
    entries: tuple[tuple[str, str, str], ...]

    @staticmethod
    def build(variables: Mapping[str, Any], bn_pairs: Sequence | str | None = "auto", eps: float = 1e-5
              ) -> CodingLayout:
        """Layout of ``variables``. ``bn_pairs``: ``"auto"`` (:func:`nncjax.reduce.find_bn_pairs`:
        Flax's ``Conv_i``/``BatchNorm_i`` names), None (no folding) or explicit
        ``[(layer_path, bn_path), ...]`` module paths inside ``params``.

        >>> v = {"params": {"Conv_0": {"kernel": jnp.ones((3, 3, 1, 2)), "bias": jnp.zeros(2)},
        ...                 "BatchNorm_0": {"scale": jnp.array([1.0, 2.0]), "bias": jnp.zeros(2)}},
        ...      "batch_stats": {"BatchNorm_0": {"mean": jnp.zeros(2), "var": jnp.ones(2)}}}
        >>> lay = CodingLayout.build(v)                              # "auto": Conv_0 pairs with BatchNorm_0
        >>> lay.pairs
        (BNPair(layer=('Conv_0',), bn=('BatchNorm_0',)),)
        >>> [e[:2] for e in lay.entries]                            # four BN vectors become LS and BI
        [('params/Conv_0/kernel', 'block_w'), ('params/Conv_0/kernel_scaling', 'block_ls'),
         ('params/Conv_0/bias', 'block_bi')]
        >>> [e[1] for e in CodingLayout.build(v, bn_pairs=None).entries]   # no folding: every leaf as is
        ['leaf', 'leaf', 'leaf', 'leaf', 'leaf', 'kernel']
        """
        if not isinstance(variables, Mapping) or "params" not in variables:
            raise InputError("variables must be a Flax Linen variable dict with a 'params' entry (a flax.nnx "
                             "state goes through nncjax.optimize, which takes any pytree)")
        if bn_pairs == "auto":
            pairs = find_bn_pairs(variables["params"]) if "batch_stats" in variables else []
        elif bn_pairs is None:
            pairs = []
        else:
            pairs = as_bn_pairs(bn_pairs, "bn_pairs must be 'auto', None or [(layer_path, bn_path), ...]")
        entries: list[tuple[str, str, str]] = []
        consumed: set[str] = set()
        if pairs:
            folded = fold_batchnorm(variables, pairs, eps=eps)
            for wname in folded.blocks:
                names = block_names(wname)
                entries += [("params/" + wname, "block_w", wname),
                            ("params/" + wname + SCALING_SUFFIX, "block_ls", wname),
                            ("params/" + names["BI"], "block_bi", wname)]
            kept = {"params/" + k for k in folded.rest}
            consumed = {k for k in named_leaves(variables["params"])}
            consumed = {"params/" + k for k in consumed} - kept
            for p in pairs:
                consumed |= {"batch_stats/" + "/".join(p.bn) + "/" + k for k in ("mean", "var")}
        for name, leaf in named_leaves(variables).items():
            if name in consumed:
                continue
            kind = "kernel" if kernel_rows(name, leaf) and _is_float(leaf) else "leaf"
            entries.append((name, kind, name))
        return CodingLayout(variables, tuple(pairs), float(eps), tuple(entries))

    def with_scalings(self, names: Sequence[str]) -> CodingLayout:
        """This layout plus a ``"<name>_scaling"`` tensor after each named ``"kernel"`` entry (its
        rows are its outputs: it is then coded in NNR layout) or ``"leaf"`` entry with ``ndim >= 2``
        (its rows are axis 0, as coded).

        >>> v = {"params": {"Dense_0": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}}
        >>> lay = CodingLayout.build(v).with_scalings(["params/Dense_0/kernel", "params/Dense_0/bias"])
        >>> lay.entries[-1]                                          # the 1-D bias gets none
        ('params/Dense_0/kernel_scaling', 'scaling', 'params/Dense_0/kernel')
        >>> {k: x.shape for k, x in lay.to_coded(v).items()}        # kernel (in 3, out 2) now rows first
        {'params/Dense_0/bias': (2,), 'params/Dense_0/kernel': (2, 3), 'params/Dense_0/kernel_scaling': (2,)}
        """
        if isinstance(names, (str, bytes)) or not isinstance(names, Iterable):  # a string matched substrings
            raise InputError(f"names must be a list of tensor names, got {names!r}")
        names = set(names)
        unknown = names - {e[0] for e in self.entries}
        if unknown:
            raise InputError(f"with_scalings: {sorted(map(str, unknown))[:5]} are not tensors of this layout")
        leaves = named_leaves(self.template)
        out = []
        for e in self.entries:
            out.append(e)
            if e[0] in names and e[1] in ("kernel", "leaf") and np.ndim(leaves[e[2]]) >= 2:
                out.append((e[0] + SCALING_SUFFIX, "scaling", e[0]))
        return dataclasses.replace(self, entries=tuple(out))

    def blocks(self) -> dict[str, dict[str, str]]:
        """:func:`nncjax.encode`'s ``blocks``: each folded layer's weight with its LS and BI, and each
        scaled kernel with its LS, so they are written as NNR_PT_BLOCK units (cpt LS|BI, or LS).

        >>> v = {"params": {"Conv_0": {"kernel": jnp.ones((3, 3, 1, 2)), "bias": jnp.zeros(2)},
        ...                 "BatchNorm_0": {"scale": jnp.array([1.0, 2.0]), "bias": jnp.zeros(2)}},
        ...      "batch_stats": {"BatchNorm_0": {"mean": jnp.zeros(2), "var": jnp.ones(2)}}}
        >>> v["params"]["Dense_0"] = {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros(4)}
        >>> CodingLayout.build(v).with_scalings(["params/Dense_0/kernel"]).blocks()
        {'params/Conv_0/kernel': {'ls': 'params/Conv_0/kernel_scaling', 'bi': 'params/Conv_0/bias'},
         'params/Dense_0/kernel': {'ls': 'params/Dense_0/kernel_scaling'}}
        """
        out: dict[str, dict[str, str]] = {}
        for name, kind, src in self.entries:
            if kind in ("block_ls", "block_bi"):
                out.setdefault("params/" + src, {})[kind[-2:]] = name
            elif kind == "scaling":
                out.setdefault(src, {})["ls"] = name
        return out

    def to_coded(self, variables: Mapping[str, Any]) -> dict[str, jax.Array]:
        """``variables`` -> ``{coded name: array}`` in entry order (scalings start at 1).

        Folded and scaled kernels come in NNR layout, ``(out, in, *kernel)``; LS and BI are ``(out,)``.

        >>> v = {"params": {"Conv_0": {"kernel": jnp.ones((3, 3, 1, 2)), "bias": jnp.zeros(2)},
        ...                 "BatchNorm_0": {"scale": jnp.array([1.0, 2.0]), "bias": jnp.zeros(2)}},
        ...      "batch_stats": {"BatchNorm_0": {"mean": jnp.zeros(2), "var": jnp.ones(2)}}}
        >>> c = CodingLayout.build(v, eps=0.0).to_coded(v)
        >>> {k: x.shape for k, x in c.items()}                      # kernel (3, 3, 1, 2) rows first
        {'params/Conv_0/kernel': (2, 1, 3, 3), 'params/Conv_0/kernel_scaling': (2,), 'params/Conv_0/bias': (2,)}
        >>> c["params/Conv_0/kernel_scaling"].tolist()             # LS = BN gain, scale / sqrt(var + eps)
        [1.0, 2.0]
        """
        leaves = named_leaves(variables)
        blocks = fold_batchnorm(variables, self.pairs, eps=self.eps).blocks if self.pairs else {}
        scaled = self._scaled_kernels()
        out: dict[str, jax.Array] = {}
        for name, kind, src in self.entries:
            if kind.startswith("block_"):
                blk = blocks[src]
                out[name] = {"block_w": blk.w, "block_ls": blk.ls, "block_bi": blk.bi}[kind]
            elif kind == "kernel" and name in scaled:
                out[name] = flax_to_nnr(jnp.asarray(leaves[src]))
            elif kind == "scaling":
                axis = -1 if self._is_kernel(src) else 0
                out[name] = jnp.ones((np.shape(leaves[src])[axis],), jnp.float32)
            else:
                out[name] = jnp.asarray(leaves[src])
        return out

    def _scaled_kernels(self) -> set[str]:
        return {src for _, kind, src in self.entries if kind == "scaling" and self._is_kernel(src)}

    def _is_kernel(self, name: str) -> bool:
        return any(n == name and kind == "kernel" for n, kind, _ in self.entries)

    def to_variables(self, coded: Mapping[str, Any]) -> Any:
        """``{coded name: array}`` -> Flax variables computing the coded model. Pure and jit-able.

        Folded blocks: ``unfold_batchnorm`` (BN scale = LS, shift = BI, mean 0, unit variance);
        scaled kernels: rows multiplied by their ``_scaling``, back in Flax layout; scaled leaves:
        rows (axis 0) multiplied by theirs.

        >>> v = {"params": {"Dense_0": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}}
        >>> lay = CodingLayout.build(v).with_scalings(["params/Dense_0/kernel"])
        >>> c = lay.to_coded(v)
        >>> jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), lay.to_variables(c), v)   # round trip
        {'params': {'Dense_0': {'bias': True, 'kernel': True}}}
        >>> c["params/Dense_0/kernel_scaling"] = jnp.array([2.0, 3.0])   # scale the 2 output rows
        >>> lay.to_variables(c)["params"]["Dense_0"]["kernel"].tolist()  # Flax layout (in 3, out 2)
        [[2.0, 3.0], [2.0, 3.0], [2.0, 3.0]]
        """
        missing = [e[0] for e in self.entries if e[0] not in coded]
        if missing:
            raise InputError(f"coded tensors lack {missing[:5]}")
        scal = {src: coded[name] for name, kind, src in self.entries if kind == "scaling"}
        blocks: dict[str, dict[str, Any]] = {}
        updates: dict[str, Any] = {}
        for name, kind, src in self.entries:
            x = jnp.asarray(coded[name])
            if kind.startswith("block_"):
                blocks.setdefault(src, {})[kind[6:]] = x
            elif kind in ("kernel", "leaf") and src in scal:
                x = x * jnp.asarray(scal[src], x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
                updates[src] = nnr_to_flax(x) if kind == "kernel" else x
            elif kind in ("leaf", "kernel"):
                updates[src] = x
        tmpl = named_leaves(self.template)
        updates = {k: v.astype(np.asarray(tmpl[k]).dtype).reshape(np.shape(tmpl[k])) for k, v in updates.items()}
        variables = self.template
        if blocks:
            fb = {w: FoldedBlock(b["w"], b["ls"], b["bi"]) for w, b in blocks.items()}
            in_params = {k[len("params/"):]: v for k, v in updates.items() if k.startswith("params/")}
            variables = unfold_batchnorm(self.template, fb, self.pairs, eps=self.eps, rest=in_params)
            updates = {k: v for k, v in updates.items() if not k.startswith("params/")}
        return replace_named(variables, updates)


# ------------------------------------------------------------------------------------------------
# result


@dataclasses.dataclass(frozen=True)
class IOQResult:
    """What :func:`optimize_ioq` produced.

    Attributes:
      tensors: ``{coded name: np.ndarray}`` to pass to :func:`nncjax.encode`, in coding order: float32,
        except integer and bool leaves, which keep their dtype (the codec codes them losslessly).
      qp_overrides: ``{coded name: qp}`` for every float tensor.
      qp, qp_density, nonweight_qp, dq: the global codec settings.
      dq_overrides: ``{weight: False}`` for the kernels coded with GPTQ (``moments``); their block
        members follow them.
      layout: the :class:`CodingLayout` (maps decoded tensors back to the model).
      lam: the rate price used (per bit per weight).
      wall_s: ``{"fold", "alloc", "lsa", "total"}`` seconds spent in each stage.
      history: ``{"weight_qps": {name: qp}, "d_alloc": D after the QP allocation, "d_lsa": D after LSA (tuning set,
        scales quantized), "lsa_kept": whether LSA's scales and biases were kept (only where they lowered D;
        else ``tensors`` are the allocation's and ``d_lsa == d_alloc``), "lsa_losses": (steps,)}``.

    Example:
      >>> import nncjax.models
      >>> from nncjax.models.digits_mlp import load_digits_split
      >>> m = nncjax.models.get("digits_mlp"); x_tune = load_digits_split("train")[0][:256]
      >>> res = optimize_ioq(m.params, m.apply, x_tune, lam=1e-3, base_qp=-30)
      >>> data = nncjax.encode(res.tensors, **res.encode_kwargs())
      >>> variables_hat = res.restore(nncjax.decode(data, raw=True))
      >>> m.eval(variables_hat)["top1"] > 0.95, res.history["d_lsa"] <= res.history["d_alloc"]
      (True, True)
    """

    tensors: dict[str, np.ndarray]
    qp_overrides: dict[str, int]
    qp: int
    qp_density: int
    nonweight_qp: int
    dq: bool
    layout: CodingLayout
    lam: float
    wall_s: dict[str, float]
    history: dict[str, Any]
    dq_overrides: dict[str, bool] = dataclasses.field(default_factory=dict)

    def encode_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`nncjax.encode` for :attr:`tensors`.

        A hand-made result (:func:`optimize_ioq` makes real ones) of a scaled Dense kernel:

        >>> import nncjax
        >>> v = {"params": {"Dense_0": {"kernel": jnp.arange(6.0).reshape(3, 2), "bias": jnp.array([0.5, -0.25])}}}
        >>> lay = CodingLayout.build(v).with_scalings(["params/Dense_0/kernel"])
        >>> res = IOQResult(tensors={k: np.asarray(x) for k, x in lay.to_coded(v).items()}, layout=lay,
        ...                 qp_overrides={"params/Dense_0/kernel": -36}, qp=-32, qp_density=2, nonweight_qp=-75,
        ...                 dq=True, lam=0.0, wall_s={}, history={})
        >>> res.encode_kwargs()
        {'qp': -32, 'qp_density': 2, 'nonweight_qp': -75, 'dq': True, 'qp_overrides': {'params/Dense_0/kernel': -36},
         'blocks': {'params/Dense_0/kernel': {'ls': 'params/Dense_0/kernel_scaling'}}}
        >>> data = nncjax.encode(res.tensors, **res.encode_kwargs())
        >>> jax.tree.map(lambda a, b: bool(np.allclose(a, b, atol=1e-4)), res.restore(nncjax.decode(data, raw=True)), v)
        {'params': {'Dense_0': {'bias': True, 'kernel': True}}}
        """
        kw = {"qp": self.qp, "qp_density": self.qp_density, "nonweight_qp": self.nonweight_qp, "dq": self.dq,
              "qp_overrides": dict(self.qp_overrides)}
        if self.dq_overrides:
            kw["dq_overrides"] = dict(self.dq_overrides)
        blocks = self.layout.blocks()
        if blocks:
            kw["blocks"] = blocks
        return kw

    def restore(self, decoded: Mapping[str, Any]) -> Any:
        """Flax variables of the model from flat :func:`nncjax.decode` output ``{name: array}``.

        From ``decode(data, raw=True)`` (LS tensors present) the result is exactly what
        ``decode(data, like=variables)`` gives without this object. From ``decode(data)`` (LS already
        multiplied into the kernels and dropped) LS counts as 1, which computes the same model up to
        float rounding (BN scales are 1, the kernels carry LS).

        A hand-made result (as in :meth:`encode_kwargs`; :func:`optimize_ioq` makes real ones):

        >>> import nncjax
        >>> v = {"params": {"Dense_0": {"kernel": jnp.arange(6.0).reshape(3, 2), "bias": jnp.array([0.5, -0.25])}}}
        >>> lay = CodingLayout.build(v).with_scalings(["params/Dense_0/kernel"])
        >>> res = IOQResult(tensors={k: np.asarray(x) for k, x in lay.to_coded(v).items()}, layout=lay,
        ...                 qp_overrides={"params/Dense_0/kernel": -20}, qp=-32, qp_density=2, nonweight_qp=-75,
        ...                 dq=True, lam=0.0, wall_s={}, history={})
        >>> data = nncjax.encode(res.tensors, **res.encode_kwargs())
        >>> v_hat = res.restore(nncjax.decode(data, raw=True))
        >>> jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), v_hat, nncjax.decode(data, like=v))   # exactly
        {'params': {'Dense_0': {'bias': True, 'kernel': True}}}
        """
        coded = {k: jnp.asarray(v) for k, v in decoded.items()}
        ls = [n for n, kind, _ in self.layout.entries if kind in ("block_ls", "scaling")]
        if ls and not any(n in coded for n in ls):
            for n in ls:  # an LS tensor is named "<weight>_scaling"
                w = n[: -len(SCALING_SUFFIX)]
                if w in coded:
                    coded[n] = jnp.ones((coded[w].shape[0],), jnp.float32)
        return jax.device_get(self.layout.to_variables(coded))


# ------------------------------------------------------------------------------------------------
# the pipeline


def _is_float(x: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def optimize_ioq(
    variables: Mapping[str, Any],
    apply_fn: Callable[[Any, Any], Any],
    data: Any,
    *,
    lam: float,
    allocation: str = "ioq",
    base_qp: int | None = None,
    qp_density: int = 2,
    nonweight_qp: int | None = None,
    ls_qp: int | None = None,
    dq: bool = True,
    bn_pairs: Sequence | str | None = "auto",
    eps: float = 1e-5,
    offsets: Sequence[int] = (-4, -2, -1, 1, 2, 4),
    rounds: int = 2,
    probes: int = 4,
    max_scale_ratio: float = 4.0,
    moments: Mapping[str, Any] | None = None,
    check_moments: Mapping[str, Any] | None = None,
    lsa_steps: int = 200,
    lsa_optimizer: optax.GradientTransformation | None = None,
    progress: bool = False,
) -> IOQResult:
    """BN folding, a per-tensor QP allocation and LSA (module docstring) for a Flax model; returns what to encode.

    Args:
      variables: Flax variables ``{"params": ..., "batch_stats": ...}`` (float32).
      apply_fn: ``apply_fn(variables, batch) -> outputs`` (pytree of arrays), jit-able.
      data: tuning data: one batch or a list of batches (passed to ``apply_fn`` as is). ``D`` is the
        relative output MSE against the original model, averaged over the batches; LSA cycles them.
      lam: rate price per bit per weight (``D + lam * R_bits / n_weights``, as :func:`nncjax.optimize`).
      allocation: how stage 2 chooses the weights' QPs. ``"ioq"``: IOQ's closed-form start and greedy
        search over ``offsets`` (``rounds`` passes). ``"sensitivity"``: the closed-form allocation of
        :func:`nncjax.optimize.optimize` with ``init="sensitivity", steps=0`` on the folded tensors
        (per-tensor QPs and per-row scales from Gauss-Newton sensitivities, ``probes`` probes per
        batch, row steps within ``max_scale_ratio`` of their tensor's; the scales merge into LS), in
        a fraction of IOQ's time; needs ``lam > 0``.
      base_qp: starting QP of the weights (IOQ's closed-form spread/size offsets are added to it).
      qp_density, dq: codec settings. nonweight_qp: QP of 1-D tensors (biases, BI, LayerNorm).
        Defaults of ``base_qp`` and ``nonweight_qp``: -32 and -75 at ``qp_density=2`` (steps 2**-8
        and 2**-18.75), the QPs of those steps at another density (:func:`nncjax.steps.equivalent_qp`).
      ls_qp: QP of the LS / scaling tensors (default ``nonweight_qp``).
      bn_pairs: ``"auto"``, None, or explicit ``[(layer_path, bn_path)]`` (see :class:`CodingLayout`).
        ``"auto"`` keeps only the ``Conv_i``/``BatchNorm_i`` pairs (indices without a partner are left
        alone) where the BatchNorm alone reads the layer's output, as it is, and reads nothing else
        (checked with a forward-mode derivative of ``apply_fn`` on the first batch): folding any
        other pair would change the model.
      eps: BatchNorm epsilon of the model.
      offsets, rounds: IOQ greedy search moves (:func:`nncjax.ioq.ioq_search`).
      probes, max_scale_ratio: of the sensitivity allocation.
      moments, check_moments: with ``allocation="sensitivity"``, the kernels' input moments
        (:func:`nncjax.quantize.gptq.input_moments`; names as the variables', e.g.
        ``"params/layer_0/output/kernel"``): each of those kernels then switches to GPTQ without DQ
        where that saves bits at equal layer-output error (:func:`nncjax.with_error_feedback`,
        the error checked on ``check_moments``), before LSA.
      lsa_steps: optax steps of LSA (0 disables it). lsa_optimizer: default ``optax.adam(1e-3)``.
      progress: tqdm bars.

    Returns:
      :class:`IOQResult` (``tensors``, ``qp_overrides``, ``restore``, ``wall_s``, ``history``).

    Raises:
      InputError: bad arguments (``lam``, QPs, ``allocation``, ``moments`` that are not mappings, or as
        :func:`nncjax.with_error_feedback` refuses them); NaN or Inf in the model's outputs on a batch.

    Integer and bool leaves are coded losslessly as they are (no QP); LSA's scales and biases are kept
    only where they lower ``D`` on ``data`` (``history["lsa_kept"]``).

    Example:
      >>> import nncjax.models
      >>> from nncjax.models.digits_mlp import load_digits_split
      >>> m = nncjax.models.get("digits_mlp"); x_tune = load_digits_split("train")[0][:256]
      >>> res = optimize_ioq(m.params, m.apply, x_tune, lam=1e-3, base_qp=-30)
      >>> variables_hat = nncjax.decode(nncjax.encode(res.tensors, **res.encode_kwargs()), like=m.params)
      >>> m.eval(variables_hat)["top1"] > 0.95, sorted(res.history["weight_qps"])
      (True, ['params/fc1/kernel', 'params/fc2/kernel'])
    """
    lam = check_lam(lam)
    dq = check_flag(dq, "dq")
    if allocation not in _ALLOCATIONS:
        raise InputError(f"allocation must be one of {_ALLOCATIONS}, got {allocation!r}")
    if allocation == "sensitivity" and not lam > 0:
        raise InputError("allocation='sensitivity' needs lam > 0")
    if not all(m is None or isinstance(m, Mapping) for m in (moments, check_moments)):
        raise InputError(f"moments and check_moments must map tensor names to (columns, columns) arrays or be None, "
                         f"got {type(moments).__name__} and {type(check_moments).__name__}")
    if allocation != "sensitivity" and (moments or check_moments):
        raise InputError("moments (GPTQ) need allocation='sensitivity'")
    if check_moments and not moments:  # held-out moments alone would silently leave GPTQ out
        raise InputError("check_moments without moments: GPTQ needs the moments it fits (moments=)")
    qpd = check_qp_density(qp_density)
    lo, hi = qp_limits(qpd)
    base_qp = default_qp("base_qp", qpd) if base_qp is None else base_qp
    nonweight_qp = default_qp("nonweight_qp", qpd) if nonweight_qp is None else nonweight_qp
    base_qp = check_int(base_qp, "base_qp", lo=lo, hi=hi)
    nonweight_qp = check_int(nonweight_qp, "nonweight_qp", lo=lo, hi=hi)
    ls_qp = nonweight_qp if ls_qp is None else check_int(ls_qp, "ls_qp (or None)", lo=lo, hi=hi)
    progress = check_flag(progress, "progress")
    batches = list(data) if isinstance(data, list) else [data]
    if not batches:
        raise InputError("data must hold at least one batch")
    t_start = time.perf_counter()

    # 1. coding layout (BN folding); kernels are coded rows first with a scaling when anything
    # scales their rows
    if isinstance(bn_pairs, str) and bn_pairs == "auto" and isinstance(variables, Mapping) \
            and "batch_stats" in variables and "params" in variables:
        bn_pairs = _feeding_pairs(find_bn_pairs(variables["params"], strict=False), apply_fn, variables,
                                  batches[0])
    layout = CodingLayout.build(variables, bn_pairs, eps)
    kernels = [n for n, kind, _ in layout.entries if kind == "kernel"]
    if lsa_steps or allocation == "sensitivity":
        layout = layout.with_scalings(kernels)
    scaled = [n for n, kind, _ in layout.entries if kind in ("kernel", "block_w")] if lsa_steps else []
    leaves = named_leaves(variables)
    weights = [n for n, kind, _ in layout.entries if kind in ("kernel", "block_w")
               or (kind == "leaf" and default_weight_select(n, leaves[n]) and _is_float(leaves[n]))]
    t_fold = time.perf_counter()

    refs = [jax.jit(apply_fn)(variables, b) for b in batches]
    check_finite_outputs(refs, distortion="output")

    def apply_coded(c, batch):
        return apply_fn(layout.to_variables(c), batch)

    @jax.jit
    def distortion_one(c, batch, ref):
        return relative_output_mse(apply_coded(c, batch), ref)

    def distortion(c: Mapping[str, Any]) -> float:
        c = {k: jnp.asarray(v) for k, v in c.items()}
        return float(np.mean([float(distortion_one(c, b, r)) for b, r in zip(batches, refs)]))

    # 2. per-tensor QPs of the weights; 1-D tensors fixed at their QPs
    dq_overrides: dict[str, bool] = {}
    if allocation == "ioq":
        tensors, qps, hat = _ioq_stage(layout.to_coded(variables), weights, _fixed_qps(layout, weights, nonweight_qp,
                                                                                       ls_qp),
                                       distortion, lam, base_qp, qpd, dq, offsets, rounds, progress)
    else:
        layout, tensors, qps, hat, dq_overrides = _sensitivity_stage(
            layout, variables, apply_coded, batches, weights, lam, base_qp, qpd, dq, nonweight_qp, probes,
            max_scale_ratio, moments, check_moments)
    # the fixed (1-D) tensors as decoded: a block's members share its weight's dq_flag
    unit_dq = {n: dq_overrides.get(w, dq) for w, roles in layout.blocks().items() for n in [w, *roles.values()]}
    for n, q in _fixed_qps(layout, weights, nonweight_qp, ls_qp).items():
        if _is_float(tensors[n]):
            qps[n], hat[n] = q, codec_reconstruct(tensors[n], q, qp_density=qpd, dq=unit_dq.get(n, dq))
        else:
            hat[n] = tensors[n]
    d_alloc = distortion(hat)
    t_alloc = time.perf_counter()

    # 3. LSA: weights frozen at their decoded values; per-row scales and biases (1-D "bias" leaves,
    # folded BI included) trained on the output-matching loss; the scales multiply the LS tensors
    losses = np.zeros((0,))
    d_lsa, lsa_kept = d_alloc, False
    if lsa_steps:
        allocated = dict(tensors)
        base = {n: jnp.asarray(hat[n]) for n in tensors}
        row_scales = {n: jnp.ones((tensors[n].shape[0],), jnp.float32) for n in scaled}
        pairs_ = list(zip(batches, refs))

        def loss_fn(c, br):
            return relative_output_mse(apply_coded(c, br[0]), br[1])

        res = fit_local_scales(loss_fn, base, row_scales, itertools.cycle(pairs_),
                               lsa_optimizer or optax.adam(1e-3), steps=lsa_steps, progress=progress,
                               train_biases=True, axis=0)
        losses = np.asarray(res.losses)
        trained = {k: np.asarray(v, np.float32) for k, v in res.params.items()}
        for n, kind, src in layout.entries:
            w = "params/" + src if kind == "block_ls" else src
            if kind in ("scaling", "block_ls") and w in res.scales:
                tensors[n] = (tensors[n] * np.asarray(res.scales[w], np.float32)).astype(np.float32)
            elif tensors[n].ndim == 1 and n.rsplit("/", 1)[-1] == "bias":
                tensors[n] = trained[n]
        d_lsa = distortion({n: (codec_reconstruct(tensors[n], qps[n], qp_density=qpd, dq=unit_dq.get(n, dq))
                                if n in qps and n not in weights else hat[n]) for n in tensors})
        # Adam's fixed step can wreck biases far smaller than it (or the tuning data mislead it): the
        # allocation is returned as it was unless LSA lowered D
        lsa_kept = d_lsa < d_alloc
        if not lsa_kept:
            tensors, d_lsa = allocated, d_alloc
    t_end = time.perf_counter()
    nw = {n: int(q) for n, q in qps.items()}
    return IOQResult(
        tensors=tensors, qp_overrides=nw, qp=int(base_qp), qp_density=qpd, nonweight_qp=int(nonweight_qp),
        dq=dq, layout=layout, lam=float(lam),
        wall_s={"fold": t_fold - t_start, "alloc": t_alloc - t_fold, "lsa": t_end - t_alloc,
                "total": t_end - t_start},
        history={"weight_qps": {n: nw[n] for n in weights}, "d_alloc": d_alloc, "d_lsa": d_lsa,
                 "lsa_kept": lsa_kept, "lsa_losses": losses},
        dq_overrides=dq_overrides,
    )


def _feeding_pairs(pairs: list[BNPair], apply_fn: Callable, variables: Any, batch: Any) -> list[BNPair]:
    """``pairs`` less those a fold would change the model of: the BatchNorm must be the only reader of
    its layer's output, and read nothing else. Flax names pair ``Conv_i`` with ``BatchNorm_i`` in a
    pre-activation block too (BatchNorm before the convolution), and a layer's output may also feed a
    skip connection or the layer or BatchNorm be called twice; folding moves the layer's bias (and LS)
    where those other uses do not see it. Checked by one forward-mode derivative on the first batch:
    adding ``d`` to the layer's outputs and subtracting it from the BatchNorm's inputs leaves the
    model's outputs exactly unchanged (tangent exactly 0) only then. Pairs the trace cannot see
    (layers behind a nested ``jax.jit``) are kept."""
    if not pairs:
        return pairs
    import flax.linen as nn

    from nncjax._layer_stats import unwrap_jit

    sign = {p.layer: (i, 1) for i, p in enumerate(pairs)} | {p.bn: (i, -1) for i, p in enumerate(pairs)}
    fn = unwrap_jit(apply_fn)

    def shifted(d):
        def intercept(next_fun, args, kwargs, context):
            hit = sign.get(tuple(context.module.path)) if context.method_name == "__call__" else None
            if hit is None:
                return next_fun(*args, **kwargs)
            i, s = hit
            if s > 0:
                y = next_fun(*args, **kwargs)
                return y + d[i].astype(y.dtype)
            if not args:  # an input passed by keyword is not shifted: the pair counts as not feeding
                return next_fun(*args, **kwargs)
            return next_fun(args[0] - d[i].astype(args[0].dtype), *args[1:], **kwargs)

        with nn.intercept_methods(intercept):
            return fn(variables, batch)

    @jax.jit
    def leaks(t):
        out = jax.jvp(shifted, (jnp.zeros(len(pairs), jnp.float32),), (t,))[1]
        return jnp.any(jnp.stack([jnp.any(x != 0) for x in jax.tree.leaves(out)
                                  if jnp.issubdtype(x.dtype, jnp.inexact)] or [jnp.bool_(False)]))

    if not bool(leaks(jnp.ones(len(pairs), jnp.float32))):  # the usual case: one pass for every pair
        return pairs
    return [p for i, p in enumerate(pairs) if not bool(leaks(jnp.zeros(len(pairs), jnp.float32).at[i].set(1.0)))]


def _fixed_qps(layout: CodingLayout, weights: list[str], nonweight_qp: int, ls_qp: int) -> dict[str, int]:
    """QPs of the tensors no allocation searches: LS / scalings at ``ls_qp``, the rest at ``nonweight_qp``."""
    return {n: (ls_qp if kind in ("block_ls", "scaling") else nonweight_qp)
            for n, kind, _ in layout.entries if n not in weights}


def _ioq_stage(coded: Mapping[str, Any], weights: list[str], fixed: dict[str, int], distortion: Callable,
               lam: float, base_qp: int, qpd: int, dq: bool, offsets: Sequence[int], rounds: int, progress: bool):
    """IOQ's QPs: ``(tensors to code, {name: qp}, {name: decoded})`` (``fixed`` tensors at their QPs)."""
    tensors = {k: np.asarray(v, np.float32) if _is_float(v) else np.asarray(v) for k, v in coded.items()}
    n_weights = sum(tensors[n].size for n in weights)
    cache: dict[tuple[str, int], tuple[np.ndarray, int]] = {}
    by_id = {id(v): k for k, v in tensors.items()}

    def coded_at(name: str, qp: int) -> tuple[np.ndarray, int]:
        if (name, qp) not in cache:
            x = tensors[name]
            cache[(name, qp)] = (code_tensor(x, qp, qp_density=qpd, dq=dq) if name in weights
                                 else (codec_reconstruct(x, qp, qp_density=qpd, dq=dq), 0))
        return cache[(name, qp)]

    def quantize_fn(w, qp):
        return jnp.asarray(coded_at(by_id[id(w)], int(qp))[0])

    def rate_bits(name, w, qp):
        return float(coded_at(name, int(qp))[1])

    init = ioq_initial_qps({n: tensors[n] for n in weights}, int(base_qp), qp_density=qpd)
    init.update({n: q for n, q in fixed.items() if _is_float(tensors[n])})
    qps = ioq_search(tensors, distortion, rate_bits, float(lam) / max(n_weights, 1), init, offsets=tuple(offsets),
                     rounds=rounds, progress=progress, quantize_fn=quantize_fn, qp_density=qpd, names=weights)
    qps = {n: int(q) for n, q in qps.items()}
    return tensors, qps, {n: coded_at(n, q)[0] for n, q in qps.items()}


def _sensitivity_stage(layout: CodingLayout, variables: Mapping[str, Any], apply_coded: Callable, batches: list,
                       weights: list[str], lam: float, base_qp: int, qpd: int, dq: bool, nonweight_qp: int,
                       probes: int, max_scale_ratio: float, moments: Mapping | None, check_moments: Mapping | None):
    """The sensitivity allocation of ``weights`` on the coded tensors (then GPTQ where ``moments``
    are given): ``(layout with the scaled leaves' scalings, tensors to code (``W / s`` and
    ``LS * s``), {weight: qp}, {weight: decoded}, {weight: False} for the GPTQ ones)``."""
    coded = layout.to_coded(variables)
    rd = optimize(coded, apply_coded, batches, lam=float(lam), init="sensitivity", steps=0, select=weights,
                  scale_axis=0, base_qp=int(base_qp), qp_density=qpd, dq=dq, nonweight_qp=int(nonweight_qp),
                  probes=probes, max_scale_ratio=max_scale_ratio, progress=False)
    gptq = {}
    if moments:
        with_gptq, rd = with_error_feedback(coded, rd, moments, check_moments=check_moments, progress=False)
        gptq = {n: with_gptq[n] for n in rd.dq_overrides}
    leaves = [n for n, kind, _ in layout.entries if kind == "leaf" and n in rd.local_scales]
    if leaves:
        layout = layout.with_scalings(leaves)
        coded = layout.to_coded(variables)
    tensors = {k: np.asarray(gptq.get(k, v), np.float32) if _is_float(v) else np.asarray(v)
               for k, v in coded.items()}
    for n, s in rd.local_scales.items():
        rows = np.asarray(s, np.float32).reshape((-1,) + (1,) * (tensors[n].ndim - 1))
        tensors[n] = (tensors[n] / rows).astype(np.float32)
        tensors[n + SCALING_SUFFIX] = (tensors[n + SCALING_SUFFIX] * np.asarray(s, np.float32)).astype(np.float32)
    qps = {n: int(rd.qp_overrides[n]) for n in weights}
    with ThreadPoolExecutor() as pool:  # the coder kernels release the GIL
        decoded = list(pool.map(lambda n: code_tensor(tensors[n], qps[n], qp_density=qpd,
                                                      dq=rd.dq_overrides.get(n, dq))[0], weights))
    return layout, tensors, qps, dict(zip(weights, decoded)), dict(rd.dq_overrides)
