"""Serve a model over the OpenAI API (chat completions, completions, models, health).

  python -m alignment.serve --model=smollm2-135m-instruct --port=8000
  python -m alignment.serve --model=workdirs/demo/policy --guard=workdirs/demo/guard
  python -m alignment.serve --model=tiny-random --chat_template=chatml      # a model without a template

--model takes what `alignment.generate` takes: a model name, a .gguf file, an HF checkpoint directory or a
training workdir. Clients name the model `--served_name` (default: the --model value). The limits are
flags: --context (prompt + answer tokens), --max_tokens (per answer), --max_batch (rows decoded side by
side), --queue (waiting requests; more are answered 429) and --timeout_s (a request waiting longer gets 503).
Requests join and leave the running batch between decode steps (continuous batching, `engine.py`). At
start-up the prefill is compiled for prompts up to the largest --warmup_widths width and the decoder for
every batch bucket at every cache size such a prompt and --max_tokens can need, so those requests compile
nothing; `--warmup_widths=all` compiles up to the context.
"""

import time

from absl import flags

from alignment import console

flags.DEFINE_string("model", "smollm2-135m-instruct", "model name or path (see the module doc)")
flags.DEFINE_string("served_name", "", "the model id clients send (default: --model)")
flags.DEFINE_string("guard", "", "a safety classifier's workdir: check prompts and responses")
flags.DEFINE_string("chat_template", "", "a Jinja chat template file, or 'chatml', for a model without one")
flags.DEFINE_string("host", "127.0.0.1", "address to listen on")
flags.DEFINE_integer("port", 8000, "port to listen on")
flags.DEFINE_integer("context", 2048, "prompt plus answer tokens at most")
flags.DEFINE_integer("max_tokens", 512, "answer tokens a request may ask for at most")
flags.DEFINE_integer("max_batch", 16, "rows decoded side by side (a request with n choices is n rows)")
flags.DEFINE_integer("queue", 64, "requests that may wait; one more is answered 429")
flags.DEFINE_float("timeout_s", 120.0, "seconds a request may wait for its answer; then 503")
flags.DEFINE_float("batch_window_ms", 20.0, "when idle: after a request arrives, how long to wait for others")
flags.DEFINE_string("warmup_widths", "64,128,256", "prompt lengths compiled for at start-up: comma-separated "
                    "(the largest counts), 'all' or 'none'")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "param and compute dtype")
F = flags.FLAGS


def chat_tokenizer(tokenizer, template_flag: str):
  """The model's tokenizer, or (for a model without a chat template) wrapped with --chat_template."""
  from alignment.data import chat
  from alignment.models.tokenizer import with_chat_template
  if not template_flag:
    return tokenizer
  return with_chat_template(tokenizer, chat.load_template() if template_flag == "chatml" else
                            chat.load_template(template_flag))


def main(argv):
  if len(argv) > 1:
    console.fail(f"unexpected arguments {argv[1:]}")
  from alignment.train.model import Policy, check_model_source, load_policy
  try:
    check_model_source(F.model)
    widths = (None if F.warmup_widths == "all" else [] if F.warmup_widths == "none" else
              [int(w) for w in F.warmup_widths.split(",")])
  except ValueError as e:
    console.fail(str(e) if "--model" in str(e) else f"--warmup_widths={F.warmup_widths}: expected widths, 'all' or 'none'")
  if F.max_tokens >= F.context:
    console.fail(f"--max_tokens={F.max_tokens} must be below --context={F.context}")
  import uvicorn
  from alignment.serve.api import make_app
  from alignment.serve.engine import Engine, Limits
  from alignment.safety import guard as guard_lib
  try:
    guard = guard_lib.open_flag("--guard", F.guard)
  except ValueError as e:
    console.fail(str(e))
  start = time.time()
  policy = load_policy(F.model, dtype=F.dtype)
  if policy.tokenizer is None:
    console.fail(f"--model={F.model}: the model ships no tokenizer")
  try:
    tokenizer = chat_tokenizer(policy.tokenizer, F.chat_template)
  except OSError as e:
    console.fail(f"--chat_template={F.chat_template}: {e}")
  engine = Engine(Policy(policy.cfg, policy.params, tokenizer, policy.description),
                  Limits(context=F.context, max_tokens=F.max_tokens, max_batch=F.max_batch, queue=F.queue,
                         batch_window_s=F.batch_window_ms / 1000))
  loaded = time.time()
  compiled = engine.warmup(widths) if widths != [] else 0
  name = F.served_name or F.model
  print(f"serving {name} on http://{F.host}:{F.port}/v1 (loaded in {loaded - start:.1f}s, {compiled} sampler shapes "
        f"compiled in {time.time() - loaded:.1f}s{', behind the Guard' if guard else ''})", flush=True)
  app = make_app(engine, model_name=name, guard=guard, timeout_s=F.timeout_s)
  uvicorn.run(app, host=F.host, port=F.port, log_level="warning")


if __name__ == "__main__":
  console.run(main)
