"""Pieces every config shares: argument parsing, mesh, sharding rules, optimizer and loop defaults.

A config file is `configs/<algorithm>.py` with `get_config(arg)`, where `arg` is a comma list
`preset,key=value,...` (big_vision style): `--config=configs/sft.py:tiny,steps=20`. Anything else is
overridden on the command line: `--config.optim.lr=1e-4`.
"""

import os

import ml_collections

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures")

# Logical parameter axes -> mesh axes. FSDP shards the model width, tensor parallelism the heads,
# the MLP and the vocabulary; batches are split over ('data', 'fsdp').
SHARDING_RULES = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("layers", None),
)


def parse_arg(arg, presets, **defaults):
  """'preset,k=v,...' -> ConfigDict of {preset, **defaults overridden by k=v}, types taken from defaults."""
  parts = [p for p in (arg or "").split(",") if p]
  preset = parts.pop(0) if parts and "=" not in parts[0] else presets[0]
  if preset not in presets:
    raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(presets)}")
  values = dict(defaults)
  for part in parts:
    key, sep, raw = part.partition("=")
    if not sep or key not in defaults:
      raise ValueError(f"config argument {part!r}: expected key=value with key in {sorted(defaults)}")
    kind = type(defaults[key])
    values[key] = (raw.lower() in ("1", "true", "yes")) if kind is bool else kind(raw)
  return ml_collections.ConfigDict(dict(preset=preset, **values))


def base_config():
  """Defaults shared by every algorithm; presets override what they need."""
  c = ml_collections.ConfigDict()
  c.algorithm = ""
  c.seed = 0
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.sharding = ml_collections.ConfigDict(dict(rules=SHARDING_RULES))
  c.kernel = ml_collections.ConfigDict(dict(impl="auto"))  # auto | naive | xla | pallas

  c.model = ml_collections.ConfigDict()
  c.model.name = "tiny-random"   # a preset, a registered model name, a .gguf file or an HF directory
  c.model.dtype = "float32"      # compute dtype
  c.model.param_dtype = "float32"
  c.model.remat = "none"         # none | full | dots
  c.model.scan_layers = True

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-4
  c.optim.schedule = "cosine"    # cosine | linear | constant
  c.optim.warmup_steps = 0
  c.optim.end_lr_ratio = 0.1
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.0
  c.optim.clip_norm = 1.0
  c.optim.grad_accum_steps = 1

  c.train = ml_collections.ConfigDict()
  c.train.steps = 100
  c.train.batch_size = 8         # global, in rows of seq_len tokens
  c.train.seed = 0
  c.train.log_every = 1
  c.train.eval_every = 0         # 0: evaluate at the end only if eval data exists
  c.train.eval_batches = 0       # 0: the whole eval split
  c.train.ckpt_every = 0         # 0: only at the end (and on SIGTERM)
  c.train.max_to_keep = 2
  return c
