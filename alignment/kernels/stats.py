"""The math every fused backend shares: per-row online statistics, their merge, the final values, and
the per-row coefficients of the backward pass.

A backend sweeps the vocabulary in blocks and keeps, per row, over the columns it has seen
(z = policy logits / temperature, r = reference logits / temperature, y = target):

  m  = max z                      s  = sum exp(z - m)
  a  = sum exp(z - m) (z - m)     t  = z[y] (0 when y is not among the columns)
  mr = max r                      sr = sum exp(r - mr)
  d  = sum exp(z - m) (z - r)     tr = r[y]

`a` is centred on the running max so the entropy log(s) - a/s never subtracts two numbers of the
logits' size (logits of +-100 would otherwise cost four digits). Two sets of statistics over
disjoint columns merge exactly (`merge_stacked`, `merge_across`): vocab blocks, vocab splits on a GPU and
vocabulary shards over the 'tensor' axis all combine this way.

Backward, with p = softmax(z), log r = log softmax(r), per-row cotangents g_lp, g_lse, g_ent, g_kl:
  d/dz_j = g_lp [j == y] + p_j (A + B log p_j + C log r_j)
  A = g_lse - g_lp - g_ent H - g_kl KL,   B = g_kl - g_ent,   C = -g_kl
(d logp_y = onehot - p; d lse = p; d H = -p (log p + H); d KL = p (log p - log r - KL)).
"""

import jax.numpy as jnp
from jax import lax

# A finite "minus infinity" for masked logits and empty maxima: exp(NEG - m) == 0 and NEG * 0 == 0,
# so padded columns and rows never make a NaN (with -inf, (-inf) * 0 would).
NEG = -1e30

POLICY = ("m", "s", "a", "t")
REFERENCE = ("mr", "sr", "d", "tr")


def init(n, has_ref):
  """Empty statistics for `n` rows."""
  neg, zero = jnp.full((n,), NEG, jnp.float32), jnp.zeros((n,), jnp.float32)
  st = dict(m=neg, s=zero, a=zero, t=zero)
  if has_ref:
    st.update(mr=neg, sr=zero, d=zero, tr=zero)
  return st


def update(st, z, r, fresh, hit, keepdims=False, diff=None):
  """Folds one block of columns into `st`.

  z, r: float32 [n, b] logits (r None without a reference); fresh: bool, broadcastable to [n, b], the
  columns this block adds (False for padding and already-seen columns), or None when all are;
  hit: bool [n, b], column == target. Statistics are [n] vectors, or [n, 1] columns with `keepdims`
  (what Mosaic TPU wants).
  """
  def red(f, x):
    return f(x, axis=1, keepdims=keepdims)

  def col(x):
    return x if keepdims else x[:, None]

  def mask(x, fill):
    return x if fresh is None else jnp.where(fresh, x, fill)

  m_new = jnp.maximum(st["m"], red(jnp.max, mask(z, NEG)))
  alpha = jnp.exp(st["m"] - m_new)
  zc = mask(z - col(m_new), 0.0)
  e = mask(jnp.exp(zc), 0.0)
  hit = hit if fresh is None else hit & fresh
  out = dict(
      m=m_new,
      s=alpha * st["s"] + red(jnp.sum, e),
      a=alpha * (st["a"] + (st["m"] - m_new) * st["s"]) + red(jnp.sum, e * zc),
      t=st["t"] + red(jnp.sum, jnp.where(hit, z, 0.0)))
  if r is not None:
    mr_new = jnp.maximum(st["mr"], red(jnp.max, mask(r, NEG)))
    er = mask(jnp.exp(r - col(mr_new)), 0.0)
    out.update(
        mr=mr_new,
        sr=jnp.exp(st["mr"] - mr_new) * st["sr"] + red(jnp.sum, er),
        d=alpha * st["d"] + red(jnp.sum, e * mask(z - r if diff is None else diff, 0.0)),
        tr=st["tr"] + red(jnp.sum, jnp.where(hit, r, 0.0)))
  return out


