"""Tensor layout conversion between Flax and NNR (output rows first).

NNR tensors put the output channels in ``dims[0]`` (PyTorch order): a convolution is ``(O, I, *spatial)``
and a dense layer ``(out, in)``. Flax stores convolution kernels as ``(*spatial, I, O)`` ("HWIO") and
dense kernels as ``(in, out)``. Block members LS/BI/BN are per output row, i.e. per ``dims[0]``.

The conversion is a pure transpose, so it is exact and its own inverse up to the permutation:

* rank 1 (biases, BN vectors): unchanged;
* rank 2 (dense ``(in, out)``): ``(out, in)``;
* rank n >= 3 (conv ``(*spatial, I, O)``): ``(O, I, *spatial)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nncjax.reduce._tree import as_array

__all__ = ["flax_to_nnr", "nnr_to_flax", "flax_to_nnr_perm", "nnr_to_flax_perm"]


def flax_to_nnr_perm(ndim: int) -> tuple[int, ...]:
    """Axis permutation taking a Flax kernel of rank ``ndim`` to NNR layout.

    >>> flax_to_nnr_perm(4), flax_to_nnr_perm(2)
    ((3, 2, 0, 1), (1, 0))
    """
    if ndim <= 1:
        return tuple(range(ndim))
    if ndim == 2:
        return (1, 0)
    return (ndim - 1, ndim - 2) + tuple(range(ndim - 2))


def nnr_to_flax_perm(ndim: int) -> tuple[int, ...]:
    """Inverse of :func:`flax_to_nnr_perm`.

    >>> nnr_to_flax_perm(4)
    (2, 3, 1, 0)
    """
    perm = flax_to_nnr_perm(ndim)
    inv = [0] * ndim
    for i, p in enumerate(perm):
        inv[p] = i
    return tuple(inv)


def flax_to_nnr(kernel: jax.Array) -> jax.Array:
    """Flax kernel ``(*spatial, I, O)`` or ``(in, out)`` -> NNR ``(O, I, *spatial)`` or ``(out, in)``.

    >>> flax_to_nnr(jnp.zeros((3, 3, 8, 16))).shape
    (16, 8, 3, 3)
    """
    kernel = as_array(kernel, "kernel")
    return jnp.transpose(kernel, flax_to_nnr_perm(kernel.ndim))


def nnr_to_flax(w: jax.Array) -> jax.Array:
    """NNR tensor ``(O, I, *spatial)`` or ``(out, in)`` -> Flax layout; inverse of :func:`flax_to_nnr`.

    >>> nnr_to_flax(jnp.zeros((16, 8, 3, 3))).shape
    (3, 3, 8, 16)
    """
    w = as_array(w, "w")
    return jnp.transpose(w, nnr_to_flax_perm(w.ndim))
