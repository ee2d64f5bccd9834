"""The eval harness: generate responses to probes with the KV-cache sampler, grade them, summarise.

    probes = gym.load_probes("test")                       # or gym.read_probes_jsonl("mine.jsonl")
    report = evaluate_probes(cfg, params, tokenizer, probes, EvalSettings(max_new_tokens=64))
    print(format_table(report))

`params` is a Transformer's plain param dict (what the trainer holds, or
`nnx.to_pure_dict(nnx.state(model, nnx.Param))` of a loaded model), so the same function serves
`python -m alignment.evaluate` and the evals every k steps of a training run. Decoding is greedy:
the figures are a function of the weights alone, and two checkpoints are compared on the same footing.

The report (a JSON-serialisable dict):
  {"summary": graders.summarize(...)          per kind: n, passed, rate, 95% Wilson interval; the
                                              helpful / honest / harmless scores,
   "num_probes": int,
   "mean_response_tokens": float,             generated tokens per probe, EOS included,
   "truncated_fraction": float,               probes that hit max_new_tokens before EOS,
   "kl_to_reference": {"mean": float, "num_probes": int, "kinds": {kind: float}}
                                              with a reference only: per response, the sum over its
                                              tokens of KL(policy || reference) over the whole
                                              vocabulary (teacher-forced on the policy's own response),
                                              in nats; the mean over the probes measured and per kind,
   "results": [{**probe, "response", "passed", "response_tokens"[, "kl"]}]}
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alignment import workdir as workdir_lib
from alignment.evals import graders, gym
from alignment.kernels import token_logprobs
from alignment.models import sampler
from alignment.models.config import ModelConfig


SUITES = ("gym:test", "gym:train", "safety:held_out", "safety:calibration")


def safety_probes(split: str, seed: int = 0, per_kind: int = 0) -> list[dict]:
  """The real-world safety prompts of `alignment.safety.data` as probes: harmful and jailbreak requests
  pass when refused; the benign kinds (careful, edgy, over_refusal, everyday) are graded as over-refusal
  bait, passing when answered. `template_id` keeps the source kind: 'safety/<kind>'. `per_kind`: a
  seeded sample of that many prompts of each source kind (`safety.data.sample_per_kind`), in split order."""
  from alignment.safety import data as safety_data
  records = [{**r, "index": i} for i, r in enumerate(safety_data.load_splits(seed)[split])]
  probes = []
  for r in sorted(safety_data.sample_per_kind(records, per_kind, seed), key=lambda r: r["index"]):
    kind = r["kind"] if r["kind"] in safety_data.HARMFUL_KINDS else "over_refusal"
    probes.append({"kind": kind, "prompt": r["prompt"], "id": f"safety/{split}/{r['index']}",
                   "template_id": f"safety/{r['kind']}"})
  return probes


def load_probes(suite: str, probes_file: str = "") -> list[dict]:
  """Probes of `suite` ('gym:test', 'gym:train', 'safety:held_out', 'safety:calibration'; a safety suite
  followed by ':N' samples N prompts of each kind; '' for none) followed by those of a JSONL file
  (`gym.read_probes_jsonl`: a malformed row raises ValueError naming file:line)."""
  source, _, split = suite.partition(":")
  split, _, per_kind = split.partition(":") if source == "safety" else (split, "", "")
  if suite and (f"{source}:{split}" not in SUITES or per_kind and not (per_kind.isdigit() and int(per_kind) > 0)):
    raise ValueError(f"suite {suite!r}: expected one of {', '.join(SUITES)} (a safety suite may end in ':N', "
                     f"N prompts of each kind; or '' with a probes file)")
  probes = (gym.load_probes(split) if source == "gym" else safety_probes(split, per_kind=int(per_kind or 0))
            ) if suite else []
  if probes_file:
    probes += gym.read_probes_jsonl(probes_file)
  if not probes:
    raise ValueError("no probes: give a suite and/or a probes file")
  return probes


def sample_probes(probes: Sequence[Mapping], limit: int) -> list[dict]:
  """Up to `limit` of `probes` (all when 0), the same ones every time, spread over the kinds: the kinds
  take turns adding one unit each, and each kind's units come in an order whose every prefix is spread
  over its probes. A unit is one probe, or for a
  pressured sycophancy probe that probe with its plain twin (the pressured one is only scored when its
  plain twin is, `graders.sycophancy_scored`). Kept in the suite's order."""
  if not limit or limit >= len(probes):
    return list(probes)
  plain = {p.get("question_id"): i for i, p in enumerate(probes)
           if p["kind"] == "sycophancy" and p.get("pressure") == graders.PLAIN and p.get("question_id")}
  units = {}  # kind -> [indices of one unit]
  for i, p in enumerate(probes):
    if p["kind"] == "sycophancy" and p.get("pressure") == graders.PLAIN and p.get("question_id") in plain:
      continue  # comes with its pressured probes
    twin = plain.get(p.get("question_id")) if p["kind"] == "sycophancy" else None
    units.setdefault(p["kind"], []).append([twin, i] if twin is not None else [i])
  orders = {kind: [kind_units[u] for u in _spread_order(len(kind_units))] for kind, kind_units in units.items()}
  chosen, open_kinds = set(), list(orders)
  while open_kinds:
    for kind in list(open_kinds):
      new = set(orders[kind].pop(0)) - chosen if orders[kind] else None
      if new is None or len(chosen) + len(new) > limit:
        open_kinds.remove(kind)
      else:
        chosen |= new
  return [dict(probes[i]) for i in sorted(chosen)]


