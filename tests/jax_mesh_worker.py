"""Run with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``: sharded vs unsharded JAX.

Prints one JSON object: the device count and, per quantity, the largest relative
difference between the operators on batches sharded over a 4-device mesh (along the
example axis) and on the same batches on one device.
"""

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

jax.config.update("jax_enable_x64", True)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cola  # noqa: E402

import cola_curvature as cc  # noqa: E402
from tests.jax_cases import mlp_fn  # noqa: E402


def main() -> None:
    key = jax.random.key(0)
    keys = jax.random.split(key, 6)
    params = {
        "0.weight": jax.random.normal(keys[0], (5, 4)),
        "0.bias": jax.random.normal(keys[1], (5,)),
        "2.weight": jax.random.normal(keys[2], (3, 5)),
        "2.bias": jax.random.normal(keys[3], (3,)),
    }
    X = jax.random.normal(keys[4], (16, 4))
    y = jax.random.randint(keys[5], (16,), 0, 3)
    batches = [(X[:8], y[:8]), (X[8:], y[8:])]
    mesh = Mesh(jax.devices(), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    sharded = [(jax.device_put(x, sharding), jax.device_put(t, sharding)) for x, t in batches]
    loss = cc.losses.CrossEntropy("mean")
    v = jax.random.normal(key, (sum(p.size for p in params.values()), 2))
    errors = {}
    for name, operator_type in [("ggn", cc.GGN), ("hessian", cc.Hessian)]:
        one = operator_type(mlp_fn, loss, params, batches)
        many = operator_type(mlp_fn, loss, params, sharded)
        expected = one @ v
        errors[name] = float(jnp.abs(many @ v - expected).max() / jnp.abs(expected).max())
    one = cc.GGN(mlp_fn, loss, params, batches)
    many = cc.GGN(mlp_fn, loss, params, sharded)
    solve = [cola.linalg.inv(g + 0.1 * cola.ops.I_like(g)) @ v for g in (one, many)]
    errors["cg"] = float(jnp.abs(solve[1] - solve[0]).max() / jnp.abs(solve[0]).max())
    print(json.dumps({"devices": len(jax.devices()), "errors": errors}))


if __name__ == "__main__":
    main()
