"""Serving throughput: N concurrent clients x M requests against `python -m alignment.serve` on
SmolLM2-135M-Instruct, against the same requests sent one at a time to the same server.

  python benchmarks/serve.py [--clients=8] [--requests=4] [--max_tokens=64] [--rounds=2]

Every request is a greedy chat completion of a distinct gym prompt, so each has one right answer: the
concurrent run must answer every request (none lost) with the text it got when it ran alone (none
answered with another's). The server runs in its own process and is warmed up (its prefill and decoder compiled
for the shapes these prompts use) before anything is timed. The sequential and the
concurrent passes alternate for `rounds`; per pass: generated tokens over wall time, and the p50 / p99
of per-request latency. Prints one JSON object with the medians over rounds and
`throughput_ratio` = concurrent tokens/s over sequential tokens/s.
"""

import argparse
import concurrent.futures
import contextlib
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "smollm2-135m-instruct"


def _post(url, body, timeout=900):
  req = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
  with urllib.request.urlopen(req, timeout=timeout) as r:
    return json.loads(r.read())


def _start_server(max_batch: int, max_tokens: int):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  proc = subprocess.Popen([sys.executable, "-m", "alignment.serve", f"--model={MODEL}", f"--port={port}",
                           f"--max_batch={max_batch}", f"--max_tokens={max_tokens}", "--context=1024",
                           "--warmup_widths=64,128", "--queue=256", "--timeout_s=900"],
                          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  url = f"http://127.0.0.1:{port}"
  while True:
    if proc.poll() is not None:
      raise RuntimeError(proc.stdout.read())
    with contextlib.suppress(OSError):
      urllib.request.urlopen(url + "/health", timeout=1)
      return proc, url
    time.sleep(1)


def _prompts(n: int) -> list[str]:
  from alignment.evals import gym, harness
  probes = harness.sample_probes(gym.load_probes("test"), 4 * n)
  texts = list(dict.fromkeys(gym.probe_text(p) for p in probes if len(gym.probe_text(p)) < 200))  # < 128 tokens
  if len(texts) < n:
    raise RuntimeError(f"only {len(texts)} distinct short gym prompts; asked for {n}")
  return texts[:n]


def _one(url, prompt, max_tokens):
  """(answer or None when the request failed, completion tokens, latency in s)."""
  start = time.perf_counter()
  try:
    out = _post(url + "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": prompt}],
                                               "temperature": 0, "max_tokens": max_tokens})
  except OSError:
    return None, 0, time.perf_counter() - start
  return out["choices"][0]["message"]["content"], out["usage"]["completion_tokens"], time.perf_counter() - start


def _pass(url, prompts, max_tokens, clients):
  start = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(clients) as pool:
    results = list(pool.map(lambda p: _one(url, p, max_tokens), prompts))
  wall = time.perf_counter() - start
  latencies = sorted(r[2] for r in results)
  tokens = sum(r[1] for r in results)
  return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
          "p50_s": latencies[len(latencies) // 2],
          "p99_s": latencies[min(len(latencies) - 1, int(round(0.99 * (len(latencies) - 1))))]}, [r[0] for r in results]


def machine() -> dict:
  cpu = platform.processor()
  with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
    cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
  return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
          "load_avg_at_start": os.getloadavg()}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--clients", type=int, default=8)
  parser.add_argument("--requests", type=int, default=4, help="requests per client")
  parser.add_argument("--max_tokens", type=int, default=64)
  parser.add_argument("--rounds", type=int, default=2)
  args = parser.parse_args()
  prompts = _prompts(args.clients * args.requests)
  result = {"machine": machine(), "workload": {"model": MODEL, "clients": args.clients, "requests": len(prompts),
                                                "max_tokens": args.max_tokens, "greedy": True, "rounds": args.rounds}}
  proc, url = _start_server(max_batch=args.clients, max_tokens=args.max_tokens)
  try:
    start = time.perf_counter()
    _pass(url, prompts[:args.clients], args.max_tokens, args.clients)
    result["warmup_s"] = time.perf_counter() - start  # after the server compiled its shapes for prompts up to 128
    passes = {"sequential": [], "concurrent": []}
    answers = {"sequential": [], "concurrent": []}
    for _ in range(args.rounds):
      for name, clients in (("sequential", 1), ("concurrent", args.clients)):
        stats, texts = _pass(url, prompts, args.max_tokens, clients)
        passes[name].append(stats)
        answers[name].append(texts)
    health = json.loads(urllib.request.urlopen(url + "/health").read())
  finally:
    proc.terminate()
    proc.wait(timeout=60)
  for name, runs in passes.items():
    result[name] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
  result["throughput_ratio"] = result["concurrent"]["tokens_per_s"] / result["sequential"]["tokens_per_s"]
  alone = answers["sequential"][0]
  result["lost"] = sum(t is None for texts in answers["concurrent"] + answers["sequential"] for t in texts)
  result["answered_with_another_text"] = sum(a != b for texts in answers["concurrent"] for a, b in zip(texts, alone)
                                             if a is not None)
  result["engine"] = health["engine"]
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
