"""`python -m alignment.report` on a real run, rendered by headless Chromium (Debian's `chromium`).

The run: the tiny GRPO config for 4 steps on prompts that hold HTML's special characters, with the gym
evaluated at the start and the end. The page Chromium renders must have drawn every plot (the page
counts its decoded images on load), show the sample table's prompts and responses as the run wrote them
(escaped, not interpreted), and the gym's first and last scores as metrics.jsonl has them."""

import html
import html.parser
import json
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PROMPTS = ["Is <b>bold</b> a tag?", "Say \"yes\" & 'no'.", "What is 2 < 3 > 1?", "Name a colour.",
           "Write <script>alert(1)</script> backwards.", "Count to three."]


class _Cells(html.parser.HTMLParser):
  """The text of each cell of each row of the table with a given id, as a browser's DOM holds it."""

  def __init__(self, table_id):
    super().__init__(convert_charrefs=True)
    self.table_id, self.inside, self.rows, self.cell = table_id, False, [], None

  def handle_starttag(self, tag, attrs):
    if tag == "table":
      self.inside = dict(attrs).get("id") == self.table_id
    elif self.inside and tag == "tr":
      self.rows.append([])
    elif self.inside and tag in ("td", "th"):
      self.cell = ""

  def handle_endtag(self, tag):
    if tag == "table":
      self.inside = False
    elif self.inside and tag in ("td", "th"):
      self.rows[-1].append(self.cell)
      self.cell = None

  def handle_data(self, data):
    if self.cell is not None:
      self.cell += data


def _table_rows(dom, table_id):
  parser = _Cells(table_id)
  parser.feed(dom)
  return parser.rows


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("report")
  prompts = root / "prompts.jsonl"
  prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
  workdir = root / "run"
  subprocess.run([sys.executable, "-m", "alignment.main", "--config=configs/grpo.py:tiny", f"--workdir={workdir}",
                  "--config.train.steps=4", f"--config.rl.prompts={prompts}",
                  "--config.evals.every=4", "--config.train.eval_at_start=True", "--config.evals.limit=12",
                  "--config.evals.max_new_tokens=8"], cwd=REPO, check=True, capture_output=True, timeout=900)
  return workdir


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (`make test` installs it with apt-get "
                    "where apt-get is available)")
def test_the_report_renders_its_plots_samples_and_gym_table_in_chromium(run_dir):
  subprocess.run([sys.executable, "-m", "alignment.report", str(run_dir), "--samples=20"], cwd=REPO, check=True,
                 capture_output=True, timeout=300)
  page = run_dir / "report.html"
  dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
                       capture_output=True, text=True, timeout=120).stdout
  body = dom[dom.index("<body"):dom.index(">", dom.index("<body"))]
  images = int(body.split('data-images="')[1].split('"')[0])
  assert images >= 5 and f'data-images-drawn="{images}"' in body  # loss, reward, KL, length, gym, time: all drawn
  for panel in ("Loss", "Reward", "KL to the reference", "Gym scores", "Time per phase (s)"):
    assert f'alt="{panel}"' in dom

  rows = _table_rows(dom, "samples")[1:]
  written = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
  assert len(written) == 4 * 4  # 4 logged steps x rl.log_samples
  rollout_rows = [r for r in rows if r[0].startswith("rollout, step")]
  assert len(rows) == 20 and len(rollout_rows) >= 20 - 12  # the pool: 16 rollouts, 12 gym probes
  visible = lambda text: "".join(f"\\x{ord(c):02x}" if ord(c) < 32 and c not in "\n\t" or ord(c) == 127 else c
                                 for c in text)  # a control character shows as \xNN
  for _, prompt, response, reward, _ in rollout_rows:  # each shown as written, and its reward
    assert any(s["prompt"] == prompt and visible(s["response"]) == response and f"{s['reward']:.3f}" == reward
               for s in written)
  assert "<script>alert(1)</script>" not in dom.split("<body", 1)[1].replace(html.escape(PROMPTS[4]), "")

  records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
  evals = [r for r in records if "gym/helpful" in r]
  assert [r["step"] for r in evals] == [0, 4]
  (helpful,) = [r for r in _table_rows(dom, "gym") if r[0] == "gym/helpful"]
  assert helpful[1:3] == [f"{evals[0]['gym/helpful']:.3f}", f"{evals[1]['gym/helpful']:.3f}"]

  shot = run_dir / "report.png"
  subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                  "--window-size=1200,3000", page.as_uri()], capture_output=True, timeout=120)
  assert shot.stat().st_size > 50_000  # a drawn page, not a blank one


def test_a_directory_without_metrics_is_refused_in_one_line(tmp_path):
  out = subprocess.run([sys.executable, "-m", "alignment.report", str(tmp_path)], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode != 0 and not (tmp_path / "report.html").exists()
  assert f"{tmp_path}: no metrics.jsonl" in out.stderr and len(out.stderr.strip().splitlines()) == 1
