"""Supervised fine-tuning: the loss over assistant tokens and the task the shared loop runs."""

from flax import nnx

from alignment.kernels import token_logprobs
from alignment.losses.sft import nll_sum
from alignment.train import registry
from alignment.train.model import setup_model
from alignment.train.optim import model_optimizer
from alignment.train.preference import resolve_train_path
from alignment.train.task import (Task, data_dir, data_filters, filter_info, prepare_once_per_job,
                                  tokenizer_and_template)


def make_loss_fn(graphdef, impl: str):
  """(parts, batch, rng) -> (NLL sum, (loss-token count, {'entropy': sum})) of parts['policy'] over packed
  [B, T] rows."""

  def loss_fn(parts, batch, rng):
    del rng  # no randomness (no dropout in these models)
    model = nnx.merge(graphdef, parts["policy"])
    hidden = model(batch["inputs"], batch["positions"], batch["segment_ids"])
    stats = token_logprobs(hidden.reshape(-1, hidden.shape[-1]), model.unembed_matrix(),
                           batch["targets"].reshape(-1), impl=impl)
    loss_sum, num_tokens = nll_sum(stats.logprobs, batch["loss_mask"].reshape(-1))
    entropy_sum = (stats.entropy * batch["loss_mask"].reshape(-1)).sum()
    return loss_sum, (num_tokens, {"entropy": entropy_sum})

  return loss_fn


@registry.supervised("sft")
def build_task(config, mesh) -> Task:
  from alignment.data import pipeline, sft as sft_data  # data deps load only when training

  d = config.data
  prepare = lambda: sft_data.prepare_sft(resolve_train_path(d, chosen_only=True), d.eval_path or None,
                                         data_dir=data_dir(d),
                                         eval_fraction=0.0 if d.eval_path else d.eval_fraction,
                                         filters=data_filters(d))
  sources = prepare_once_per_job(prepare)
  model = setup_model(config.model, config.seed)
  tokenizer, template, template_kwargs = tokenizer_and_template(d, model.tokenizer, config.model.name)
  if tokenizer.get_vocab_size() > model.cfg.vocab_size:
    raise ValueError(f"tokenizer has {tokenizer.get_vocab_size()} tokens but model {config.model.name!r} "
                     f"has vocab_size {model.cfg.vocab_size}")
  common = dict(tokenizer=tokenizer, template=template, seq_len=d.seq_len, batch_size=config.train.batch_size,
                pack=d.pack, template_kwargs=template_kwargs)
  train_data = pipeline.make_sft_iterator(sources["train"], seed=d.seed, **common)
  eval_data = None
  if "eval" in sources:
    eval_data = lambda: pipeline.make_eval_iterator(sources["eval"], **common)
  info = {"train_examples": len(sources["train"]), "eval_examples": len(sources.get("eval", [])),
          **filter_info(sources)}
  return Task({"policy": model.part(model_optimizer(config))}, make_loss_fn(model.spec.graphdef, config.kernel.impl),
              train_data, eval_data, info, model_cfg=model.cfg, tokenizer=tokenizer)
