"""Train state creation with explicit shardings: params from logical axes, optimizer state from params.

The state is a plain dict pytree: {params, opt_state, step, rng}; params are the model's nnx.Param
state as a nested dict, rebuilt into a module inside the step with `nnx.merge(graphdef, params)`.
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from alignment.parallel import replicated, tree_shardings


class ModelSpec(NamedTuple):
  graphdef: nnx.GraphDef
  abstract_params: dict  # nested dict of ShapeDtypeStruct
  logical_specs: dict    # nested dict of PartitionSpec over logical axis names


def model_spec(make_model: Callable[[nnx.Rngs], nnx.Module]) -> ModelSpec:
  """Shapes, logical axes and graph of `make_model(rngs)`, without allocating any parameter."""
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: make_model(nnx.Rngs(0)))
  graphdef, params = nnx.split(abstract, nnx.Param)
  return ModelSpec(graphdef, params.to_pure_dict(), nnx.get_partition_spec(params).to_pure_dict())


def init_params(make_model: Callable[[nnx.Rngs], nnx.Module], seed: int, shardings):
  """Random initialisation compiled with `out_shardings`, so no device ever holds the whole model."""
  def init():
    with nnx.use_eager_sharding(False):
      return nnx.state(make_model(nnx.Rngs(seed)), nnx.Param).to_pure_dict()
  return jax.jit(init, out_shardings=shardings)()


def param_shardings(spec: ModelSpec, mesh: Mesh, rules):
  return tree_shardings(spec.logical_specs, spec.abstract_params, mesh, rules)


def state_shardings(tx: optax.GradientTransformation, abstract_params, params_sharding, mesh: Mesh,
                    with_frozen: bool = False):
  """Shardings of {params, opt_state, step, rng[, frozen]}: each optimizer moment follows its parameter,
  and frozen (reference) params are laid out like the params."""
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  opt_sharding = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, params_sharding,
                                       transform_non_params=lambda _: replicated(mesh))
  out = dict(params=params_sharding, opt_state=opt_sharding, step=replicated(mesh), rng=replicated(mesh))
  if with_frozen:
    out["frozen"] = params_sharding
  return out


def _build_state(tx, params, seed, frozen=None):
  state = dict(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32),
               rng=jax.random.PRNGKey(seed))
  if frozen is not None:
    state["frozen"] = frozen
  return state


def create_train_state(params, tx: optax.GradientTransformation, shardings, seed: int, frozen=None):
  """Builds the state from (already sharded) params and optional frozen params; both are donated."""
  return jax.jit(lambda p, f: _build_state(tx, p, seed, f), out_shardings=shardings,
                 donate_argnums=(0, 1) if frozen is not None else 0)(params, frozen)


def abstract_state(shardings, abstract_params, tx):
  """ShapeDtypeStructs (with shardings) of the whole state, the target of a checkpoint restore."""
  frozen = abstract_params if "frozen" in shardings else None
  shapes = jax.eval_shape(lambda p, f: _build_state(tx, p, 0, f), abstract_params, frozen)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
