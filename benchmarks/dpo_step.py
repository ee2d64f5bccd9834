"""One DPO training step on SmolLM2-135M-Instruct on CPU: ours against TRL's DPOTrainer. Prints JSON.

  python benchmarks/dpo_step.py [--pairs 4] [--steps 3] [--layout rows|packed] [--remat R] [--skip_trl]

Both sides train the same weights (TRL loads our HF export of the GGUF model) on the same pairs, in
float32, batch of `--pairs` pairs, with a live reference model and with precomputed reference
log-probabilities. Tokens/s counts the real (non-padding) tokens of the chosen and rejected sequences.
`model_flops_ratio` = the model FLOPs of the step per second / this machine's dense float32 matmul
FLOP/s, both measured in this run, counted the usual way: 6 per weight per token (2 for the live
reference's forward), the unembedding included at every token, plus causal attention;
`needed_flops_ratio` counts the unembedding only at the completion tokens, the only logits DPO reads
(and the only ones our step computes: `logit_capacity`, estimated as training does). The matmul rate
is sampled before the timed steps and after each reference's (it moved by a quarter between runs
minutes apart) and the median divides. TRL runs with bf16 and gradient checkpointing off (its defaults
are on), padding each batch to its longest row as it does. Set MALLOC_MMAP_MAX_=0
MALLOC_TRIM_THRESHOLD_=100000000000 to remove glibc's allocator cost (reported in the output).
Needs the benchmark extra: pip install -e '.[bench]'.
"""

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from alignment import models
from alignment.data import chat, preference_pipeline
from alignment.models.config import REMATS
from alignment.parallel import make_mesh, replicated, shard_batch
from alignment.train import state as state_lib
from alignment.train.dpo import estimate_logit_capacity, make_loss_fn, sequence_logps
from alignment.train.model import setup_model
from alignment.train.optim import make_optimizer
from alignment.train.step import make_train_step
from configs import dpo as dpo_config
from configs.common import SHARDING_RULES

TOPICS = ["rivers", "volcanoes", "bridges", "glaciers", "deserts", "forests", "harbours", "comets"]


def make_pairs(n: int, prompt_words: int, completion_words: int):
  """Deterministic English-like pairs of controlled length (no dataset download needed)."""
  rng = np.random.default_rng(0)
  words = ("the a of water stone light river city north south time people long small old new high low "
           "found built moved across under over because many few early late").split()
  text = lambda k: " ".join(rng.choice(words, size=k)).capitalize() + "."
  pairs = []
  for i in range(n):
    topic = TOPICS[i % len(TOPICS)]
    prompt = f"Write a short paragraph about {topic}. Notes: {text(prompt_words)}"
    pairs.append({"prompt": [{"role": "user", "content": prompt}],
                  "chosen": text(completion_words), "rejected": text(completion_words)})
  return pairs


def median_seconds(fn, steps: int, warmup: int = 1):
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times), times


def matmul_flops_per_second(n: int = 2048, repeats: int = 5) -> float:
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  seconds, _ = median_seconds(lambda: f(a, b).block_until_ready(), repeats)
  return 2 * n ** 3 / seconds


def model_flops(cfg, tokens: int, seq_lens, with_reference: bool, logit_tokens: Optional[int] = None) -> float:
  """Matmul FLOPs of one step: policy forward+backward (6 per weight per token) plus the reference
  forward (2), over the layer weights and the unembedding, plus causal attention scores and values.
  The unembedding counts at `logit_tokens` tokens (default: every token, the usual 6N per token)."""
  d, f, h, kv, dh, layers = cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_layers
  layer_weights = layers * (d * h * dh + 2 * d * kv * dh + h * dh * d + 3 * d * f)
  logit_tokens = tokens if logit_tokens is None else logit_tokens
  attention = sum(2 * 2 * layers * h * dh * (t * (t + 1) / 2) for t in seq_lens)  # QK^T and PV, causal
  passes = 3 + (1 if with_reference else 0)  # fwd + bwd (2x) [+ reference fwd]
  return passes * (2 * layer_weights * tokens + 2 * d * cfg.vocab_size * logit_tokens + attention)


