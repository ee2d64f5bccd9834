"""A run's report as one self-contained HTML file: training curves, the gym's scores before and after, the
config, and sample generations drawn at random.

  python -m alignment.report WORKDIR [--output=FILE] [--samples=12] [--seed=0]

Reads what a run leaves in its workdir: metrics.jsonl (the curves: loss, reward, KL, response length,
accuracies, time per phase, gym scores), config.json, summary.json, samples.jsonl (an online-RL run's
completions with their rewards) and evals/step_*.json (the gym's probes, responses and verdicts). Plots
are PNGs embedded in the page, so WORKDIR/report.html (the default output) opens anywhere.
"""

import base64
import html
import io
import json
import random

from absl import flags

from alignment import console
from alignment import metrics as metrics_lib
from alignment import workdir as workdir_lib

flags.DEFINE_string("output", "", "where to write the page (default: WORKDIR/report.html)")
flags.DEFINE_integer("samples", 12, "sample generations in the table")
flags.DEFINE_integer("seed", 0, "which samples are drawn")
F = flags.FLAGS

# (panel title, which metric keys it draws); a panel with no such key in the run is left out.
PANELS = [
    ("Loss", lambda k: k in ("loss", "eval/loss") or k.endswith("/loss") and not k.startswith("time/")),
    ("Reward", lambda k: k.startswith("reward/")),
    ("KL to the reference", lambda k: k.startswith("kl/") or k == "kl_coef"),
    ("Response length (tokens)", lambda k: k in ("rollout/response_len", "gym/mean_response_tokens")),
    ("Accuracies", lambda k: "accuracy" in k),
    ("Gym scores", lambda k: k in ("gym/helpful", "gym/honest", "gym/harmless")),
    ("Time per phase (s)", lambda k: k.startswith("time/")),
]
ON_LOAD = """<script>
window.addEventListener('load', () => {
  const images = [...document.images];
  document.body.dataset.images = images.length;
  document.body.dataset.imagesDrawn = images.filter(i => i.complete && i.naturalWidth > 0).length;
});
</script>"""


def _plot(title: str, series: dict) -> str:
  """A PNG of the series ({key: (steps, values)}) as a data URI."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 3))
  for key, (steps, values) in sorted(series.items()):
    ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=key)
  ax.set_title(title, fontsize=10)
  ax.set_xlabel("step", fontsize=8)
  ax.tick_params(labelsize=8)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="best")
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=90)
  plt.close(fig)
  return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def curves(records: dict) -> list[tuple[str, str]]:
  """[(panel title, PNG data URI)] for the panels the run's metrics fill."""
  keys = sorted({k for r in records.values() for k in r if k not in ("step", "time")})
  out = []
  for title, wanted in PANELS:
    series = {}
    for key in filter(wanted, keys):
      points = [(step, r[key]) for step, r in records.items() if isinstance(r.get(key), (int, float))]
      if points:
        series[key] = ([p[0] for p in points], [p[1] for p in points])
    if series:
      out.append((title, _plot(title, series)))
  return out


def gym_table(records: dict) -> list[tuple[str, float, float]]:
  """[(gym key, first eval's value, last eval's value)] when the run evaluated the gym twice or more."""
  evals = [r for r in records.values() if any(k.startswith("gym/") for k in r)]
  if len(evals) < 2:
    return []
  first, last = evals[0], evals[-1]
  return [(k, first[k], last[k]) for k in first if k.startswith("gym/") and k in last]


def samples(root, count: int, seed: int) -> list[dict]:
  """`count` rows drawn at random from the run's completions (samples.jsonl) and its last gym eval's
  responses: source, prompt, response, reward (or None), verdict (or None)."""
  pool = []
  path = root / "samples.jsonl"
  if path.exists():
    for line in path.read_text().splitlines():
      s = json.loads(line)
      gym_reward = s.get("rewards", {}).get("gym")
      pool.append({"source": f"rollout, step {s['step']}", "prompt": s["prompt"], "response": s["response"],
                   "reward": s["reward"], "verdict": None if gym_reward is None else
                   ("passed" if gym_reward > 0 else "failed")})
  reports = sorted((root / "evals").glob("step_*.json")) if (root / "evals").exists() else []
  if reports:
    report = json.loads(reports[-1].read_text())
    for r in report.get("results", []):
      pool.append({"source": f"gym {r['kind']}, step {report['step']}", "prompt": r["prompt"],
                   "response": r["response"], "reward": None, "verdict": "passed" if r["passed"] else "failed"})
  return random.Random(seed).sample(pool, min(count, len(pool)))