def _spread_order(n: int) -> list[int]:
  """range(n) reordered so that every prefix is spread over it: 1, 2, 4, ... evenly spread points."""
  order, seen, k = [], set(), 1
  while len(order) < n:
    for i in _spread(n, k):
      if i not in seen:
        seen.add(i)
        order.append(i)
    k *= 2
  return order


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """How responses are generated. Prompts are sorted by length and run `batch_size` at a time (the last
  batch is filled up with repeats), left-padded to a multiple of `pad_multiple` tokens, so a suite
  compiles the sampler once per padded width and the compilations serve every later eval."""
  max_new_tokens: int = 64
  batch_size: int = 16
  pad_multiple: int = 64
  system: str | None = None  # an optional system turn before each probe
  seed: int = 0


def _length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
  """Indices sorted by length, in chunks of `batch_size`: rows of a batch need similar padding."""
  order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
  return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def answers(policy, prompts: Sequence, settings: EvalSettings) -> list[str]:
  """A loaded policy's (`train.model.load_policy`) greedy answers, decoded and stripped, to prompts:
  strings (one user turn each) or message lists ending before the assistant's turn."""
  ids = sampler.encode_chat(policy.tokenizer, prompts)
  out = generate_responses(policy.cfg, policy.params, policy.tokenizer, ids, settings)
  return [policy.tokenizer.decode(r).strip() for r in out]


def generate_responses(cfg: ModelConfig, params, tokenizer, prompt_ids: Sequence[Sequence[int]],
                       settings: EvalSettings, *, mesh=None) -> list[list[int]]:
  """Greedy responses to tokenised prompts, as token id lists (EOS included when reached), in input order."""
  eos_ids, pad_id = sampler.stop_and_pad_ids(tokenizer)
  sampling = sampler.SamplingConfig(max_new_tokens=settings.max_new_tokens, greedy=True, eos_ids=eos_ids,
                                    pad_id=pad_id)
  fn = sampler.make_sampler(cfg, sampling, mesh)
  rng = jax.random.key(settings.seed)
  out: list[list[int] | None] = [None] * len(prompt_ids)
  for index in _length_batches([len(p) for p in prompt_ids], settings.batch_size):
    rows = [prompt_ids[i] for i in index]
    rows += [rows[0]] * (settings.batch_size - len(rows))
    tokens, lengths = sampler.pad_prompts(rows, pad_id=sampling.pad_id, multiple=settings.pad_multiple)
    samples = jax.device_get(fn(params, jnp.asarray(tokens), jnp.asarray(lengths), rng))
    for row, i in enumerate(index):
      out[i] = samples.tokens[row][samples.mask[row] == 1].tolist()
  return out


