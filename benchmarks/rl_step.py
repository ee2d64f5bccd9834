"""One GRPO iteration on SmolLM2-135M-Instruct on CPU: ours against TRL's GRPOTrainer. Prints JSON.

  python benchmarks/rl_step.py [--prompts 8] [--group 4] [--max_new_tokens 64] [--iters 3] [--rounds 2] [--skip_ours]

An iteration samples `group` completions for each of `prompts` chat-templated prompts (temperature 1, top_p 1,
stopping at EOS or after `max_new_tokens`), scores them with `rule_reward`, takes the reference log-probs for the
k3 KL (beta 0.04) and makes one AdamW step (lr 1e-6) on the GRPO loss (per-sequence token mean, advantages
scaled by the group's std), float32, all prompts * group completions in one batch. Both sides start from the same
weights (TRL loads our HF export of the GGUF model).

Phases, each the median over the timed iterations: generate_s (prompt templating, sampling, decoding),
score_s (the no-grad log-prob passes before the loss: TRL runs only the reference's here, as with one gradient
step per rollout the old log-probs equal the policy's own, detached in the loss), reward_s, train_s (loss
forward+backward, clipping, optimizer step), other_s (the rest of the iteration: padding, advantages, metrics)
and total_s (the whole iteration, its sampling included); cpu_s is the process's CPU seconds (all threads) in the
iteration, less moved than wall time by other jobs on a shared machine. first_iter_s is each side's warm-up
iteration; response_len the mean completion length in tokens, EOS included.

The sides take turns so that load from others on a shared machine falls on both alike: `--rounds` rounds of
`--iters` iterations each, every side built once and kept between its rounds, the first round adding the build
and the warm-up iteration. A side is `side(args, prompts, reward, turn) -> dict` that calls `turn()` before each of
its rounds; the sides run in threads, one at a time.
"""

import argparse
import contextlib
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import threading
import time

import jax

from alignment import models

PHASES = ("generate_s", "score_s", "reward_s", "train_s", "other_s", "total_s", "cpu_s")
QUESTIONS = ["Write one sentence about rivers.", "Describe a volcano in one sentence.",
             "Name three animals that live in forests.", "Write a short sentence about the moon.",
             "Say something kind about bridges.", "Give one fact about glaciers.",
             "Write a two-line poem about rain.", "Explain in one sentence what a harbour is."]
BETA, LEARNING_RATE, TEMPERATURE, TOP_P = 0.04, 1e-6, 1.0, 1.0


def make_prompts(n: int):
  """User turns only; each side applies the model's chat template (TRL does for conversational prompts)."""
  return [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}] for i in range(n)]


def rule_reward(texts) -> list:
  """Fraction of words of at most 4 letters (0 without words): cheap, deterministic, varies within a group."""
  out = []
  for text in texts:
    words = re.findall(r"[A-Za-z]+", text)
    out.append(sum(len(w) <= 4 for w in words) / len(words) if words else 0.0)
  return out


def summarize(iterations, first_iter_s: float, **extra) -> dict:
  """The side's result: per-phase medians over the timed iterations, plus the raw totals."""
  out = {k: statistics.median(it[k] for it in iterations) for k in PHASES}
  out.update(first_iter_s=first_iter_s, response_len=statistics.mean(it["response_len"] for it in iterations),
             totals_s=[it["total_s"] for it in iterations], **extra)
  return out


def ours_side(args, prompts, reward, turn=lambda: None) -> dict:
  """`alignment.rl.loop.Learner` (what `python -m alignment.main --config=configs/grpo.py:smollm2` runs) on
  the same workload: its iteration reports the phases' times itself."""
  turn()
  from alignment.parallel import make_mesh
  from alignment.rl import rewards as rewards_lib
  from alignment.rl.loop import Learner
  from alignment.train import state as state_lib
  from configs import grpo

  rewards_lib.register("short_words")(lambda config, mesh: lambda records, completions: reward(completions))
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "prompts.jsonl")
    with open(path, "w") as f:
      f.writelines(json.dumps({"prompt": p}) + "\n" for p in prompts)
    config = grpo.get_config("smollm2")
    config.rl.update(prompts=path, rewards="short_words", prompts_per_step=args.prompts, group_size=args.group,
                     max_new_tokens=args.max_new_tokens, temperature=TEMPERATURE, top_p=TOP_P, kl_coef=BETA)
    config.optim.lr = LEARNING_RATE
    config.train.steps = 1 + args.iters * args.rounds
    mesh = make_mesh({"data": -1})
    learner = Learner(config, mesh)
  iterations, first = [], None
  with jax.set_mesh(mesh):
    state = state_lib.create_train_state(learner.parts, learner.shardings, config.train.seed)
    for step in range(1, config.train.steps + 1):
      start, cpu_start = time.perf_counter(), time.process_time()
      state, step_metrics, record = learner.iteration(state, step)
      jax.block_until_ready(state)
      it = {k: record[f"time/{k}"] for k in ("generate_s", "score_s", "reward_s", "train_s")}
      it.update(total_s=time.perf_counter() - start, cpu_s=time.process_time() - cpu_start,
                response_len=record["rollout/response_len"])
      it["other_s"] = it["total_s"] - sum(it[k] for k in ("generate_s", "score_s", "reward_s", "train_s"))
      if first is None:
        first = it
      else:
        iterations.append(it)
        if len(iterations) % args.iters == 0 and len(iterations) < args.iters * args.rounds:
          turn()
  return summarize(iterations, first["total_s"], jax=jax.__version__,
                   score_passes="old log-probs (for the ratio and the sampler/trainer mismatch) and reference, "
                                "one jitted function")


