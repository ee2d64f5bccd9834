"""Per-step metrics to WORKDIR/metrics.jsonl and TensorBoard event files (tensorboardX, no TensorFlow)."""

import json
import os
import time

import jax
import numpy as np


class MetricsWriter:
  """Appends one JSON object per logged step; only process 0 writes."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self.enabled:
      from tensorboardX import SummaryWriter  # imported lazily: it pulls in protobuf
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=10)

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    values = {k: float(np.asarray(v)) for k, v in metrics.items()}
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": int(step), "time": round(time.time(), 3), **values}) + "\n")
    for key, value in values.items():
      self._tb.add_scalar(key, value, int(step))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> dict:
  """{step: record} from WORKDIR/metrics.jsonl; a step logged twice (a resumed run) keeps its last record."""
  records = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      records[record["step"]] = record
  return dict(sorted(records.items()))
