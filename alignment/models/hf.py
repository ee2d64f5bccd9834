"""HF checkpoints in and out: config.json + *.safetensors <-> our `ModelConfig` + `Transformer`.

In: `load_dir(path)` reads a transformers checkpoint directory (one file or a sharded
`model.safetensors.index.json`) of a Llama, Qwen2/2.5 or Gemma 3 text model. GGUF files come through
here too: `gguf.load` turns them into the same HF-named arrays first.
Out: `export(model, tokenizer, path)` writes a directory that transformers (and so vLLM) loads as is.

Layout: HF stores Linear weights [out, in]; ours are [in, ...] with heads split out and every layer
stacked on a leading L axis. HF Gemma norms store gamma and compute x * (1 + gamma); ours are plain
multipliers, so Gemma norms get + 1 on the way in and - 1 on the way out.
"""

import json
import os
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alignment.models import tokenizer as tokenizer_lib
from alignment.models.config import ModelConfig
from alignment.models.transformer import Transformer

GEMMA_TYPES = ("gemma3_text", "gemma3")


# ----------------------------------------------------------------------------------------------
# config.json <-> ModelConfig


def _rope_theta(hf: dict, layer_type: Optional[str] = None, default: float = 10000.0) -> float:
  # transformers >= 5 writes `rope_parameters` (per layer type for Gemma 3); older files `rope_theta`.
  params = hf.get("rope_parameters") or {}
  if layer_type is not None and layer_type in params:
    params = params[layer_type]
  if params.get("rope_type", "default") != "default":
    raise ValueError(f"rope_type={params['rope_type']!r} (RoPE scaling) is not supported; only 'default'")
  scaling = hf.get("rope_scaling")
  if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
    raise ValueError(f"rope_scaling={scaling!r} is not supported; only unscaled RoPE")
  if "rope_theta" in params:
    return float(params["rope_theta"])
  if layer_type == "sliding_attention" and "rope_local_base_freq" in hf:
    return float(hf["rope_local_base_freq"])
  return float(hf.get("rope_theta", default))


