"""Generate text from a model on the command line.

  python -m alignment.generate --model=smollm2-135m-instruct --prompt="What is the capital of France?"
  python -m alignment.generate --model=workdirs/demo/policy --prompt="..."  # a training run's latest policy
  python -m alignment.generate --model=workdirs/demo/policy --guard=workdirs/demo/guard --prompt="..."

--model takes a model name, a .gguf file, an HF checkpoint directory, or the workdir of an sft or dpo
run. Prompts are chat-templated with the model's own template unless --raw (or the model has none, as a
base model). Several --prompt flags run as one batch. --temperature=0 decodes greedily. --guard (a safety
classifier's workdir, `alignment.safety.guard`) refuses a flagged prompt before generating and replaces a
flagged response with a refusal; what it blocked is printed with the response.
"""

import sys
import time

from absl import flags

from alignment import console

flags.DEFINE_string("model", "smollm2-135m-instruct", "model name or path")
flags.DEFINE_multi_string("prompt", ["What is the capital of France?"], "prompt(s); repeat for a batch")
flags.DEFINE_string("system", None, "optional system message")
flags.DEFINE_bool("raw", False, "feed prompts as raw text, without the chat template")
flags.DEFINE_integer("max_new_tokens", 128, "tokens to generate at most")
flags.DEFINE_float("temperature", 0.0, "0 = greedy")
flags.DEFINE_integer("top_k", 0, "0 = off")
flags.DEFINE_float("top_p", 1.0, "1.0 = off")
flags.DEFINE_integer("seed", 0, "sampling seed")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "param and compute dtype")
flags.DEFINE_string("guard", "", "a safety classifier's workdir: check each prompt before and each response after")
F = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    console.fail(f"unexpected arguments {argv[1:]}")
  empty = [i for i, p in enumerate(F.prompt) if not p.strip()]
  if empty and F.raw:  # a chat-templated empty prompt still has tokens (the template's); a raw one has none
    console.fail(f"--prompt number {empty[0] + 1} is empty: with --raw there is nothing to continue from")
  import numpy as np
  from flax import nnx
  from alignment.models import Transformer, sampler
  from alignment.train.model import check_model_source, load_policy
  try:
    check_model_source(F.model)
  except ValueError as e:
    console.fail(str(e))
  if F.guard and F.raw:
    console.fail("--guard checks chat prompts; drop --raw")
  start = time.time()
  from alignment.safety import guard as guard_lib
  try:
    guard = guard_lib.open_flag("--guard", F.guard)
  except ValueError as e:
    console.fail(str(e))
  policy = load_policy(F.model, dtype=F.dtype)
  if policy.tokenizer is None:
    console.fail(f"--model={F.model}: the model ships no tokenizer; cannot encode a text prompt")
  model = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: Transformer(policy.cfg, rngs=nnx.Rngs(0)))), policy.params)
  eos_ids, pad_id = sampler.stop_and_pad_ids(policy.tokenizer)
  sampling = sampler.SamplingConfig(
      max_new_tokens=F.max_new_tokens, greedy=F.temperature == 0, temperature=F.temperature or 1.0,
      top_k=F.top_k, top_p=F.top_p, eos_ids=eos_ids, pad_id=pad_id)
  loaded = time.time()
  lengths = []

  def generate(index):
    texts, out = sampler.generate_text(model, policy.tokenizer, [F.prompt[i] for i in index], sampling, seed=F.seed,
                                       system=F.system, raw=F.raw)
    lengths.append(int(np.asarray(out.lengths).sum()))
    return texts

  if guard is None:
    texts, stages = generate(list(range(len(F.prompt)))), [None] * len(F.prompt)
  else:
    texts, stages, _ = guard.respond(F.prompt, generate)
  n = sum(lengths)
  for prompt, text, stage in zip(F.prompt, texts, stages):
    blocked = f"[guard: blocked at the {stage} check]\n" if stage else ""
    print(f">>> {prompt}\n{blocked}{text}\n", flush=True)
  print(f"[load {loaded - start:.1f}s, generate {time.time() - loaded:.1f}s incl. compile, {n} tokens]",
        file=sys.stderr)


if __name__ == "__main__":
  console.run(main)
