"""`ModelConfig`: one frozen description of a decoder LM, covering the Llama family (Llama, SmolLM2,
Qwen2 with `qkv_bias`) and the Gemma 3 text family (q/k norms, post norms, tanh-GELU, scaled
embeddings, local/global attention with two RoPE bases). Loaders map GGUF / HF configs onto it.

Norm scales are plain multipliers (y = x_hat * scale). GGUF Gemma files already store 1 + gamma;
loaders of HF Gemma checkpoints add the 1 at load time.
"""

import dataclasses
import math
from typing import Optional, Tuple

from alignment.choices import DTYPES, REMATS

ACTIVATIONS = ("silu", "gelu_tanh")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of a decoder-only transformer. Hashable, so it can live in a graphdef."""
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  d_ff: int
  rope_theta: float = 10000.0
  rms_eps: float = 1e-5
  tie_embeddings: bool = True
  qkv_bias: bool = False  # Qwen2
  activation: str = "silu"  # 'silu' (SwiGLU) | 'gelu_tanh' (GeGLU, Gemma)
  qk_norm: bool = False  # Gemma 3: RMSNorm over head_dim on q and k, before RoPE
  post_norms: bool = False  # Gemma 3: RMSNorm on the attention and MLP outputs, before the residual add
  embed_scale: bool = False  # Gemma: embeddings * sqrt(d_model), in the compute dtype
  # Sliding-window ("local") attention: a query sees itself and the `sliding_window - 1` tokens before
  # it. None: every layer is global. Otherwise layer i is global iff `global_every` and
  # (i + 1) % global_every == 0 (Gemma 3: 6, i.e. layers 5, 11, 17 are global); None: all local.
  sliding_window: Optional[int] = None
  global_every: Optional[int] = None
  rope_local_theta: Optional[float] = None  # RoPE base of the local layers; None: rope_theta
  # Attention logits are scaled by query_pre_attn_scalar ** -0.5; None: head_dim ** -0.5.
  query_pre_attn_scalar: Optional[float] = None
  param_dtype: str = "float32"
  dtype: str = "float32"  # compute dtype; softmax, norms and RoPE always run in float32
  # What the backward keeps of each layer's forward: 'none' (everything autodiff saves), 'full' (only the
  # layer's input: recompute the layer), 'dots' (the weight matmuls' outputs), 'all_dots' (every matmul's
  # output, attention scores and outputs too; norms, RoPE, activations and softmax are recomputed).
  remat: str = "none"
  scan_layers: bool = True  # lax.scan over the stacked layers (fast compile) or a Python loop
  frozen_layers: int = 0  # training: the first n layers get no gradient (Transformer.trunk)
  frozen_embeddings: bool = False  # training: nor does the embedding table (with it, a tied unembedding)
  init_std: float = 0.02  # std of the random embedding init (projections use fan_in ** -0.5)

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"ModelConfig.{name}={value!r}; expected a positive int")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"ModelConfig.n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"ModelConfig.head_dim={self.head_dim}; RoPE needs an even head_dim")
    if not 0 <= self.frozen_layers <= self.n_layers:
      raise ValueError(f"ModelConfig.frozen_layers={self.frozen_layers}; expected 0..n_layers={self.n_layers}")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"ModelConfig.activation={self.activation!r}; expected one of {ACTIVATIONS}")
    for name in ("param_dtype", "dtype"):
      if getattr(self, name) not in DTYPES:
        raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}; expected one of {DTYPES}")
    if self.remat not in REMATS:
      raise ValueError(f"ModelConfig.remat={self.remat!r}; expected one of {REMATS}")
    for name in ("rope_theta", "rms_eps", "init_std"):
      if not getattr(self, name) > 0:
        raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}; expected a positive number")
    for name in ("rope_local_theta", "query_pre_attn_scalar"):
      value = getattr(self, name)
      if value is not None and not value > 0:
        raise ValueError(f"ModelConfig.{name}={value!r}; expected None or a positive number")
    for name in ("sliding_window", "global_every"):
      value = getattr(self, name)
      if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
        raise ValueError(f"ModelConfig.{name}={value!r}; expected None or a positive int")
    if self.global_every is not None and self.sliding_window is None:
      raise ValueError(f"ModelConfig.global_every={self.global_every} needs sliding_window to be set")

  @property
  def layer_is_local(self) -> Tuple[bool, ...]:
    """Per layer: True where the layer uses sliding-window attention and the local RoPE base."""
    if self.sliding_window is None:
      return (False,) * self.n_layers
    return tuple(not (self.global_every and (i + 1) % self.global_every == 0) for i in range(self.n_layers))

  @property
  def attn_scale(self) -> float:
    return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

  @property
  def local_theta(self) -> float:
    return self.rope_local_theta if self.rope_local_theta is not None else self.rope_theta

  @property
  def embed_multiplier(self) -> float:
    return math.sqrt(self.d_model) if self.embed_scale else 1.0


PRESETS = {
    # Runs a train step in CPU seconds. vocab_size 512: the tiny tokenizer
    # (alignment/data/assets/tiny_tokenizer.json) must have at most 512 tokens.
    "tiny-random": ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                               d_ff=128, rope_theta=10000.0, rms_eps=1e-5, tie_embeddings=True),
    # SmolLM2-135M(-Instruct), llama architecture (FACTS.md).
    "smollm2-135m": ModelConfig(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
                                head_dim=64, d_ff=1536, rope_theta=100000.0, rms_eps=1e-5,
                                tie_embeddings=True),
    # Gemma 3 270M text model (FACTS.md; d_ff from its HF config).
    "gemma3-270m": ModelConfig(vocab_size=262144, d_model=640, n_layers=18, n_heads=4, n_kv_heads=1,
                               head_dim=256, d_ff=2048, rope_theta=1_000_000.0, rms_eps=1e-6,
                               tie_embeddings=True, activation="gelu_tanh", qk_norm=True, post_norms=True,
                               embed_scale=True, sliding_window=512, global_every=6,
                               rope_local_theta=10000.0, query_pre_attn_scalar=256.0),
}


def get_model_config(name: str, **overrides) -> ModelConfig:
  """A preset by name, with fields replaced by `overrides` (validated again)."""
  if name not in PRESETS:
    raise ValueError(f"unknown model config {name!r}; expected one of {sorted(PRESETS)}")
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"unknown ModelConfig field(s) {unknown}; known: {sorted(fields)}")
  return dataclasses.replace(PRESETS[name], **overrides)