def ours(pairs, args, tokenizer, template, matmul_samples):
  config = dpo_config.get_config("smollm2")
  config.kernel.impl = args.impl
  config.model.remat = args.remat or config.model.remat
  setup = setup_model(config.model, 0)
  mesh = make_mesh({"data": 1}, jax.devices()[:1])
  params_sharding = state_lib.param_shardings(setup.spec, mesh, SHARDING_RULES)
  optimizer = make_optimizer(config.optim, 100)
  lengths = [len(preference_pipeline.tokenize_sequence(p["prompt"], p[side], tokenizer, template)[0])
             for p in pairs for side in ("chosen", "rejected")]
  round_up = lambda n: -(-n // 64) * 64
  if args.layout == "packed":  # all pairs in one row: no padding beyond 63 tokens, attention over the whole row
    rows, pairs_per_row, seq_len = 1, len(pairs), round_up(sum(lengths))
  else:  # one pair a row: padding up to the longest pair, attention only over each pair's row
    rows, pairs_per_row, seq_len = len(pairs), 1, round_up(max(map(sum, zip(lengths[::2], lengths[1::2]))))
  it = preference_pipeline.make_preference_eval_iterator(
      pairs, tokenizer=tokenizer, template=template, seq_len=seq_len, batch_size=rows, pairs_per_row=pairs_per_row,
      max_length=max(lengths))
  host_batch = next(it)
  assert int(host_batch["pair_mask"].sum()) == len(pairs)
  tokens = int((host_batch["segment_ids"] > 0).sum())
  completion_tokens = int(host_batch["loss_mask"].sum())
  # The whole data set is this one batch, so its most completion cells a row is exact: no headroom (what
  # `resolve_logit_capacity` concludes for a split it has seen whole, one pair a row).
  capacity = (estimate_logit_capacity([host_batch], seq_len, headroom=1.0) if args.logit_capacity < 0
              else args.logit_capacity)
  out = {"tokens_per_step": tokens, "completion_tokens": completion_tokens, "layout": args.layout,
         "rows": rows, "row_len": seq_len, "logit_capacity": capacity, "remat": config.model.remat}
  with jax.set_mesh(mesh):
    for reference in ("live", "cached"):
      config.dpo.reference = reference
      loss_fn = make_loss_fn(setup.spec.graphdef, config.dpo, impl=args.impl, pairs_per_row=pairs_per_row,
                             logit_capacity=capacity)
      batch = dict(host_batch)
      parts = {"policy": setup.part(optimizer)}
      if reference == "live":
        parts["ref"] = setup.part()
      else:
        ref = jax.jit(lambda p, b: sequence_logps(setup.spec.graphdef, p, b, impl=args.impl,
                                                  pairs_per_row=pairs_per_row, logit_capacity=capacity))(
            setup.load_params(params_sharding), shard_batch(host_batch, mesh))
        batch["ref_chosen_logps"], batch["ref_rejected_logps"] = np.asarray(ref["chosen"]), np.asarray(ref["rejected"])
      shardings = state_lib.state_shardings(parts, mesh, SHARDING_RULES)
      state = state_lib.create_train_state(parts, shardings, 0)
      global_batch = shard_batch(batch, mesh)
      step = jax.jit(make_train_step(loss_fn, {"policy": optimizer}, 1, "num_pairs"), donate_argnums=0,
                     out_shardings=(shardings, replicated(mesh)))
      holder = {"state": state}

      def run():
        holder["state"], metrics = step(holder["state"], global_batch)
        jax.block_until_ready(metrics["loss"])

      seconds, times = median_seconds(run, args.steps)
      matmul_samples.append(matmul_flops_per_second())
      flops = model_flops(setup.cfg, tokens, lengths, reference == "live")
      needed = model_flops(setup.cfg, tokens, lengths, reference == "live", logit_tokens=completion_tokens)
      out[reference] = {"step_s": seconds, "times_s": times, "tokens_per_s": tokens / seconds,
                        "model_flops_per_s": flops / seconds, "needed_flops_per_s": needed / seconds}
      del holder, state
  return out, setup


def trl(pairs, args, model, tokenizer, tokens: int):
  import torch
  import transformers
  from datasets import Dataset
  from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
  from trl import DPOConfig, DPOTrainer
  from alignment.models import hf

  torch.manual_seed(0)
  out = {"torch_threads": torch.get_num_threads(), "trl": __import__("trl").__version__,
         "transformers": transformers.__version__}
  with tempfile.TemporaryDirectory() as export_dir:
    hf.export(model, tokenizer, export_dir)
    dataset = Dataset.from_list([{"prompt": p["prompt"], "chosen": [{"role": "assistant", "content": p["chosen"]}],
                                  "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs])
    for reference in ("live", "cached"):
      hf_tokenizer = AutoTokenizer.from_pretrained(export_dir)
      policy = AutoModelForCausalLM.from_pretrained(export_dir, torch_dtype=torch.float32)
      ref_model = AutoModelForCausalLM.from_pretrained(export_dir, torch_dtype=torch.float32)
      times = []

      class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
          self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
          times.append(time.perf_counter() - self.t)

      with tempfile.TemporaryDirectory() as output_dir:
        config = DPOConfig(output_dir=output_dir, per_device_train_batch_size=len(pairs), max_steps=args.steps + 1,
                           learning_rate=5e-7, bf16=False, gradient_checkpointing=False, report_to=[],
                           logging_steps=1, save_strategy="no", use_cpu=True, max_length=1024,
                           precompute_ref_log_probs=reference == "cached", dataloader_num_workers=0,
                           dataset_num_proc=None, seed=0)
        trainer = DPOTrainer(model=policy, ref_model=ref_model, args=config,
                             train_dataset=dataset.repeat(args.steps + 2) if hasattr(dataset, "repeat") else dataset,
                             processing_class=hf_tokenizer, callbacks=[Timer()])
        with contextlib.redirect_stdout(sys.stderr):  # TRL prints its logs; stdout carries only the JSON
          trainer.train()
      seconds = statistics.median(times[1:])  # the first step warms up
      out[reference] = {"step_s": seconds, "times_s": times, "tokens_per_s": tokens / seconds}
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--pairs", type=int, default=4)
  parser.add_argument("--prompt_words", type=int, default=48)
  parser.add_argument("--completion_words", type=int, default=30)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--impl", default="auto")
  parser.add_argument("--layout", choices=("rows", "packed"), default="rows",
                      help="rows: one pair a row (padded to the longest pair); packed: every pair in one row")
  parser.add_argument("--logit_capacity", type=int, default=-1,
                      help="logits per row at the completion cells (-1: estimated as training does; 0: every cell)")
  parser.add_argument("--remat", choices=REMATS,
                      help="what the backward keeps of the forward (default: the smollm2 preset's)")
  parser.add_argument("--skip_trl", action="store_true")
  args = parser.parse_args()

  model, tokenizer = models.load("smollm2-135m-instruct")
  template = getattr(tokenizer, "chat_template", None) or chat.load_template()
  pairs = make_pairs(args.pairs, args.prompt_words, args.completion_words)
  result = {"device": jax.devices()[0].device_kind, "cores": os.cpu_count(), "jax": jax.__version__,
            "pairs": args.pairs, "malloc_tuned": os.environ.get("MALLOC_MMAP_MAX_") == "0"}
  matmul_samples = [matmul_flops_per_second()]
  result["ours"], _ = ours(pairs, args, tokenizer, template, matmul_samples)
  result["matmul_flops_per_s_samples"] = matmul_samples
  result["matmul_flops_per_s"] = statistics.median(matmul_samples)
  tokens = result["ours"]["tokens_per_step"]
  for reference in ("live", "cached"):
    for name in ("model", "needed"):
      result["ours"][reference][f"{name}_flops_ratio"] = (result["ours"][reference][f"{name}_flops_per_s"] /
                                                          result["matmul_flops_per_s"])
  if not args.skip_trl:
    result["trl"] = trl(pairs, args, model, tokenizer, tokens)
    result["ratio_tokens_per_s_ours_over_trl"] = {
        r: result["ours"][r]["tokens_per_s"] / result["trl"][r]["tokens_per_s"] for r in ("live", "cached")}
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
