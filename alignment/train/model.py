"""The policy model named in `config.model`: its spec, its (sharded) initial params, its tokenizer."""

import dataclasses
import json
from typing import Any, Callable, NamedTuple, Optional

import jax
import numpy as np
from flax import nnx

import ml_collections

from alignment import checkpoint, models
from alignment import workdir as workdir_lib
from alignment.train import state as state_lib


class ModelSetup(NamedTuple):
  cfg: models.ModelConfig
  spec: state_lib.ModelSpec
  load_params: Callable[[Any], Any]  # shardings -> params
  tokenizer: Optional[Any]           # tokenizers.Tokenizer or None

  def part(self, optimizer: Optional[state_lib.Optimizer] = None) -> state_lib.Part:
    """This model as a part of the train state (trained when given an optimizer)."""
    return state_lib.Part(self.spec, self.load_params, optimizer)


def setup_model(model_config, seed: int, *, reward_head: bool = False, probe_taps: tuple = ()) -> ModelSetup:
  """Random init for a preset shape (e.g. 'tiny-random'); otherwise weights from `models.load`.

  Compute dtype, remat and scan come from `config.model` either way. With `reward_head` the module
  is a `models.RewardModel`, with `probe_taps` a `models.PooledProbe` reading those depths (params
  {'backbone', 'head'} either way); a loaded backbone gets a fresh head.
  """
  runtime = dict(dtype=model_config.dtype, param_dtype=model_config.param_dtype,
                 remat=model_config.remat, scan_layers=model_config.scan_layers,
                 frozen_layers=model_config.get("frozen_layers", 0),
                 frozen_embeddings=model_config.get("frozen_embeddings", False))
  if is_workdir(model_config.name):
    return _setup_from_run(model_config, seed, reward_head=reward_head, probe_taps=probe_taps)
  tokenizer = None
  if model_config.name in models.PRESETS:
    cfg = models.get_model_config(model_config.name, **runtime)
    if model_config.name in models.NAMED_LOADERS:  # the preset's own tokenizer, e.g. tiny-random's
      tokenizer = models.load(model_config.name)[1]
    make = _module(cfg, reward_head, probe_taps)
    load_params = lambda shardings: state_lib.init_params(make, seed, shardings)
  else:
    loaded, tokenizer = models.load(model_config.name, dtype=model_config.param_dtype)
    cfg = dataclasses.replace(loaded.cfg, **runtime)
    make = _module(cfg, reward_head, probe_taps)
    host_params = nnx.state(loaded, nnx.Param).to_pure_dict()
    if reward_head or probe_taps:
      head = (models.PooledProbe.make_head(cfg, probe_taps, nnx.Rngs(seed)) if probe_taps else
              models.ScalarHead(cfg.d_model, rngs=nnx.Rngs(seed), param_dtype=cfg.param_dtype))
      host_params = {"backbone": host_params, "head": nnx.state(head, nnx.Param).to_pure_dict()}
    # A fresh host copy per call: on CPU device_put may alias the numpy buffer, and the policy and a
    # frozen reference loaded from one host tree would then be one buffer, donated twice.
    load_params = lambda shardings: jax.device_put(jax.tree.map(np.array, host_params), shardings)
  return ModelSetup(cfg, state_lib.model_spec(make), load_params, tokenizer)


def _setup_from_run(model_config, seed: int, *, reward_head: bool, probe_taps: tuple) -> ModelSetup:
  """`config.model.name` = a training run's workdir: the model that run trained (its config.json's
  `model.name`, with this config's dtype, remat, scan and freezing), its params from the run's latest
  checkpoint: how SFT is followed by DPO, an RM or RL. A reward head or probe starts fresh on them."""
  workdir = workdir_lib.resolve(model_config.name)
  check_model_source(model_config.name, "config.model.name", generating=False)
  run = json.loads((workdir / "config.json").read_text())
  if run["algorithm"] not in ("sft", "dpo", "ppo", "grpo"):
    raise ValueError(f"config.model.name={model_config.name}: a {run['algorithm']!r} run holds no policy to "
                     f"start from; give an sft, dpo, ppo or grpo workdir")
  base_config = ml_collections.ConfigDict(model_config.to_dict())
  base_config.name = run["model"]["name"]
  base = setup_model(base_config, seed, reward_head=reward_head, probe_taps=probe_taps)
  restore = lambda shardings: checkpoint.restore_entry(workdir / "checkpoints", "policy", sharding=shardings)[0]
  if not (reward_head or probe_taps):
    return base._replace(load_params=restore)

  def load_params(shardings):
    fresh_head = base.load_params(shardings)["head"]  # loads the base backbone too: once, at start-up
    return {"backbone": restore(shardings["backbone"]), "head": fresh_head}
  return base._replace(load_params=load_params)


