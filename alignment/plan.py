"""How much memory a train step needs on each device, and how many FLOPs, before paying for the devices.

  python -m alignment.plan --config=configs/sft.py:smollm2
  python -m alignment.plan --config=configs/dpo.py:smollm2 --model=8B --chip=v5p --devices=64 \\
      --config.mesh.data=8 --config.mesh.fsdp=8 --config.model.dtype=bfloat16 --config.model.remat=full

Per device: the params of every model part, their optimizer state, the gradients of the trained parts,
and the activations of one micro-batch (what the backward keeps under `config.model.remat`, and the
working buffers of the step), each from shapes alone; nothing is compiled or allocated, so a 8B plan
takes a second on a laptop.

Params, optimizer state and gradients are exact: the shapes come from the model and the optimizer
(`jax.eval_shape`), each array cut as the config's sharding rules cut it over the mesh. Activations are
a model of what XLA keeps:
  * saved for the backward, per token and layer: the layer input (remat 'full'); the outputs of the
    weight matmuls (q, k, v, o, gate, up and down: 'dots'); those, the attention output and its float32
    scores ('all_dots'); everything autodiff keeps, 6 d_ff + 7 d_model more and the softmax twice ('none').
  * the larger of two working peaks: the backward of one layer (its recomputed intermediates, the scores'
    gradients), or the loss head (float32 logits of one vocabulary block).
Their coefficients (`_WORK`) were fitted to `compiled.memory_analysis()` of 67 CPU train steps of small
models (d_model 64-128, d_ff 128-512, vocab 512-2048, 2-4 layers, 64-512 tokens, every remat; within
17% of each) and predict SmolLM2-135M's, which they never saw, within 9% (tests/test_plan.py checks
20%). Other backends schedule differently: on a TPU or GPU read them as an estimate, and leave headroom.

Rows a step: sft, rm and dpo `train.batch_size` rows of `data.seq_len` tokens; grpo and ppo
`rl.prompts_per_step` x `rl.group_size` rows of `rl.max_prompt_tokens + rl.max_new_tokens` (the widest
they can be). A micro-batch is that over `optim.grad_accum_steps`, spread over data x fsdp.
"""

import json
import math
import sys
from typing import NamedTuple, Optional

from absl import app, flags
from ml_collections import config_flags


GiB = 2 ** 30

# Llama 3.2 1B and Llama 3.1 8B (their HF config.json).
SIZES = {
    "1B": dict(vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64, d_ff=8192,
               rope_theta=500000.0, tie_embeddings=True),
    "8B": dict(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, d_ff=14336,
               rope_theta=500000.0, tie_embeddings=False),
}


class Chip(NamedTuple):
  memory: float       # bytes of accelerator memory a device
  peak_flops: float   # dense bf16 FLOP/s a device


CHIPS = {"v5e": Chip(16 * GiB, 197e12), "v5p": Chip(95 * GiB, 459e12), "H100": Chip(80 * GiB, 989e12)}

# Working-buffer coefficients fitted to XLA:CPU's buffer assignment (module docstring): a layer's backward
# (its intermediates, its attention scores), the loss head's logits block, hidden-size float32 buffers.
_WORK = dict(layer=0.44, scores=2.36, head=2.40, hidden=11.1)

ALGORITHMS = ("sft", "rm", "dpo", "grpo", "ppo")


def _mean_keys(tokens: int) -> float:
  """Keys a query attends to on average in training's causal attention: query block i of B reads the
  first (i + 1) / B of the keys (alignment.models.transformer.query_blocks)."""
  from alignment.models.transformer import query_blocks
  blocks = query_blocks(tokens)
  return tokens * (blocks + 1) / (2 * blocks)


