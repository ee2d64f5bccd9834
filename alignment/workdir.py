"""Workdir paths as `etils.epath.Path`: a local directory, or a URI (`gs://bucket/run`) that keeps its
scheme in every path derived from it (`os.path.abspath('gs://b/r')` would give '<cwd>/gs:/b/r')."""

import os

from etils import epath


def resolve(path) -> epath.Path:
  """A workdir (or a file in one) given as a string or path: URIs as they are, local paths absolute."""
  text = os.fspath(path)
  return epath.Path(text if is_remote(text) else os.path.abspath(text))


def is_remote(path) -> bool:
  """True for a URI with a scheme (gs://, s3://, ...), False for a local path."""
  return "://" in os.fspath(path)
