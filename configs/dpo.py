"""Direct preference optimisation and its variants (sigmoid, hinge, ipo, robust, simpo, orpo).

  python -m alignment.main --config=configs/dpo.py:tiny --workdir=/tmp/dpo
  python -m alignment.main --config=configs/dpo.py:smollm2 --workdir=/tmp/dpo_smol \
      --config.dpo.loss_type=ipo --config.dpo.reference=cached
  python -m alignment.main --config=configs/dpo.py:gym --workdir=workdirs/dpo_gym  # DPO alone on the gym pairs

Preset `gym`: SmolLM2-135M-Instruct on the alignment gym's preference pairs, sized for a 2-core CPU
(about 120 of the 400 pairs, the top 10 of 30 layers trained), with the gym's test split evaluated before and after.
`make demo` (alignment/safety/stack.py) runs it as its DPO stage, from its SFT run, on its own pairs.
"""

from configs import common


def get_config(arg=None):
  a = common.parse_arg(arg, ["tiny", "smollm2", "gym"], steps=0, batch_size=0, seq_len=0, loss_type="")
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
      logit_capacity=-1,     # logits at up to this many completion cells a row (a batch over it takes the
                             # every-cell path: same result, slower); -1 estimates it from the data, 0: every cell
  )
  lr, steps, eval_every = (1e-3, 60, 30) if a.preset == "tiny" else (5e-7, 100, 50)
  common.apply_preset(c, "smollm2" if a.preset == "gym" else a.preset, lr=lr, steps=steps, eval_every=eval_every)
  c.train.eval_at_start = True
  if a.preset == "gym":
    _gym_preset(c)
  common.apply_run_args(c, a)
  if a.preset == "gym":
    c.evals.every = c.train.steps  # step 0 (eval_at_start) and the last step
  if a.loss_type:
    c.dpo.loss_type = a.loss_type
  return c


def _gym_preset(c):
  """The demo, sized for a 2-core CPU: every gym pair may train (no held-out pairs: the gym's test
  templates are the held-out set); 20 steps of two 512-token rows (about 120 of the 400 pairs: twice the
  Adam steps of four-row batches in the same time; held-out sycophancy rose only with these steps and
  the gym's v4 pairs together, README); the embedding and the bottom 20 of 30 layers frozen, so a step is
  one shared trunk pass for the policy and its reference plus the top 10 layers of each and the backward
  of the policy's; an NLL term on the chosen side (RPO) so the policy learns to say the chosen answers,
  not only to avoid the rejected ones. lr 2e-5: at 5e-5 (or with the embedding trained) the refusals
  spread to benign requests."""
  c.data.train_path = "gym:train"
  c.data.eval_fraction = 0.0
  c.data.seq_len, c.data.pairs_per_row, c.data.max_length = 512, 4, 256
  c.train.batch_size, c.train.steps = 2, 20
  c.train.eval_every, c.train.ckpt_every = 0, 0
  c.model.frozen_layers, c.model.frozen_embeddings = 20, True
  c.optim.lr, c.optim.schedule, c.optim.warmup_steps = 2e-5, "constant", 0
  c.dpo.nll_coef = 1.0
  c.evals.max_new_tokens, c.evals.batch_size, c.evals.kl_probes = 48, 33, 16


def get_sweep(arg=None):
  """The DPO-variant ablation: each loss type at two betas."""
  return [{"dpo.loss_type": t, "dpo.beta": b} for t in ("sigmoid", "ipo", "hinge", "simpo") for b in (0.1, 0.5)]
