"""nncjax.reduce against NNCodec: BN folding gives NNCodec's LS/BI; NNCodec's own unfolding is inexact."""

from __future__ import annotations

import numpy as np
import pytest

from nncjax.reduce import fold_bn

pytestmark = pytest.mark.oracle


def _cases(n=24):
    rng = np.random.default_rng(1234)
    cases = []
    for i in range(n):
        rows = int(rng.integers(1, 20))
        shape = (rows,) + tuple(int(d) for d in rng.integers(1, 4, size=int(rng.integers(1, 4))))
        c = {"w": rng.normal(size=shape).astype(np.float32),
             "gamma": rng.normal(size=rows).astype(np.float32),
             "beta": rng.normal(size=rows).astype(np.float32),
             "mean": rng.normal(size=rows).astype(np.float32),
             "var": rng.uniform(0.0, 3.0, size=rows).astype(np.float32),
             "tef": bool(i % 2)}
        if i % 3:
            c["bias"] = rng.normal(size=rows).astype(np.float32)
        if i % 4 == 1:
            c["ls"] = rng.uniform(0.5, 2.0, size=rows).astype(np.float32)
        cases.append(c)
    return cases


def test_fold_bn_matches_nncodec(oracle):
    cases = _cases()
    results = oracle.call("reduce", "fold_blocks", cases)
    for c, r in zip(cases, results):
        eps = 1e-3 if c["tef"] else 1e-5  # NNCodec: TF (TEF topology) models 1e-3, others 1e-5
        ls, bi = fold_bn(c["gamma"], c["beta"], c["mean"], c["var"], eps=eps, bias=c.get("bias"), ls=c.get("ls"))
        assert r["cpt_folded"] == 0x0A  # LS | BI, BN removed
        np.testing.assert_allclose(np.asarray(ls), r["ls"], rtol=2e-6, atol=1e-7)
        np.testing.assert_allclose(np.asarray(bi), r["bi"], rtol=2e-6, atol=2e-6)
        # NNCodec's decoder-side unfolding: var = 1 and gamma = 1, so a BN with epsilon eps multiplies
        # by 1/sqrt(1 + eps) instead of 1 -- the inexactness nncjax.reduce.unfold_bn avoids.
        u = r["unfolded"]
        assert np.all(u["var"] == 1) and np.all(u["gamma"] == 1) and np.all(u["mean"] == 0)
        np.testing.assert_array_equal(u.get("bias", u["beta"]), r["bi"])
