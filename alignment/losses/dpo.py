"""The DPO family: per-pair losses on the log-probabilities of a chosen and a rejected completion.

Inputs are per-sequence SUMS of completion-token log-probs, float32 [B] (one entry per pair; any
shape works, e.g. [R, P] of a packed batch, since everything is elementwise), and every loss is
returned per pair: the trainer averages over the valid pairs (`pair_mask`), so nothing here reduces
over the batch. Lengths, where a loss needs them, are completion token counts
[B]; they are clamped to >= 1 so that an empty pair slot gives finite values the trainer masks out.

Loss types (h = implicit-reward margin, z = the logit a loss pushes up; eps = label_smoothing):

  sigmoid  DPO, Rafailov et al. 2023, Eq. 7; conservative DPO (cDPO, Mitchell 2023) when eps > 0:
             z = beta * ((c - c_ref) - (r - r_ref)) - margin
             loss = -(1 - eps) log sig(z) - eps log sig(-z)
  robust   robust DPO, Chowdhury et al. 2024 (the unbiased estimate of the clean loss under labels
           flipped with probability eps), z as in sigmoid:
             loss = (-(1 - eps) log sig(z) + eps log sig(-z)) / (1 - 2 eps)
  hinge    SLiC-HF (Zhao et al. 2023) on reference-normalised log-ratios, as RSO (Liu et al. 2024)
           and TRL: loss = max(0, 1 - z), z = beta * ((c - c_ref) - (r - r_ref))
  ipo      IPO, Azar et al. 2023, Eq. 17, with per-token AVERAGE log-ratios, as TRL does after
           consulting the authors (TRL PR #1265): a summed h makes the target 1 / (2 beta) depend on
           the completion lengths. h = (c - c_ref) / len_c - (r - r_ref) / len_r,
           loss = (h - 1 / (2 beta))^2
  simpo    SimPO, Meng et al. 2024, reference-free; label smoothing as in the authors' code:
             z = beta * (c / len_c - r / len_r) - simpo_gamma
             loss = -(1 - eps) log sig(z) - eps log sig(-z)
  orpo     ORPO, Hong et al. 2024, reference-free, on average log-probs a = logp / len:
             log odds(y) = a - log(1 - exp(a))
             loss = -a_c + orpo_alpha * (-log sig(log odds(c) - log odds(r)))
           The NLL of the chosen completion (per-token average, the paper's L_SFT) is INCLUDED;
           the caller adds nothing. `beta` only scales the reported rewards.

`margin` (per-pair offsets from the data, e.g. rating differences) is an offset on the logit z of
`sigmoid` and `robust` (DPO with an offset, ODPO, Amini et al. 2024); label smoothing then
acts on the offset logit, as SimPO's code and TRL do with gamma.
`nll_coef` adds nll_coef * (-c / len_c), the chosen completion's per-token NLL (RPO, Pang et al.
2024; TRL's `rpo_alpha`), to any loss type. TRL averages that NLL over all chosen tokens of the
batch; here it is per pair, like the rest of the loss.

Metrics, all [B] and without gradient: `rewards/chosen`, `rewards/rejected` are the implicit rewards
the loss compares: beta * (c - c_ref) for sigmoid, robust and hinge; beta * (c - c_ref) / len_c for
ipo; beta * c / len_c for simpo and orpo (reference-free, as TRL's CPO and ORPO trainers).
So `rewards/accuracies` is exactly what the loss pushes towards 1 (for ipo: the averaged margin).
`rewards/margins` = chosen - rejected, `rewards/accuracies` = 1.0 where chosen > rejected,
`logps/chosen`, `logps/rejected` = the sequence sums c and r as given.

A new variant is one function `fn(pair, *, beta, ...) -> (loss, rewards_chosen, rewards_rejected)`
decorated with `@register(name, ...)`; keyword arguments of `preference_loss` that it does not know
are passed on to it (`simpo_gamma`, `orpo_alpha`).
"""