def model_config(name: str, config_model):
  """The ModelConfig `name` describes, with the run's dtype, remat and scan; reads no weights."""
  from alignment import models
  from alignment.models import hf
  runtime = dict(dtype=config_model.dtype, param_dtype=config_model.param_dtype, remat=config_model.remat,
                 scan_layers=config_model.scan_layers, frozen_layers=config_model.get("frozen_layers", 0),
                 frozen_embeddings=config_model.get("frozen_embeddings", False))
  if name in SIZES:
    return models.ModelConfig(**SIZES[name], **runtime)
  if name in models.PRESETS:
    return models.get_model_config(name, **runtime)
  from alignment.models import registry
  path = registry.NAMED_GGUFS[name]() if name in registry.NAMED_GGUFS else name
  if str(path).endswith(".gguf"):
    from alignment.models import gguf
    return hf.model_config(gguf.hf_config(gguf.read_metadata(str(path))), **runtime)
  if hf.is_hf_dir(str(path)):
    with open(f"{path}/config.json") as f:
      config = json.load(f)
    if "algorithm" in config:  # a training run's workdir: the model it trained
      return model_config(config["model"]["name"], config_model)
    return hf.model_config(config, **runtime)
  raise ValueError(f"--model={name!r}: not a named size ({', '.join(SIZES)}), a preset ({', '.join(models.PRESETS)}), "
                   f"a model name ({', '.join(registry.NAMED_GGUFS)}), a .gguf file, an HF directory or a workdir")


class Step(NamedTuple):
  rows: int        # rows a step, all devices
  tokens: int      # tokens a row
  parts: dict      # name -> (trains, scalar head); in the state's order; every model the policy's shape


def step_shape(config) -> Step:
  """The rows and models of one update of `config.algorithm` (module docstring)."""
  algorithm = config.algorithm
  if algorithm in ("sft", "rm", "dpo"):
    rows, tokens = config.train.batch_size, config.data.seq_len
  elif algorithm in ("grpo", "ppo"):
    rows = config.rl.prompts_per_step * config.rl.group_size
    tokens = config.rl.max_prompt_tokens + config.rl.max_new_tokens
  else:
    raise ValueError(f"config.algorithm={algorithm!r}: the planner knows {', '.join(ALGORITHMS)}")
  parts = {"reward": (True, True)} if algorithm == "rm" else {"policy": (True, False)}
  if algorithm == "dpo" and config.dpo.reference == "live":
    parts["ref"] = (False, False)
  if algorithm in ("grpo", "ppo"):
    from alignment.rl import presets  # the loss preset fills in the KL coefficient
    if presets.resolve(config).kl_coef > 0:
      parts["ref"] = (False, False)
  if algorithm == "ppo":
    parts["value"] = (True, True)
  if algorithm in ("grpo", "ppo") and "reward_model" in config.rl.rewards:  # scored on the devices (its shape assumed)
    parts["reward"] = (False, True)
  return Step(rows, tokens, parts)


