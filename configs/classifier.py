"""A classifier (algorithm "classifier"): a scalar head read at each sequence's last token, trained with
a logistic loss on labelled prompts and prompt-response pairs; its threshold is chosen on the eval split
for `classifier.target_fpr` (alignment/safety/classifier.py).

  python -m alignment.main --config=configs/classifier.py:tiny --workdir=/tmp/clf
  python -m alignment.main --config=configs/classifier.py:safety --workdir=workdirs/guard
  python -m alignment.safety.classifier --workdir=workdirs/guard --split=held_out

Preset `safety`: SmolLM2-135M-Instruct as loaded, its hidden states averaged at layers 6, 10, ..., 30 and
computed once (`features='cached'`), a linear head trained full-batch with an L2 penalty on the real-world
safety prompts of `alignment.safety.data`: train on its train split, thresholds on its calibration split;
the held-out split is for the report. With `alignment.safety.pairs` files as train and eval paths it
learns prompt-response pairs too, and the output check gets its own threshold.
"""

import os

from configs import common


def get_config(arg=None):
  a = common.parse_arg(arg, ["tiny", "safety"], steps=0, batch_size=0, seq_len=0)
  c = common.base_config()
  c.algorithm = "classifier"
  c.data = dict(
      train_path=os.path.join(common.FIXTURES, "labelled_train.jsonl"),  # JSONL or safety:<split>
      eval_path=os.path.join(common.FIXTURES, "labelled_eval.jsonl"),    # the threshold is chosen here
      data_dir="",            # where TFDS prepares the data; empty: ~/.cache/alignment/tfds
      tokenizer="",           # tokenizer.json; empty: the model's own
      chat_template="",       # a .jinja file; empty: the model's own
      seq_len=128,            # tokens per row
      examples_per_row=4,     # sequences packed into one row
      max_length=0,           # per sequence, its last tokens kept; 0: seq_len
      seed=0,
      filters=common.data_filters(),
  )
  c.classifier = dict(
      target_fpr=0.05,    # the calibration FPR the threshold allows
      taps="1,2",         # the depths (layer counts) whose averaged hidden states the head reads
      features="live",    # live: every step runs the backbone | cached (the whole backbone frozen:
                          #   config.model.frozen_*): its features are computed once (kept in cache_dir)
                          #   and only the head runs
      cache_dir="",       # empty: ~/.cache/alignment/classifier_features
      l2=0.0,             # the mean loss gets l2 * |head weights|^2
  )
  if a.preset == "tiny":
    common.apply_preset(c, "tiny", lr=3e-3, steps=60, eval_every=30)
  else:
    common.apply_preset(c, "smollm2", lr=3e-3, steps=300, eval_every=100)
    c.data.train_path, c.data.eval_path = "safety:train", "safety:calibration"
    c.data.seq_len, c.data.examples_per_row, c.data.max_length = 512, 8, 512
    c.classifier.taps, c.classifier.features, c.classifier.l2 = "6,10,14,18,22,26,30", "cached", 0.003
    c.model.frozen_layers, c.model.frozen_embeddings = 30, True
    c.train.batch_size = 8
  common.apply_run_args(c, a)
  return c