def _module(cfg, reward_head: bool, probe_taps: tuple = ()):
  if probe_taps:
    return lambda rngs: models.PooledProbe(cfg, probe_taps, rngs=rngs)
  cls = models.RewardModel if reward_head else models.Transformer
  return lambda rngs: cls(cfg, rngs=rngs)


class Policy(NamedTuple):
  cfg: models.ModelConfig
  params: dict           # the Transformer's plain param dict
  tokenizer: Optional[Any]
  description: str       # what was loaded, for reports: a name, a path, or 'WORKDIR (step N)'


def is_workdir(path) -> bool:
  path = workdir_lib.resolve(path)
  return (path / "config.json").is_file() and (path / "checkpoints").is_dir()


def check_model_source(name_or_path: str, flag: str = "--model", *, generating: bool = True) -> None:
  """Raises ValueError (one line: what is missing, and what would create it) unless `name_or_path` is a
  model name, a .gguf file, an HF checkpoint directory, or a workdir with a checkpoint (of a policy, when
  `generating`). Reads no weights."""
  if name_or_path in models.PRESETS:
    return
  from alignment.models import registry
  registry.register(models.NAMED_LOADERS, models.PATH_LOADERS)
  if name_or_path in models.NAMED_LOADERS:
    return
  path = workdir_lib.resolve(name_or_path)
  config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
  if config.get("algorithm"):  # a training run's workdir (an HF directory's config.json has no algorithm)
    if checkpoint.latest_step(path / "checkpoints") is None:
      raise ValueError(f"{flag}={name_or_path}: this training workdir has no checkpoint yet (its run saved none); "
                       f"finish or resume its run with `python -m alignment.main --workdir={name_or_path} ...`")
    if generating and config["algorithm"] == "rm":
      raise ValueError(f"{flag}={name_or_path}: a reward-model run (algorithm 'rm') scores text and does not "
                       f"generate; give an sft or dpo workdir, or a model")
    return
  if any(accepts(str(name_or_path)) for accepts, _ in models.PATH_LOADERS):
    return
  if not path.exists():
    looks_like_path = "/" in name_or_path or name_or_path.endswith(".gguf") or name_or_path.startswith(".")
    if not looks_like_path:
      raise ValueError(f"{flag}={name_or_path!r}: not a model name (known: {', '.join(sorted(models.NAMED_LOADERS))}) "
                       f"and no such file or directory")
    if name_or_path.endswith(".gguf") or not generating:
      raise ValueError(f"{flag}={name_or_path}: no such file or directory")
    demo = path.parts[-2:] == ("workdirs", "demo") or path.parts[-3:-1] == ("workdirs", "demo")
    made_by = ("`make demo` creates workdirs/demo/policy (the aligned policy) and workdirs/demo/guard" if demo else
               "a training run creates a workdir: `python -m alignment.main --config=configs/sft.py:tiny "
               f"--workdir={name_or_path}`")
    raise ValueError(f"{flag}={name_or_path}: no such file or directory; {made_by}")
  raise ValueError(f"{flag}={name_or_path}: not a model: expected a .gguf file, an HF checkpoint directory "
                   f"(config.json + *.safetensors) or a training workdir (config.json + checkpoints/)")


def load_policy(name_or_path: str, *, dtype: str = "float32", step: Optional[int] = None) -> Policy:
  """A generating model from what `models.load` takes (a name, a .gguf file, an HF directory) or from a
  training run's workdir (its config.json names the model; the params come from its latest checkpoint,
  or `step`, without reading the optimizer state)."""
  if not is_workdir(name_or_path):
    model, tokenizer = models.load(name_or_path, dtype=dtype)
    return Policy(model.cfg, nnx.to_pure_dict(nnx.state(model, nnx.Param)), tokenizer, name_or_path)
  check_model_source(name_or_path)
  workdir = workdir_lib.resolve(name_or_path)
  config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
  setup = setup_model(config.model, config.seed)
  params, step = checkpoint.restore_entry(workdir / "checkpoints", "policy", step=step)
  # Remat and freezing shape training only; without them the config is the one `models.load` gives the
  # same model, so a sampler compiled for it serves this policy too.
  cfg = dataclasses.replace(setup.cfg, remat="none", frozen_layers=0, frozen_embeddings=False)
  return Policy(cfg, params, setup.tokenizer, f"{name_or_path} (step {step})")
