"""Supervised fine-tuning.

  python -m alignment.main --config=configs/sft.py:tiny --workdir=/tmp/sft
  python -m alignment.main --config=configs/sft.py:smollm2,steps=200 --workdir=/tmp/sft_smol \
      --config.data.train_path=my_chats.jsonl
"""

import os

from configs import common


def get_config(arg=None):
  a = common.parse_arg(arg, ["tiny", "smollm2"], steps=0, batch_size=0, seq_len=0)
  c = common.base_config()
  c.algorithm = "sft"
  c.data = dict(
      train_path=os.path.join(common.FIXTURES, "sft_messages.jsonl"),
      eval_path="",           # empty: hold out `eval_fraction` of the train file
      eval_fraction=0.1,
      data_dir="",            # where TFDS prepares the data; empty: ~/.cache/alignment/tfds
      tokenizer="",           # tokenizer.json; empty: the model's own
      chat_template="",       # a .jinja file; empty: the model's own
      seq_len=128,
      pack=True,
      seed=0,
      filters=common.data_filters(),
  )
  if a.preset == "tiny":
    common.apply_preset(c, a.preset, lr=3e-3, steps=100, eval_every=50)
  else:
    common.apply_preset(c, a.preset, lr=2e-5, steps=100, eval_every=50)
    c.optim.weight_decay = 0.01
  common.apply_run_args(c, a)
  return c


def get_sweep(arg=None):
  """Learning rate x packing: the first ablation anyone runs on a new SFT set."""
  return [{"optim.lr": lr, "data.pack": pack} for lr in (1e-3, 3e-3) for pack in (True, False)]