def _abstract_mesh(mesh_sizes, devices: int):
  from jax.sharding import AbstractMesh, AxisType
  from alignment.parallel.mesh import MESH_AXES, mesh_shape
  shape = mesh_shape(mesh_sizes, devices, what="the plan has")
  return AbstractMesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _device_bytes(tree) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (the most any device holds)."""
  import jax
  return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


def state_bytes(config, cfg, step: Step, mesh) -> dict:
  """Bytes a device holds, exact: 'params', 'optimizer' (its state and the step's few counters) and
  'gradients'; for the activation model, 'embedding_gradient' (the trained embedding's, apart from the
  layers' while they run), 'layer' and 'embedding' (a device's share of one layer and of the embedding
  tables of every part in the step)."""
  from alignment.train import state as state_lib
  from alignment.train.model import _module
  from alignment.train.optim import model_optimizer
  optimizer = model_optimizer(config)
  parts = {name: state_lib.Part(state_lib.model_spec(_module(cfg, head)), None, optimizer if trains else None)
           for name, (trains, head) in step.parts.items()}
  rules = tuple(tuple(r) for r in config.sharding.rules)
  abstract = state_lib.abstract_state(parts, state_lib.state_shardings(parts, mesh, rules))
  trained = [name for name, (trains, _) in step.parts.items() if trains]
  trunk = lambda name: abstract[name]["backbone"] if step.parts[name][1] else abstract[name]
  params = sum(_device_bytes(abstract[name]) for name in parts)
  return dict(params=params, optimizer=_device_bytes(abstract) - params,  # with the step's counters and key
              gradients=sum(_device_bytes(abstract[name]) for name in trained),
              embedding_gradient=_device_bytes(abstract["policy"]["embed"])
              if "policy" in trained and not cfg.frozen_embeddings else 0,
              layer=sum(_device_bytes(trunk(name)["layers"]) for name in parts) / cfg.n_layers,
              embedding=sum(_device_bytes(trunk(name)["embed"]) for name in parts))


def _saved_per_token(cfg, tokens: int, tensor: int) -> tuple:
  """(bytes the backward keeps a token and layer under cfg.remat, the bytes of one layer's intermediates a
  token (scores apart), the float32 attention scores' bytes a token and layer)."""
  b = 2 if cfg.dtype == "bfloat16" else 4
  split = lambda n: n / tensor if n % tensor == 0 else n  # what the tensor axis divides
  attn_width = split(cfg.n_heads * cfg.head_dim)
  keys = _mean_keys(tokens)
  if cfg.sliding_window:
    keys = min(keys, cfg.sliding_window)
  scores = 4 * split(cfg.n_heads) * keys
  dots = b * (attn_width + 2 * split(cfg.n_kv_heads * cfg.head_dim) + 2 * split(cfg.d_ff) + 2 * cfg.d_model)
  elementwise = b * (6 * split(cfg.d_ff) + 7 * cfg.d_model)
  layer = dots + b * attn_width + elementwise
  saved = {"full": b * cfg.d_model, "dots": dots, "all_dots": dots + b * attn_width + scores,
           "none": layer + 2 * scores}[cfg.remat]
  return saved, layer, scores


def activation_bytes(cfg, step: Step, mesh, grad_accum: int, state: dict) -> dict:
  """{'activations': bytes a device beyond params, optimizer state and gradients; 'micro_rows'}.

  With fsdp > 1 a device gathers the weights it computes with: two layers at a time (the one running and
  the next) and the embedding for the loss head. XLA:CPU gathers more (all the stacked layers at once:
  SmolLM2 with fsdp=4 used 1.9x this model's temporaries); TPU and GPU schedules gather layer by layer."""
  gradients = state["gradients"]
  batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
  micro_rows = step.rows // grad_accum // batch_devices
  n = micro_rows * step.tokens
  saved, layer, scores = _saved_per_token(cfg, step.tokens, mesh.shape["tensor"])
  models = sum(1 for trains, _ in step.parts.values() if trains)
  kept = models * cfg.n_layers * n * saved
  hidden = _WORK["hidden"] * n * cfg.d_model * 4
  from alignment.kernels import BLOCKS
  vocab = min(cfg.vocab_size, BLOCKS["xla"]["cpu"]["block_vocab"])  # the columns of logits the fitted kernel holds
  vocab = vocab / mesh.shape["tensor"] if vocab % mesh.shape["tensor"] == 0 else vocab
  heads = any(trains and not head for trains, head in step.parts.values())
  # Accumulating micro-batches, the step sums each one's gradients into a float32 total: a second copy.
  accumulator = gradients * (2 if cfg.param_dtype == "bfloat16" else 1) if grad_accum > 1 else 0
  gather = mesh.shape["fsdp"] - 1
  peaks = [gradients + kept + n * (_WORK["layer"] * layer + _WORK["scores"] * scores) + hidden  # a layer's backward
           + 2 * gather * state["layer"] + accumulator,
           state["embedding_gradient"] + kept + heads * _WORK["head"] * n * vocab * 4 + hidden  # the loss head
           + gather * state["embedding"],
           2 * gradients]                                                                     # the update
  return dict(activations=max(peaks) - gradients, micro_rows=micro_rows)


def step_flops(cfg, step: Step) -> float:
  """Matmul FLOPs of one update over all devices: forward, backward (twice the forward) and what remat
  recomputes, for each trained model; a frozen one (reference, reward model) runs forward only."""
  tokens = step.rows * step.tokens
  qkvo = cfg.d_model * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
  layer = 2 * (qkvo + 3 * cfg.d_model * cfg.d_ff)  # a token's weight matmuls
  attention = 2 * 2 * cfg.n_heads * cfg.head_dim * _mean_keys(step.tokens)  # q k^T and p v
  recompute = {"none": 0, "full": layer + attention, "dots": attention, "all_dots": 0}[cfg.remat]
  total = 0.0
  for trains, head in step.parts.values():
    unembed = 2 * cfg.d_model * (1 if head else cfg.vocab_size)
    forward = cfg.n_layers * (layer + attention) + unembed
    total += tokens * (3 * forward + cfg.n_layers * recompute if trains else forward)
  return total


def plan(config, model: Optional[str] = None, chip: Optional[str] = None, devices: Optional[int] = None) -> dict:
  """The plan of one train step (module docstring) as a dict of bytes a device and FLOPs."""
  import jax
  if chip is not None and chip not in CHIPS:
    raise ValueError(f"--chip={chip!r}; expected one of {', '.join(CHIPS)}")
  devices = devices or jax.device_count()
  mesh = _abstract_mesh(config.mesh, devices)
  cfg = model_config(model or config.model.name, config.model)
  step = step_shape(config)
  rows = mesh.shape["data"] * mesh.shape["fsdp"] * config.optim.grad_accum_steps
  if step.rows % rows:
    key = "train.batch_size" if config.algorithm in ("sft", "rm", "dpo") else "rl.prompts_per_step x rl.group_size"
    raise ValueError(f"config.{key}={step.rows} must be divisible by data x fsdp ({rows // config.optim.grad_accum_steps}) "
                     f"x config.optim.grad_accum_steps ({config.optim.grad_accum_steps})")
  memory = state_bytes(config, cfg, step, mesh)
  act = activation_bytes(cfg, step, mesh, config.optim.grad_accum_steps, memory)
  for key in ("embedding_gradient", "layer", "embedding"):
    del memory[key]
  memory["activations"] = act["activations"]
  total = sum(memory.values())
  flops = step_flops(cfg, step)
  out = dict(model=model or config.model.name, algorithm=config.algorithm, devices=devices, mesh=dict(mesh.shape),
             remat=cfg.remat, dtype=cfg.dtype, rows=step.rows, tokens_per_row=step.tokens,
             micro_rows_per_device=act["micro_rows"], parts=list(step.parts), **{f"{k}_bytes": v for k, v in memory.items()},
             total_bytes=total, step_flops=flops, flops_per_device=flops / devices)
  if chip is not None:
    out.update(chip=chip, chip_memory_bytes=CHIPS[chip].memory, fits=total <= CHIPS[chip].memory,
               seconds_at_peak=flops / devices / CHIPS[chip].peak_flops)
  return out


def _size(n: float) -> str:
  for unit, scale in (("GiB", GiB), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
    if n >= scale:
      return f"{n / scale:.2f} {unit}"
  return f"{n:.0f} B"


def format_plan(p: dict) -> str:
  mesh = " ".join(f"{k}={v}" for k, v in p["mesh"].items())
  lines = [f"{p['model']} · {p['algorithm']} ({', '.join(p['parts'])}) · {p['devices']} devices, mesh {mesh} · "
           f"{p['dtype']}, remat {p['remat']}",
           f"a step: {p['rows']} rows x {p['tokens_per_row']} tokens ({p['micro_rows_per_device']} a device a micro-batch)",
           "per device:"]
  for key in ("params", "optimizer", "gradients", "activations", "total"):
    lines.append(f"  {key:<12} {_size(p[key + '_bytes']):>12}")
  lines.append(f"FLOPs a step: {p['step_flops']:.3g} ({p['flops_per_device']:.3g} a device)")
  if "chip" in p:
    verdict = "fits" if p["fits"] else "does NOT fit"
    lines.append(f"on {p['chip']} ({p['chip_memory_bytes'] / GiB:.0f} GiB): {verdict}; "
                 f"{p['seconds_at_peak'] * 1e3:.1f} ms a step at peak FLOP/s, "
                 f"{p['seconds_at_peak'] / 0.4 * 1e3:.1f} ms at 40% of it")
  return "\n".join(lines)


def define_flags() -> None:
  """The command's flags (defined when it runs, so that importing the planner defines none)."""
  config_flags.DEFINE_config_file("config", None, "configs/<algorithm>.py:<preset>[,key=value]", lock_config=True)
  flags.DEFINE_string("model", None, "plan another model than config.model.name: a named size (1B, 8B), a preset, "
                      "a model name, a .gguf file, an HF directory or a workdir")
  flags.DEFINE_string("chip", None, "the accelerator: v5e, v5p, H100 (its memory and peak bf16 FLOP/s)")
  flags.DEFINE_integer("devices", None, "devices in the job (default: this machine's)")
  flags.DEFINE_bool("json", False, "print the plan as one JSON object")
  flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from alignment import choices
  config = flags.FLAGS.config
  try:
    choices.check_config(config)
    p = plan(config, flags.FLAGS.model, flags.FLAGS.chip, flags.FLAGS.devices)
  except (ValueError, FileNotFoundError, ImportError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(json.dumps(p) if flags.FLAGS.json else format_plan(p))


if __name__ == "__main__":
  from alignment import console
  define_flags()
  console.run(main, flags_parser=console.parse_config_flags)
