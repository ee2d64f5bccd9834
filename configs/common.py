"""Pieces every config shares: argument parsing, mesh, sharding rules, optimizer and loop defaults.

A config file is `configs/<algorithm>.py` with `get_config(arg)`, where `arg` is a comma list
`preset,key=value,...` (big_vision style): `--config=configs/sft.py:tiny,steps=20`. Anything else is
overridden on the command line: `--config.optim.lr=1e-4`.
"""

import dataclasses
import os

import ml_collections

from alignment.data import filters

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
    if kind is bool:
      values[key] = raw.lower() in ("1", "true", "yes")
      continue
    try:
      values[key] = kind(raw)
    except ValueError:
      raise ValueError(f"config argument {part!r}: {key} takes {'an' if kind is int else 'a'} {kind.__name__}, "
                       f"got {raw!r}") from None
  return ml_collections.ConfigDict(dict(preset=preset, **values))


PRESET_MODELS = {"tiny": "tiny-random", "smollm2": "smollm2-135m-instruct"}


def apply_preset(c, preset: str, *, lr: float, steps: int, eval_every: int):
  """What a preset sets beyond the algorithm: the model, the run's length, and for the real model a
  longer sequence, warmup and mid-run checkpoints (half-way, and every 10 minutes)."""
  c.model.name = PRESET_MODELS[preset]
  c.optim.lr = lr
  c.train.steps = steps
  c.train.batch_size = 8
  c.train.eval_every = eval_every
  if preset == "tiny":
    c.optim.warmup_steps = 5
  else:
    c.data.seq_len = 512
    c.optim.warmup_steps = 10
    c.train.ckpt_every = steps // 2
    c.train.ckpt_every_s = 600.0
  return c


def apply_run_args(c, a):
  """The run-size arguments every config accepts after the preset: steps, batch_size, seq_len (0 = keep)."""
  if a.steps:
    c.train.steps = a.steps
  if a.batch_size:
    c.train.batch_size = a.batch_size
  if a.seq_len:
    c.data.seq_len = a.seq_len
  return c


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
  c.model.remat = "all_dots"     # none | full | dots | all_dots (alignment/models/config.py)
  c.model.scan_layers = True
  c.model.frozen_layers = 0      # the first n layers get no gradient (only the layers above are trained)
  c.model.frozen_embeddings = False  # nor does the embedding table (tied: the unembedding too)

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
  c.train.eval_every = 0         # 0: no evaluation during training
  c.train.eval_at_start = False  # also evaluate the starting params (logged as step 0)
  c.train.eval_batches = 0       # 0: the whole eval split
  c.train.ckpt_every = 0         # 0: only at the end (and on SIGTERM / Ctrl-C)
  c.train.ckpt_every_s = 0.0     # also save on a logged step once this many seconds passed since the last save
  c.train.max_to_keep = 2
  c.train.nan_policy = "skip"    # a non-finite loss or gradient norm: skip the update | halt the run

  # Gym evals during training (generating policies: sft, dpo): greedy answers to the suite's probes,
  # graded; reports in WORKDIR/evals, rates and reward-hacking monitors in metrics.jsonl.
  c.evals = ml_collections.ConfigDict()
  c.evals.every = 0              # 0: off; else every n steps, at the last step, and at step 0 with eval_at_start
  c.evals.suite = "gym:test"     # gym:test | gym:train | '' (only evals.probes)
  c.evals.probes = ""            # a JSONL file of probes (alignment.evals.gym.read_probes_jsonl)
  c.evals.limit = 0              # n probes spread over the kinds, the same every time (0: all)
  c.evals.max_new_tokens = 64
  c.evals.batch_size = 16
  c.evals.kl_probes = 32         # KL to a live reference measured on this many probes (0: all of them)
  return c


def data_filters():
  """`config.data.filters`: the filters to apply when the data is prepared (`apply`, a comma list of
  quality | exact_dedup | near_dedup, run in that order) and their thresholds (alignment.data.filters)."""
  return ml_collections.ConfigDict(dict(dataclasses.asdict(filters.DEFAULTS), apply=""))


