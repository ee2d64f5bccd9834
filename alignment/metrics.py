"""Per-step metrics to WORKDIR/metrics.jsonl and TensorBoard event files (tensorboardX, no TensorFlow),
local or behind a URI (`gs://...`: written through etils.epath)."""

import io
import json
import math
import time

import jax
import numpy as np

from alignment import workdir as workdir_lib

REMOTE_FLUSH_SECS = 30  # a remote object is rewritten whole: at most this often (and on close)


class _JsonLines:
  """A JSONL file of per-step records behind a local path or a URI: appended to line by line locally,
  rewritten whole at most every REMOTE_FLUSH_SECS remotely (object stores do not append). Records of
  steps after `start_step` left by an earlier attempt are dropped (all of them when it is 0)."""

  def __init__(self, path, remote: bool, start_step: int):
    self.path, self._remote, self._written_at = path, remote, 0.0
    self._lines = []
    if path.exists():
      old = path.read_text().splitlines(keepends=True)
      self._lines = [line for line in old if line.strip() and json.loads(line)["step"] <= (start_step or -1)]
      if len(self._lines) != len(old):
        path.write_text("".join(self._lines))

  def append(self, record: dict) -> None:
    line = json.dumps(record) + "\n"
    self._lines.append(line)
    if not self._remote:
      with self.path.open("a") as f:
        f.write(line)
    elif time.time() - self._written_at > REMOTE_FLUSH_SECS:
      self.flush()

  def flush(self) -> None:
    if self._remote:
      self.path.write_text("".join(self._lines))
      self._written_at = time.time()


class MetricsWriter:
  """Writes one JSON object per logged step to metrics.jsonl (and TensorBoard), and sample generations
  to samples.jsonl; only process 0 writes.

  `start_step`: the step the run starts from; records of later steps left by an earlier attempt
  (logged after its last checkpoint) are dropped, so a resumed run logs each step once. A run starting
  from scratch (0) drops them all: an attempt that saved nothing left only records this run logs again."""

  def __init__(self, workdir, start_step: int = 0):
    self.enabled = jax.process_index() == 0
    root = workdir_lib.resolve(workdir)
    self.path = root / "metrics.jsonl"
    self._tb = None
    if not self.enabled:
      return
    remote = workdir_lib.is_remote(root)
    self._metrics = _JsonLines(self.path, remote, start_step)
    self._samples = _JsonLines(root / "samples.jsonl", remote, start_step)
    from tensorboardX import SummaryWriter  # imported lazily: it pulls in protobuf
    _register_remote_event_files()
    self._tb = SummaryWriter(str(root / "tensorboard"), flush_secs=REMOTE_FLUSH_SECS if remote else 10)

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    values = {k: float(np.asarray(v)) for k, v in metrics.items()}
    self._metrics.append({"step": int(step), "time": round(time.time(), 3), **values})
    for key, value in values.items():
      if math.isfinite(value):
        self._tb.add_scalar(key, value, int(step))

  def write_samples(self, step: int, samples: list) -> None:
    """Sample generations of a step: dicts of prompt, response and whatever scored them."""
    if self.enabled:
      for sample in samples:
        self._samples.append({"step": int(step), **sample})

  def flush(self) -> None:
    if self.enabled:
      self._metrics.flush()
      self._samples.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    self.flush()
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def read_metrics(workdir) -> dict:
  """{step: record} from WORKDIR/metrics.jsonl; a step logged twice keeps its last record."""
  records = {}
  for line in (workdir_lib.resolve(workdir) / "metrics.jsonl").read_text().splitlines():
    if line.strip():
      record = json.loads(line)
      records[record["step"]] = record
  return dict(sorted(records.items()))


class _RemoteEventFile:
  """A TensorBoard event file behind a URI: tensorboardX's record writer appends bytes here; each flush
  rewrites the object with everything so far."""

  def __init__(self, path: str):
    self.path, self.buffer = workdir_lib.resolve(path), io.BytesIO()

  def write(self, data: bytes) -> None:
    self.buffer.write(data)

  def flush(self) -> None:
    self.path.write_bytes(self.buffer.getvalue())

  def close(self) -> None:
    self.flush()


class _RemoteEventFiles:
  """tensorboardX writer factory for URI schemes (`record_writer.register_writer_factory`)."""

  def open(self, path: str) -> _RemoteEventFile:
    return _RemoteEventFile(path)

  def directory_check(self, path: str) -> None:
    workdir_lib.resolve(path).mkdir(parents=True, exist_ok=True)


def _register_remote_event_files() -> None:
  from tensorboardX import record_writer
  for scheme in ("gs", "s3"):
    record_writer.register_writer_factory(scheme, _RemoteEventFiles())