def model_config(hf: dict, **overrides) -> ModelConfig:
  """A transformers config.json dict -> ModelConfig (Llama, Qwen2, Gemma 3 text)."""
  kind = hf.get("model_type")
  if kind == "gemma3":  # a multimodal Gemma 3 config: the text part is what we load
    hf = dict(hf["text_config"], model_type="gemma3_text")
    kind = "gemma3_text"
  heads = hf["num_attention_heads"]
  common = dict(
      vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
      n_heads=heads, n_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, d_ff=hf["intermediate_size"],
      rms_eps=float(hf.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(hf.get("tie_word_embeddings", True)))
  if kind in ("llama", "qwen2"):
    if hf.get("hidden_act", "silu") != "silu":
      raise ValueError(f"{kind} hidden_act={hf['hidden_act']!r}; only 'silu' is supported")
    if hf.get("mlp_bias"):
      raise ValueError("mlp_bias=True is not supported")
    if kind == "qwen2" and hf.get("use_sliding_window"):
      raise ValueError("Qwen2 use_sliding_window=True is not supported")
    qkv_bias = True if kind == "qwen2" else bool(hf.get("attention_bias", False))
    if kind == "llama" and qkv_bias:
      raise ValueError("Llama attention_bias=True (bias on o_proj too) is not supported")
    cfg = ModelConfig(**common, rope_theta=_rope_theta(hf), qkv_bias=qkv_bias, activation="silu")
  elif kind == "gemma3_text":
    if hf.get("final_logit_softcapping") or hf.get("attn_logit_softcapping"):
      raise ValueError("Gemma logit soft-capping is not supported (Gemma 3 does not use it)")
    if hf.get("hidden_activation", "gelu_pytorch_tanh") not in ("gelu_pytorch_tanh", "gelu_tanh"):
      raise ValueError(f"gemma3 hidden_activation={hf['hidden_activation']!r}; expected tanh-GELU")
    layer_types = hf.get("layer_types") or [
        "full_attention" if (i + 1) % hf.get("sliding_window_pattern", 6) == 0 else "sliding_attention"
        for i in range(common["n_layers"])]
    global_every = _global_every(layer_types, hf.get("_sliding_window_pattern", hf.get("sliding_window_pattern", 6)))
    cfg = ModelConfig(
        **common, rope_theta=_rope_theta(hf, "full_attention", 1e6),
        rope_local_theta=_rope_theta(hf, "sliding_attention", 1e4), activation="gelu_tanh", qk_norm=True,
        post_norms=True, embed_scale=True, sliding_window=hf.get("sliding_window") or None,
        global_every=global_every if hf.get("sliding_window") else None,
        query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar") or common["head_dim"]))
  else:
    raise ValueError(f"config.json model_type={kind!r} is not supported; expected llama, qwen2 or gemma3_text")
  return ModelConfig(**{**cfg.__dict__, **overrides}) if overrides else cfg


def _global_every(layer_types, default_pattern):
  """Gemma 3 `layer_types` -> the k in 'layer i is global iff (i + 1) % k == 0'."""
  is_global = [t == "full_attention" for t in layer_types]
  candidates = [next((i + 1 for i, g in enumerate(is_global) if g), None), default_pattern]
  for k in candidates:
    if k and all(g == ((i + 1) % k == 0) for i, g in enumerate(is_global)):
      return k
  if not any(is_global):
    return None
  raise ValueError(f"layer_types {layer_types} is not a 'global every k-th layer' pattern")


def hf_config(cfg: ModelConfig, *, bos_id=None, eos_id=None, pad_id=None) -> dict:
  """ModelConfig -> a transformers config.json dict (gemma3_text, qwen2 or llama)."""
  common = dict(
      vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
      num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
      head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_eps, tie_word_embeddings=cfg.tie_embeddings,
      bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id, torch_dtype="float32",
      dtype="float32", max_position_embeddings=8192)
  if cfg.qk_norm or cfg.post_norms or cfg.embed_scale:
    if not (cfg.qk_norm and cfg.post_norms and cfg.embed_scale and cfg.activation == "gelu_tanh"):
      raise ValueError("only the Gemma 3 combination of qk_norm/post_norms/embed_scale/gelu_tanh exports")
    local = cfg.layer_is_local
    return dict(
        common, model_type="gemma3_text", architectures=["Gemma3ForCausalLM"],
        hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=_int_if_whole(cfg.query_pre_attn_scalar or cfg.head_dim),
        sliding_window=cfg.sliding_window or 1 << 20, attention_bias=False,
        layer_types=["sliding_attention" if l else "full_attention" for l in local],
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": cfg.rope_theta},
                         "sliding_attention": {"rope_type": "default", "rope_theta": cfg.local_theta}},
        rope_theta=cfg.rope_theta, rope_local_base_freq=cfg.local_theta,
        final_logit_softcapping=None, attn_logit_softcapping=None)
  rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
  if cfg.qkv_bias:
    return dict(common, model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_act="silu",
                rope_parameters=rope, rope_theta=cfg.rope_theta, use_sliding_window=False)
  return dict(common, model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu",
              rope_parameters=rope, rope_theta=cfg.rope_theta, attention_bias=False, mlp_bias=False)


def _int_if_whole(x):
  return int(x) if float(x).is_integer() else x  # transformers' config validators want an int here


# ----------------------------------------------------------------------------------------------
# HF state dict <-> our param tree


def _is_gemma(cfg: ModelConfig) -> bool:
  return cfg.qk_norm and cfg.post_norms


def _layer_names(cfg: ModelConfig) -> dict:
  """Our stacked param path -> HF per-layer name (without 'model.layers.N.')."""
  names = {
      ("attn_norm",): "input_layernorm.weight",
      ("attn", "q"): "self_attn.q_proj.weight", ("attn", "k"): "self_attn.k_proj.weight",
      ("attn", "v"): "self_attn.v_proj.weight", ("attn", "o"): "self_attn.o_proj.weight",
      ("mlp", "gate"): "mlp.gate_proj.weight", ("mlp", "up"): "mlp.up_proj.weight",
      ("mlp", "down"): "mlp.down_proj.weight",
  }
  if _is_gemma(cfg):
    names.update({("mlp_norm",): "pre_feedforward_layernorm.weight",
                  ("post_attn_norm",): "post_attention_layernorm.weight",
                  ("post_mlp_norm",): "post_feedforward_layernorm.weight",
                  ("attn", "q_norm"): "self_attn.q_norm.weight", ("attn", "k_norm"): "self_attn.k_norm.weight"})
  else:
    names[("mlp_norm",)] = "post_attention_layernorm.weight"
  if cfg.qkv_bias:
    names.update({("attn", "q_bias"): "self_attn.q_proj.bias", ("attn", "k_bias"): "self_attn.k_proj.bias",
                  ("attn", "v_bias"): "self_attn.v_proj.bias"})
  return names


def _to_ours(cfg: ModelConfig, path, w: np.ndarray) -> np.ndarray:
  """One layer's HF array -> our per-layer layout."""
  H, KV, Dh, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model
  leaf = path[-1]
  if leaf in ("q", "k", "v"):
    return w.T.reshape(D, H if leaf == "q" else KV, Dh)
  if leaf == "o":
    return w.T.reshape(H, Dh, D)
  if leaf in ("q_bias", "k_bias", "v_bias"):
    return w.reshape(H if leaf == "q_bias" else KV, Dh)
  if leaf in ("gate", "up", "down"):
    return w.T
  if "norm" in leaf and _is_gemma(cfg):
    return w + 1.0
  return w


def _to_hf(cfg: ModelConfig, path, w: np.ndarray) -> np.ndarray:
  """Inverse of `_to_ours` for one layer."""
  leaf = path[-1]
  if leaf in ("q", "k", "v"):
    return w.reshape(cfg.d_model, -1).T
  if leaf == "o":
    return w.reshape(-1, cfg.d_model).T
  if leaf in ("q_bias", "k_bias", "v_bias"):
    return w.reshape(-1)
  if leaf in ("gate", "up", "down"):
    return w.T
  if "norm" in leaf and _is_gemma(cfg):
    return w - 1.0
  return w


def params_from_state_dict(cfg: ModelConfig, get: Callable[[str], np.ndarray]) -> dict:
  """HF tensors (fetched by name with `get`) -> our nested param dict of float32 numpy arrays."""
  gemma = _is_gemma(cfg)
  params = {"embed": np.asarray(get("model.embed_tokens.weight"), np.float32)}
  norm = np.asarray(get("model.norm.weight"), np.float32)
  params["final_norm"] = norm + 1.0 if gemma else norm
  if not cfg.tie_embeddings:
    params["unembed"] = np.ascontiguousarray(np.asarray(get("lm_head.weight"), np.float32).T)
  layers = {}
  for path, name in _layer_names(cfg).items():
    stacked = np.stack([_to_ours(cfg, path, np.asarray(get(f"model.layers.{i}.{name}"), np.float32))
                        for i in range(cfg.n_layers)])
    node = layers
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = stacked
  params["layers"] = layers
  return params


def state_dict_from_params(cfg: ModelConfig, params: dict) -> dict:
  """Our nested param dict (arrays) -> HF name -> float32 numpy array."""
  gemma = _is_gemma(cfg)
  f32 = lambda a: np.asarray(jax.device_get(a), np.float32)
  out = {"model.embed_tokens.weight": f32(params["embed"])}
  norm = f32(params["final_norm"])
  out["model.norm.weight"] = norm - 1.0 if gemma else norm
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = np.ascontiguousarray(f32(params["unembed"]).T)
  for path, name in _layer_names(cfg).items():
    node = params["layers"]
    for key in path:
      node = node[key]
    stacked = f32(node)
    for i in range(cfg.n_layers):
      out[f"model.layers.{i}.{name}"] = np.ascontiguousarray(_to_hf(cfg, path, stacked[i]))
  return out


def build_model(cfg: ModelConfig, params: dict, *, shardings=None, mesh=None, rules=None) -> Transformer:
  """A Transformer holding `params` (numpy, cast to cfg.param_dtype), without a random init.

  shardings: optional pytree of `jax.sharding.Sharding` matching `params`, or give `mesh` and `rules`
  (config.sharding.rules) to derive them from the params' logical axis names. Each device then
  receives only its own shard (`jax.make_array_from_callback` slices the one host copy per device).
  """
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  if shardings is None and mesh is not None:
    from alignment.parallel import tree_shardings
    specs = nnx.to_pure_dict(nnx.get_partition_spec(state))
    shardings = tree_shardings(specs, nnx.to_pure_dict(state), mesh, rules)
  dtype = jnp.dtype(cfg.param_dtype)
  expected = nnx.to_pure_dict(state)

  def put(path, ref, host):
    if tuple(ref.shape) != tuple(host.shape):
      name = "/".join(str(getattr(k, "key", k)) for k in path)
      raise ValueError(f"param {name}: checkpoint shape {host.shape} != model shape {tuple(ref.shape)}")
    host = host.astype(dtype) if host.dtype != dtype else host
    return host

  host = jax.tree_util.tree_map_with_path(put, expected, params)
  if shardings is None:
    arrays = jax.tree.map(jnp.asarray, host)
  else:
    arrays = jax.tree.map(
        lambda h, s: jax.make_array_from_callback(h.shape, s, lambda idx, h=h: h[idx]), host, shardings)
  nnx.replace_by_pure_dict(state, arrays)
  return nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------------------------
# Directories


def _reader(path: str) -> Callable[[str], np.ndarray]:
  """name -> numpy array over one `model.safetensors` or a sharded index (files opened lazily)."""
  from safetensors import safe_open

  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      where = json.load(f)["weight_map"]
  else:
    files = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    if not files:
      raise FileNotFoundError(f"{path}: no *.safetensors and no model.safetensors.index.json")
    where = {}
    for name in files:
      with safe_open(os.path.join(path, name), framework="numpy") as f:
        where.update({k: name for k in f.keys()})
  handles = {}

  def get(name):
    # Gemma 3 multimodal checkpoints prefix the text model.
    for key in (name, name.replace("model.", "language_model.model.", 1),
                name.replace("model.", "model.language_model.", 1)):
      if key in where:
        break
    else:
      if name == "lm_head.weight":
        raise KeyError("lm_head.weight missing although tie_word_embeddings is false")
      raise KeyError(f"{path}: tensor {name!r} not found in the checkpoint")
    file = where[key]
    if file not in handles:
      handles[file] = safe_open(os.path.join(path, file), framework="numpy")
    return handles[file].get_tensor(key)

  return get


def is_hf_dir(path: str) -> bool:
  return os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json"))


def load_dir(path: str, *, dtype: str = "float32", shardings=None, mesh=None, rules=None):
  """An HF checkpoint directory -> (Transformer, Tokenizer or None)."""
  with open(os.path.join(path, "config.json")) as f:
    hf = json.load(f)
  cfg = model_config(hf, param_dtype=dtype, dtype=dtype)
  params = params_from_state_dict(cfg, _reader(path))  # bf16 files read as ml_dtypes.bfloat16
  model = build_model(cfg, params, shardings=shardings, mesh=mesh, rules=rules)
  tok = tokenizer_lib.from_pretrained(path) if os.path.exists(os.path.join(path, "tokenizer.json")) else None
  return model, tok


def export(model: Transformer, tokenizer, path: str, *, max_shard_bytes: int = 2 << 30) -> None:
  """Writes config.json, model.safetensors (sharded with an index past `max_shard_bytes`),
  generation_config.json and the tokenizer (tokenizer.json, tokenizer_config.json with the chat
  template) into `path`. float32 weights; transformers/vLLM load the directory as is."""
  from safetensors.numpy import save_file

  cfg = model.cfg
  os.makedirs(path, exist_ok=True)
  ids = dict(bos_id=getattr(tokenizer, "bos_id", None), eos_id=getattr(tokenizer, "eos_id", None),
             pad_id=getattr(tokenizer, "pad_id", None))
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf_config(cfg, **ids), f, indent=2)
  gen = {k: v for k, v in dict(bos_token_id=ids["bos_id"], eos_token_id=ids["eos_id"],
                               pad_token_id=ids["pad_id"]).items() if v is not None}
  with open(os.path.join(path, "generation_config.json"), "w") as f:
    json.dump(gen, f, indent=2)
  state = state_dict_from_params(cfg, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  shards, current, size = [], {}, 0
  for name, w in state.items():
    if current and size + w.nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[name] = w
    size += w.nbytes
  shards.append(current)
  meta = {"format": "pt"}
  if len(shards) == 1:
    save_file(shards[0], os.path.join(path, "model.safetensors"), metadata=meta)
  else:
    weight_map = {}
    for i, shard in enumerate(shards):
      name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      save_file(shard, os.path.join(path, name), metadata=meta)
      weight_map.update({k: name for k in shard})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {"total_size": sum(w.nbytes for w in state.values())}, "weight_map": weight_map},
                f, indent=2)
  if tokenizer is not None:
    if hasattr(tokenizer, "save") and hasattr(tokenizer, "backend"):
      tokenizer.save(path)
    else:  # a plain tokenizers.Tokenizer
      tokenizer.save(os.path.join(path, "tokenizer.json"))
