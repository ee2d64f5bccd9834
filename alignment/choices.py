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
}


def check_config(config) -> None:
  """Raises ValueError naming the first key whose value is not one of its choices."""
  for key, allowed in CONFIG_CHOICES.items():
    node = config
    for part in key.split("."):
      node = node.get(part) if hasattr(node, "get") else None
      if node is None:
        break
    if node is not None and node not in allowed:
      raise ValueError(f"config.{key}={node!r}; expected one of {', '.join(repr(a) for a in allowed)}")
