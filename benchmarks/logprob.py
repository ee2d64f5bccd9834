"""Memory and time of token_logprobs forward+backward: naive vs the fused backends. Prints JSON.

  python benchmarks/logprob.py            # CPU: compiled temp memory at the two model shapes, time
  python benchmarks/logprob.py --quick    # small shapes, a few seconds
  python benchmarks/logprob.py --gpu      # on a GPU: correctness of pallas_gpu, memory, time against
                                          # naive XLA and the bare matmuls (effective TFLOP/s)

Memory is `jit(...).lower(...).compile().memory_analysis().temp_size_in_bytes` of value_and_grad of
sum(c1 * logprobs + c2 * entropy [+ c3 * kl]) w.r.t. hidden and unembed: temporaries only (inputs and
the gradients it returns are not counted). Time is the median of `--repeats` runs after a warm-up.
"""

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from alignment.kernels import block_table, platform, token_logprobs

MODEL_SHAPES = [(8192, 576, 49152), (4096, 640, 262144)]  # SmolLM2-135M, Gemma 3 270M widths
QUICK_SHAPES = [(1024, 128, 8192)]


TUNED = {}  # block_sizes per impl, set by the GPU sweep


def loss_fn(impl, with_ref, block_sizes=None):
  block_sizes = block_sizes or TUNED.get(impl)
  def loss(h, w, y, hr, wr, c):
    out = token_logprobs(h, w, y, ref_hidden=hr if with_ref else None,
                         ref_unembed=wr if with_ref else None, impl=impl, block_sizes=block_sizes)
    total = jnp.sum(c[0] * out.logprobs + c[1] * out.entropy)
    if with_ref:
      total = total + jnp.sum(c[2] * out.kl)
    return total
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def abstract(n, d, v, dtype):
  s = jax.ShapeDtypeStruct
  return (s((n, d), dtype), s((d, v), dtype), s((n,), jnp.int32), s((n, d), dtype), s((d, v), dtype),
          s((3, n), jnp.float32))


def concrete(n, d, v, dtype, seed=0):
  ks = jax.random.split(jax.random.key(seed), 6)
  h = jax.random.normal(ks[0], (n, d), jnp.float32)
  w = jax.random.normal(ks[1], (d, v), jnp.float32) * (3 / np.sqrt(d))
  hr = h + 0.1 * jax.random.normal(ks[2], (n, d))
  wr = w + 0.1 * jax.random.normal(ks[3], (d, v)) / np.sqrt(d)
  y = jax.random.randint(ks[4], (n,), 0, v)
  c = jax.random.normal(ks[5], (3, n))
  return (h.astype(dtype), w.astype(dtype), y, hr.astype(dtype), wr.astype(dtype), c)


def temp_mb(impl, shape, dtype, with_ref):
  try:
    compiled = loss_fn(impl, with_ref).lower(*abstract(*shape, dtype)).compile()
    ma = compiled.memory_analysis()
    print(f"memory_analysis {impl} {shape} ref={with_ref}: {ma}", file=sys.stderr, flush=True)
    return ma.temp_size_in_bytes / 2**20
  except Exception as e:  # pylint: disable=broad-except
    return f"failed: {type(e).__name__}: {str(e)[:200]}"


def memory(impls, shapes, dtype):
  rows = []
  for shape in shapes:
    for with_ref in (False, True):
      row = dict(N=shape[0], D=shape[1], V=shape[2], ref=with_ref)
      for impl in impls:
        row[f"{impl}_mb"] = temp_mb(impl, shape, dtype, with_ref)
      for impl in impls:
        if impl != "naive" and isinstance(row[f"{impl}_mb"], float) and isinstance(row["naive_mb"], float):
          row[f"{impl}_ratio"] = round(row[f"{impl}_mb"] / row["naive_mb"], 4)
      rows.append({k: round(v, 1) if isinstance(v, float) and k.endswith("_mb") else v
                   for k, v in row.items()})
  return rows


def guarded(fn, *args):
  """fn(*args), or {'error': ...} so one failure does not end the report."""
  try:
    return fn(*args)
  except Exception as e:  # pylint: disable=broad-except
    return dict(error=f"{type(e).__name__}: {str(e)[:400]}")


