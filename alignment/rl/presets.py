"""Loss presets: `config.rl.loss` names a known recipe, and the `config.rl` keys left empty ("" or -1)
take the preset's value; a key set explicitly overrides it (`--config.rl.clip_eps_high=0.3` on dapo).

  ppo           GAE advantages from a value model, per-token KL in the reward, token mean (Ouyang et al.
                2022, as TRL's PPOTrainer)
  grpo          group-normalised advantages, k3 KL as a loss term, each sequence's token mean averaged
                (Shao et al. 2024)
  dr_grpo       mean-centred advantages without std, sequence sums over a constant (Liu et al. 2025)
  dapo          clip-higher (0.2 / 0.28), dynamic sampling, overlong shaping, token mean, no KL (Yu et al. 2025)
  gspo          the length-normalised sequence ratio with a tight clip (3e-4 / 4e-4) (Zheng et al. 2025)
  rloo          leave-one-out baseline, token mean (Ahmadian et al. 2024)
  reinforce_pp  batch-normalised outcome advantages, KL in the reward (Hu 2025)
"""

import ml_collections

from alignment.choices import RL_LOSSES

# key -> value per preset; keys absent from a preset take DEFAULTS
DEFAULTS = dict(advantage="grpo", aggregation="seq_mean_token_mean", kl_in="loss", kl_coef=0.04, ratio_level="token",
                clip_eps=0.2, clip_eps_high=0.0, dynamic_sampling=0, overlong_cache=0)
PRESETS = {
    "ppo": dict(advantage="gae", aggregation="token_mean", kl_in="reward", kl_coef=0.05),
    "grpo": dict(),
    "dr_grpo": dict(advantage="dr_grpo", aggregation="seq_mean_token_sum_norm"),
    "dapo": dict(aggregation="token_mean", kl_coef=0.0, clip_eps_high=0.28, dynamic_sampling=1, overlong_cache=-4),
    "gspo": dict(ratio_level="sequence", clip_eps=3e-4, clip_eps_high=4e-4),
    "rloo": dict(advantage="rloo", aggregation="token_mean", kl_in="reward"),
    "reinforce_pp": dict(advantage="reinforce_pp", aggregation="token_mean", kl_in="reward"),
}
assert set(PRESETS) == set(RL_LOSSES)
UNSET = ("", -1, -1.0)


def resolve(config) -> ml_collections.ConfigDict:
  """`config.rl` with every preset key filled in (a copy). dapo's overlong_cache -4 stands for a quarter of
  `max_new_tokens` (DAPO's 4k cache of a 16k budget)."""
  rl = ml_collections.ConfigDict(config.rl.to_dict())
  if rl.loss not in PRESETS:
    raise ValueError(f"config.rl.loss={rl.loss!r}; expected one of {', '.join(PRESETS)}")
  values = {**DEFAULTS, **PRESETS[rl.loss]}
  for key, value in values.items():
    if rl.get(key) in UNSET:
      rl[key] = value
  if rl.overlong_cache == -4:
    rl.overlong_cache = rl.max_new_tokens // 4
  if config.algorithm == "ppo" and rl.advantage != "gae":
    raise ValueError(f"config.rl.advantage={rl.advantage!r}: algorithm 'ppo' estimates advantages with its value "
                     f"model (gae); the critic-free estimators run under algorithm 'grpo'")
  if config.algorithm == "grpo" and rl.advantage == "gae":
    raise ValueError("config.rl.loss='ppo' (GAE) needs a value model: use algorithm 'ppo' (configs/ppo.py)")
  return rl
