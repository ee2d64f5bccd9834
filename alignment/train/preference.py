"""Preference data for the reward-model and DPO tasks: prepared splits, global-batch iterators, stats."""

import filecmp
import hashlib
import os
from typing import Callable, NamedTuple, Optional

from alignment.train.task import (ResumableIterator, data_dir, data_filters, filter_info, prepare_once_per_job,
                                  tokenizer_and_template)


class PreferenceData(NamedTuple):
  train: ResumableIterator
  eval: Optional[Callable[[], ResumableIterator]]  # a fresh ordered pass over the eval split
  reference_pass: Callable[[str], ResumableIterator]  # an ordered pass over a split (cached references)
  splits: tuple
  num_pairs: dict
  fingerprint: str
  info: dict


def source_fingerprint(source) -> str:
  """A hash of a split's records in order (what the cached reference log-probs depend on)."""
  h = hashlib.sha256()
  for i in range(len(source)):
    record = source[i]
    for key in sorted(record):
      h.update(repr((key, record[key])).encode())
  return h.hexdigest()[:20]


GYM_PATH = "gym:train"  # `config.data.train_path` naming the alignment gym's preference pairs


def resolve_train_path(data_config, *, chosen_only: bool = False) -> str:
  """`config.data.train_path`, where 'gym:train' becomes the gym's pairs (`gym.preference_pairs`), written
  as generic JSONL under the data dir (named by the gym version and seed; rewritten when its content
  changed). With `chosen_only` (SFT), prompt/completion rows of the chosen answers instead."""
  path = data_config.train_path
  if not path.startswith("gym:"):
    return path
  if path != GYM_PATH:
    raise ValueError(f"config.data.train_path={path!r}: the gym's preference pairs are {GYM_PATH!r} (the test "
                     f"templates have none)")
  from alignment.evals import gym
  name = f"{gym.GYM_VERSION}_train_seed{data_config.seed}{'_chosen' if chosen_only else ''}.jsonl"
  out = os.path.join(data_dir(data_config), "gym", name)
  tmp = gym.write_preference_jsonl(out + f".tmp{os.getpid()}", seed=data_config.seed, chosen_only=chosen_only)
  if os.path.exists(out) and filecmp.cmp(tmp, out, shallow=False):
    os.remove(tmp)  # unchanged: keep the file (and its prepared dataset) as it is
  else:
    os.replace(tmp, out)  # regenerated every run, so an edit to the generator is never masked by an old file
  return out


def preference_data(config, model_tokenizer) -> PreferenceData:
  from alignment.data import preference, preference_pipeline  # data deps load only when training

  d = config.data
  sources = prepare_once_per_job(lambda: preference.prepare_preferences(
      resolve_train_path(d), d.eval_path or None, data_dir=data_dir(d),
      eval_fraction=0.0 if d.eval_path else d.eval_fraction, format=d.format, filters=data_filters(d)))
  tokenizer, template, template_kwargs = tokenizer_and_template(d, model_tokenizer, config.model.name)
  common = dict(tokenizer=tokenizer, template=template, template_kwargs=template_kwargs,
                seq_len=d.seq_len, batch_size=config.train.batch_size, pairs_per_row=d.pairs_per_row,
                max_length=d.max_length or None, truncation=d.truncation)
  train = preference_pipeline.make_preference_iterator(sources["train"], seed=d.seed, **common)
  evaluate = None
  if "eval" in sources:
    evaluate = lambda: preference_pipeline.make_preference_eval_iterator(sources["eval"], **common)
  reference_pass = lambda split: preference_pipeline.make_preference_eval_iterator(sources[split], **common)
  splits = tuple(sorted(sources))
  num_pairs = {split: len(sources[split]) for split in splits}
  fingerprint = hashlib.sha256("|".join(source_fingerprint(sources[s]) for s in splits).encode()).hexdigest()[:20]
  info = {**{f"{split}_pairs": n for split, n in num_pairs.items()}, **filter_info(sources)}
  return PreferenceData(train, evaluate, reference_pass, splits, num_pairs, fingerprint, info)
