"""Tokens a training step processes with and without prefix sharing (`alignment.rl.prefix`), on the gym's
train prompts in SmolLM2-135M-Instruct's chat template. Prints one JSON object.

  python benchmarks/prefix_tokens.py

GRPO: every train probe's prompt with G = 4 and G = 8 completions of COMPLETION_TOKENS tokens each (an
assumption: no sampling is run; only lengths matter). DPO: each preference pair's prompt with its chosen
and rejected answers, tokenized as `preference_pipeline.tokenize_sequence` does for training. Tokens are
the real (non-padding) cells of `build_rows`' layouts; a shared layout packs whole groups into rows of
SEQ_LEN, an unshared one has one row per completion.
"""

import json
import time

import numpy as np

from alignment.data import chat, preference_pipeline
from alignment.evals import gym
from alignment.models import gguf, registry
from alignment.models.sampler import encode_chat
from alignment.rl import prefix

COMPLETION_TOKENS = 64
SEQ_LEN = 2048


def tokenizer():
  """SmolLM2-135M-Instruct's tokenizer, from its GGUF's metadata (the weights are not needed here)."""
  path = str(registry.smollm2_gguf())
  return registry.gguf_tokenizer(path, gguf.read_metadata(path))


def compare(prompts, completions, group_size):
  """Token counts of both layouts of the same groups: in all, and per group (a step of B prompts
  processes B times as many)."""
  shared = prefix.build_rows(prompts, completions, group_size, SEQ_LEN, share=True)
  unshared = prefix.build_rows(prompts, completions, group_size, SEQ_LEN, share=False)
  n = len(prompts)
  mean = lambda seqs: round(float(np.mean([len(s) for s in seqs])), 1)
  return {"groups": n, "group_size": group_size, "mean_prompt_tokens": mean(prompts),
          "mean_completion_tokens": mean(completions), "unshared_tokens": unshared.tokens,
          "shared_tokens": shared.tokens, "unshared_tokens_per_group": round(unshared.tokens / n, 1),
          "shared_tokens_per_group": round(shared.tokens / n, 1),
          "saved_fraction": round(1 - shared.tokens / unshared.tokens, 4)}


def grpo(prompts, group_size):
  return compare(prompts, [[1] * COMPLETION_TOKENS] * (len(prompts) * group_size), group_size)


def dpo(tok):
  """Each pair's shared prompt is the render up to its first completion token (the same for both sides:
  the render of the prompt with the generation prompt)."""
  template = tok.chat_template or chat.load_template()
  prompts, completions = [], []
  for pair in gym.preference_pairs("train"):
    messages = [{"role": "user", "content": pair["prompt"]}]
    sides = [preference_pipeline.tokenize_sequence(messages, pair[s], tok, template) for s in ("chosen", "rejected")]
    starts = [int(np.flatnonzero(mask)[0]) for _, mask in sides]
    heads = [ids[:start].tolist() for (ids, _), start in zip(sides, starts)]
    if heads[0] != heads[1]:
      raise ValueError(f"pair {pair['id']}: chosen and rejected tokenize the prompt differently")
    prompts.append(heads[0])
    completions += [ids[start:].tolist() for (ids, _), start in zip(sides, starts)]
  return compare(prompts, completions, 2)


def main():
  start = time.perf_counter()
  tok = tokenizer()
  prompts = encode_chat(tok, [gym.probe_text(p) for p in gym.load_probes("train")])
  result = {"tokenizer": "smollm2-135m-instruct", "seq_len": SEQ_LEN,
            "assumption": f"GRPO completions are {COMPLETION_TOKENS} tokens each (none sampled); tokens = "
                          "non-padding cells (a sequence's last token is never an input: it has no target)",
            "grpo": {f"G={g}": grpo(prompts, g) for g in (4, 8)}, "dpo": dpo(tok),
            "seconds": round(time.perf_counter() - start, 1)}
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
