"""A local Google Cloud Storage server for the tests: gcp-storage-emulator, with the two things of the
JSON API that TensorStore relies on and the emulator leaves out of media downloads: the object's
generation in the `x-goog-generation` header, and the `ifGenerationMatch` / `ifGenerationNotMatch`
preconditions (412 / 304), which TensorStore uses to revalidate what it cached.

    python tests/gcs_emulator.py PORT BUCKET DATA_DIR    # serves until killed; objects under DATA_DIR
"""

import logging
import sys
from http import HTTPStatus

from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
  except NotFound:
    response.status = HTTPStatus.NOT_FOUND
    return
  generation = str(obj.get("generation") or "0")
  match, not_match = request.query.get("ifGenerationMatch"), request.query.get("ifGenerationNotMatch")
  if match and match[0] != generation:
    response.status = HTTPStatus.PRECONDITION_FAILED
    return
  response["x-goog-generation"] = generation
  response["x-goog-metageneration"] = str(obj.get("metageneration") or "1")
  if not_match and not_match[0] == generation:
    response.status = HTTPStatus.NOT_MODIFIED
    return
  _download(request, response, storage, *args, **kwargs)


objects.download = download  # before the server module builds its routing table from it
from gcp_storage_emulator.server import create_server  # noqa: E402


def main(port: str, bucket: str, data_dir: str) -> None:
  logging.disable(logging.CRITICAL)
  create_server("127.0.0.1", int(port), in_memory=False, default_bucket=bucket, data_dir=data_dir).run()


if __name__ == "__main__":
  main(*sys.argv[1:])
