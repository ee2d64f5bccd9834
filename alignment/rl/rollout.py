"""Rollouts: G completions per prompt from the KV-cache sampler on the live params, the training batch
they make (a row per completion, or each group's prompt once: `shared_batch`), and the advantages of both kinds (critic-free from sequence rewards, GAE from token rewards).

Prompt widths are bucketed (left-padded to a multiple of 32), so the sampler compiles once per bucket;
completions are trimmed to a multiple of 16 columns past the longest, so the update compiles once per
(prompt bucket, completion bucket).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from alignment.losses import grpo, ppo
from alignment.models import sampler as sampler_lib
from alignment.parallel import shard_batch
from alignment.rl import prefix

PROMPT_BUCKET = 32
COMPLETION_BUCKET = 16


class Rollouts(NamedTuple):
  """N = B x G completions of B prompts (rows b*G .. b*G+G-1 share prompt b), host numpy."""
  prompt_index: np.ndarray   # [B] into the prompt set
  prompt_tokens: np.ndarray  # [B, P] left-padded
  prompt_lengths: np.ndarray  # [B]
  tokens: np.ndarray         # [N, L] right-padded
  mask: np.ndarray           # [N, L] 1 on generated tokens (through EOS)
  sampler_logprobs: np.ndarray  # [N, L] under the sampling distribution
  finished: np.ndarray       # [N] bool: ended with EOS (else cut at max_new_tokens)
  texts: list                # [N] decoded completions (special tokens dropped)

  @property
  def lengths(self) -> np.ndarray:
    return self.mask.sum(axis=1)


def sample(sampler_fn, params, prompt_ids, prompt_index, group_size: int, rng, tokenizer, eos_ids, mesh) -> Rollouts:
  """Samples `group_size` completions of each prompt (token id lists) and decodes them."""
  tokens, lengths = sampler_lib.pad_prompts(prompt_ids, pad_id=0, multiple=PROMPT_BUCKET)
  inputs = shard_batch({"tokens": tokens, "lengths": lengths}, mesh)
  out = jax.device_get(sampler_fn(params, inputs["tokens"], inputs["lengths"], rng))
  width = min(out.tokens.shape[1], -(-int(out.lengths.max()) // COMPLETION_BUCKET) * COMPLETION_BUCKET)
  toks, mask, logps = (np.asarray(a)[:, :width] for a in (out.tokens, out.mask, out.logprobs))
  last = toks[np.arange(len(toks)), np.maximum(mask.sum(axis=1) - 1, 0)]
  finished = np.isin(last, np.asarray(eos_ids or (-1,))) & (mask.sum(axis=1) > 0)
  texts = [tokenizer.decode(t[m == 1]) for t, m in zip(toks, mask)]
  return Rollouts(np.asarray(prompt_index), tokens, lengths, toks, mask.astype(np.int32), logps.astype(np.float32),
                  finished, texts)


def concat(parts) -> Rollouts:
  """Rollouts of several draws (equal group size) as one; prompt widths re-padded to the widest."""
  width = max(p.prompt_tokens.shape[1] for p in parts)
  length = max(p.tokens.shape[1] for p in parts)
  pad_left = lambda a: np.pad(a, ((0, 0), (width - a.shape[1], 0)))
  pad_right = lambda a: np.pad(a, ((0, 0), (0, length - a.shape[1])))
  return Rollouts(np.concatenate([p.prompt_index for p in parts]),
                  np.concatenate([pad_left(p.prompt_tokens) for p in parts]),
                  np.concatenate([p.prompt_lengths for p in parts]),
                  np.concatenate([pad_right(p.tokens) for p in parts]),
                  np.concatenate([pad_right(p.mask) for p in parts]),
                  np.concatenate([pad_right(p.sampler_logprobs) for p in parts]),
                  np.concatenate([p.finished for p in parts]), sum((p.texts for p in parts), []))


def group_rows(groups: np.ndarray, group_size: int) -> np.ndarray:
  """The completion rows of the given prompt groups, in that order (group b holds rows b*G .. b*G+G-1)."""
  return (np.asarray(groups)[:, None] * group_size + np.arange(group_size)[None]).reshape(-1)


def select_groups(r: Rollouts, groups: np.ndarray, group_size: int) -> Rollouts:
  """The rollouts of the given prompt groups, in that order."""
  rows = group_rows(groups, group_size)
  return Rollouts(r.prompt_index[groups], r.prompt_tokens[groups], r.prompt_lengths[groups], r.tokens[rows],
                  r.mask[rows], r.sampler_logprobs[rows], r.finished[rows], [r.texts[i] for i in rows])


def training_batch(r: Rollouts, group_size: int) -> dict:
  """The model inputs of the rows prompt + completion (`alignment.rl.objective`'s layout), numpy."""
  prompts = np.repeat(r.prompt_tokens, group_size, axis=0)
  prompt_lengths = np.repeat(r.prompt_lengths, group_size)
  width = prompts.shape[1]
  sequence = np.concatenate([prompts, r.tokens], axis=1)[:, :-1]
  column = np.arange(sequence.shape[1])[None, :]
  pad = (width - prompt_lengths)[:, None]
  real = (column >= pad) & (column < width + r.lengths[:, None])
  return {"inputs": sequence.astype(np.int32), "positions": np.maximum(column - pad, 0).astype(np.int32),
          "segment_ids": real.astype(np.int32), "completion": r.tokens.astype(np.int32),
          "mask": r.mask.astype(np.int32)}


def shared_batch(r: Rollouts, group_size: int, *, pack_len: int, rows_multiple: int) -> dict:
  """The model inputs with each group's prompt once (`alignment.rl.prefix`), groups packed first-fit into
  rows of `pack_len` tokens (or the biggest group, rounded up to 128, if that is more); the row count is
  rounded up to a multiple of 2 x `rows_multiple`, so the update compiles for few shapes. numpy."""
  width = r.prompt_tokens.shape[1]
  prompts = [r.prompt_tokens[b, width - n:] for b, n in enumerate(r.prompt_lengths)]
  lengths = r.lengths
  completions = [r.tokens[i, :n] for i, n in enumerate(lengths)]
  biggest = max(len(p) - 1 + sum(1 + int(n) for n in lengths[b * group_size:(b + 1) * group_size])
                for b, p in enumerate(prompts))
  layout = prefix.build_rows(prompts, completions, group_size, max(pack_len, -(-biggest // 128) * 128), share=True,
                             rows_multiple=2 * rows_multiple)
  cols = np.zeros(r.tokens.shape, np.int32)
  cols[:, :layout.cols.shape[1]] = layout.cols
  return {"inputs": layout.inputs, "positions": layout.positions, "segment_ids": layout.segment_ids,
          "prefix_ids": layout.prefix_ids, "row": layout.row, "cols": cols,
          "completion": r.tokens.astype(np.int32), "mask": r.mask.astype(np.int32)}


def sequence_advantages(rewards, group_size: int, kind: str) -> np.ndarray:
  """float32 [N] critic-free advantages of the sequence rewards [N] (`alignment.losses.grpo`)."""
  return np.asarray(grpo.group_advantages(jnp.asarray(rewards), group_size, kind=kind))


def token_rewards(scores, kl, mask) -> np.ndarray:
  """PPO's per-token rewards [N, L]: -kl (already scaled by its coefficient) at every valid token, and
  the sequence score added at each row's last valid token (its EOS, or where it was cut)."""
  rewards = np.where(mask > 0, -kl, 0.0).astype(np.float32)
  last = np.maximum(mask.sum(axis=1) - 1, 0)
  rewards[np.arange(len(rewards)), last] += np.asarray(scores, np.float32)
  return rewards


def gae_advantages(rewards, values, mask, *, gamma: float, lam: float, whiten: bool):
  """(advantages, returns) [N, L] from GAE over the valid tokens; advantages whitened over the valid
  tokens when `whiten` (returns are not: they are the value model's targets)."""
  advantages, returns = (np.asarray(a) for a in ppo.gae(rewards, values, mask, gamma=gamma, lam=lam))
  if whiten:
    advantages = whiten_valid(advantages, mask)
  return advantages, returns


def whiten_valid(x, mask) -> np.ndarray:
  """(x - mean) / std over the cells where mask is set; 0 elsewhere."""
  valid = mask > 0
  values = x[valid].astype(np.float64)
  if values.size < 2:
    return np.where(valid, x, 0.0).astype(np.float32)
  return np.where(valid, (x - values.mean()) / (values.std() + 1e-8), 0.0).astype(np.float32)


def explained_variance(values, returns, mask) -> float:
  """1 - Var(returns - values) / Var(returns) over the valid tokens (1: a perfect value model)."""
  valid = mask > 0
  target = returns[valid].astype(np.float64)
  if target.size < 2 or target.var() == 0:
    return float("nan")
  return float(1.0 - (target - values[valid]).var() / target.var())