def preference_data(train_file: str):
  """The data block of the preference algorithms (rm, dpo): local JSONL in HH-RLHF, UltraFeedback or
  generic {prompt, chosen, rejected[, margin]} format."""
  return ml_collections.ConfigDict(dict(
      train_path=os.path.join(FIXTURES, train_file),
      eval_path="",           # empty: hold out `eval_fraction` of the train file's prompts
      eval_fraction=0.1,
      format="auto",          # auto | hh | ultrafeedback | jsonl
      data_dir="",            # where TFDS prepares the data; empty: ~/.cache/alignment/tfds
      tokenizer="",           # tokenizer.json; empty: the model's own
      chat_template="",       # a .jinja file; empty: the model's own
      seq_len=256,            # tokens per row
      pairs_per_row=1,        # preference pairs packed into one row (chosen and rejected together)
      max_length=0,           # per sequence; 0: seq_len // 2 (a pair always fits one row)
      truncation="truncate",  # a completion too long for max_length: truncate (prompt kept) | drop
      seed=0,
      filters=data_filters(),
  ))


def rl_config(algorithm: str, loss: str):
  """The online-RL block (`alignment.rl`). Keys left "" or -1 take the loss preset's value
  (`alignment.rl.presets`); set them to override it."""
  c = base_config()
  c.algorithm = algorithm
  c.data = ml_collections.ConfigDict(dict(
      tokenizer="",        # tokenizer.json; empty: the model's own
      chat_template="",    # a .jinja file; empty: the model's own (ChatML for a tokenizer without one)
  ))
  c.rl = ml_collections.ConfigDict(dict(
      loss=loss,                 # ppo | grpo | dr_grpo | dapo | gspo | rloo | reinforce_pp
      prompts="gym:train",       # gym:train | gym:test | a .jsonl file of {"prompt": ..., ...}
      kind_weights="",           # kind:weight,... scales each kind's count in the prompt set (records with a 'kind')
      prompts_per_step=8,
      group_size=4,              # completions per prompt (G)
      max_prompt_tokens=256,
      long_prompts="truncate",   # a longer prompt: truncate (keep its end) | drop
      max_new_tokens=64,
      share_prompts=True,        # a group's prompt once in the training rows, its completions packed after it
                                 # (when the update takes the batch whole: minibatches 1, grad_accum_steps 1)
      pack_len=1024,             # tokens a row of shared prompts and completions holds (at least one group)
      temperature=1.0,
      top_p=1.0,
      top_k=0,
      rewards="gym",             # name[:weight],... (alignment.rl.rewards) or package.module:function[:weight]
      reward_model="",           # the workdir of a reward model (reward 'reward_model', value_init 'reward_model')
      kl_coef=-1.0,              # 0: no reference model
      kl_estimator="k3",         # k1 | k2 | k3 | abs
      kl_in="",                  # loss | reward
      kl_target=0.0,             # > 0: Ziegler et al.'s adaptive coefficient, aiming at this KL per sequence
      kl_horizon=10000,
      advantage="",              # gae | grpo | dr_grpo | rloo | reinforce_pp
      aggregation="",            # token_mean | seq_mean_token_mean | seq_mean_token_sum_norm
      clip_eps=-1.0,
      clip_eps_high=-1.0,        # 0: = clip_eps
      ratio_level="",            # token | sequence (GSPO)
      entropy_coef=0.0,
      epochs=1,                  # passes over each rollout batch
      minibatches=1,             # optimizer steps per pass
      tis_cap=0.0,               # > 0: truncated importance sampling of the sampler / trainer mismatch
      dynamic_sampling=-1,       # 1: keep only groups whose rewards differ, drawing more prompts (DAPO)
      max_draws=4,
      log_samples=4,             # completions written to WORKDIR/samples.jsonl each logged step (the run report's)
      overlong_cache=-1,         # > 0: DAPO's soft overlong penalty over the last this-many tokens
      whiten_advantages=True,    # PPO: advantages whitened over the valid tokens
      missing_eos_penalty=0.0,   # subtracted from the score of a completion cut at max_new_tokens
      reward_clip=0.0,           # > 0: scores clipped to [-reward_clip, reward_clip]
      gamma=1.0,
      lam=0.95,
      vf_coef=0.1,
      vf_clip=0.2,
      value_init="policy",       # policy | reward_model
      value_lr=0.0,              # 0: optim.lr
  ))
  c.optim.clip_norm = 1.0
  c.optim.schedule = "constant"
  return c