def _merge(st, max_fn, sum_fn):
  m = max_fn(st["m"])
  w = jnp.exp(st["m"] - m)
  out = dict(m=m, s=sum_fn(w * st["s"]), a=sum_fn(w * (st["a"] + (st["m"] - m) * st["s"])),
             t=sum_fn(st["t"]))
  if "mr" in st:
    mr = max_fn(st["mr"])
    out.update(mr=mr, sr=sum_fn(jnp.exp(st["mr"] - mr) * st["sr"]), d=sum_fn(w * st["d"]),
               tr=sum_fn(st["tr"]))
  return out


def merge_stacked(st):
  """Merges statistics stacked as [P, N] (e.g. one row per vocab split) into [N]."""
  return _merge(st, lambda x: jnp.max(x, axis=0), lambda x: jnp.sum(x, axis=0))


def merge_across(st, axis_name):
  """Merges statistics held by the shards of mesh axis `axis_name` (each over its own columns)."""
  return _merge(st, lambda x: lax.pmax(x, axis_name), lambda x: lax.psum(x, axis_name))


def finalize(st):
  """Statistics -> per-row values (float32 [N]): logprobs, logsumexp, entropy and, with a
  reference, ref_logprobs, kl (clamped at 0); plus what the backward needs: m, log_s (and mr,
  log_sr, kl_raw, the unclamped KL).

  Differences are taken against the max first ((t - m) - log s rather than t - (m + log s)): for
  logits of +-100 that keeps the digits that m + log s would round away."""
  log_s = jnp.log(st["s"])
  out = dict(logprobs=(st["t"] - st["m"]) - log_s, logsumexp=st["m"] + log_s,
             entropy=log_s - st["a"] / st["s"], m=st["m"], log_s=log_s)
  if "mr" in st:
    log_sr = jnp.log(st["sr"])
    # lse - ref_lse written as (m - mr) + (log s - log sr): exact when policy == reference.
    kl_raw = st["d"] / st["s"] - ((st["m"] - st["mr"]) + (log_s - log_sr))
    out.update(ref_logprobs=(st["tr"] - st["mr"]) - log_sr, kl=jnp.maximum(kl_raw, 0.0),
               kl_raw=kl_raw, mr=st["mr"], log_sr=log_sr)
  return out


def coefficients(g_lp, g_lse, g_ent, g_kl, entropy, kl_raw):
  """Per-row A, B, C of the backward formula (module docstring); g_* float32 [N] or None (zero)."""
  n = entropy.shape[0]
  zero = jnp.zeros((n,), jnp.float32)
  g_lp = zero if g_lp is None else g_lp.astype(jnp.float32)
  g_lse = zero if g_lse is None else g_lse.astype(jnp.float32)
  a = g_lse - g_lp
  b = zero
  c = zero
  if g_ent is not None:
    g_ent = g_ent.astype(jnp.float32)
    a = a - g_ent * entropy
    b = b - g_ent
  if g_kl is not None:
    g_kl = g_kl.astype(jnp.float32)
    a = a - g_kl * kl_raw
    b = b + g_kl
    c = -g_kl
  return g_lp, a, b, c


def grad_logits(z, r, row, hit, fresh, use_b, use_ref):
  """d loss / d z for one block: float32 [n, bv], zero on columns that are not `fresh` (None: all are).

  row: float32 [n, 1] columns m, log_s, g_lp, a (+ b; + c, mr, log_sr with the reference), where
  log p = (z - m) - log_s (exact near the max, unlike z - lse)."""
  logp = (z - row["m"]) - row["log_s"]
  inner = row["a"]
  if use_b:
    inner = inner + row["b"] * logp
  if use_ref:
    inner = inner + row["c"] * ((r - row["mr"]) - row["log_sr"])
  dz = jnp.exp(logp) * inner + jnp.where(hit, row["g_lp"], 0.0)
  return dz if fresh is None else jnp.where(fresh, dz, 0.0)
