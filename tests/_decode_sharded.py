"""Run by tests/test_decode_ready.py in a subprocess with 8 host devices: ``decode(like=)`` and
``decode_update(like=)`` return each leaf with the sharding of ``like``'s leaf (jax arrays and
``jax.ShapeDtypeStruct`` with a sharding). Prints one JSON line."""

import json
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import nncjax


def main():
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    rng = np.random.default_rng(0)
    specs = {"w": P("data", "model"), "b": P("model"), "s": P()}
    host = {"w": rng.normal(0, 0.05, (64, 32)).astype(np.float32), "b": np.zeros(32, np.float32),
            "s": np.float32(0.5)}
    params = {k: jax.device_put(jnp.asarray(v, jnp.bfloat16 if k == "b" else jnp.float32),
                                NamedSharding(mesh, specs[k])) for k, v in host.items()}
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding) for k, v in params.items()}
    data = nncjax.encode(params, qp=-38)
    outs = {"decode": nncjax.decode(data, like=params), "abstract": nncjax.decode(data, like=abstract),
            "update": nncjax.decode_update(nncjax.encode_update(params, nncjax.UpdateState(), differential=False,
                                                                qp=-38)[0], nncjax.UpdateState(), like=params)[0]}
    same = {name: {k: bool(out[k].sharding == params[k].sharding and out[k].dtype == params[k].dtype)
                   for k in params} for name, out in outs.items()}
    err = float(jnp.max(jnp.abs(outs["decode"]["w"] - params["w"])))
    print(json.dumps({"devices": len(jax.devices()), "same": same, "max_err": err}))


if __name__ == "__main__":
    main()