def trl_side(args, prompts, reward, turn=lambda: None) -> dict:
  turn()
  import torch
  import transformers
  import trl
  from datasets import Dataset
  from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
  from trl import GRPOConfig, GRPOTrainer
  from alignment.models import hf

  steps = 1 + args.iters * args.rounds
  phases = {}  # the current iteration's
  iterations, first = [], {}

  @contextlib.contextmanager
  def clock(name):
    t = time.perf_counter()
    yield
    phases[name] = phases.get(name, 0.0) + time.perf_counter() - t

  class Timed(GRPOTrainer):
    """Clocks the phases by the methods TRL runs them in (trl/trainer/grpo_trainer.py)."""

    def _generate(self, prompts):
      with clock("generate_s"):
        out = super()._generate(prompts)
      phases["response_len"] = statistics.mean(len(ids) for ids in out[1])
      return out

    def _get_per_token_logps_and_entropies(self, *a, **k):
      if torch.is_grad_enabled():  # the loss's forward, part of train_s
        return super()._get_per_token_logps_and_entropies(*a, **k)
      with clock("score_s"):
        return super()._get_per_token_logps_and_entropies(*a, **k)

    def _calculate_rewards(self, *a, **k):
      with clock("reward_s"):
        return super()._calculate_rewards(*a, **k)

    def _prepare_inputs(self, *a, **k):
      out = super()._prepare_inputs(*a, **k)
      phases["rollout_end"] = time.perf_counter()
      return out

  class Steps(TrainerCallback):
    """An iteration is one optimizer step, from before its sampling to after its parameter update."""

    def on_step_begin(self, *a, **kwargs):
      phases.clear()
      phases["start"], phases["cpu_start"] = time.perf_counter(), time.process_time()

    def on_step_end(self, *a, **kwargs):
      now = time.perf_counter()
      it = {k: phases.get(k, 0.0) for k in ("generate_s", "score_s", "reward_s")}
      it.update(train_s=now - phases["rollout_end"], total_s=now - phases["start"],
                cpu_s=time.process_time() - phases["cpu_start"], response_len=phases["response_len"])
      it["other_s"] = it["total_s"] - sum(it[k] for k in ("generate_s", "score_s", "reward_s", "train_s"))
      if first:
        iterations.append(it)
      else:
        first.update(it)
      done = len(iterations)
      if done and done % args.iters == 0 and done < args.iters * args.rounds:
        turn()

  def completion_reward(prompts, completions, **kwargs):
    return reward([c[0]["content"] for c in completions])

  model, tokenizer = models.load("smollm2-135m-instruct")
  with tempfile.TemporaryDirectory() as export_dir, tempfile.TemporaryDirectory() as output_dir:
    hf.export(model, tokenizer, export_dir)  # the reference model is loaded from here too, at beta > 0
    del model
    config = GRPOConfig(
        output_dir=output_dir, use_cpu=True, bf16=False, gradient_checkpointing=False, seed=0,
        per_device_train_batch_size=args.prompts * args.group, gradient_accumulation_steps=1, steps_per_generation=1,
        num_generations=args.group, num_iterations=1, max_steps=steps, learning_rate=LEARNING_RATE,
        max_completion_length=args.max_new_tokens, temperature=TEMPERATURE, top_p=TOP_P, top_k=0,
        beta=BETA, loss_type="grpo", scale_rewards="group", disable_dropout=True, shuffle_dataset=False,
        use_vllm=False, logging_strategy="no", save_strategy="no", report_to=[], dataloader_num_workers=0)
    # The prompts once per step, in order: every step samples the same batch, and no epoch ends inside the run.
    dataset = Dataset.from_list([{"prompt": p} for p in prompts] * steps)
    trainer = Timed(model=AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32),
                    reward_funcs=completion_reward, args=config, train_dataset=dataset,
                    processing_class=AutoTokenizer.from_pretrained(export_dir), callbacks=[Steps()])
    with contextlib.redirect_stdout(sys.stderr):  # TRL prints; stdout carries only the JSON
      trainer.train()
  assert len(iterations) == args.iters * args.rounds, len(iterations)
  return summarize(iterations, first["total_s"], trl=trl.__version__, transformers=transformers.__version__,
                   torch=torch.__version__, torch_threads=torch.get_num_threads(),
                   config={k: getattr(config, k) for k in (
                       "per_device_train_batch_size", "gradient_accumulation_steps", "steps_per_generation",
                       "num_generations", "num_iterations", "max_completion_length", "temperature", "top_p",
                       "top_k", "beta", "loss_type", "scale_rewards", "epsilon", "epsilon_high", "learning_rate",
                       "max_grad_norm", "bf16", "gradient_checkpointing", "use_vllm")})


