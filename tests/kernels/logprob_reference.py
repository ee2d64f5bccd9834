"""An independent float64 NumPy reference: values and hand-derived gradients.

Written from the definitions, not from alignment.kernels: softmax by explicit max-shift, entropy as
-sum p log p, KL as sum p (log p - log r), and each output's gradient w.r.t. the logits z:
  d log p_y / dz = onehot(y) - p          d lse / dz = p
  d H / dz       = -p (log p + H)         d KL / dz  = p (log p - log r - KL)
then dh = dz @ W^T / T and dW = h^T @ dz / T. `finite_difference` checks these on tiny shapes.
"""

import numpy as np


def _log_softmax(x):
  m = x.max(axis=1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))


def values(h, w, y, hr=None, wr=None, temperature=1.0):
  """float64 outputs; targets outside [0, V) have logprob -lse (the target logit reads as 0)."""
  h, w = np.asarray(h, np.float64), np.asarray(w, np.float64)
  y = np.asarray(y)
  z = h @ w / temperature
  logp = _log_softmax(z)
  p = np.exp(logp)
  lse = (z - logp)[:, 0]
  inside = (y >= 0) & (y < w.shape[1])
  z_y = np.where(inside, z[np.arange(len(y)), np.clip(y, 0, w.shape[1] - 1)], 0.0)
  out = dict(logprobs=z_y - lse, logsumexp=lse, entropy=-(p * logp).sum(axis=1))
  if hr is not None:
    r = np.asarray(hr, np.float64) @ np.asarray(wr, np.float64) / temperature
    logr = _log_softmax(r)
    r_lse = (r - logr)[:, 0]
    r_y = np.where(inside, r[np.arange(len(y)), np.clip(y, 0, w.shape[1] - 1)], 0.0)
    out.update(ref_logprobs=r_y - r_lse, kl=(p * (logp - logr)).sum(axis=1))
  return out


def grads(h, w, y, hr=None, wr=None, temperature=1.0, cts=None):
  """(dh, dW) of sum_k sum_i cts[k][i] * out_k[i] over the outputs named in `cts`."""
  h, w = np.asarray(h, np.float64), np.asarray(w, np.float64)
  y = np.asarray(y)
  n, v = h.shape[0], w.shape[1]
  z = h @ w / temperature
  logp = _log_softmax(z)
  p = np.exp(logp)
  onehot = (np.arange(v)[None, :] == y[:, None]).astype(np.float64)
  ent = -(p * logp).sum(axis=1, keepdims=True)
  dz = np.zeros((n, v))
  col = lambda name: np.asarray(cts[name], np.float64)[:, None]
  if "logprobs" in cts:
    dz += col("logprobs") * (onehot - p)
  if "logsumexp" in cts:
    dz += col("logsumexp") * p
  if "entropy" in cts:
    dz += col("entropy") * (-p * (logp + ent))
  if "kl" in cts:
    logr = _log_softmax(np.asarray(hr, np.float64) @ np.asarray(wr, np.float64) / temperature)
    kl = (p * (logp - logr)).sum(axis=1, keepdims=True)
    dz += col("kl") * p * (logp - logr - kl)
  dz /= temperature
  return dz @ w.T, h.T @ dz


def finite_difference(h, w, y, hr, wr, temperature, cts, eps=1e-6):
  """Central differences of the same weighted sum, all coordinates (tiny shapes only)."""
  def loss(h_, w_):
    out = values(h_, w_, y, hr, wr, temperature)
    return sum(float(np.dot(cts[k], out[k])) for k in cts)
  h, w = np.asarray(h, np.float64), np.asarray(w, np.float64)
  dh, dw = np.zeros_like(h), np.zeros_like(w)
  for arr, grad, is_h in ((h, dh, True), (w, dw, False)):
    for idx in np.ndindex(arr.shape):
      plus, minus = arr.copy(), arr.copy()
      plus[idx] += eps
      minus[idx] -= eps
      lp = loss(plus, w) if is_h else loss(h, plus)
      lm = loss(minus, w) if is_h else loss(h, minus)
      grad[idx] = (lp - lm) / (2 * eps)
  return dh, dw