def bench(fn, args, repeats):
  jax.block_until_ready(fn(*args))  # compile + warm up
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def timing(impls, shape, dtype, repeats, with_ref):
  """Median wall and process-CPU seconds per impl; repeats interleave the impls, so load that comes
  and goes (a shared machine) hits them alike. CPU seconds count only this process's work."""
  args = concrete(*shape, dtype)
  out = dict(N=shape[0], D=shape[1], V=shape[2], ref=with_ref, repeats=repeats)
  fns = {}
  for impl in impls:
    fn = loss_fn(impl, with_ref)
    warm = guarded(lambda f: jax.block_until_ready(f(*args)), fn)
    if isinstance(warm, dict) and "error" in warm:
      out[f"{impl}_s"] = warm
    else:
      fns[impl] = fn
  wall = {k: [] for k in fns}
  cpu = {k: [] for k in fns}
  for _ in range(repeats):
    for impl, fn in fns.items():
      t, c = time.perf_counter(), time.process_time()
      jax.block_until_ready(fn(*args))
      wall[impl].append(time.perf_counter() - t)
      cpu[impl].append(time.process_time() - c)
  for impl in fns:
    out[f"{impl}_s"] = round(statistics.median(wall[impl]), 4)
    if platform() == "cpu":
      out[f"{impl}_cpu_s"] = round(statistics.median(cpu[impl]), 4)
  for impl in fns:
    if impl != "naive" and "naive" in fns:
      out[f"{impl}_vs_naive"] = round(out[f"{impl}_s"] / out["naive_s"], 3)
      if platform() == "cpu":
        out[f"{impl}_vs_naive_cpu"] = round(out[f"{impl}_cpu_s"] / out["naive_cpu_s"], 3)
  return out


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def gpu_check(shape, dtype):
  """pallas_gpu against naive (and xla) on one shape, all outputs and gradients."""
  args = concrete(*shape, dtype, seed=1)

  def full(impl):
    def f(h, w, y, hr, wr, c):
      def loss(h, w):
        out = token_logprobs(h, w, y, ref_hidden=hr, ref_unembed=wr, temperature=0.7, impl=impl,
                             block_sizes=TUNED.get(impl))
        total = sum(jnp.sum(c[i % 3] * x) for i, x in
                    enumerate((out.logprobs, out.logsumexp, out.entropy, out.kl)))
        return total, out
      (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(h, w)
      return [out.logprobs, out.logsumexp, out.entropy, out.ref_logprobs, out.kl] + list(grads)
    return jax.jit(f)(*args)

  names = ["logprobs", "logsumexp", "entropy", "ref_logprobs", "kl", "dh", "dW"]
  want = full("naive")
  res = dict(N=shape[0], D=shape[1], V=shape[2], dtype=jnp.dtype(dtype).name)
  for impl in ("xla", "pallas_gpu"):
    got = full(impl)
    res[impl] = {k: rel(g.astype(jnp.float32), w.astype(jnp.float32)) for k, g, w in zip(names, got, want)}
    res[impl]["finite"] = bool(all(np.all(np.isfinite(np.asarray(g.astype(jnp.float32)))) for g in got))
  return res


def bare_matmuls(shape, dtype, with_ref, repeats):
  """The matmuls any implementation must do: h @ W (+ ref), G @ W^T, h^T @ G (G: [N, V])."""
  n, d, v = shape
  h, w, _, hr, wr, _ = concrete(*shape, dtype)
  g = jax.random.normal(jax.random.key(9), (n, v), jnp.float32).astype(dtype)

  def f(h, w, hr, wr, g):
    out = [jnp.dot(h, w, preferred_element_type=jnp.float32).sum(),
           jnp.dot(g, w.T, preferred_element_type=jnp.float32), 
           jnp.dot(h.T, g, preferred_element_type=jnp.float32)]
    if with_ref:
      out.append(jnp.dot(hr, wr, preferred_element_type=jnp.float32).sum())
    return out
  return bench(jax.jit(f), (h, w, hr, wr, g), repeats)

# A first sweep on an H100 (see RESULTS.md) tried fwd (64,128,64,4,3) (128,128,64,8,3)
# (64,256,64,8,2) (128,128,128,8,2); dh (32,128,8,2) (64,128,8,2) (32,64,4,2) (64,64,8,3);
# dW (64,32,8,2) (128,32,8,2) (64,64,8,2) (128,64,8,3). These refine around the winners.
FWD_CANDIDATES = [  # block_rows, block_vocab, block_d, num_warps, num_stages
    (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (128, 128, 32, 8, 4)]
DH_CANDIDATES = [  # dh_rows, dh_vocab, dh_warps, dh_stages
    (64, 128, 8, 2), (64, 256, 8, 2), (128, 128, 8, 2), (64, 128, 4, 2), (64, 128, 8, 3),
    (128, 64, 8, 2)]
DW_CANDIDATES = [  # dw_rows, dw_vocab, dw_warps, dw_stages
    (128, 64, 8, 3), (256, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (256, 32, 8, 3),
    (128, 64, 8, 4)]


def gpu_sweep(shape, dtype, repeats, log, interpret=False):
  """Times each Triton kernel alone over a few tilings; returns the best block_sizes."""
  import traceback
  from alignment.kernels import pallas_gpu, stats, xla
  h, w, y, _, _, c = concrete(*shape, dtype)
  st = stats.finalize(jax.jit(lambda h, w, y: xla.forward_stats(h, w, y, inv_temp=1.0))(h, w, y))
  rows = dict(m=st["m"], log_s=st["log_s"], g_lp=c[0], a=c[1] - c[0] - c[2] * st["entropy"], b=-c[2])
  best = dict(block_table("pallas_gpu", "gpu"), **TUNED.get("pallas_gpu", {}), interpret=interpret)
  results = {}

  def try_time(name, cfg, fn):
    try:
      t = bench(jax.jit(fn), (h, w, y), repeats)
      results[name] = round(t * 1e3, 3)
    except Exception as e:  # pylint: disable=broad-except
      results[name] = f"failed: {type(e).__name__}: {str(e)[:300]}"
      traceback.print_exc()
    log(f"sweep {name}: {results[name]}")
    return results[name]

  def pick(cands, keys, make):
    times = []
    for cand in cands:
      cfg = dict(best, **dict(zip(keys, cand)))
      t = try_time("/".join(f"{k}={v}" for k, v in zip(keys, cand)), cfg, make(cfg))
      if isinstance(t, float):
        times.append((t, cand))
    if times:
      best.update(zip(keys, min(times)[1]))

  pick(FWD_CANDIDATES, ("block_rows", "block_vocab", "block_d", "num_warps", "num_stages"),
       lambda cfg: lambda h, w, y: pallas_gpu.forward_stats(h, w, y, inv_temp=1.0, **cfg))
  bwd = lambda cfg, i: lambda h, w, y: pallas_gpu.backward(
      h, w, y, None, None, rows, inv_temp=1.0, use_b=True, use_ref=False, **cfg)[i]
  pick(DH_CANDIDATES, ("dh_rows", "dh_vocab", "dh_warps", "dh_stages"), lambda cfg: bwd(cfg, 0))
  pick(DW_CANDIDATES, ("dw_rows", "dw_vocab", "dw_warps", "dw_stages"), lambda cfg: bwd(cfg, 1))
  best.pop("interpret")
  return best, results


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--quick", action="store_true", help="small shapes")
  parser.add_argument("--gpu", action="store_true", help="GPU: check pallas_gpu, time against matmuls")
  parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
  parser.add_argument("--repeats", type=int, default=None)
  parser.add_argument("--time-shape", default=None, help="N,D,V of the CPU timing")
  parser.add_argument("--no-memory", action="store_true")
  parser.add_argument("--no-sweep", action="store_true", help="GPU: keep the table's block sizes")
  parser.add_argument("--sweep-only", action="store_true", help="GPU: checks and sweep, no timing")
  parser.add_argument("--no-check", action="store_true", help="GPU: skip the correctness checks")
  parser.add_argument("--blocks", default=None, help="GPU: pallas_gpu block_sizes as JSON")
  parser.add_argument("--dry-run", action="store_true", help="--gpu's code path on CPU, tiny")
  parser.add_argument("--out", default=None, help="also write the JSON report (and a log) here")
  args = parser.parse_args()
  plat = platform()
  dtype = jnp.dtype(args.dtype or ("bfloat16" if args.gpu else "float32"))
  shapes = QUICK_SHAPES if args.quick else MODEL_SHAPES
  report = dict(device=str(jax.devices()[0].device_kind), platform=plat, jax=jax.__version__,
                dtype=dtype.name, blocks={b: block_table(b, plat) for b in ("xla", "pallas_gpu")})
  def log(msg):
    print(msg, file=sys.stderr, flush=True)
    if args.out:
      with open(args.out + ".log", "a") as f:
        f.write(msg + "\n")
      with open(args.out, "w") as f:
        json.dump(report, f, indent=1)

  if args.gpu:
    if plat != "gpu" and not args.dry_run:
      raise SystemExit("--gpu needs a GPU")
    repeats = args.repeats or 20
    report["check"] = []
    checks = (((1000, 576, 49152 + 100), jnp.float32), ((4096, 640, 32768), jnp.bfloat16))
    if args.dry_run:
      checks = (((40, 32, 300), jnp.float32), ((64, 32, 256), jnp.bfloat16))
      shapes = [(64, 32, 256)]
      global FWD_CANDIDATES, DH_CANDIDATES, DW_CANDIDATES  # pylint: disable=global-statement
      FWD_CANDIDATES, DH_CANDIDATES, DW_CANDIDATES = (c[:2] for c in (FWD_CANDIDATES, DH_CANDIDATES, DW_CANDIDATES))
    if args.blocks:
      TUNED["pallas_gpu"] = json.loads(args.blocks)
      report["blocks"]["pallas_gpu"] = dict(report["blocks"]["pallas_gpu"], **TUNED["pallas_gpu"])
    for shape, dt in () if args.no_check else checks:
      report["check"].append(guarded(gpu_check, shape, dt))
      log(json.dumps(report["check"][-1]))
    if not args.no_sweep:
      TUNED["pallas_gpu"], report["sweep_ms"] = gpu_sweep(shapes[0], dtype, repeats, log,
                                                          interpret=args.dry_run)
      report["blocks"]["pallas_gpu"] = TUNED["pallas_gpu"]
      log(json.dumps(dict(tuned=TUNED["pallas_gpu"])))
      report["check_tuned"] = guarded(gpu_check, checks[1][0], jnp.bfloat16)
      log(json.dumps(report["check_tuned"]))
    if args.sweep_only:
      print(json.dumps(report, indent=1))
      return
    impls = ("naive", "xla", "pallas_gpu")
    report["time"] = []
    for shape in shapes:
      for with_ref in (False, True):
        row = guarded(timing, impls, shape, dtype, repeats, with_ref)
        if "error" in row:
          log(json.dumps(row))
          continue
        n, d, v = shape
        flops = 2 * n * d * v * (4 if with_ref else 3)
        row["bare_matmuls_s"] = round(bare_matmuls(shape, dtype, with_ref, repeats), 4)
        row["min_tflop"] = round(flops / 1e12, 3)
        for k in ("naive", "xla", "pallas_gpu", "bare_matmuls"):
          if isinstance(row[f"{k}_s"], float):
            row[f"{k}_tflops"] = round(flops / row[f"{k}_s"] / 1e12, 1)
        report["time"].append(row)
        log(json.dumps(row))
    if not args.no_memory:
      report["memory"] = memory(impls, shapes, dtype)
      log(json.dumps(report["memory"]))
  else:
    impls = ("naive", "xla")
    if not args.no_memory:
      report["memory"] = memory(impls, shapes, dtype)
      report["pallas"] = ("n/a on CPU: the Pallas kernels run here only in interpret mode, an emulator "
                          "whose memory says nothing about the TPU/GPU kernels (see --gpu)")
    repeats = args.repeats or 3
    tshape = (tuple(int(x) for x in args.time_shape.split(",")) if args.time_shape
              else (QUICK_SHAPES[0] if args.quick else (2048, 576, 49152)))
    report["time"] = [timing(impls, tshape, dtype, repeats, with_ref) for with_ref in (False, True)]
  report["goals"] = dict(memory_ratio="<= 0.05 of naive", cpu_time_ratio="<= 1.3x naive")
  print(json.dumps(report, indent=1))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(report, f, indent=1)


if __name__ == "__main__":
  main()
