"""Reward modeling with a Bradley-Terry loss on preference pairs.

  python -m alignment.main --config=configs/rm.py:tiny --workdir=/tmp/rm
  python -m alignment.main --config=configs/rm.py:smollm2 --workdir=/tmp/rm_smol \
      --config.data.train_path=hh_rlhf.jsonl
"""

from configs import common


def get_config(arg=None):
  a = common.parse_arg(arg, ["tiny", "smollm2"], steps=0, batch_size=0, seq_len=0)
  c = common.base_config()
  c.algorithm = "rm"
  c.data = common.preference_data("pref_generic.jsonl")
  c.rm = dict(
      center_coef=0.0,    # reward centring (Eisenstein et al. 2023): coef * (r_chosen + r_rejected)^2
      use_margin=False,   # subtract the data's per-pair margin inside the sigmoid
  )
  if a.preset == "tiny":
    c.model.name = "tiny-random"
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 10
    c.train.steps = 60
    c.train.batch_size = 8
    c.train.eval_every = 30
  else:
    c.model.name = "smollm2-135m-instruct"
    c.data.seq_len = 512
    c.optim.lr = 1e-5
    c.optim.warmup_steps = 10
    c.train.steps = 100
    c.train.batch_size = 8
    c.train.eval_every = 50
    c.train.ckpt_every = 50
  common.apply_run_args(c, a)
  return c
