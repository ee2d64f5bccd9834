"""`config.model.name` = a training run's workdir: the next stage (DPO, a reward model) starts from the params
that run saved, not from the base model's."""

import jax
import numpy as np
import pytest

from alignment.main import run
from alignment.train.model import load_policy
from configs import dpo as dpo_config, rm as rm_config, sft as sft_config


def _config(module, tmp_path, **overrides):
  config = module.get_config("tiny")
  config.kernel.impl = "naive"
  config.data.data_dir = str(tmp_path / "tfds")
  for key, value in overrides.items():
    section, name = key.split("__")
    config[section][name] = value
  return config


def _same(a, b) -> bool:
  return all(jax.tree.leaves(jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b)))


@pytest.mark.slow
def test_dpo_and_a_reward_model_start_from_the_sft_runs_params(tmp_path):
  sft = str(tmp_path / "sft")
  run(_config(sft_config, tmp_path, train__steps=6, train__eval_every=0), sft)
  trained = load_policy(sft).params
  base = load_policy("tiny-random").params
  assert not _same(trained, base)  # six steps moved the params: the check below can tell them apart

  frozen = dict(train__steps=2, train__eval_every=0, optim__lr=0.0, optim__warmup_steps=0)
  dpo = _config(dpo_config, tmp_path, **frozen)
  dpo.model.name = sft
  run(dpo, str(tmp_path / "dpo"))
  assert _same(load_policy(str(tmp_path / "dpo")).params, trained)
  assert load_policy(str(tmp_path / "dpo")).cfg == load_policy("tiny-random").cfg  # one compiled sampler serves both

  from alignment import checkpoint
  rm = _config(rm_config, tmp_path, **frozen)
  rm.model.name = sft
  run(rm, str(tmp_path / "rm"))
  reward, _ = checkpoint.restore_entry(tmp_path / "rm" / "checkpoints", "reward")
  assert _same(reward["backbone"], trained)


def test_a_run_that_holds_no_policy_is_refused_by_name(tmp_path):
  rm = str(tmp_path / "rm")
  run(_config(rm_config, tmp_path, train__steps=1, train__eval_every=0), rm)
  dpo = _config(dpo_config, tmp_path)
  dpo.model.name = rm
  with pytest.raises(ValueError, match=f"config.model.name={rm}: a 'rm' run holds no policy"):
    run(dpo, str(tmp_path / "dpo"))
