"""The closed sets of values config keys take, in one module that imports nothing heavy, so a bad value
is refused in the first second of a run, before any model or data is touched.

The modules that act on these values (`alignment.models.config`, `alignment.train.optim`,
`alignment.kernels`, ...) take their tuples from here.
"""

DTYPES = ("float32", "bfloat16")
REMATS = ("none", "full", "dots", "all_dots")
SCHEDULES = ("cosine", "linear", "constant")
KERNEL_IMPLS = ("auto", "naive", "xla", "pallas", "pallas_tpu", "pallas_gpu")
NAN_POLICIES = ("skip", "halt")
PREFERENCE_FORMATS = ("hh", "ultrafeedback", "jsonl")
TRUNCATIONS = ("truncate", "drop")
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust", "simpo", "orpo")
DPO_REFERENCES = ("live", "cached")
EVAL_SUITES = ("gym:test", "gym:train", "")
RL_LOSSES = ("ppo", "grpo", "dr_grpo", "dapo", "gspo", "rloo", "reinforce_pp")
ADVANTAGES = ("gae", "grpo", "dr_grpo", "rloo", "reinforce_pp")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
KL_ESTIMATORS = ("k1", "k2", "k3", "abs")
KL_PLACES = ("loss", "reward")
RATIO_LEVELS = ("token", "sequence")
LONG_PROMPTS = ("truncate", "drop")
VALUE_INITS = ("policy", "reward_model")
DATA_FILTERS = ("quality", "exact_dedup", "near_dedup")
CLASSIFIER_FEATURES = ("live", "cached")

# dotted config key -> the values it may take (a key the config does not have is not checked)
CONFIG_CHOICES = {
    "model.dtype": DTYPES,
    "model.param_dtype": DTYPES,
    "model.remat": REMATS,
    "optim.schedule": SCHEDULES,
    "kernel.impl": KERNEL_IMPLS,
    "train.nan_policy": NAN_POLICIES,
    "data.format": ("auto",) + PREFERENCE_FORMATS,
    "data.truncation": TRUNCATIONS,
    "dpo.loss_type": DPO_LOSS_TYPES,
    "dpo.reference": DPO_REFERENCES,
    "evals.suite": EVAL_SUITES,
    "rl.loss": RL_LOSSES,
    # "" in these: the loss preset's value (alignment.rl.presets)
    "rl.advantage": ("",) + ADVANTAGES,
    "rl.aggregation": ("",) + AGGREGATIONS,
    "rl.kl_estimator": KL_ESTIMATORS,
    "rl.kl_in": ("",) + KL_PLACES,
    "rl.ratio_level": ("",) + RATIO_LEVELS,
    "rl.long_prompts": LONG_PROMPTS,
    "rl.value_init": VALUE_INITS,
    "classifier.features": CLASSIFIER_FEATURES,
}


# dotted config key -> the values each item of its comma list may take
CONFIG_LIST_CHOICES = {"data.filters.apply": DATA_FILTERS}


def check_config(config) -> None:
  """Raises ValueError naming the first key whose value (or list item) is not one of its choices."""
  for key, allowed in CONFIG_CHOICES.items():
    value = _get(config, key)
    if value is not None and value not in allowed:
      raise ValueError(f"config.{key}={value!r}; expected one of {', '.join(repr(a) for a in allowed)}")
  for key, allowed in CONFIG_LIST_CHOICES.items():
    value = _get(config, key)
    for item in (i.strip() for i in (value or "").split(",")):
      if item and item not in allowed:
        raise ValueError(f"config.{key}: unknown item {item!r}; expected items of {', '.join(allowed)}")


def _get(config, key: str):
  node = config
  for part in key.split("."):
    node = node.get(part) if hasattr(node, "get") else None
    if node is None:
      return None
  return node
