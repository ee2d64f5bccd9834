"""Reward modeling with a Bradley-Terry loss on preference pairs.

  python -m alignment.main --config=configs/rm.py:tiny --workdir=/tmp/rm
  python -m alignment.main --config=configs/rm.py:smollm2 --workdir=/tmp/rm_smol \
      --config.data.train_path=hh_rlhf.jsonl
  python -m alignment.main --config=configs/rm.py:gym --workdir=workdirs/rm_gym   # PPO's reward model (configs/ppo.py)

Preset `gym`: SmolLM2-135M-Instruct scoring the alignment gym's preference pairs, sized for a 2-core CPU like
`configs/dpo.py:gym` (the bottom 20 of 30 layers and the embedding frozen), a tenth of the prompts held out
for the pair accuracy.
"""

from configs import common


def get_config(arg=None):
  a = common.parse_arg(arg, ["tiny", "smollm2", "gym"], steps=0, batch_size=0, seq_len=0)
  c = common.base_config()
  c.algorithm = "rm"
  c.data = common.preference_data("pref_generic.jsonl")
  c.rm = dict(
      center_coef=0.0,    # reward centring (Eisenstein et al. 2023): coef * (r_chosen + r_rejected)^2
      use_margin=False,   # subtract the data's per-pair margin inside the sigmoid
  )
  lr, steps, eval_every = (1e-3, 60, 30) if a.preset == "tiny" else (1e-5, 100, 50)
  common.apply_preset(c, "smollm2" if a.preset == "gym" else a.preset, lr=lr, steps=steps, eval_every=eval_every)
  if a.preset == "gym":
    c.data.train_path, c.data.eval_fraction = "gym:train", 0.1
    c.data.seq_len, c.data.pairs_per_row, c.data.max_length = 512, 4, 256
    c.train.batch_size, c.train.steps, c.train.eval_every, c.train.ckpt_every = 2, 40, 20, 0
    c.model.frozen_layers, c.model.frozen_embeddings = 20, True
    c.optim.lr, c.optim.warmup_steps = 5e-5, 5
  common.apply_run_args(c, a)
  return c
