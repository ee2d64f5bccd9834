"""A local Google Cloud Storage server for the tests: gcp-storage-emulator, with the two things of the
JSON API that TensorStore relies on and the emulator leaves out of media downloads: the object's
generation in the `x-goog-generation` header, and the `ifGenerationMatch` / `ifGenerationNotMatch`
preconditions (412 / 304), which TensorStore uses to revalidate what it cached; and the objects `moveTo`
call, which gcsfs renames with (without it every rename waits out gcsfs's retries on a 501, then copies).

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


def move(request, response, storage, *args, **kwargs):
  bucket, source, dest = (request.params[k] for k in ("bucket_name", "object_id", "dest_object_id"))
  try:
    moved = objects._copy(request.base_url, storage, bucket, source, bucket, dest)
  except NotFound:
    response.status = HTTPStatus.NOT_FOUND
    return
  objects._delete(storage, bucket, source)
  response.json(moved)


objects.download = download  # before the server module builds its routing table from it
from gcp_storage_emulator import server  # noqa: E402

server.HANDLERS = ((r"^/storage/v1/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.+)/moveTo/o/(?P<dest_object_id>.+)$",
                    {"POST": move}),) + server.HANDLERS


def main(port: str, bucket: str, data_dir: str) -> None:
  logging.disable(logging.CRITICAL)
  server.create_server("127.0.0.1", int(port), in_memory=False, default_bucket=bucket, data_dir=data_dir).run()


if __name__ == "__main__":
  main(*sys.argv[1:])
