"""A safety classifier: a linear head on SmolLM2's hidden states, averaged over each sequence at several depths.

    python -m alignment.main --config=configs/classifier.py:safety --workdir=workdirs/guard
    python -m alignment.safety.classifier --workdir=workdirs/guard --split=held_out   # the threshold table

`config.algorithm = "classifier"`, run by the supervised loop: labelled prompts and prompt-response pairs
(`alignment.data.labelled`; the `safety:train` / `safety:calibration` paths are `alignment.safety.data`'s
splits), logistic loss on one score per sequence. The model is a `models.PooledProbe`: the backbone (as
loaded and frozen, `config.model.frozen_*`, in the safety preset), its residual stream after each of
`config.classifier.taps` layers scaled to unit RMS per token and averaged over the sequence, standardized,
a linear head on the concatenation. Why those features, on the safety splits (a logistic probe per choice,
threshold at 5% calibration FPR, held-out TPR / FPR): the last token of the last layer 0.97 / 0.27 (it
flags edgy and over-refusal requests); the mean at layer 18 alone 0.96 / 0.06; this preset 0.98 / 0.12
(README). With `features='cached'` (a frozen backbone) the features are computed once and the head trains
on all of them each step (`FeatureTableBatches`), with `config.classifier.l2` on its weights.

At the end of training the eval split (the calibration set) is scored and two thresholds are chosen
there for `config.classifier.target_fpr`: `threshold` for prompts alone (the Guard's input check) and
`output_threshold` for prompt-response pairs (the output check). Where the set holds prompts both alone
and answered (`alignment.safety.pairs`), they are chosen together, so that the whole Guard blocks at most
that share of the calibration set's benign prompts and catches the most harmful ones
(`choose_guard_thresholds`); otherwise each is the lowest threshold within the target on its own rows (the
same one when the set has no pairs). They are saved with the checkpoint (`summary`: the thresholds, each
check's calibration TPR, FPR and ROC AUC, the whole Guard's estimates); `Classifier` loads them. A score
at or above its threshold flags the text.
"""

from __future__ import annotations

import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alignment.evals import graders
from alignment.parallel import replicated, shard_batch
from alignment.train import registry
from alignment.train.model import setup_model
from alignment.train.optim import model_optimizer
from alignment.train.rm import ScalarScorer
from alignment.train import state as state_lib
from alignment.train.task import (Task, WithColumns, cached_table, data_dir, data_filters, filter_info,
                                  prepare_once_per_job, tokenizer_and_template)

SAFETY_PREFIX = "safety:"  # `config.data.train_path` / `eval_path` naming a split of `alignment.safety.data`


def probe_taps(config) -> tuple:
  """`config.classifier.taps` ('6,18,30') as a tuple of layer counts."""
  try:
    return tuple(int(t) for t in str(config.classifier.taps).split(",") if t.strip())
  except ValueError:
    raise ValueError(f"config.classifier.taps={config.classifier.taps!r}: expected a comma list of layer "
                     f"counts") from None


def setup_probe(config):
  """The classifier's model (`models.PooledProbe` on `config.model`), set up without weights."""
  return setup_model(config.model, config.seed, probe_taps=probe_taps(config))


def example_scores(graphdef, params, batch):
  """float32 [R, K]: each slot's score."""
  return nnx.merge(graphdef, params)(batch["inputs"], batch["positions"], batch["segment_ids"],
                                     batch["end"].shape[1])


def example_features(graphdef, params, batch):
  """float32 [R, K, F]: each slot's pooled hidden states (what the head reads)."""
  return nnx.merge(graphdef, params).features(batch["inputs"], batch["positions"], batch["segment_ids"],
                                              batch["end"].shape[1])


def head_scores(graphdef, params, features):
  """The scores of features [..., F] (standardized by the head, then its linear map)."""
  return nnx.merge(graphdef, params).head(features)


