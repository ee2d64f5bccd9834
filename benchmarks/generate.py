"""Sampler throughput against transformers' `generate` on SmolLM2-135M-Instruct (CPU, float32).

  python benchmarks/generate.py [--batch=8] [--new_tokens=64] [--repeats=3]

Both decode greedily with a KV cache, from the same chat-templated prompts (left-padded batch), for
exactly `new_tokens` tokens per row (no early EOS stop), from the same GGUF weights. tokens/s counts
generated tokens (batch * new_tokens) over wall time, the median of `repeats`, after one warm-up run
each (our compile time is reported separately). The two alternate, one run each per repeat, so load
from anything else on a shared machine falls on both alike. Prints one JSON object.
"""

import argparse
import json
import os
import platform
import time

import jax
import numpy as np

from alignment import models
from alignment.models import registry, sampler

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "hi",
             "List three prime numbers and explain why each is prime.", "Tell me a fun fact about octopuses.",
             "How do I reverse a list in Python?", "Why is the sky blue?", "Give me a synonym for happy."]


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--new_tokens", type=int, default=64)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--skip_transformers", action="store_true")
  args = ap.parse_args()

  model, tok = models.load("smollm2-135m-instruct")
  qs = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.batch)]
  prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True),
                        add_special_tokens=False).ids for q in qs]
  tokens, lengths = sampler.pad_prompts(prompts, pad_id=2)
  s = sampler.SamplingConfig(max_new_tokens=args.new_tokens, greedy=True, eos_ids=(), pad_id=2)
  n_tokens = args.batch * args.new_tokens

  def ours():
    out = sampler.sample(model, tokens, lengths, s)
    jax.block_until_ready(out)
    return out

  t = time.perf_counter()
  ours()
  first = time.perf_counter() - t
  runs = {"ours": ours}
  if not args.skip_transformers:
    import torch
    from transformers import AutoModelForCausalLM
    path = registry.smollm2_gguf()
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    width = tokens.shape[1]
    kw = dict(input_ids=torch.tensor(tokens), max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
              attention_mask=torch.tensor((np.arange(width)[None] >= (width - lengths)[:, None]).astype(np.int64)),
              do_sample=False, pad_token_id=2)

    def theirs():
      with torch.no_grad():
        return ref.generate(**kw)

    theirs()  # warm-up
    runs["transformers"] = theirs
  outputs, seconds = {}, {name: [] for name in runs}
  for _ in range(args.repeats):
    for name, fn in runs.items():
      t = time.perf_counter()
      outputs[name] = fn()
      seconds[name].append(time.perf_counter() - t)
  rate = {name: n_tokens / float(np.median(ts)) for name, ts in seconds.items()}
  result = {
      "model": "smollm2-135m-instruct (Q4_1 GGUF dequantised, float32)", "batch": args.batch,
      "new_tokens": args.new_tokens, "prompt_lengths": [len(p) for p in prompts],
      "ours_tokens_per_s": rate["ours"], "ours_seconds": seconds["ours"],
      "ours_compile_and_first_run_s": first, "device": str(jax.devices()[0].platform),
      "cpu_count": os.cpu_count(), "machine": platform.machine(),
      "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
  }
  if not args.skip_transformers:
    # transformers suppresses EOS (min_new_tokens) where we emit it: compare rows before our first EOS.
    mine, hf_new = np.asarray(outputs["ours"].tokens), outputs["transformers"][:, width:].numpy()
    stop = [int(np.argmax(r == 2)) if (r == 2).any() else len(r) for r in mine]
    agree = np.mean([(a[:n] == b[:n]).all() for a, b, n in zip(mine, hf_new, stop)])
    result.update({"transformers_tokens_per_s": rate["transformers"], "transformers_seconds": seconds["transformers"],
                   "speedup": rate["ours"] / rate["transformers"],
                   "rows_identical_to_transformers_before_eos": float(agree),
                   "torch_threads": torch.get_num_threads()})
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
