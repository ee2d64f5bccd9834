"""The critic-free family: GRPO, Dr. GRPO, DAPO, GSPO, RLOO, REINFORCE++ (`config.rl.loss`).

  python -m alignment.main --config=configs/grpo.py:tiny --workdir=/tmp/grpo
  python -m alignment.main --config=configs/grpo.py:tiny,loss=dapo --workdir=/tmp/dapo
  python -m alignment.main --config=configs/grpo.py:gym --workdir=workdirs/grpo_gym

Presets:
  tiny     the random tiny model, a rule reward on its text (`vowels`), 40 steps
  smollm2  SmolLM2-135M-Instruct on the gym's train prompts, graded by the gym's verifiers
  gym      smollm2 sized for a 2-core CPU, with the gym's held-out test split evaluated before and after
"""

from configs import common


def get_config(arg=None):
  a = common.parse_arg(arg, ["tiny", "smollm2", "gym"], steps=0, loss="grpo", group_size=0, prompts_per_step=0)
  c = common.rl_config("grpo", a.loss)
  _apply_preset(c, a.preset)
  if a.steps:
    c.train.steps = a.steps
  if a.group_size:
    c.rl.group_size = a.group_size
  if a.prompts_per_step:
    c.rl.prompts_per_step = a.prompts_per_step
  return c


def _apply_preset(c, preset):
  if preset == "tiny":
    c.model.name = "tiny-random"
    c.rl.prompts = "gym:train"
    c.rl.rewards = "vowels"
    c.rl.max_prompt_tokens, c.rl.max_new_tokens = 96, 24
    c.optim.lr = 2e-3
    c.train.steps = 40
    return
  c.model.name = "smollm2-135m-instruct"
  c.rl.prompts, c.rl.rewards = "gym:train", "gym"
  c.rl.max_prompt_tokens, c.rl.max_new_tokens = 256, 64
  c.rl.temperature = 1.0
  c.optim.lr = 1e-6
  c.train.steps = 100
  c.train.ckpt_every_s = 600.0
  if preset == "gym":
    # Half the gym's train prompts are sycophancy, and SmolLM2 refuses a harmful request (or abstains on an
    # unanswerable one) about 1 time in 10, so most such groups have no right answer to reinforce: a fifth of the
    # sycophancy prompts, the harmful, jailbreak and honesty ones twice, 8 samples a prompt, and dynamic sampling
    # (up to 3 draws of 4 prompts, the groups whose rewards differ first) give those kinds their gradient.
    c.rl.kind_weights = "sycophancy:0.2,honesty:2,harmful:2,jailbreak:2"
    c.rl.dynamic_sampling, c.rl.max_draws = 1, 3
    c.rl.prompts_per_step, c.rl.group_size, c.rl.max_new_tokens = 4, 8, 48
    c.rl.kl_coef = 0.1
    c.model.frozen_layers, c.model.frozen_embeddings = 20, True
    c.optim.lr = 5e-5
    c.train.steps = 20
    c.train.eval_at_start = True
    c.evals.every = c.train.steps
    c.evals.max_new_tokens, c.evals.batch_size, c.evals.kl_probes = 48, 33, 16


def get_sweep(arg=None):
  """The critic-free presets side by side, two group sizes each."""
  return [{"rl.loss": loss, "rl.group_size": g} for loss in ("grpo", "dr_grpo", "dapo", "gspo", "rloo", "reinforce_pp")
          for g in (4, 8)]
