"""Run by tests/test_optimize.py in a subprocess with 8 host devices: optimize() on params and data
sharded over a mesh must agree with the unsharded run, gradient RD and the sensitivity allocation
alike. Prints one JSON line."""

import json
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from nncjax.optimize import optimize


def apply(p, x):
    h = jnp.tanh(x @ p["fc1"]["kernel"] + p["fc1"]["bias"])
    return h @ p["fc2"]["kernel"] + p["fc2"]["bias"]


def main():
    rng = np.random.default_rng(0)
    params = {"fc1": {"kernel": rng.normal(size=(64, 128)).astype(np.float32) * 0.15,
                      "bias": rng.normal(size=128).astype(np.float32) * 0.1},
              "fc2": {"kernel": rng.normal(size=(128, 16)).astype(np.float32) * 0.1,
                      "bias": rng.normal(size=16).astype(np.float32) * 0.1}}
    x = rng.normal(size=(64, 64)).astype(np.float32)
    kw = {"lam": 3e-3, "base_qp": -28, "steps": 12, "dq": False, "learn_scales": True, "progress": False, "refine": 1}
    plain = optimize(params, apply, x, **kw)
    mesh = Mesh(np.array(jax.devices()), ("d",))
    shard = {"fc1": {"kernel": NamedSharding(mesh, P(None, "d")), "bias": NamedSharding(mesh, P("d"))},
             "fc2": {"kernel": NamedSharding(mesh, P("d", None)), "bias": NamedSharding(mesh, P())}}
    sharded = optimize(params, apply, x, param_sharding=shard, data_sharding=NamedSharding(mesh, P("d", None)),
                       **kw)
    sens = {"lam": 3e-3, "init": "sensitivity", "steps": 0, "progress": False}
    sens_runs = [optimize(params, apply, x, **sens),
                 optimize(params, apply, x, param_sharding=shard, data_sharding=NamedSharding(mesh, P("d", None)),
                          **sens)]
    print(json.dumps({
        "devices": len(jax.devices()),
        "plain": {k: v.tolist() for k, v in plain.history.items()},
        "sharded": {k: v.tolist() for k, v in sharded.history.items()},
        "qps": [plain.qp_overrides, sharded.qp_overrides],
        "scales": [{k: v.tolist() for k, v in r.local_scales.items()} for r in (plain, sharded)],
        "sens_qps": [r.qp_overrides for r in sens_runs],
        "sens_scales": [{k: v.tolist() for k, v in r.local_scales.items()} for r in sens_runs],
        "sens_bits": [r.estimated_bits for r in sens_runs],
    }))


if __name__ == "__main__":
    main()