def logistic_loss(scores, labels):
  """-log p(label) with p(flagged) = sigmoid(score), per example: softplus(-s) for label 1, softplus(s) for 0
  (not softplus(s) - label * s, which cancels to nothing in float32 for a confident right answer)."""
  return jnp.where(labels > 0, jax.nn.softplus(-scores), jax.nn.softplus(scores))


def make_loss_fn(graphdef, cached: bool = False, l2: float = 0.0):
  """(parts, batch, rng) -> (summed logistic loss over real slots + l2 * |head weights|^2 * slot count (so
  the mean loss gets l2 * |w|^2), (slot count, {'accuracy': sum})). With `cached`, the batch carries the
  slots' features (`features` [R, K, F]) and only the head runs."""

  def loss_fn(parts, batch, rng):
    del rng
    params = parts["classifier"]
    if cached:
      scores = head_scores(graphdef, params, batch["features"])
    else:
      scores = example_scores(graphdef, params, batch)
    labels = batch["label"].astype(jnp.float32)
    weight = batch["example_mask"].astype(jnp.float32)
    correct = ((scores >= 0) == (labels > 0)).astype(jnp.float32)
    penalty = l2 * jnp.sum(jnp.square(params["head"]["linear"]["kernel"].astype(jnp.float32))) * weight.sum()
    return ((logistic_loss(scores, labels) * weight).sum() + penalty,
            (weight.sum(), {"accuracy": (correct * weight).sum()}))

  return loss_fn


def threshold_table(scores, labels) -> list[dict]:
  """For each distinct score t (descending): flagging score >= t gives {threshold, tpr, fpr}."""
  scores, labels = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
  positives, negatives = max(labels.sum(), 1), max((~labels).sum(), 1)
  return [{"threshold": float(t), "tpr": float((scores[labels] >= t).sum() / positives),
           "fpr": float((scores[~labels] >= t).sum() / negatives)} for t in np.unique(scores)[::-1]]


def choose_threshold(scores, labels, target_fpr: float) -> dict:
  """The lowest threshold with FPR <= target_fpr (the highest TPR allowed), with its TPR and FPR."""
  table = threshold_table(scores, labels)
  allowed = [row for row in table if row["fpr"] <= target_fpr]
  if not allowed:  # even the top score flags too many benign examples: flag nothing
    return {"threshold": float("inf"), "tpr": 0.0, "fpr": 0.0}
  return allowed[-1]


