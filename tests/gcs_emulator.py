"""A local Google Cloud Storage server for the object-store tests: ``gcp-storage-emulator`` with the two things of the
JSON API it lacks and that orbax's OCDBT checkpoints rely on: generation preconditions (``ifGenerationMatch``,
``ifGenerationNotMatch``: 412 or 304) and the ``x-goog-generation`` header of a download. Requests are served one at
a time, so a conditional write is atomic as on GCS.

    python tests/gcs_emulator.py PORT BUCKET      # serves in memory until killed

``environment(url)`` is what a client process needs to use it: gcsfs (epath's ``gs://``) and tensorstore (orbax's
arrays) both sent to ``url``, anonymously.
"""

from __future__ import annotations

import sys
from http import HTTPStatus
from urllib.parse import unquote


def environment(url: str) -> dict[str, str]:
    return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "anonymous",
            "FSSPEC_GCS_TOKEN": "anon", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


def _with_generations(handler):
    """``handler`` behind the object's generation preconditions; a download answers its generation in a header."""
    from gcp_storage_emulator.exceptions import NotFound

    def checked(request, response, storage, *args, **kwargs):
        bucket = request.params["bucket_name"]
        name = request.params.get("object_id") or (request.query.get("name") or [None])[0]
        if name is None and request.query.get("uploadType") == ["multipart"]:
            name = request.data["meta"].get("name")
        current = 0
        if name is not None:
            try:
                current = int(storage.get_file_obj(bucket, unquote(name))["generation"])
            except NotFound:
                pass
        match = request.query.get("ifGenerationMatch")
        if match and int(match[0]) != current:
            response.status = HTTPStatus.PRECONDITION_FAILED
            return
        not_match = request.query.get("ifGenerationNotMatch")
        if not_match and int(not_match[0]) == current:
            response.status = HTTPStatus.NOT_MODIFIED if request.method == "GET" else HTTPStatus.PRECONDITION_FAILED
            return
        handler(request, response, storage, *args, **kwargs)
        if current and request.method == "GET" and response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
            response["x-goog-generation"] = str(current)

    return checked


def serve(port: int, bucket: str):
    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects

    wrapped = {f: _with_generations(f) for f in (objects.get, objects.download, objects.insert, objects.delete)}
    server.HANDLERS = tuple((regex, {m: wrapped.get(f, f) for m, f in methods.items()})
                            for regex, methods in server.HANDLERS)
    s = server.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    s.run()


if __name__ == "__main__":
    serve(int(sys.argv[1]), sys.argv[2])
