"""PPO-RLHF with a value model (Ouyang et al. 2022): per-token KL in the reward, GAE, clipped policy and
value losses, several epochs of minibatches per rollout.

  python -m alignment.main --config=configs/ppo.py:tiny --workdir=/tmp/ppo
  python -m alignment.main --config=configs/rm.py:gym --workdir=workdirs/rm_gym        # the reward model
  python -m alignment.main --config=configs/ppo.py:smollm2 --workdir=workdirs/ppo \\
      --config.rl.reward_model=workdirs/rm_gym

Presets:
  tiny     the random tiny model with a rule reward on its text, a value model from the policy
  smollm2  SmolLM2-135M-Instruct on the gym's train prompts, rewarded by a reward model
           (`config.rl.reward_model`, trained by configs/rm.py), its value model initialised from it
"""

from configs import common


def get_config(arg=None):
  a = common.parse_arg(arg, ["tiny", "smollm2"], steps=0, reward_model="", kl_target=0.0)
  c = common.rl_config("ppo", "ppo")
  c.rl.epochs, c.rl.minibatches = 2, 2
  if a.preset == "tiny":
    c.model.name = "tiny-random"
    c.rl.rewards = "vowels"
    c.rl.max_prompt_tokens, c.rl.max_new_tokens = 96, 24
    c.optim.lr = 2e-3
    c.rl.value_lr = 3e-3
    c.rl.epochs = 1
    c.train.steps = 40
  else:
    c.model.name = "smollm2-135m-instruct"
    c.rl.rewards = "reward_model"
    c.rl.reward_model = a.reward_model
    c.rl.value_init = "reward_model"
    c.rl.prompts_per_step, c.rl.group_size, c.rl.max_new_tokens = 8, 2, 48
    c.model.frozen_layers, c.model.frozen_embeddings = 20, True
    c.optim.lr, c.rl.value_lr = 1e-4, 1e-4
    c.train.steps = 20
    c.train.ckpt_every_s = 600.0
  if a.steps:
    c.train.steps = a.steps
  if a.kl_target:
    c.rl.kl_target = a.kl_target
  return c


def get_sweep(arg=None):
  """KL coefficient against a fixed and an adaptive controller."""
  return [{"rl.kl_coef": k, "rl.kl_target": t} for k in (0.02, 0.1) for t in (0.0, 4.0)]