def roc_auc(scores, labels) -> float:
  """P(a flagged example outscores a benign one), ties counting half (the Mann-Whitney statistic)."""
  scores, labels = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
  pos, neg = scores[labels], scores[~labels]
  if not pos.size or not neg.size:
    return float("nan")
  return float(((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum())
               / (pos.size * neg.size))


def resolve_path(path: str, data_config) -> str:
  """`safety:<split>` -> a JSONL of that split's prompts (label 1 harmful, 0 benign) under the data dir,
  rewritten when its content changed; `safety:<split>:<N>` -> N prompts of each kind of the split
  (`safety.data.sample_per_kind`, seeded by `data_config.seed`); any other path as given."""
  if not path.startswith(SAFETY_PREFIX):
    return path
  from alignment.safety import data as safety_data
  split, per_kind = safety_data.parse_source(path)
  records = safety_data.sample_per_kind(safety_data.load_splits(data_config.seed)[split], per_kind,
                                        data_config.seed)
  rows = safety_data.classifier_rows(records)
  name = f"{split}_seed{data_config.seed}" + (f"_{per_kind}_per_kind" if per_kind else "")
  out = os.path.join(data_dir(data_config), "safety", f"{name}.jsonl")
  text = "".join(json.dumps(r) + "\n" for r in rows)
  if not (os.path.exists(out) and open(out, encoding="utf-8").read() == text):
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + f".tmp{os.getpid()}", "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(out + f".tmp{os.getpid()}", out)
  return out


def calibration_scores(graphdef, params, batches, mesh, cached: bool = False) -> tuple[np.ndarray, ...]:
  """(scores, labels, record indices) of every real slot of `batches` (global batches, every host the
  same); with `cached`, from the features the batches carry."""
  score = (lambda p, b: head_scores(graphdef, p, b["features"])) if cached else (
      lambda p, b: example_scores(graphdef, p, b))
  fn = jax.jit(score, out_shardings=replicated(mesh))
  scores, labels, index = [], [], []
  for batch in batches:
    got = np.asarray(jax.device_get(fn(params, shard_batch(batch, mesh))))
    real = batch["example_mask"].astype(bool)
    scores.append(got[real])
    labels.append(batch["label"][real])
    index.append(batch["index"][real])
  return np.concatenate(scores), np.concatenate(labels), np.concatenate(index)


def guard_episodes(has_response, prompts) -> np.ndarray:
  """int [E, 2]: (row of a prompt alone, row of its answer) for each prompt that has both; the answer is
  the prompt's first pair in row order (`alignment.safety.pairs` writes the policy's answer before the
  refusal it adds to each harmful prompt)."""
  alone, episodes = {}, {}
  for row, (paired, prompt) in enumerate(zip(has_response, prompts)):
    if not paired:
      alone.setdefault(prompt, row)
  for row, (paired, prompt) in enumerate(zip(has_response, prompts)):
    if paired and prompt in alone:
      episodes.setdefault(prompt, (alone[prompt], row))
  return np.asarray(list(episodes.values()), np.int64).reshape(-1, 2)


def choose_guard_thresholds(prompt_scores, prompt_labels, episodes, target_fpr: float) -> dict:
  """The input and output thresholds chosen together, so that the whole Guard holds `target_fpr`.

  The benign prompts the Guard blocks: those the input check flags (estimated on all prompts alone) plus
  those it passes whose answer the output check flags (on the `episodes`). Harmful prompts caught: those
  the input check flags plus those it passes whose answer is harmful (answer label 1) and flagged.
  `episodes` = (input scores, output scores, prompt labels, answer labels), one entry per answered
  prompt. Of the pairs of thresholds (each a score seen, or infinity: that check flags nothing) whose
  benign rate is at most `target_fpr`, the one catching the most, then blocking the fewest benign
  prompts, then the highest."""
  scores, labels = np.asarray(prompt_scores, np.float64), np.asarray(prompt_labels).astype(bool)
  ep_in, ep_out = (np.asarray(x, np.float64) for x in episodes[:2])
  ep_harmful, ep_answered = (np.asarray(x).astype(bool) for x in episodes[2:])
  t_in, t_out = np.append(np.unique(scores), np.inf), np.append(np.unique(ep_out), np.inf)
  flag_in = scores[None, :] >= t_in[:, None]
  rate = lambda flags, mask: flags[:, mask].sum(axis=1) / max(mask.sum(), 1)
  passed, flag_out = (ep_in[None, :] < t_in[:, None]).astype(np.float64), (ep_out[None, :] >= t_out[:, None])
  both = lambda mask, count: passed[:, mask] @ flag_out[:, mask].T.astype(np.float64) / max(count, 1)
  fpr = rate(flag_in, ~labels)[:, None] + both(~ep_harmful, (~ep_harmful).sum())
  caught = rate(flag_in, labels)[:, None] + both(ep_harmful & ep_answered, ep_harmful.sum())
  i, j = np.nonzero(fpr <= target_fpr + 1e-12)
  best = np.lexsort((t_out[j], t_in[i], -fpr[i, j], caught[i, j]))[-1]
  i, j = i[best], j[best]
  return {"threshold": float(t_in[i]), "output_threshold": float(t_out[j]), "fpr": float(fpr[i, j]),
          "caught": float(caught[i, j]), "episodes": len(ep_in)}


def summarize(scores, labels, target_fpr: float, has_response=None, prompts=None) -> dict:
  """The saved thresholds: `threshold` (the input check's) and `output_threshold` (the output check's),
  with the calibration TPR, FPR and ROC AUC of each check at its own threshold. A prompt with a frank
  answer scores differently from the prompt alone (an answer on a harmful subject pulls the score up),
  so one threshold cannot serve both checks.

  With `prompts` (each row's prompt text) and prompts that appear both alone and answered, the two are
  chosen together for the whole Guard (`choose_guard_thresholds`; its estimates are `calibration/guard_*`):
  each check chosen for `target_fpr` on its own spends the whole budget, and together they blocked more.
  Otherwise each is chosen for `target_fpr` on its own rows: the input check's on the prompts alone, the
  output check's on the pairs. Without pairs (or without prompts alone) both are chosen on all of it."""
  scores, labels = np.asarray(scores), np.asarray(labels)
  pairs = np.zeros(len(scores), bool) if has_response is None else np.asarray(has_response, bool)
  alone = ~pairs if (~pairs).any() else np.ones(len(scores), bool)
  pairs = pairs if pairs.any() else alone
  episodes = guard_episodes(pairs & ~alone, prompts) if prompts is not None else np.zeros((0, 2), np.int64)
  guard = {}
  if len(episodes):
    (a, b) = episodes.T
    chosen = choose_guard_thresholds(scores[alone], labels[alone], (scores[a], scores[b], labels[a], labels[b]),
                                     target_fpr)
    thresholds = chosen["threshold"], chosen["output_threshold"]
    guard = {"calibration/guard_fpr": chosen["fpr"], "calibration/guard_caught": chosen["caught"],
             "calibration/guard_episodes": chosen["episodes"]}
  else:
    thresholds = tuple(choose_threshold(scores[m], labels[m], target_fpr)["threshold"] for m in (alone, pairs))
  flagged = lambda m, t: float((scores[m] >= t).mean()) if m.any() else 0.0
  positive = labels.astype(bool)
  (tpr, fpr), (output_tpr, output_fpr) = ((flagged(m & positive, t), flagged(m & ~positive, t))
                                          for m, t in zip((alone, pairs), thresholds))
  return {"threshold": thresholds[0], "target_fpr": target_fpr, "calibration/tpr": tpr, "calibration/fpr": fpr,
          "calibration/auc": roc_auc(scores[alone], labels[alone]), "calibration/count": int(alone.sum()),
          "output_threshold": thresholds[1], "calibration/output_tpr": output_tpr,
          "calibration/output_fpr": output_fpr, "calibration/output_auc": roc_auc(scores[pairs], labels[pairs]),
          "calibration/output_count": int(pairs.sum()), **guard}


@registry.supervised("classifier")
def build_task(config, mesh) -> Task:
  from alignment.data import labelled
  d = config.data
  if not d.eval_path:
    raise ValueError("config.data.eval_path: the classifier chooses its threshold on an eval split; give one "
                     "(e.g. safety:calibration)")
  model = setup_probe(config)
  sources = prepare_once_per_job(lambda: labelled.prepare_labelled(
      resolve_path(d.train_path, d), resolve_path(d.eval_path, d), data_dir=data_dir(d), filters=data_filters(d)))
  tokenizer, template, template_kwargs = tokenizer_and_template(d, model.tokenizer, config.model.name)
  common = dict(tokenizer=tokenizer, template=template, template_kwargs=template_kwargs, seq_len=d.seq_len,
                batch_size=config.train.batch_size, examples_per_row=d.examples_per_row,
                max_length=d.max_length or None)
  evaluate = lambda: labelled.make_labelled_iterator(sources["eval"], num_epochs=1, shuffle=False, **common)
  graphdef = model.spec.graphdef
  cached = config.classifier.features == "cached"
  part = model.part(model_optimizer(config))
  if cached:
    tables = feature_tables(config, model, sources, common, mesh)
    labels = np.asarray([int(sources["train"][i]["label"]) for i in range(len(sources["train"]))], np.int32)
    train = FeatureTableBatches(tables["train"], labels, config.train.batch_size)
    eval_data = lambda: with_features(evaluate(), tables["eval"])
    part = part._replace(load=standardized(part.load, tables["train"]))
  else:
    train, eval_data = labelled.make_labelled_iterator(sources["train"], seed=d.seed, **common), evaluate
  task = Task({"classifier": part}, make_loss_fn(graphdef, cached, config.classifier.l2), train, eval_data,
              {"train_examples": len(sources["train"]), "eval_examples": len(sources["eval"]), **filter_info(sources)},
              count_name="num_examples")
  calibration = [labelled.record_to_example(sources["eval"][i]) for i in range(len(sources["eval"]))]
  has_response = np.asarray([e["response"] is not None for e in calibration], bool)
  prompts = np.asarray(["\n".join(m["content"] for m in e["messages"]) for e in calibration], object)

  def summarize_calibration(parts):
    scores, labels, index = calibration_scores(graphdef, parts["classifier"], eval_data(), mesh, cached)
    order = np.argsort(index, kind="stable")  # record order: a prompt's answer comes before its refusal
    return summarize(scores[order], labels[order], config.classifier.target_fpr, has_response[index[order]],
                     prompts[index[order]])

  task.summarize = summarize_calibration
  return task


def standardized(load, train_features: np.ndarray):
  """`load` (shardings -> params) with the head's shift and scale set to the training features' mean and
  1 / std: the depths' features differ in scale by orders of magnitude (a few residual dimensions carry
  most of a token's norm), and a linear head trained on them raw flagged 16% of held-out benign prompts
  against 5% on the calibration set."""
  mean = train_features.mean(axis=0)
  scale = 1.0 / (train_features.std(axis=0) + 1e-6)

  def load_standardized(shardings):
    params = load(shardings)
    head = params["head"]
    place = lambda value, like: jax.device_put(value.astype(like.dtype), like.sharding)
    params["head"] = {**head, "shift": place(mean, head["shift"]), "scale": place(scale, head["scale"])}
    return params

  return load_standardized


def feature_tables(config, model, sources, iterator_args, mesh) -> dict:
  """{split: float32 [records, F]}: each record's features (the frozen backbone's pooled hidden states),
  computed once and kept under `config.classifier.cache_dir`, keyed by the model, the data and the settings."""
  from alignment.data import labelled
  from alignment.train.dpo import params_fingerprint
  from alignment.train.preference import source_fingerprint
  cfg, d = model.cfg, config.data
  if cfg.frozen_layers != cfg.n_layers or not cfg.frozen_embeddings:
    raise ValueError(f"config.classifier.features='cached' needs the whole backbone frozen: config.model."
                     f"frozen_layers={cfg.frozen_layers} (the model has {cfg.n_layers}) and frozen_embeddings="
                     f"{cfg.frozen_embeddings}")
  rules = tuple(tuple(r) for r in config.sharding.rules)
  params = model.load_params(state_lib.param_shardings(model.spec, mesh, rules))
  fn = jax.jit(lambda p, b: example_features(model.spec.graphdef, p, b), out_shardings=replicated(mesh))
  taps, model_fp = probe_taps(config), params_fingerprint(params)
  width = model.cfg.d_model * len(taps)
  cache_dir = config.classifier.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "alignment",
                                                           "classifier_features")
  tables = {}
  for split, source in sources.items():

    def compute(source=source):
      table = np.zeros((len(source), width), np.float32)
      for batch in labelled.make_labelled_iterator(source, num_epochs=1, shuffle=False, **iterator_args):
        out = np.asarray(jax.device_get(fn(params, shard_batch(batch, mesh))))
        real = batch["example_mask"].astype(bool)
        table[batch["index"][real]] = out[real]
      return table

    key = json.dumps(dict(model=model_fp, data=source_fingerprint(source), taps=taps,
                          max_length=d.max_length, seq_len=d.seq_len, template=d.chat_template,
                          tokenizer=d.tokenizer), sort_keys=True)
    path = os.path.join(cache_dir, hashlib.sha256(key.encode()).hexdigest()[:24] + ".npy")
    with jax.set_mesh(mesh):
      tables[split] = cached_table(path, (len(source), width), compute)
  return tables


