"""Direct preference optimisation and its variants (sigmoid, hinge, ipo, robust, simpo, orpo).

  python -m alignment.main --config=configs/dpo.py:tiny --workdir=/tmp/dpo
  python -m alignment.main --config=configs/dpo.py:smollm2 --workdir=/tmp/dpo_smol \
      --config.dpo.loss_type=ipo --config.dpo.reference=cached
"""

from configs import common


def get_config(arg=None):
  a = common.parse_arg(arg, ["tiny", "smollm2"], steps=0, batch_size=0, seq_len=0, loss_type="")
  c = common.base_config()
  c.algorithm = "dpo"
  c.data = common.preference_data("pref_generic.jsonl")
  c.dpo = dict(
      loss_type="sigmoid",   # sigmoid | hinge | ipo | robust | simpo | orpo
      beta=0.1,
      label_smoothing=0.0,   # cDPO (sigmoid) / robust DPO noise rate
      nll_coef=0.0,          # adds nll_coef * the chosen completion's per-token NLL (RPO)
      simpo_gamma=0.5,       # SimPO target margin
      orpo_alpha=0.1,        # ORPO odds-ratio weight
      use_margin=False,      # offset the logit by the data's per-pair margin (sigmoid, robust)
      reference="live",      # live: frozen copy in the state | cached: log-probs computed once, on disk
      ref_cache_dir="",      # empty: ~/.cache/alignment/ref_logps
  )
  lr, steps, eval_every = (1e-3, 60, 30) if a.preset == "tiny" else (5e-7, 100, 50)
  common.apply_preset(c, a.preset, lr=lr, steps=steps, eval_every=eval_every)
  c.train.eval_at_start = True
  common.apply_run_args(c, a)
  if a.loss_type:
    c.dpo.loss_type = a.loss_type
  return c


def get_sweep(arg=None):
  """The DPO-variant ablation: each loss type at two betas."""
  return [{"dpo.loss_type": t, "dpo.beta": b} for t in ("sigmoid", "ipo", "hinge", "simpo") for b in (0.1, 0.5)]
