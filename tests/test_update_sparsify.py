"""nncjax.reduce.sparsify_update: NNCodec's FL-client sparsification (qp-induced zeros, the delta
search for a target sparsity, structured rows below the mean), zero for zero against NNCodec."""

from __future__ import annotations

import numpy as np
import pytest

from nncjax import InputError
from nncjax.reduce import sparsify_update


def _update(rng, i):
    """A random weight update: NNR-layout weights of several ranks and scales (heavy-tailed ones, one
    with whole rows near zero), vectors, sometimes an all-zero weight or a large vector."""
    scale = float(10.0 ** rng.uniform(-3.5, -1.5))
    upd = {}
    for j in range(int(rng.integers(1, 5))):
        rank = int(rng.integers(2, 5))
        shape = (int(rng.integers(1, 40)),) + tuple(int(d) for d in rng.integers(1, 6, size=rank - 1))
        w = rng.normal(0, scale, shape) if j % 2 else rng.standard_t(2, shape) * scale
        if j == 2:
            w[: shape[0] // 2] *= 0.05
        upd[f"layer{j}.weight"] = w.astype(np.float32)
        upd[f"layer{j}.bias"] = rng.normal(0, scale, shape[0]).astype(np.float32)
    if i % 5 == 0:
        upd["dead.weight"] = np.zeros((4, 3), np.float32)
    if i % 7 == 3:  # mostly a vector: a high target is out of reach (NNCodec runs its 501 rounds)
        upd["big.bias"] = rng.normal(0, scale, 4000).astype(np.float32)
    return upd


def _cases(n=40):
    rng = np.random.default_rng(2025)
    return [{"update": _update(rng, i), "qp": int(rng.integers(-40, -20)), "qp_density": int(rng.integers(0, 4)),
             "target": float(rng.choice([0.0, 0.3, 0.6, 0.9, 0.99])), "gain": float(rng.choice([0.0, 0.9, 1.2]))}
            for i in range(n)]


@pytest.mark.oracle
def test_sparsify_update_zeroes_what_nncodec_zeroes(oracle):
    cases = _cases()
    for c, want in zip(cases, oracle.call("reduce", "fl_sparsify", cases)):
        got, s = sparsify_update(c["update"], qp=c["qp"], qp_density=c["qp_density"], target_sparsity=c["target"],
                                 struct_gain=c["gain"])
        assert list(want) == list(got)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)  # -0.0 (NNCodec) == 0.0
        zeros = sum(int(np.count_nonzero(a == 0)) for a in want.values())
        assert s == zeros / sum(a.size for a in want.values())


def test_targets_are_reached_and_vectors_kept():
    rng = np.random.default_rng(0)
    upd = {"a.weight": rng.normal(0, 0.01, (64, 32)).astype(np.float32),
           "a.bias": rng.normal(0, 0.01, 64).astype(np.float32)}
    reached = []
    for target in (0.2, 0.5, 0.8):
        out, s = sparsify_update(upd, qp=-40, target_sparsity=target, struct_gain=0)
        reached.append(s)
        assert s >= target  # NNCodec's delta schedule may overshoot (its first step is 0.2)
        np.testing.assert_array_equal(out["a.bias"], upd["a.bias"])
        kept = out["a.weight"] != 0
        assert np.abs(upd["a.weight"][kept]).min() >= np.abs(upd["a.weight"][~kept]).max()  # a magnitude cut
    assert reached == sorted(reached) and reached[-1] < 0.85
    out, s = sparsify_update(upd, qp=-40, target_sparsity=0.5, select=lambda n, a: n != "a.weight")
    np.testing.assert_array_equal(out["a.weight"], upd["a.weight"])  # nothing else to zero: the target is missed
    assert s == 0.0


def test_flax_layout_rows_are_the_last_axis():
    rng = np.random.default_rng(1)
    w = rng.normal(0, 0.01, (24, 16)).astype(np.float32)
    w[:6] *= 0.01  # weak rows (NNR layout)
    nnr, _ = sparsify_update({"w": w}, qp=-50, struct_gain=0.5)
    flax, _ = sparsify_update({"w": w.T.copy()}, qp=-50, struct_gain=0.5, axis=-1)
    np.testing.assert_array_equal(flax["w"].T, nnr["w"])
    assert np.all(nnr["w"][:6] == 0) and np.all(np.any(nnr["w"][6:] != 0, axis=1))


@pytest.mark.parametrize(("kw", "match"), [
    (dict(target_sparsity=1.5), "target_sparsity"), (dict(target_sparsity=-0.1), "target_sparsity"),
    (dict(struct_gain=-1.0), "struct_gain"), (dict(struct_gain=float("nan")), "struct_gain"),
    (dict(qp_density=9), "qp_density"), (dict(qp=1.5), "qp"), (dict(axis=3), "axis"),
])
def test_bad_arguments(kw, match):
    with pytest.raises(InputError, match=match):
        sparsify_update({"w": np.ones((3, 4), np.float32)}, **{"qp": -30, **kw})


def test_non_finite_weights_are_refused():
    with pytest.raises(InputError, match="'w' holds NaN or Inf"):
        sparsify_update({"w": np.array([[1.0, np.nan]], np.float32)}, qp=-30)