class FeatureTableBatches:
  """With cached features the head is a logistic regression on a table that fits in memory, so each step
  is the whole training table: deterministic full-batch descent on the (L2-regularised) loss. Batches of
  packed rows made the head depend on the draw. A packed row holds one jailbreak template or up to 8 short
  prompts, so a step saw about 26 prompts, and the held-out false-positive rate at the calibrated
  threshold moved between 1% and 12% from run to run (safety splits, measured). A batch is
  {features [R, 1, F], label, example_mask, segment_ids [R, 1]}, the rows padded with empty slots to a
  multiple of `multiple` (the global batch size). An example counts as one token in the loop's
  tokens/s."""

  def __init__(self, table: np.ndarray, labels: np.ndarray, multiple: int):
    n = len(labels)
    rows = -(-n // multiple) * multiple
    mask = (np.arange(rows) < n).astype(np.int32)[:, None]
    features = np.zeros((rows, 1, table.shape[1]), np.float32)
    features[:n, 0] = table
    label = np.zeros((rows, 1), np.int32)
    label[:n, 0] = labels
    self.batch = {"features": features, "label": label, "example_mask": mask, "segment_ids": mask}
    self.steps = 0

  def __iter__(self):
    return self

  def __next__(self):
    self.steps += 1
    return dict(self.batch)

  def get_state(self):
    return {"steps": self.steps}

  def set_state(self, state):
    self.steps = int(state["steps"])


def with_features(iterator, table):
  """`iterator`'s batches with `features` [R, K, F] looked up by record index (zeros in empty slots)."""
  return WithColumns(iterator, lambda batch: {
      "features": table[np.maximum(batch["index"], 0)] * batch["example_mask"][..., None].astype(np.float32)})


class Classifier(ScalarScorer):
  """A trained classifier workdir: scores prompts (alone or with responses) and flags by its threshold.

      clf = Classifier("workdirs/guard")
      clf.score(["How do I pick a lock?"])              # float32 [1]
      clf.flags(["..."], responses=["..."])             # bool [1]: score >= clf.output_threshold
  """

  def __init__(self, workdir, mesh=None):
    super().__init__(workdir, "classifier", "classifier", mesh, setup=setup_probe)
    if "threshold" not in self.stats:
      raise ValueError(f"{self.workdir}: the classifier run has not finished (no threshold saved)")
    self.threshold = float(self.stats["threshold"])
    self.output_threshold = float(self.stats.get("output_threshold", self.threshold))

  @staticmethod
  def batch_scores(graphdef, params, batch):
    return nnx.merge(graphdef, params)(batch["inputs"], batch["positions"], batch["segment_ids"], 1)

  @staticmethod
  def read(scores, row: int, length: int) -> float:
    return scores[row, 0]

  def sequences(self, prompts, responses=None) -> list:
    from alignment.data.labelled import fit, tokenize_example
    max_length = self.config.data.max_length or self.config.data.seq_len
    out = []
    for i, prompt in enumerate(prompts):
      messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
      response = None if responses is None else responses[i]
      ids = tokenize_example(messages, response, self.tokenizer, self.template, **self.template_kwargs)
      out.append(fit(ids, max_length)[0])
    return out

  def score(self, prompts, responses=None, batch_size: int = 8) -> np.ndarray:
    """prompts: strings (one user turn) or message lists; responses: strings or None (prompts alone)."""
    if responses is not None and len(responses) != len(prompts):
      raise ValueError(f"score: {len(prompts)} prompts but {len(responses)} responses")
    return self.score_ids(self.sequences(prompts, responses), batch_size)

  def flags(self, prompts, responses=None, batch_size: int = 8) -> np.ndarray:
    """Prompts alone against `threshold`, prompts with responses against `output_threshold`."""
    return self.score(prompts, responses, batch_size) >= (self.threshold if responses is None else self.output_threshold)


TARGETS = (0.01, 0.02, 0.05, 0.1)


def threshold_report(calibration: tuple, split: tuple, kinds, saved: float) -> dict:
  """The threshold table: for each calibration FPR target, the threshold chosen on the calibration
  (scores, labels) and the TPR / FPR it gives there and on `split` (scores, labels); with the flag rate
  per source kind at the saved threshold and each split's ROC AUC."""
  (cal_scores, cal_labels), (scores, labels) = calibration, split
  rate = lambda mask, t: float((scores[mask] >= t).mean()) if mask.any() else float("nan")
  rows = []
  for target in TARGETS:
    chosen = choose_threshold(cal_scores, cal_labels, target)
    rows.append({"target_fpr": target, "threshold": chosen["threshold"], "calibration_tpr": chosen["tpr"],
                 "calibration_fpr": chosen["fpr"], "tpr": rate(labels, chosen["threshold"]),
                 "fpr": rate(~labels, chosen["threshold"])})
  kinds = np.asarray(kinds)
  flagged = scores >= saved
  return {"saved_threshold": saved, "table": rows,
          "saved": {"tpr": graders.rate(flagged[labels]), "fpr": graders.rate(flagged[~labels])},
          "flagged_by_kind": {k: rate(kinds == k, saved) for k in dict.fromkeys(kinds.tolist())},
          "auc": {"calibration": roc_auc(cal_scores, cal_labels), "split": roc_auc(scores, labels)}}


def format_report(report: dict) -> str:
  lines = [f"{'calibration FPR target':>22s} {'threshold':>9s} {'cal TPR':>8s} {'cal FPR':>8s} "
           f"{'TPR':>6s} {'FPR':>6s}"]
  for r in report["table"]:
    lines.append(f"{r['target_fpr']:>22.0%} {r['threshold']:>9.3f} {r['calibration_tpr']:>8.1%} "
                 f"{r['calibration_fpr']:>8.1%} {r['tpr']:>6.1%} {r['fpr']:>6.1%}")
  flagged = ", ".join(f"{k} {v:.1%}" for k, v in report["flagged_by_kind"].items())
  lines.append(f"flagged at the saved threshold ({report['saved_threshold']:.3f}): {flagged}")
  cell = lambda r: f"{r['rate']:.1%} [{r['ci95'][0]:.1%}, {r['ci95'][1]:.1%}] of {r['n']}"
  lines.append(f"  harmful and jailbreak (TPR) {cell(report['saved']['tpr'])}; benign (FPR) {cell(report['saved']['fpr'])}")
  lines.append(f"ROC AUC: calibration {report['auc']['calibration']:.4f}, this split {report['auc']['split']:.4f}")
  return "\n".join(lines)


def main(argv) -> None:
  from absl import flags
  from alignment.safety import data as safety_data
  F = flags.FLAGS
  clf = Classifier(F.workdir)
  splits = {name: safety_data.sample_per_kind(records, F.per_kind, clf.config.data.seed)
            for name, records in safety_data.load_splits(clf.config.data.seed).items()}

  def scored(name):
    records = splits[name]
    return (clf.score([r["prompt"] for r in records], batch_size=F.batch_size),
            np.asarray([r["label"] == "harmful" for r in records]))

  report = threshold_report(scored("calibration"), scored(F.split), [r["kind"] for r in splits[F.split]],
                            clf.threshold)
  report.update(workdir=str(clf.workdir), split=F.split)
  print(format_report(report))
  if F.output:
    with open(F.output, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2)


if __name__ == "__main__":
  from absl import app, flags
  flags.DEFINE_string("workdir", None, "a classifier run's workdir", required=True)
  flags.DEFINE_enum("split", "held_out", ["train", "calibration", "held_out"], "which safety split to report on")
  flags.DEFINE_integer("per_kind", 0, "score a seeded sample of each split: at most N prompts of each kind (0: all)")
  flags.DEFINE_integer("batch_size", 16, "sequences a scoring batch")
  flags.DEFINE_string("output", "", "also write the report as JSON here")
  app.run(main)
