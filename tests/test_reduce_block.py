"""NNR_PT_BLOCK members (nncjax.reduce.block): cpt, topology order, coded order, and the way back."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from nncjax.errors import InputError
from nncjax.reduce import (
    CPT_BI,
    CPT_BN,
    CPT_DC,
    CPT_LS,
    BNVectors,
    block_from_members,
    block_members,
    fold_bn,
    low_rank_decompose,
)

BN_NAMES = ("bn/bias", "bn/scale", "bn/mean", "bn/var")


def _parts(seed=0):
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.normal(size=(6, 4, 3, 3)), jnp.float32)
    vec = lambda: jnp.asarray(rng.uniform(0.5, 2.0, size=6), jnp.float32)  # noqa: E731
    bn = BNVectors(vec(), vec(), vec(), vec(), BN_NAMES)
    return w, vec(), vec(), bn


@pytest.mark.parametrize("cpt", range(16))
def test_orders_for_every_cpt(cpt):
    w, ls, bi, bn = _parts()
    kw = dict(ls=ls if cpt & CPT_LS else None, bi=bi if cpt & CPT_BI else None, bn=bn if cpt & CPT_BN else None)
    if cpt & CPT_DC:
        m = block_members("c/kernel", lowrank=low_rank_decompose(w, 3), dims=w.shape, **kw)
        weights = ["c/kernel_G", "c/kernel_H"]
        assert (m.decomposition_rank, m.g_number_of_rows) == (3, 6)
    else:
        m = block_members("c/kernel", w, **kw)
        weights = ["c/kernel"]
        assert m.decomposition_rank is None and m.g_number_of_rows is None
    assert m.cpt == cpt and m.dims == (6, 4, 3, 3)
    ls_n = ["c/kernel_scaling"] if cpt & CPT_LS else []
    bi_n = ["c/bias"] if cpt & CPT_BI else []
    bn_n = list(BN_NAMES) if cpt & CPT_BN else []
    assert m.topology == weights + ls_n + bn_n + bi_n
    assert [n for n, _ in m.coded] == ls_n + bi_n + bn_n + weights
    # Back from the decoded members: always W, LS, BI with the BN folded in.
    back = block_from_members("c/kernel", m.cpt, m.dims, dict(m.coded), bn_names=BN_NAMES)
    exp_ls = ls if cpt & CPT_LS else jnp.ones(6)
    exp_bi = bi if cpt & CPT_BI else jnp.zeros(6)
    if cpt & CPT_BN:
        exp_ls, exp_bi = fold_bn(bn.gamma, bn.beta, bn.mean, bn.var, bias=exp_bi, ls=exp_ls)
    np.testing.assert_allclose(back.ls, exp_ls, rtol=1e-6)
    np.testing.assert_allclose(back.bi, exp_bi, rtol=1e-6, atol=1e-6)
    exp_w = (dict(m.coded)["c/kernel_G"] @ dict(m.coded)["c/kernel_H"]).reshape(w.shape) if cpt & CPT_DC else w
    np.testing.assert_allclose(back.w, exp_w, rtol=1e-6)
    assert back.w.shape == w.shape


def test_nncodec_example_order():
    """The digest's example (cpt BN|BI = 12): coded order bias, beta, gamma, mean, var, weight."""
    w, _, bi, bn = _parts()
    bn = bn._replace(names=("bn.beta", "bn.gamma", "bn.mean", "bn.var"))
    m = block_members("conv.weight", w, bi=bi, bn=bn, names={"BI": "conv.bias"})
    assert m.cpt == 12
    assert m.topology == ["conv.weight", "bn.beta", "bn.gamma", "bn.mean", "bn.var", "conv.bias"]
    assert [n for n, _ in m.coded] == ["conv.bias", "bn.beta", "bn.gamma", "bn.mean", "bn.var", "conv.weight"]


def test_member_errors():
    w, ls, _, _ = _parts()
    with pytest.raises(InputError):
        block_members("c/kernel", w, ls=ls[:3])
    with pytest.raises(InputError):
        block_members("c/kernel")
    with pytest.raises(InputError):
        block_members("c/kernel", lowrank=low_rank_decompose(w, 2))  # dims missing
    with pytest.raises(InputError):  # LS scales G's rows: they must be W's rows
        block_members("c/kernel", lowrank=low_rank_decompose(w, 2, g_rows=24), dims=w.shape, ls=ls)
    with pytest.raises(InputError):
        block_from_members("c/kernel", CPT_LS, (6, 4, 3, 3), {"c/kernel": w})  # LS missing
    with pytest.raises(InputError):
        block_from_members("c/kernel", 0, (6, 4, 3, 2), {"c/kernel": w})
    with pytest.raises(InputError):
        block_from_members("c/kernel", CPT_BN, (6, 4, 3, 3), {"c/kernel": w})  # bn_names missing
    with pytest.raises(InputError):
        block_from_members("c/kernel", 0x10, (6, 4, 3, 3), {"c/kernel": w})