def _text(value) -> str:
  """HTML for a prompt or response: escaped, and control characters (which HTML cannot hold, and a
  model may emit) shown as \\xNN."""
  if isinstance(value, list):  # a conversation prompt
    value = "\n".join(f"[{m.get('role')}] {m.get('content')}" for m in value)
  value = "".join(c if c in "\n\t" or 32 <= ord(c) != 127 else f"\\x{ord(c):02x}" for c in str(value))
  return html.escape(value)


def render(workdir, count: int = 12, seed: int = 0) -> str:
  """The report's HTML for a run's workdir (ValueError when it holds no metrics.jsonl)."""
  root = workdir_lib.resolve(workdir)
  if not (root / "metrics.jsonl").exists():
    raise ValueError(f"{root}: no metrics.jsonl (not a training workdir, or nothing logged yet)")
  records = metrics_lib.read_metrics(root)
  config = json.loads((root / "config.json").read_text()) if (root / "config.json").exists() else {}
  summary = json.loads((root / "summary.json").read_text()) if (root / "summary.json").exists() else {}
  title = f"{config.get('algorithm', 'run')}: {root}"
  parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>",
           "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
           "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
           "vertical-align:top;font-size:13px}pre{background:#f6f6f6;padding:1em;overflow:auto;font-size:12px}"
           "td.text{white-space:pre-wrap;max-width:420px}",
           "</style></head><body>", f"<h1>{html.escape(title)}</h1>",
           f"<p>{len(records)} logged steps, last step {max(records) if records else 0}.</p>"]
  if summary:
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{_text(v)}</td></tr>" for k, v in summary.items()
                   if not isinstance(v, (dict, list)))
    parts.append(f"<h2>Summary</h2><table id='summary'>{rows}</table>")
  parts.append("<h2>Training curves</h2>")
  for panel, uri in curves(records):
    parts.append(f"<div class='plot'><img alt='{html.escape(panel)}' src='{uri}'></div>")
  table = gym_table(records)
  if table:
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{a:.3f}</td><td>{b:.3f}</td><td>{b - a:+.3f}</td></tr>"
                   for k, a, b in table)
    parts.append("<h2>Gym: first and last evaluation</h2><table id='gym'><tr><th>score</th><th>first</th>"
                 f"<th>last</th><th>change</th></tr>{rows}</table>")
  drawn = samples(root, count, seed)
  if drawn:
    reward = lambda s: "" if s["reward"] is None else f"{s['reward']:.3f}"
    rows = "".join(
        f"<tr><td>{_text(s['source'])}</td><td class='text'>{_text(s['prompt'])}</td>"
        f"<td class='text'>{_text(s['response'])}</td><td>{reward(s)}</td><td>{s['verdict'] or ''}</td></tr>"
        for s in drawn)
    parts.append("<h2>Sample generations (drawn at random)</h2><table id='samples'><tr><th>from</th>"
                 f"<th>prompt</th><th>response</th><th>reward</th><th>verdict</th></tr>{rows}</table>")
  parts.append(f"<h2>Config</h2><pre id='config'>{html.escape(json.dumps(config, indent=2))}</pre>")
  parts.append(ON_LOAD + "</body></html>")
  return "\n".join(parts)


def main(argv):
  if len(argv) != 2:
    console.fail("usage: python -m alignment.report WORKDIR [--output=FILE] [--samples=12] [--seed=0]")
  try:
    page = render(argv[1], F.samples, F.seed)
  except (ValueError, json.JSONDecodeError) as e:
    console.fail(str(e))
  out = workdir_lib.resolve(F.output) if F.output else workdir_lib.resolve(argv[1]) / "report.html"
  out.write_text(page)
  print(out)


if __name__ == "__main__":
  console.run(main)
