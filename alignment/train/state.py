"""The train state: named model parts, one optimizer per trained part, explicit shardings.

    state = {"policy": params, "ref": params,      # the parts: what trains and what does not
             "opt_state": {"policy": ...},          # one optimizer state per trained part
             "step": int32, "rng": key,
             "skipped_steps": int32,                # updates skipped for a non-finite loss or gradient
             "first_skipped_step": int32}           # the first of them (-1: none)

A part is a model's params as a plain nested dict (`nnx.state(model, nnx.Param).to_pure_dict()`),
rebuilt into a module inside a step with `nnx.merge(graphdef, params)`. Which parts exist and which of
them train is the algorithm's choice (SFT: policy; DPO: policy and a live ref; RM: reward; PPO:
policy and value train, ref and reward do not). Each part is laid out by its own logical axes and each
trained part's optimizer moments like its params.
"""

from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from alignment.parallel import replicated, tree_shardings

BOOKKEEPING = ("opt_state", "step", "rng", "skipped_steps", "first_skipped_step")


class ModelSpec(NamedTuple):
  graphdef: nnx.GraphDef
  abstract_params: dict  # nested dict of ShapeDtypeStruct
  logical_specs: dict    # nested dict of PartitionSpec over logical axis names


class Optimizer(NamedTuple):
  tx: optax.GradientTransformation
  schedule: optax.Schedule  # step -> learning rate, for the logs


class Part(NamedTuple):
  """One model of the state: its spec, how to load its initial params onto given shardings, and its
  optimizer (None: it does not train)."""
  spec: ModelSpec
  load: Callable[[Any], Any]
  optimizer: Optional[Optimizer] = None


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


def trained(parts: Mapping[str, Part]) -> dict:
  """{name: Optimizer} of the parts that train, in the parts' order."""
  return {name: part.optimizer for name, part in parts.items() if part.optimizer is not None}


def parts_of(state: Mapping) -> dict:
  """The model parts of a state (everything but the bookkeeping), by name."""
  return {name: value for name, value in state.items() if name not in BOOKKEEPING}


def check_parts(parts: Mapping[str, Part]) -> None:
  clash = sorted(set(parts) & set(BOOKKEEPING))
  if clash:
    raise ValueError(f"state part names {clash} are reserved for {BOOKKEEPING}")
  if not trained(parts):
    raise ValueError(f"no part of the state trains: {sorted(parts)}")


def state_shardings(parts: Mapping[str, Part], mesh: Mesh, rules) -> dict:
  """Shardings of the whole state: each part from its logical axes, each optimizer moment like its
  parameter, the bookkeeping scalars replicated."""
  check_parts(parts)
  out = {name: param_shardings(part.spec, mesh, rules) for name, part in parts.items()}
  opt = {}
  for name, optimizer in trained(parts).items():
    abstract_opt = jax.eval_shape(optimizer.tx.init, parts[name].spec.abstract_params)
    # a leaf the optimizer keeps no state for (optax.MaskedNode: a frozen embedding) stays one
    opt[name] = optax.tree_map_params(optimizer.tx, lambda m, s: m if isinstance(m, optax.MaskedNode) else s,
                                      abstract_opt, out[name], transform_non_params=lambda _: replicated(mesh),
                                      is_leaf=lambda m: isinstance(m, optax.MaskedNode))
  out["opt_state"] = opt
  out.update({key: replicated(mesh) for key in BOOKKEEPING if key != "opt_state"})
  return out


def _build_state(parts: Mapping[str, Part], params: dict, seed: int) -> dict:
  state = dict(params)
  state["opt_state"] = {name: optimizer.tx.init(params[name]) for name, optimizer in trained(parts).items()}
  state["step"] = jnp.zeros((), jnp.int32)
  state["rng"] = jax.random.PRNGKey(seed)
  state["skipped_steps"] = jnp.zeros((), jnp.int32)
  state["first_skipped_step"] = jnp.full((), -1, jnp.int32)
  return state


def create_train_state(parts: Mapping[str, Part], shardings: dict, seed: int) -> dict:
  """Loads every part onto its shardings and builds the state around them (the loaded params are
  donated, so no part is ever held twice)."""
  params = {name: part.load(shardings[name]) for name, part in parts.items()}
  return jax.jit(lambda p: _build_state(parts, p, seed), out_shardings=shardings, donate_argnums=0)(params)


def abstract_state(parts: Mapping[str, Part], shardings: dict) -> dict:
  """ShapeDtypeStructs (with shardings) of the whole state, the target of a checkpoint restore."""
  abstract = {name: part.spec.abstract_params for name, part in parts.items()}
  shapes = jax.eval_shape(lambda p: _build_state(parts, p, 0), abstract)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
