"""GGUF files (llama.cpp's format) -> a HF-style config dict and HF-named float32 weights.

We translate a GGUF into exactly what a HF safetensors checkpoint would hold (`config.json` fields,
`model.layers.N.self_attn.q_proj.weight`, ...), so that one code path (`hf.py`) turns either into our
model, and transformers' own GGUF loader is a like-for-like reference in the tests.

Two layout facts of llama.cpp files that matter:
  * Llama-family Q and K projections are stored permuted for llama.cpp's interleaved RoPE; we undo it
    per projection so HF's rotate-half RoPE applies. (Skipping this breaks half the argmaxes.)
  * Gemma norm weights are stored as 1 + gamma; HF (and our config) store gamma.
"""

import re
import struct
from typing import NamedTuple

import numpy as np

import gguf as gguf_lib  # the `gguf` package (absolute import: not this module)

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
            12: "<d"}
_STRING, _ARRAY = 8, 9


class TensorInfo(NamedTuple):
  name: str
  shape: tuple  # numpy order (rows, ..., cols)
  qtype: gguf_lib.GGMLQuantizationType
  offset: int  # absolute, in bytes from the start of the file
  nbytes: int


def read_header(path: str) -> tuple[dict, list]:
  """GGUF metadata (plain Python values) and tensor infos, without touching the tensor data.

  `gguf.GGUFReader` builds a numpy view per array element, which takes ~50 s on Gemma 3's
  262k-token vocabulary on our CPUs; this plain struct walk takes well under a second.
  """
  with open(path, "rb") as f:
    buf = f.read(64 << 20)  # metadata + tensor infos; grown below if a file has more
  pos = 0

  def take(fmt):
    nonlocal pos, buf
    size = struct.calcsize(fmt)
    if pos + size > len(buf):
      with open(path, "rb") as f:
        buf = f.read(max(2 * len(buf), pos + size))
    out = struct.unpack_from(fmt, buf, pos)[0]
    pos += size
    return out

  def string():
    nonlocal pos
    n = take("<Q")
    out = buf[pos:pos + n].decode("utf-8", errors="replace")
    pos += n
    return out

  def value(kind):
    if kind == _STRING:
      return string()
    if kind == _ARRAY:
      inner, n = take("<I"), take("<Q")
      return [value(inner) for _ in range(n)]
    return take(_SCALARS[kind])

  if take("4s") != b"GGUF":
    raise ValueError(f"{path} is not a GGUF file (bad magic)")
  version = take("<I")
  if version not in (2, 3):
    raise ValueError(f"{path}: GGUF version {version} is not supported (2 or 3)")
  n_tensors, n_kv = take("<Q"), take("<Q")
  meta = {}
  for _ in range(n_kv):
    key = string()
    meta[key] = value(take("<I"))
  infos = []
  for _ in range(n_tensors):
    name = string()
    dims = [take("<Q") for _ in range(take("<I"))]
    qtype = gguf_lib.GGMLQuantizationType(take("<I"))
    offset = take("<Q")
    block, type_size = gguf_lib.GGML_QUANT_SIZES[qtype]
    infos.append((name, tuple(reversed(dims)), qtype, offset, int(np.prod(dims)) // block * type_size))
  align = int(meta.get("general.alignment", 32))
  data_start = (pos + align - 1) // align * align
  return meta, [TensorInfo(n, s, q, data_start + o, b) for n, s, q, o, b in infos]


def read_metadata(path: str) -> dict:
  """All key/value metadata of a GGUF file as plain Python values (str, int, float, lists)."""
  return read_header(path)[0]


def dequantize(path_or_map, info: TensorInfo) -> np.ndarray:
  """One tensor as a float32 array of `info.shape` (dequantised by the `gguf` package)."""
  data = path_or_map if isinstance(path_or_map, np.ndarray) else np.memmap(path_or_map, np.uint8, "r")
  raw = np.asarray(data[info.offset:info.offset + info.nbytes])
  block, type_size = gguf_lib.GGML_QUANT_SIZES[info.qtype]
  raw = raw.reshape(*info.shape[:-1], info.shape[-1] // block * type_size)
  return np.asarray(gguf_lib.quants.dequantize(raw, info.qtype), np.float32).reshape(info.shape)


def hf_config(meta: dict) -> dict:
  """The transformers `config.json` dict that describes the model in this GGUF."""
  arch = meta["general.architecture"]
  get = lambda key, default=None: meta.get(f"{arch}.{key}", default)
  vocab = len(meta["tokenizer.ggml.tokens"])
  heads = int(get("attention.head_count"))
  kv_heads = int(get("attention.head_count_kv", heads))
  d_model = int(get("embedding_length"))
  head_dim = int(get("attention.key_length", d_model // heads))
  config = dict(
      vocab_size=int(get("vocab_size", vocab)), hidden_size=d_model,
      intermediate_size=int(get("feed_forward_length")), num_hidden_layers=int(get("block_count")),
      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
      rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
      max_position_embeddings=int(get("context_length", 8192)),
      bos_token_id=meta.get("tokenizer.ggml.bos_token_id"), eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
      pad_token_id=meta.get("tokenizer.ggml.padding_token_id"), torch_dtype="float32")
  if arch == "llama":
    config.update(model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu",
                  rope_theta=float(get("rope.freq_base", 10000.0)), attention_bias=False, mlp_bias=False)
  elif arch == "qwen2":
    config.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_act="silu",
                  rope_theta=float(get("rope.freq_base", 1e6)), use_sliding_window=False)
  elif arch == "gemma3":
    window = int(get("attention.sliding_window", 512))
    pattern = 6  # llama.cpp hard-codes Gemma 3's 5 local : 1 global layers (not in the metadata)
    layers = config["num_hidden_layers"]
    config.update(
        model_type="gemma3_text", architectures=["Gemma3ForCausalLM"],
        hidden_activation="gelu_pytorch_tanh", rope_theta=float(get("rope.freq_base", 1e6)),
        rope_local_base_freq=10000.0, sliding_window=window, query_pre_attn_scalar=head_dim,
        layer_types=["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                     for i in range(layers)],
        final_logit_softcapping=None, attn_logit_softcapping=None, rope_scaling=None)
  else:
    raise ValueError(f"GGUF architecture {arch!r} is not supported; expected llama, qwen2 or gemma3")
  config["tie_word_embeddings"] = True  # corrected by load_state_dict when an output.weight exists
  return config


_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
}
_LAYER_NAMES_BY_ARCH = {
    # llama.cpp's ffn_norm is the pre-MLP norm; HF calls it post_attention_layernorm for Llama/Qwen2
    # but pre_feedforward_layernorm for Gemma 3, whose post_attention_layernorm is a real post-norm.
    "llama": {"ffn_norm": "post_attention_layernorm"},
    "qwen2": {"ffn_norm": "post_attention_layernorm"},
    "gemma3": {"ffn_norm": "pre_feedforward_layernorm", "post_attention_norm": "post_attention_layernorm",
               "post_ffw_norm": "post_feedforward_layernorm"},
}


def hf_name(gguf_name: str, arch: str) -> str:
  """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'."""
  top = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
         "output.weight": "lm_head.weight"}
  if gguf_name in top:
    return top[gguf_name]
  m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
  names = dict(_LAYER_NAMES, **_LAYER_NAMES_BY_ARCH.get(arch, {}))
  if m is None or m.group(2) not in names:
    raise ValueError(f"GGUF tensor {gguf_name!r} has no HF counterpart for architecture {arch!r}")
  return f"model.layers.{m.group(1)}.{names[m.group(2)]}.{m.group(3)}"


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undo llama.cpp's per-head (interleaved-pair) row order of a Q or K projection [out, ...]."""
  rows = w.shape[0]
  return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load(path: str) -> tuple[dict, dict, dict]:
  """Reads a GGUF -> (hf config dict, {hf name: float32 numpy array}, metadata).

  Quantised tensors (Q4_0/Q4_1/Q5_0/Q8_0/Q4_K/Q5_K/Q6_K, F16, BF16, ...) are dequantised with the
  `gguf` package; arrays come out in HF's (out, in) layout.
  """
  meta, infos = read_header(path)
  config = hf_config(meta)
  arch = meta["general.architecture"]
  data = np.memmap(path, np.uint8, "r")
  state = {}
  for info in infos:
    w = dequantize(data, info)
    name = hf_name(info.name, arch)
    if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
      heads = config["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
      w = unpermute_qk(w, heads)
    if arch == "gemma3" and name.endswith("norm.weight"):
      w = w - 1.0
    state[name] = w
  config["tie_word_embeddings"] = "lm_head.weight" not in state
  return config, state, meta
