"""Every notebook in notebooks/ runs top to bottom on this machine's CPU (their short CPU settings),
executed by nbclient in a fresh kernel; a cell that raises fails the test. The notebooks check their own numbers
(the kernel notebook: fused equals naive, and holds less memory); here the printed results are read too."""

import glob
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "notebooks", "*.ipynb")))


def _run(path, monkeypatch):
  """Executes the notebook as on a user's CPU (one device, not the suite's 8 fake ones); its printed
  outputs, by code cell."""
  import nbclient
  import nbformat
  monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", ""))
  notebook = nbformat.read(path, as_version=4)
  nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                          resources={"metadata": {"path": os.path.dirname(path)}}).execute()
  return ["".join(out.get("text", "") for out in cell.get("outputs", []) if out.get("output_type") == "stream")
          for cell in notebook.cells if cell.cell_type == "code"]


def test_the_notebooks_are_the_ones_the_readme_links():
  names = [os.path.basename(p) for p in NOTEBOOKS]
  assert names == ["kernel.ipynb", "quickstart.ipynb", "rlhf.ipynb"]
  readme = open(os.path.join(REPO, "README.md")).read()
  assert all(f"notebooks/{name}" in readme for name in names)


@pytest.mark.slow
def test_quickstart_chats_evaluates_trains_and_compares(monkeypatch):
  outputs = _run(os.path.join(REPO, "notebooks", "quickstart.ipynb"), monkeypatch)
  assert outputs[0].startswith("cpu ")
  chats = outputs[1].split(">>> ")[1:]
  assert len(chats) == 2 and all(len(chat.splitlines()) >= 2 and chat.splitlines()[1].strip() for chat in chats)
  assert '"final_loss"' in outputs[3]
  table = outputs[-1]
  assert "SmolLM2" in table and "after DPO" in table and "HARMLESS" in table


@pytest.mark.slow
def test_kernel_notebook_shows_equal_numbers_and_the_memory_saved(monkeypatch):
  outputs = _run(os.path.join(REPO, "notebooks", "kernel.ipynb"), monkeypatch)
  assert "equal within float32 rounding" in outputs[1]
  assert "naive:" in outputs[2] and "x less" in outputs[2]


@pytest.mark.slow
def test_rlhf_notebook_trains_a_reward_model_then_ppo_and_grpo(monkeypatch):
  outputs = _run(os.path.join(REPO, "notebooks", "rlhf.ipynb"), monkeypatch)
  reward_model, ppo, grpo = outputs[2], outputs[3], outputs[4]
  assert "held-out pairs ranked right:" in reward_model and "accuracy" in reward_model
  for out, steps in ((ppo, 12), (grpo, 40)):
    assert f'"steps": {steps},' in out and '"skipped_steps": 0' in out
    assert "reward/mean" in out and "kl/ref" in out
  assert "value/mean" in ppo
