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
  lr, steps, eval_every = (1e-3, 60, 30) if a.preset == "tiny" else (1e-5, 100, 50)
  common.apply_preset(c, a.preset, lr=lr, steps=steps, eval_every=eval_every)
  common.apply_run_args(c, a)
  return c
