"""Builds ``adaptive_cost.npz``: what one DeepCABAC context really costs, tabulated once by simulation.

The rate model (:mod:`nncjax.rate.deepcabac`) needs the cost of coding ``n`` bins with ``n1`` ones through
one adaptive context (dual-state log-domain estimator, nnr-format.md §5, and the 9-bit range engine, §4).
That cost is the empirical entropy ``n * h(n1 / n)`` plus an *excess*: the learning transient from the
init state and the steady-state noise of the estimator. The excess depends only on the init index, on
``n`` and on the bin probability, so it is simulated here on i.i.d. bins (exact integer estimator and
exact renormalisation shifts of the engine, which are the bits it writes) and stored as a table over
(init index, log2 n, p). Run ``python -m nncjax.rate.calibration`` to rebuild it (a few seconds).
"""

from __future__ import annotations

import os

import numba
import numpy as np

from nncjax.arguments import check_int
from nncjax.kernels.tables import CURVE, INIT, RPS

#: Probability grid of the table: logit-spaced, symmetric, from 2**-14 to 1 - 2**-14.
P_GRID = 1.0 / (1.0 + np.exp(-np.linspace(-np.log(2.0**14), np.log(2.0**14), 57)))
#: Bin-count grid exponents: n = 2**0 ... 2**16; beyond it the excess grows linearly.
LOG2N_GRID = np.arange(0, 17)
PATH = os.path.join(os.path.dirname(__file__), "adaptive_cost.npz")


@numba.njit(cache=True, nogil=True)
def _simulate(init_idx, p, n_max, runs, seed, curve, init, rps):
    """Mean of (engine bits - n * h(empirical p)) at n = 2**j, j = 0..log2(n_max)."""
    np.random.seed(seed)
    n_pts = 0
    while (1 << n_pts) <= n_max:
        n_pts += 1
    out = np.zeros(n_pts, dtype=np.float64)
    sh0 = np.int32(init[init_idx, 0] + 4)
    sh1 = np.int32(init[init_idx, 1])
    for _ in range(runs):
        s01 = np.int32(init[init_idx, 2])
        s0 = np.int32(init[init_idx, 3])
        rng = np.int32(510)
        shifts = np.int64(0)
        ones = np.int64(0)
        nxt = 0
        for i in range(n_max):
            b = 1 if np.random.random() < p else 0
            ones += b
            r_lps = np.int32(rps[abs(s01 >> 7) + (rng & 0xE0)])
            mps = 1 if s01 >= 0 else 0
            rng = rng - r_lps if b == mps else r_lps
            while rng < 256:
                rng <<= 1
                shifts += 1
            s = np.int32(1 if b == 1 else -1)
            s1 = s01 - 16 * s0
            s0 += s * (np.int32(curve[16 + ((s * s0) >> 3)]) >> sh0)
            s1 += s * (np.int32(curve[16 + ((s * s1) >> 7)]) >> sh1)
            s01 = s1 + 16 * s0
            if i + 1 == (1 << nxt):
                n = i + 1
                q = ones / n
                h = 0.0
                if 0.0 < q < 1.0:
                    h = -(q * np.log2(q) + (1.0 - q) * np.log2(1.0 - q))
                # fractional bits still held in the range register count as spent
                out[nxt] += shifts + np.log2(510.0 / rng) - n * h
                nxt += 1
    return out / runs


def build(runs: int = 24) -> dict:
    """Simulates the excess table: ``excess`` (9, len(LOG2N_GRID), len(P_GRID)) float32 bits.
    ``runs`` (an integer >= 1, else InputError): simulated bin sequences averaged per table entry."""
    runs = check_int(runs, "runs", lo=1)  # 0 runs would divide by zero at the end of the simulation
    n_max = 1 << int(LOG2N_GRID[-1])
    ex = np.zeros((9, LOG2N_GRID.size, P_GRID.size), dtype=np.float64)
    for i in range(9):
        for j, p in enumerate(P_GRID):
            ex[i, :, j] = _simulate(i, float(p), n_max, runs, 1000 * i + j, CURVE.astype(np.int32),
                                    INIT.astype(np.int32), RPS.astype(np.int32))
    # Slope of the excess at the last grid points: the steady-state cost above entropy per bin.
    slope = (ex[:, -1] - ex[:, -3]) / (2.0 ** LOG2N_GRID[-1] - 2.0 ** LOG2N_GRID[-3])
    return {"p_grid": P_GRID.astype(np.float32), "log2n_grid": LOG2N_GRID.astype(np.float32),
            "excess": ex.astype(np.float32), "slope": np.maximum(slope, 0.0).astype(np.float32)}


if __name__ == "__main__":
    np.savez(PATH, **build())
    print("wrote", PATH)
