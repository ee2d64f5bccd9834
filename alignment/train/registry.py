"""Algorithms by name: `config.algorithm` -> the function that runs it, `run(config, workdir) -> summary`.

A supervised algorithm registers its task builder and the shared loop runs it:

    @registry.supervised("dpo")
    def build_task(config, mesh) -> Task: ...

another kind of loop (online RL) registers its own run function with `@registry.register(name)`. A new
algorithm is a module, a line in `MODULES` (so that it is imported only when asked for) and a config.
"""

import importlib
from typing import Callable, Dict

MODULES = {
    "sft": "alignment.train.sft",
    "rm": "alignment.train.rm",
    "dpo": "alignment.train.dpo",
    "classifier": "alignment.safety.classifier",
    "ppo": "alignment.rl.loop",
    "grpo": "alignment.rl.loop",
}

_RUNNERS: Dict[str, Callable] = {}


def register(name: str):
  """Registers `fn(config, workdir, accept_config_changes=False) -> summary dict` as algorithm `name`."""
  def decorator(fn):
    _RUNNERS[name] = fn
    return fn
  return decorator


def supervised(name: str):
  """Registers `build_task(config, mesh) -> Task` as algorithm `name`, run by the supervised loop."""
  def decorator(build_task):
    from alignment.train import loop
    register(name)(lambda config, workdir, **options: loop.train(config, workdir, build_task, **options))
    return build_task
  return decorator


def check_name(name: str) -> None:
  """Raises ValueError unless `name` is a known algorithm (nothing is imported)."""
  if name not in MODULES and name not in _RUNNERS:
    raise ValueError(f"config.algorithm={name!r}; expected one of {sorted(set(MODULES) | set(_RUNNERS))}")


def get(name: str) -> Callable:
  """The run function of algorithm `name`, importing its module on first use."""
  check_name(name)
  if name not in _RUNNERS:
    importlib.import_module(MODULES[name])
  return _RUNNERS[name]