import dataclasses
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

# ORPO's log(1 - p) is -inf at p = 1; a float32 average log-prob can round to exactly 0 for a very
# confident model, so the average is capped just below 0 (the loss is then flat there).
_MAX_MEAN_LOGP = -1e-6


class Pair(NamedTuple):
  """A batch of preference pairs, float32 [B] each; lengths are None when not given."""
  chosen: jax.Array
  rejected: jax.Array
  ref_chosen: jax.Array
  ref_rejected: jax.Array
  chosen_lengths: Optional[jax.Array]
  rejected_lengths: Optional[jax.Array]


@dataclasses.dataclass(frozen=True)
class LossType:
  fn: Callable
  needs_lengths: bool
  reference_free: bool
  label_smoothing: bool
  margin: bool


LOSS_TYPES: dict[str, LossType] = {}


def register(name, *, needs_lengths=False, reference_free=False, label_smoothing=False,
             margin=False):
  """Registers `fn` as loss type `name`; the flags say what it needs (completion lengths, or no
  reference log-probs) and accepts (`label_smoothing`, `margin` keyword arguments)."""
  def add(fn):
    LOSS_TYPES[name] = LossType(fn, needs_lengths, reference_free, label_smoothing, margin)
    return fn
  return add


def _those_with(flag):
  return ", ".join(name for name, spec in LOSS_TYPES.items() if getattr(spec, flag))


def _smoothed_logistic(z, eps):
  """-(1 - eps) log sig(z) - eps log sig(-z), stable for any |z|."""
  return (1.0 - eps) * jax.nn.softplus(-z) + eps * jax.nn.softplus(z)


def _log1m_exp(x):
  """log(1 - exp(x)) for x < 0, accurate near 0 (expm1) and finite for very negative x."""
  return jnp.log(-jnp.expm1(x))


@register("sigmoid", label_smoothing=True, margin=True)
def sigmoid(p, *, beta, label_smoothing, margin=0.0):
  rc, rr = beta * (p.chosen - p.ref_chosen), beta * (p.rejected - p.ref_rejected)
  return _smoothed_logistic(rc - rr - margin, label_smoothing), rc, rr


@register("robust", label_smoothing=True, margin=True)
def robust(p, *, beta, label_smoothing, margin=0.0):
  rc, rr = beta * (p.chosen - p.ref_chosen), beta * (p.rejected - p.ref_rejected)
  z = rc - rr - margin
  eps = label_smoothing
  loss = ((1.0 - eps) * jax.nn.softplus(-z) - eps * jax.nn.softplus(z)) / (1.0 - 2.0 * eps)
  return loss, rc, rr


@register("hinge")
def hinge(p, *, beta):
  rc, rr = beta * (p.chosen - p.ref_chosen), beta * (p.rejected - p.ref_rejected)
  return jax.nn.relu(1.0 - (rc - rr)), rc, rr


@register("ipo", needs_lengths=True)
def ipo(p, *, beta):
  hc = (p.chosen - p.ref_chosen) / p.chosen_lengths
  hr = (p.rejected - p.ref_rejected) / p.rejected_lengths
  return jnp.square(hc - hr - 0.5 / beta), beta * hc, beta * hr


@register("simpo", needs_lengths=True, reference_free=True, label_smoothing=True)
def simpo(p, *, beta, label_smoothing, simpo_gamma=0.5):
  rc, rr = beta * p.chosen / p.chosen_lengths, beta * p.rejected / p.rejected_lengths
  return _smoothed_logistic(rc - rr - simpo_gamma, label_smoothing), rc, rr