@functools.lru_cache(maxsize=8)
def transformer_graphdef(cfg: ModelConfig):
  # The graph only (params come sharded, or not, from the caller), built outside any ambient mesh, whose
  # axes are not the params' logical names.
  with nnx.use_eager_sharding(False), jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
    return nnx.graphdef(nnx.eval_shape(lambda: _transformer(cfg)))


@functools.lru_cache(maxsize=8)
def _next_token_fn(cfg: ModelConfig):
  graphdef = transformer_graphdef(cfg)

  def next_logprobs(params, tokens, last, candidates):
    model = nnx.merge(graphdef, params)
    hidden = jnp.take_along_axis(model(tokens), last[:, None, None], axis=1)[:, 0]
    logits = jnp.einsum("bd,dv->bv", hidden.astype(jnp.float32), model.unembed_matrix().astype(jnp.float32))
    return jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), candidates, axis=1)

  return jax.jit(next_logprobs)


def next_token_logprobs(cfg: ModelConfig, params, prefixes: Sequence[Sequence[int]], candidates: Sequence[Sequence[int]],
                        *, batch_size: int = 16, pad_multiple: int = 64) -> np.ndarray:
  """float32 [N, K]: log p(candidates[i][k] | prefixes[i]), the next-token distribution after each prefix
  read at the K candidate ids (the same K for every prefix). One forward per prefix, whatever K."""
  fn = _next_token_fn(cfg)
  out = np.zeros((len(prefixes), len(candidates[0])), np.float32)
  rows = min(batch_size, len(prefixes))
  for index in _length_batches([len(p) for p in prefixes], rows):
    width = -(-max(len(prefixes[i]) for i in index) // pad_multiple) * pad_multiple
    tokens = np.zeros((rows, width), np.int32)
    last = np.zeros((rows,), np.int32)
    cands = np.zeros((rows, len(candidates[0])), np.int32)
    for row, i in enumerate(index):
      tokens[row, :len(prefixes[i])], last[row], cands[row] = prefixes[i], len(prefixes[i]) - 1, candidates[i]
    got = np.asarray(fn(params, jnp.asarray(tokens), jnp.asarray(last), jnp.asarray(cands)))
    out[index] = got[:len(index)]
  return out


@functools.lru_cache(maxsize=8)
def _kl_fn(cfg: ModelConfig, impl: str):
  graphdef = transformer_graphdef(cfg)

  def kl(params, ref_params, tokens, mask):
    def forward(p):
      model = nnx.merge(graphdef, p)
      hidden = model(tokens)
      return hidden.reshape(-1, hidden.shape[-1]), model.unembed_matrix()
    hidden, unembed = forward(params)
    ref_hidden, ref_unembed = forward(ref_params)
    stats = token_logprobs(hidden, unembed, jnp.roll(tokens, -1, axis=1).reshape(-1), ref_hidden=ref_hidden,
                           ref_unembed=ref_unembed, impl=impl)
    return (stats.kl.reshape(tokens.shape) * mask).sum(axis=1)

  return jax.jit(kl)


def _transformer(cfg):
  from alignment.models import Transformer
  return Transformer(cfg, rngs=nnx.Rngs(0))


def response_kl(cfg: ModelConfig, params, ref_params, prompt_ids: Sequence[Sequence[int]],
                response_ids: Sequence[Sequence[int]], settings: EvalSettings, *, impl: str = "auto") -> list[float]:
  """Per response: sum over its tokens of KL(policy || reference) over the full vocabulary, in nats.

  Each prompt + response is teacher-forced through both models (right-padded; a causal model's
  outputs before the padding do not see it); the KL at position t is that of the next-token
  distributions that produced response token t+1.
  """
  fn = _kl_fn(cfg, impl)
  out = [0.0] * len(prompt_ids)
  full = [list(p) + list(r) for p, r in zip(prompt_ids, response_ids)]
  rows = min(settings.batch_size, len(full))  # a sample of 16 probes is not padded to a batch of 33 rows
  for index in _length_batches([len(s) for s in full], rows):
    width = -(-max(len(full[i]) for i in index) // settings.pad_multiple) * settings.pad_multiple
    tokens = np.zeros((rows, width), np.int32)
    mask = np.zeros((rows, width), np.float32)
    for row, i in enumerate(index):
      tokens[row, :len(full[i])] = full[i]
      # Position t predicts token t+1: the response's tokens are predicted from len(prompt)-1 on.
      mask[row, len(prompt_ids[i]) - 1:len(full[i]) - 1] = 1.0
    sums = np.asarray(fn(params, ref_params, jnp.asarray(tokens), jnp.asarray(mask)))
    for row, i in enumerate(index):
      out[i] = float(sums[row])
  return out


def _spread(n: int, k: int | None) -> list[int]:
  """k indices spread evenly over range(n) (all of them when k is None or >= n)."""
  if k is None or k >= n:
    return list(range(n))
  return sorted({int(i) for i in np.linspace(0, n - 1, k)})


def evaluate_probes(cfg: ModelConfig, params, tokenizer, probes: Sequence[Mapping], settings: EvalSettings, *,
                    ref_params=None, kl_probes: int | None = None, mesh=None, impl: str = "auto", guard=None) -> dict:
  """Generates a response to every probe, grades it and summarises (the report in the module doc).

  With `ref_params`, the KL to the reference is measured on `kl_probes` probes spread evenly over the
  list (all when None): two teacher-forced forwards per probe, which on a CPU cost more than the
  generation, so runs that evaluate often measure it on a sample. With a `guard`
  (`alignment.safety.guard.Guard`) the responses go through it: each result says which stage blocked it
  (`guard`: 'input' | 'output' | None), the report counts them per kind (`guard`), and the KL is measured
  on the policy's own responses to the prompts the input check let through."""
  if not probes:
    raise ValueError("evaluate_probes: no probes")
  texts_in = [gym.probe_text(p) for p in probes]
  prompt_ids = sampler.encode_chat(tokenizer, texts_in, system=settings.system)
  if guard is None:
    generated = list(range(len(probes)))
    responses = generate_responses(cfg, params, tokenizer, prompt_ids, settings, mesh=mesh)
    texts = [tokenizer.decode(r) for r in responses]
  else:
    own, generated = {}, []

    def generate(index):
      generated.extend(index)
      own.update(zip(index, generate_responses(cfg, params, tokenizer, [prompt_ids[i] for i in index], settings,
                                               mesh=mesh)))
      return [tokenizer.decode(own[i]) for i in index]

    guarded = guard.respond(texts_in, generate)
    texts = guarded.responses
    responses = [own[i] if guarded.stages[i] is None else tokenizer.encode(texts[i], add_special_tokens=False).ids
                 for i in range(len(probes))]
  results = graders.grade_all(probes, texts)
  eos_ids, _ = sampler.stop_and_pad_ids(tokenizer)
  for r, ids in zip(results, responses):
    r["response_tokens"] = len(ids)
    r["truncated"] = len(ids) == settings.max_new_tokens and ids[-1] not in eos_ids
  report = {
      "summary": graders.summarize(results),
      "num_probes": len(probes),
      "mean_response_tokens": float(np.mean([len(r) for r in responses])),
      "truncated_fraction": float(np.mean([r["truncated"] for r in results])),
  }
  if guard is not None:
    for r, stage in zip(results, guarded.stages):
      r["guard"] = stage
    report["guard"] = guard_counts(results, guard)
  if ref_params is not None:
    chosen = [generated[i] for i in _spread(len(generated), kl_probes)] if generated else []
    kls = response_kl(cfg, params, ref_params, [prompt_ids[i] for i in chosen], [responses[i] for i in chosen],
                      settings, impl=impl)
    kinds = {}
    for i, kl in zip(chosen, kls):
      results[i]["kl"] = kl
      kinds.setdefault(results[i]["kind"], []).append(kl)
    report["kl_to_reference"] = {"mean": float(np.mean(kls)), "num_probes": len(chosen),
                                 "kinds": {k: float(np.mean(kinds[k])) for k in graders.KINDS if k in kinds}}
  report["results"] = results
  return report


def with_guard(report: Mapping, guard, tokenizer, prompt_scores=None) -> dict:
  """The report `evaluate_probes` gives with `guard` around the same policy, made from its report without
  one: a greedy answer does not depend on the guard, so the input check's refusals and the output check's
  verdicts apply to the answers already generated instead of generating them again (the KL is dropped).
  `prompt_scores`: the input check's scores of these probes, when another report's call computed them."""
  results = report["results"]
  guarded = guard.respond([gym.probe_text(r) for r in results], lambda index: [results[i]["response"] for i in index],
                          prompt_scores)
  refusal_tokens = len(tokenizer.encode(guard.refusal, add_special_tokens=False).ids)
  out = []
  for r, response, stage in zip(results, guarded.responses, guarded.stages):
    row = {k: v for k, v in r.items() if k != "kl"}
    if stage is not None:
      row.update(response=response, passed=graders.grade(r, response), response_tokens=refusal_tokens,
                 truncated=False)
    out.append({**row, "guard": stage})
  return {**{k: v for k, v in report.items() if k != "kl_to_reference"},
          "summary": graders.summarize(out),
          "mean_response_tokens": float(np.mean([r["response_tokens"] for r in out])),
          "truncated_fraction": float(np.mean([r["truncated"] for r in out])),
          "guard": guard_counts(out, guard), "results": out}


def guard_counts(results: Sequence[Mapping], guard) -> dict:
  """{"threshold", "output_threshold" (None: the output check is off), "blocked": {stage: {kind: count}},
  "n": {kind: count}} of a Guard's results; kinds are `template_id`'s source kind for the safety suites
  ('safety/edgy' -> 'edgy'), else the gym kind."""
  kind_of = lambda r: r.get("template_id", "")[len("safety/"):] if str(r.get("template_id", "")).startswith(
      "safety/") else r["kind"]
  n, blocked = {}, {"input": {}, "output": {}}
  for r in results:
    kind = kind_of(r)
    n[kind] = n.get(kind, 0) + 1
    if r["guard"]:
      blocked[r["guard"]][kind] = blocked[r["guard"]].get(kind, 0) + 1
  return {"threshold": guard.threshold, "output_threshold": guard.output_threshold if guard.checks_output else None,
          "blocked": blocked, "n": n}


def write_report(report: Mapping, path) -> None:
  """Writes a report as JSON at `path`, local or a URI (its folder is created), through a temporary
  file, so a reader never sees half a report."""
  path = workdir_lib.resolve(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
  tmp.replace(path)


def read_report(path) -> dict:
  return json.loads(workdir_lib.resolve(path).read_text(encoding="utf-8"))


def flat_metrics(report: Mapping, prefix: str = "gym/") -> dict:
  """The scalars of a report for metrics.jsonl: per-kind pass rates, the three scores, length, KL."""
  summary = report["summary"]
  out = {f"{prefix}{kind}": s["rate"] for kind, s in summary["kinds"].items() if s["rate"] is not None}
  out.update({f"{prefix}{name}": s["score"] for name, s in summary["scores"].items() if s["score"] is not None})
  out[f"{prefix}mean_response_tokens"] = report["mean_response_tokens"]
  out[f"{prefix}truncated_fraction"] = report["truncated_fraction"]
  if "kl_to_reference" in report:
    out[f"{prefix}kl_to_reference"] = report["kl_to_reference"]["mean"]
  return out


def _pct(x) -> str:
  return "   -  " if x is None else f"{100 * x:5.1f}%"


def report_rows(report: Mapping) -> list[tuple[str, str, object, list | None]]:
  """(label, n, value, ci95) rows of a report, in a fixed order."""
  s = report["summary"]
  rows = []
  for kind in graders.KINDS:
    if kind in s["kinds"]:
      k = s["kinds"][kind]
      rows.append((kind, str(k["n"]), k["rate"], k["ci95"]))
  plain = s["sycophancy_plain"]
  if plain["n"]:
    rows.append(("(sycophancy asked plainly)", str(plain["n"]), plain["rate"], plain["ci95"]))
  for name, score in s["scores"].items():
    rows.append((name.upper(), "", score["score"], score["ci95"] if score["score"] is not None else None))
  if "guard" in report:
    g = report["guard"]
    for stage in ("input", "output"):
      blocked = sum(g["blocked"][stage].values())
      rows.append((f"guard: blocked at {stage}", str(blocked), blocked / max(1, report["num_probes"]), None))
  rows.append(("mean response tokens", "", report["mean_response_tokens"], None))
  if "kl_to_reference" in report:
    rows.append(("KL to reference (nats/response)", "", report["kl_to_reference"]["mean"], None))
  return rows


def _value(label: str, value) -> str:
  if label.startswith(("mean response", "KL to")):
    return f"{value:6.2f}"
  return _pct(value)


def format_table(report: Mapping) -> str:
  """One report as a text table: pass rate and 95% interval per kind, the three scores, length (and KL)."""
  lines = [f"{'':32s} {'n':>4s}  {'pass':>6s}  95% interval"]
  for label, n, value, ci in report_rows(report):
    interval = f"[{100 * ci[0]:5.1f}, {100 * ci[1]:5.1f}]" if ci and value is not None else ""
    lines.append(f"{label:32s} {n:>4s}  {_value(label, value)}  {interval}")
  return "\n".join(lines)


def sycophancy_on_shared_questions(before: Mapping, after: Mapping) -> tuple[int, float, float] | None:
  """(n, pass rate before, pass rate after) of the pressured sycophancy probes whose question both reports
  answered right when asked plainly: the same probes on both sides, so the change is giving in less or
  more, not a different set of known questions. None when the reports share no such probe."""
  graded = lambda report: {r["id"]: bool(r["passed"]) for r in graders.sycophancy_scored(report.get("results", ()))[1]}
  first, second = graded(before), graded(after)
  shared = sorted(first.keys() & second.keys())
  if not shared:
    return None
  return len(shared), sum(first[i] for i in shared) / len(shared), sum(second[i] for i in shared) / len(shared)


def format_comparison(before: Mapping, after: Mapping, names: tuple[str, str] = ("before", "after")) -> str:
  """Two reports side by side (the same probes): pass rates, their change in points, intervals.

    Beside the per-report sycophancy rate (each over the questions that report's model knew), the row
    '(sycophancy, shared questions)' compares the same pressured probes (`sycophancy_on_shared_questions`).
    """
  after_rows = {label: (n, value, ci) for label, n, value, ci in report_rows(after)}
  rows = report_rows(before)
  shared = sycophancy_on_shared_questions(before, after)
  if shared is not None:
    label = "(sycophancy, shared questions)"
    at = next(i for i, row in enumerate(rows) if row[0] == "sycophancy") + 1
    rows.insert(at, (label, str(shared[0]), shared[1], None))
    after_rows[label] = (str(shared[0]), shared[2], None)
  lines = [f"{'':32s} {'n':>4s}  {names[0]:>7s}  {names[1]:>7s}  {'change':>7s}"]
  for label, n, value, _ in rows:
    if label not in after_rows:
      continue
    n_after, value_after, _ = after_rows[label]
    if label.startswith(("mean response", "KL to")):
      change = f"{value_after - value:+7.2f}"
    elif value is None or value_after is None:
      change = "      -"
    else:
      change = f"{100 * (value_after - value):+6.1f}p"
    shown_n = n if n == n_after else f"{n}/{n_after}"
    lines.append(f"{label:32s} {shown_n:>4s}  {_value(label, value):>7s}  {_value(label, value_after):>7s}  {change}")
  return "\n".join(lines)
