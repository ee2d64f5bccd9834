"""What the command-line tools print besides their results: nothing from the libraries by default.

Orbax, absl, TFDS, XLA and JAX's backend discovery each log INFO or WARNING lines on a normal run (every
checkpoint file, 'Unable to initialize backend tpu', TFDS's dataset preparation banners and progress
bars). `setup()` silences them unless `--verbosity=info` (or debug / warning) asks for them; errors still
show. Ctrl-C outside a training loop ends a command with one line and exit 130. Commands start with
`run(main)`, which does both.

`setup` must run before JAX is imported (XLA reads its C++ log level once, when it loads): commands
import JAX inside `main`, not at the top.
"""

import contextlib
import logging
import os
import re
import sys

VERBOSITY = {"debug": 1, "info": 0, "warning": -1, "error": -2}  # absl's --verbosity numbers
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT
_LIBRARY_LOGGERS = ("absl", "jax", "orbax", "tensorflow_datasets", "etils", "grain", "tensorflow")
_verbose = False


def normalize_verbosity(argv):
  """argv with `--verbosity=info` (a name) turned into absl's number (`--verbosity=0`)."""
  out = []
  for arg in argv:
    name, sep, value = arg.partition("=")
    if sep and name in ("--verbosity", "-v") and value.lower() in VERBOSITY:
      arg = f"{name}={VERBOSITY[value.lower()]}"
    out.append(arg)
  return out


def setup(verbosity_given: bool) -> None:
  """Libraries at ERROR unless the command line gave --verbosity (then absl's level stands)."""
  global _verbose
  _verbose = verbosity_given
  if verbosity_given:
    return
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # XLA's C++ INFO and WARNING lines
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.ERROR)
  for name in _LIBRARY_LOGGERS:
    logging.getLogger(name).setLevel(logging.ERROR)


def fail(message: str):
  """How a command refuses bad input: one line on stderr, exit 2."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def verbose() -> bool:
  return _verbose


@contextlib.contextmanager
def quiet_stdout():
  """TFDS prints banners and progress bars while it prepares a dataset: kept off the console unless
  verbose (their errors still raise)."""
  if _verbose:
    yield
    return
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()
  with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
    yield


def run(main, flags_parser=None):
  """`absl.app.run(main)` for a command: `--verbosity=info` understood, the console set up before `main`,
  and Ctrl-C ending it with one line on stderr and exit 130 instead of a traceback."""
  from absl import app, flags
  parse = flags_parser or flags.FLAGS

  def wrapped(argv):
    setup(flags.FLAGS["verbosity"].present)
    try:
      return main(argv)
    except KeyboardInterrupt:
      print("interrupted", file=sys.stderr, flush=True)
      sys.exit(INTERRUPTED_EXIT_CODE)

  app.run(wrapped, flags_parser=lambda argv: parse(normalize_verbosity(argv)))


def parse_config_flags(argv):
  """absl flag parsing with every failure (unknown key, wrong type, bad preset) reduced to one line."""
  from absl import flags
  try:
    argv = flags.FLAGS(argv)
    _ = flags.FLAGS.config.algorithm  # a bad config file raises on first use: make that use here
    return argv
  except Exception as e:  # absl, ml_collections and config files raise a variety of types
    text = str(e).replace("\\n", "\n")
    if "Traceback" in text:  # raised inside the config file: its last line says what is wrong
      text = re.sub(r"^\w*(Error|Exception): ", "", text.strip().splitlines()[-1])
    text = " ".join(text.split())
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":  # a KeyError's message comes quoted
      text = text[1:-1]
    if isinstance(e, (AttributeError, KeyError)):  # an override names a key the config does not have
      key = re.findall(r"[A-Za-z_]\w*", text.replace("\\", " "))[0]
      culprit = next((a.split("=")[0] for a in argv[1:] if a.startswith("--config.") and key in a), "")
      hint = text[text.find("Did you mean"):] if "Did you mean" in text else ""
      text = f"{culprit}: no such config key {key!r}. {hint}".strip()
    print(f"error: {text}", file=sys.stderr)
    sys.exit(2)
