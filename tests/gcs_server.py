"""gcp-storage-emulator, with the two GCS behaviours our clients rely on added.

Run as `python tests/gcs_server.py PORT BUCKET`; serves the GCS JSON API on
localhost:PORT with an empty in-memory BUCKET until killed.

gcp-storage-emulator (2026.7) serves the API, but
  * its media downloads lack the `x-goog-generation` header that GCS sends
    (https://cloud.google.com/storage/docs/xml-api/reference-headers
    #xgooggeneration): tensorstore, orbax's array writer, then reads every
    object as generation 0 and fails its OCDBT manifest updates with
    "Malformed StorageGeneration";
  * it ignores the `ifGenerationMatch` / `ifGenerationNotMatch`
    preconditions (https://cloud.google.com/storage/docs/request-
    preconditions) that the run lock (`gcs_lock`) and tensorstore's
    conditional writes depend on.
This wraps its object handlers to do both, as GCS documents them (412
Precondition Failed; 304 Not Modified for a read whose ifGenerationNotMatch
holds), so the tests exercise the real protocol, not a weaker one, and
serves requests concurrently (the emulator answers one at a time).
"""

import faulthandler
import http.server
import signal
import sys
import threading
import time
import types
from http import HTTPStatus

from gcp_storage_emulator import server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects


def _generation(storage, bucket: str, name: str) -> int:
  """The object's generation, 0 when it does not exist (GCS's convention)."""
  try:
    return int(storage.get_file_obj(bucket, name)["generation"])
  except NotFound:
    return 0


def _object_name(request) -> str | None:
  if "name" in request.query:
    return request.query["name"][0]
  if request.params.get("object_id"):
    return request.params["object_id"]
  data = request.data
  if isinstance(data, dict) and isinstance(data.get("meta"), dict):
    return data["meta"].get("name")  # a multipart upload's metadata part
  return None


def _refused(request, response, storage, *, read: bool) -> bool:
  """Answers 412 (or 304 for reads) when a precondition fails."""
  match = request.query.get("ifGenerationMatch")
  not_match = request.query.get("ifGenerationNotMatch")
  if not match and not not_match:
    return False
  name = _object_name(request)
  if name is None:
    return False
  current = _generation(storage, request.params["bucket_name"], name)
  if match and int(match[0]) != current:
    response.status = HTTPStatus.PRECONDITION_FAILED
    return True
  if not_match and int(not_match[0]) == current:
    response.status = (HTTPStatus.NOT_MODIFIED if read
                       else HTTPStatus.PRECONDITION_FAILED)
    if read:
      response["x-goog-generation"] = str(current)
    return True
  return False


# Requests are served concurrently (as GCS serves them; tensorstore and
# gcsfs keep several in flight), but the emulator's storage is not
# thread-safe: each handler runs under one lock, after its request body has
# been read, so a precondition's check and the write it guards are atomic.
_STORAGE_LOCK = threading.RLock()  # batch requests nest handlers


def _serialized(handler, *, preconditions: bool = False, read: bool = False):
  def run(request, response, storage, *args, **kwargs):
    _ = request.data  # read the body outside the lock
    with _STORAGE_LOCK:
      if preconditions and _refused(request, response, storage, read=read):
        return None
      return handler(request, response, storage, *args, **kwargs)
  return run


def _with_generation(handler):
  """`handler`, adding to its media responses the generation headers GCS
  sends (objects.download, and objects.get for ?alt=media)."""
  def run(request, response, storage, *args, **kwargs):
    handler(request, response, storage, *args, **kwargs)
    media = handler is objects.download or request.query.get("alt") == [
        "media"]
    if media and response.status in (HTTPStatus.OK,
                                     HTTPStatus.PARTIAL_CONTENT):
      obj = storage.get_file_obj(request.params["bucket_name"],
                                 request.params["object_id"])
      response["x-goog-generation"] = str(obj["generation"])
      response["x-goog-metageneration"] = str(obj.get("metageneration", 1))
  return run


_WRAPPED = {
    objects.download: _serialized(_with_generation(objects.download),
                                  preconditions=True, read=True),
    objects.get: _serialized(_with_generation(objects.get),
                             preconditions=True, read=True),
    objects.insert: _serialized(objects.insert, preconditions=True),
    objects.delete: _serialized(objects.delete, preconditions=True),
    objects.xml_upload: _serialized(objects.xml_upload, preconditions=True),
}


def _wrapped(handler):
  if handler not in _WRAPPED:
    _WRAPPED[handler] = _serialized(handler)
  return _WRAPPED[handler]


def main(port: int, bucket: str) -> None:
  faulthandler.register(signal.SIGUSR1)  # kill -USR1: where it is stuck
  # gcp-storage-emulator's HTTPServer answers one request at a time; GCS
  # (and so tensorstore's and gcsfs's parallel requests) expects many.
  http.server.HTTPServer = http.server.ThreadingHTTPServer
  for _, handlers in server.HANDLERS:
    for method, handler in list(handlers.items()):
      handlers[method] = _wrapped(handler)
  # The router also calls objects.insert by name, for uploads without the
  # /upload prefix.
  server.objects = types.SimpleNamespace(
      **{**vars(objects), "insert": _WRAPPED[objects.insert]})
  emulator = server.create_server("localhost", port, in_memory=True,
                                  default_bucket=bucket)
  emulator.start()
  while True:
    time.sleep(3600)


if __name__ == "__main__":
  main(int(sys.argv[1]), sys.argv[2])