class Turns:
  """Runs the sides in threads, one at a time: `turn()` hands over to the next unfinished side (in the order
  given) and waits until its own turn comes back; a side's first `turn()` only waits. A side's error ends
  every side at its next `turn()`."""

  def __init__(self, names):
    self.order, self.running, self.started = list(names), set(names), set()
    self.active, self.error = self.order[0], None
    self.cond = threading.Condition()

  def _pass(self, name):
    i = self.order.index(name)
    for other in self.order[i + 1:] + self.order[:i + 1]:
      if other in self.running:
        self.active = other
        break
    self.cond.notify_all()

  def turn(self, name):
    with self.cond:
      if name in self.started:
        self._pass(name)
      self.started.add(name)
      self.cond.wait_for(lambda: self.active == name or self.error is not None)
      if self.error is not None:
        raise RuntimeError(f"{name} stopped: another side failed") from self.error

  def finish(self, name, error=None):
    with self.cond:
      self.running.discard(name)
      self.error = self.error or error
      if self.active == name:
        self._pass(name)
      self.cond.notify_all()


def run_alternating(sides, args, prompts, reward) -> dict:
  turns, results, errors = Turns(sides), {}, []

  def run(name, side):
    try:
      results[name] = side(args, prompts, reward, lambda: turns.turn(name))
      turns.finish(name)
    except BaseException as e:  # handed to the main thread
      errors.append(e)
      turns.finish(name, e)

  threads = [threading.Thread(target=run, args=item, daemon=True) for item in sides.items()]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  if errors:
    raise errors[0]
  return results


def machine() -> dict:
  cpu = platform.processor()
  with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
    cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
  return {"cpu": cpu, "cores": os.cpu_count(), "device": jax.devices()[0].device_kind, "jax": jax.__version__,
          "python": platform.python_version(), "load_avg_at_start": os.getloadavg()}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--prompts", type=int, default=8)
  parser.add_argument("--group", type=int, default=4, help="completions per prompt (TRL's num_generations)")
  parser.add_argument("--max_new_tokens", type=int, default=64)
  parser.add_argument("--iters", type=int, default=3, help="timed iterations per side and round")
  parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (ours, trl, ours, trl, ...)")
  parser.add_argument("--skip_ours", action="store_true")
  args = parser.parse_args()

  prompts = make_prompts(args.prompts)
  result = {"machine": machine(), "workload": {
      "model": "smollm2-135m-instruct (Q4_1 GGUF dequantised, float32)", "prompts": args.prompts,
      "group": args.group, "completions": args.prompts * args.group, "max_new_tokens": args.max_new_tokens,
      "iters": args.iters, "rounds": args.rounds, "warmup_iters": 1, "temperature": TEMPERATURE, "top_p": TOP_P,
      "beta": BETA, "kl": "k3", "learning_rate": LEARNING_RATE, "loss": "grpo (per-sequence token mean)",
      "scale_rewards": "group std", "updates_per_rollout": 1, "reward": rule_reward.__doc__}}
  sides = {"trl": trl_side} if args.skip_ours else {"ours": ours_side, "trl": trl_side}
  result.update(run_alternating(sides, args, prompts, rule_reward))
  if "ours" in result:
    result["speedup_vs_trl"] = result["trl"]["total_s"] / result["ours"]["total_s"]
    result["cpu_speedup_vs_trl"] = result["trl"]["cpu_s"] / result["ours"]["cpu_s"]
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
