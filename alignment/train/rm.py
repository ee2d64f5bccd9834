"""Reward modeling: a scalar head read at each sequence's last token, trained with Bradley-Terry.

The score index comes from the data (`chosen_end`, `rejected_end`), never from searching for an EOS
id, so it is right even when the pad id equals the EOS id. At the end of training the eval set's
reward mean and std are saved with the checkpoint (PPO normalises rewards with them).
`RewardScorer` loads a trained workdir and scores (prompt, completion) pairs.
"""

import functools
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from alignment import checkpoint
from alignment import workdir as workdir_lib
from alignment.losses.reward import bradley_terry_loss
from alignment.parallel import make_mesh, replicated, shard_batch
from alignment.train import preference as pref_task
from alignment.train import registry
from alignment.train import state as state_lib
from alignment.train.model import setup_model
from alignment.train.optim import model_optimizer
from alignment.train.task import Task, tokenizer_and_template


def pair_rewards(graphdef, params, batch):
  """Rewards of the chosen and rejected sequences: float32 [R, P] each."""
  scores = nnx.merge(graphdef, params)(batch["inputs"], batch["positions"], batch["segment_ids"])
  read = lambda end: jnp.take_along_axis(scores, end, axis=1)
  return read(batch["chosen_end"]), read(batch["rejected_end"])


def make_loss_fn(graphdef, rm_config):
  """(parts, batch, rng) -> (BT loss of parts['reward'] summed over real pairs, (pair count, metric sums))."""

  def loss_fn(parts, batch, rng):
    del rng
    r_chosen, r_rejected = pair_rewards(graphdef, parts["reward"], batch)
    margin = batch["margin"].reshape(-1) if rm_config.use_margin else None
    loss, metrics = bradley_terry_loss(r_chosen.reshape(-1), r_rejected.reshape(-1), margin=margin,
                                       center_coef=rm_config.center_coef)
    weight = batch["pair_mask"].reshape(-1).astype(jnp.float32)
    return (loss * weight).sum(), (weight.sum(), {k: (v * weight).sum() for k, v in metrics.items()})

  return loss_fn


def reward_stats(graphdef, params, batches, mesh) -> dict:
  """Mean and std of the rewards of every sequence (chosen and rejected) over `batches` (global batches:
  every host reads every reward and computes the same figures)."""
  fn = jax.jit(lambda p, b: pair_rewards(graphdef, p, b), out_shardings=replicated(mesh))
  values = []
  for batch in batches:
    chosen, rejected = jax.device_get(fn(params, shard_batch(batch, mesh)))
    real = batch["pair_mask"].astype(bool)
    values += [chosen[real], rejected[real]]
  values = np.concatenate(values) if values else np.zeros(0)
  return {"reward/mean": float(values.mean()) if values.size else 0.0,
          "reward/std": float(values.std()) if values.size else 0.0, "reward/count": int(values.size)}


@registry.supervised("rm")
def build_task(config, mesh) -> Task:
  model = setup_model(config.model, config.seed, reward_head=True)
  data = pref_task.preference_data(config, model.tokenizer)
  summary_data = data.eval if data.eval is not None else lambda: data.reference_pass("train")
  summarize = lambda parts: reward_stats(model.spec.graphdef, parts["reward"], summary_data(), mesh)
  return Task({"reward": model.part(model_optimizer(config))}, make_loss_fn(model.spec.graphdef, config.rm),
              data.train, data.eval, dict(data.info), count_name="num_pairs", summarize=summarize)


def scalar_model_run(workdir, algorithm: str = "rm", setup=None) -> tuple:
  """(resolved workdir, its config, its model set up without weights: `setup(config)`, by default a reward
  model) of a run of `algorithm` (a scalar head: 'rm', 'classifier'); another algorithm's workdir is
  refused naming it."""
  workdir = workdir_lib.resolve(workdir)
  config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
  if config.algorithm != algorithm:
    raise ValueError(f"{workdir}/config.json: algorithm is {config.algorithm!r}, not {algorithm!r}")
  model = setup(config) if setup else setup_model(config.model, config.seed, reward_head=True)
  return workdir, config, model