@register("orpo", needs_lengths=True, reference_free=True)
def orpo(p, *, beta, orpo_alpha=0.1):
  ac = jnp.minimum(p.chosen / p.chosen_lengths, _MAX_MEAN_LOGP)
  ar = jnp.minimum(p.rejected / p.rejected_lengths, _MAX_MEAN_LOGP)
  log_odds = (ac - _log1m_exp(ac)) - (ar - _log1m_exp(ar))
  return -ac + orpo_alpha * jax.nn.softplus(-log_odds), beta * ac, beta * ar


def _check(loss_type, spec, *, label_smoothing, margin, nll_coef, **given):
  """Raises ValueError, naming the argument, for what `loss_type` cannot take or lacks."""
  if not 0.0 <= label_smoothing < 0.5:
    raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
  if label_smoothing and not spec.label_smoothing:
    raise ValueError(f"loss_type {loss_type!r} takes no label_smoothing (got {label_smoothing}); "
                     f"those that do: {_those_with('label_smoothing')}")
  if margin is not None and not spec.margin:
    raise ValueError(f"loss_type {loss_type!r} takes no margin; "
                     f"those that do: {_those_with('margin')}")
  needed = {} if spec.reference_free else {"ref_chosen_logps": f"loss_type {loss_type!r}",
                                            "ref_rejected_logps": f"loss_type {loss_type!r}"}
  if nll_coef:
    needed["chosen_lengths"] = "nll_coef > 0"
  if spec.needs_lengths:
    needed.update(chosen_lengths=f"loss_type {loss_type!r}", rejected_lengths=f"loss_type {loss_type!r}")
  for name, why in needed.items():
    if given[name] is None:
      raise ValueError(f"{why} needs {name} ([B] per pair)")


def preference_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta,
                    loss_type="sigmoid", label_smoothing=0.0, chosen_lengths=None,
                    rejected_lengths=None, margin=None, nll_coef=0.0, **kw):
  """Per-pair preference loss of `loss_type` (see the module docstring for the formulas).

  chosen_logps, rejected_logps, ref_*_logps: float [B] sums of completion-token log-probs; the
  reference ones may be None for the reference-free simpo and orpo, which ignore them.
  chosen_lengths, rejected_lengths: [B] completion token counts. margin: float [B] offsets (sigmoid,
  robust). nll_coef: weight of the chosen side's per-token NLL. kw: the loss type's own options
  (`simpo_gamma`, `orpo_alpha`).
  Returns (loss float32 [B], metrics: dict of float32 [B]).
  """
  if loss_type not in LOSS_TYPES:
    raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(sorted(LOSS_TYPES))}")
  spec = LOSS_TYPES[loss_type]
  _check(loss_type, spec, label_smoothing=label_smoothing, margin=margin, nll_coef=nll_coef,
         ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
         chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)

  def f32(x):
    return None if x is None else jnp.asarray(x, jnp.float32)

  def lengths(x):
    return None if x is None else jnp.maximum(f32(x), 1.0)

  p = Pair(f32(chosen_logps), f32(rejected_logps), f32(ref_chosen_logps), f32(ref_rejected_logps),
           lengths(chosen_lengths), lengths(rejected_lengths))
  options = dict(kw)
  if spec.label_smoothing:
    options["label_smoothing"] = label_smoothing
  if margin is not None:
    options["margin"] = f32(margin)
  loss, rewards_chosen, rewards_rejected = spec.fn(p, beta=beta, **options)
  if nll_coef:
    loss = loss - nll_coef * p.chosen / p.chosen_lengths
  rewards_chosen, rewards_rejected = jax.lax.stop_gradient((rewards_chosen, rewards_rejected))
  metrics = {
      "rewards/chosen": rewards_chosen,
      "rewards/rejected": rewards_rejected,
      "rewards/margins": rewards_chosen - rewards_rejected,
      "rewards/accuracies": (rewards_chosen > rewards_rejected).astype(jnp.float32),
      "logps/chosen": jax.lax.stop_gradient(p.chosen),
      "logps/rejected": jax.lax.stop_gradient(p.rejected),
  }
  return loss, metrics
