"""Every notebook in notebooks/ runs top to bottom on this machine's CPU (their short CPU settings),
executed by nbclient in a fresh kernel; a cell that raises fails the test. The notebooks check their own numbers
(the kernel notebook: fused equals naive, and holds less memory); here the printed results are read too."""

import glob
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "notebooks", "*.ipynb")))


def _run(path, monkeypatch, tmp_path):
  """Executes the notebook as on a user's CPU (one device, not the suite's 8 fake ones), its temporary
  folders under tmp_path; its printed outputs, by code cell."""
  import nbclient
  import nbformat
  monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", ""))
  monkeypatch.setenv("TMPDIR", str(tmp_path))
  notebook = nbformat.read(path, as_version=4)
  nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                          resources={"metadata": {"path": os.path.dirname(path)}}).execute()
  return ["".join(out.get("text", "") for out in cell.get("outputs", []) if out.get("output_type") == "stream")
          for cell in notebook.cells if cell.cell_type == "code"]


def test_the_notebooks_are_the_ones_the_readme_links():
  names = [os.path.basename(p) for p in NOTEBOOKS]
  assert names == ["kernel.ipynb", "quickstart.ipynb", "rlhf.ipynb", "safety.ipynb"]
  readme = open(os.path.join(REPO, "README.md")).read()
  assert all(f"notebooks/{name}" in readme for name in names)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_a_notebook_writes_only_under_a_folder_new_to_each_run(path):
  """A fixed path such as /tmp/run would make the second run of a notebook (or a run after another
  checkout's) resume or refuse the first one's workdir."""
  import nbformat
  code = "\n".join(cell.source for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "code")
  assert "/tmp" not in code


@pytest.mark.slow
def test_quickstart_chats_evaluates_trains_and_compares(monkeypatch, tmp_path):
  outputs = _run(os.path.join(REPO, "notebooks", "quickstart.ipynb"), monkeypatch, tmp_path)
  assert outputs[0].startswith("cpu ")
  chats = outputs[1].split(">>> ")[1:]
  assert len(chats) == 2 and all(len(chat.splitlines()) >= 2 and chat.splitlines()[1].strip() for chat in chats)
  assert '"final_loss"' in outputs[3]
  table = outputs[-1]
  assert "SmolLM2" in table and "after DPO" in table and "HARMLESS" in table


@pytest.mark.slow
def test_kernel_notebook_shows_equal_numbers_and_the_memory_saved(monkeypatch, tmp_path):
  outputs = _run(os.path.join(REPO, "notebooks", "kernel.ipynb"), monkeypatch, tmp_path)
  assert "equal within float32 rounding" in outputs[1]
  assert "naive:" in outputs[2] and "x less" in outputs[2]


@pytest.mark.slow
def test_rlhf_notebook_trains_a_reward_model_then_ppo_and_grpo(monkeypatch, tmp_path):
  outputs = _run(os.path.join(REPO, "notebooks", "rlhf.ipynb"), monkeypatch, tmp_path)
  reward_model, ppo, grpo, report = outputs[2:6]
  assert "held-out pairs ranked right:" in reward_model and "accuracy" in reward_model
  for out, steps in ((ppo, 12), (grpo, 40)):
    assert f'"steps": {steps},' in out and '"skipped_steps": 0' in out
    assert "reward/mean" in out and "kl/ref" in out
  assert "value/mean" in ppo
  page = report.strip()
  assert page.startswith(str(tmp_path)) and page.endswith("/grpo/report.html")
  assert "<h2>Config</h2>" in open(page).read()


@pytest.mark.slow
def test_safety_notebook_trains_a_classifier_guards_a_policy_and_runs_a_red_team_round(monkeypatch, tmp_path):
  outputs = _run(os.path.join(REPO, "notebooks", "safety.ipynb"), monkeypatch, tmp_path)
  counts, trained, measured, guarded, round_, compared, read = outputs[1:8]
  assert counts.splitlines()[0].startswith("train ") and "held_out" in counts
  assert '"calibration/fpr"' in trained and '"skipped_steps": 0' in trained
  # A probe on SmolLM2 trained on 96 real prompts ranks 45 held-out ones (chance: 0.5).
  assert float(measured.split("this split ")[1].split()[0]) >= 0.85
  per_kind = measured.split("flagged at the saved threshold")[1].splitlines()[0]
  assert all(f" {kind} " in per_kind for kind in ("harmful", "jailbreak", "careful", "edgy", "over_refusal", "everyday"))
  assert "harmful and jailbreak (TPR)" in measured
  # The report's calibration sample is the one trained on: its 5% row chose the threshold saved.
  five = next(line.split() for line in measured.splitlines() if line.split()[:1] == ["5%"])
  assert five[1] == measured.split("flagged at the saved threshold (")[1].split(")")[0]
  answers = guarded.split(">>> ")[1:]
  assert len(answers) == 5 and all(len(a.strip().splitlines()) >= 2 for a in answers)
  assert "attacks from 1 train behaviours" in round_ and '"final_loss"' in round_
  table = compared.split("held-out attack success")[1].splitlines()[1:]
  families = [line.split()[0] for line in table if line.strip()]
  assert families[0] == "direct" and "inthewild" in families and any(f.startswith("dan/") for f in families)
  assert read.count("success=") == 4