def reward_model_run(workdir) -> tuple:
  """`scalar_model_run` of a reward-model run."""
  return scalar_model_run(workdir, "rm")


LENGTH_BUCKET = 64  # scored batches are padded to a multiple of this (few compiled shapes)


class ScalarScorer:
  """The latest checkpoint of a scalar-head run (a reward model, a classifier): scores token sequences
  at their last token, one sequence a row, the sequences sorted by length so that a batch pads little."""

  def __init__(self, workdir, algorithm: str, entry: str, mesh=None, setup=None):
    workdir, self.config, model = scalar_model_run(workdir, algorithm, setup)
    self.workdir = workdir
    self.mesh = mesh or make_mesh({"data": -1})
    self.tokenizer, self.template, self.template_kwargs = tokenizer_and_template(
        self.config.data, model.tokenizer, self.config.model.name)
    rules = tuple(tuple(r) for r in self.config.sharding.rules)
    params_sharding = state_lib.param_shardings(model.spec, self.mesh, rules)
    directory = workdir / "checkpoints"
    try:  # the model's params alone: the optimizer state stays on disk
      self.params, step = checkpoint.restore_entry(directory, entry, sharding=params_sharding)
    except FileNotFoundError:
      raise ValueError(f"{workdir}/checkpoints: no checkpoint to score with") from None
    self.step = step
    self.stats = checkpoint.restore_meta(directory, step).get("summary", {})
    self._scores = jax.jit(functools.partial(self.batch_scores, model.spec.graphdef),
                           out_shardings=replicated(self.mesh))

  @staticmethod
  def batch_scores(graphdef, params, batch):
    """float32 [R, T]: the scores of one-sequence rows at every position (the last token's is read)."""
    return nnx.merge(graphdef, params)(batch["inputs"], batch["positions"], batch["segment_ids"])

  @staticmethod
  def read(scores, row: int, length: int) -> float:
    return scores[row, length - 1]

  def score_ids(self, sequences, batch_size: int = 8) -> np.ndarray:
    """Token id lists -> float32 [N], each sequence's score at its last token."""
    width = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    batch_size = -(-batch_size // width) * width
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out = np.zeros(len(sequences), np.float32)
    for start in range(0, len(order), batch_size):
      chunk = order[start:start + batch_size]
      seq_len = -(-max(len(sequences[i]) for i in chunk) // LENGTH_BUCKET) * LENGTH_BUCKET
      inputs = np.zeros((batch_size, seq_len), np.int32)
      segments = np.zeros((batch_size, seq_len), np.int32)
      for row, i in enumerate(chunk):
        inputs[row, :len(sequences[i])], segments[row, :len(sequences[i])] = sequences[i], 1
      positions = np.tile(np.arange(seq_len, dtype=np.int32), (batch_size, 1))
      batch = shard_batch(dict(inputs=inputs, positions=positions, segment_ids=segments), self.mesh)
      scores = np.asarray(jax.device_get(self._scores(self.params, batch)))
      for row, i in enumerate(chunk):
        out[i] = self.read(scores, row, len(sequences[i]))
    return out


class RewardScorer(ScalarScorer):
  """Scores (prompt, completion) pairs with the latest checkpoint of a reward-model workdir.

      scorer = RewardScorer("workdirs/rm")
      scorer.score(["What is 2+2?"], ["4"])  # -> float32 [1]; raw rewards (see `.stats` to normalise)
  """

  def __init__(self, workdir, mesh=None):
    super().__init__(workdir, "rm", "reward", mesh)

  def score(self, prompts, completions, batch_size: int = 8) -> np.ndarray:
    """prompts: strings (one user turn) or message lists; completions: strings -> float32 [N]."""
    from alignment.data.preference_pipeline import tokenize_sequence
    if len(prompts) != len(completions):
      raise ValueError(f"score: {len(prompts)} prompts but {len(completions)} completions")
    sequences = []
    for prompt, completion in zip(prompts, completions):
      messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
      ids, _ = tokenize_sequence(messages, completion, self.tokenizer, self.template, **self.template_kwargs)
      sequences.append(ids)
    return self.score_ids(sequences, batch_size)
