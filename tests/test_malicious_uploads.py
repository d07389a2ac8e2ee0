"""Archive-shaped model uploads are refused before anything is unpacked (issue 8's corpus).

fedgate accepts exactly one model format, ``keras-json-v1``: a single JSON document
(engine/artifact.py). Nothing in the gateway or the engine opens archives or honours
``Content-Encoding``, so the classic archive attacks — zip slip, symlinks, decompression
bombs — and serialized TF graphs carrying ``ReadFile``/``WriteFile``/``PyFunc`` ops can only
arrive as opaque bytes, and are refused at validation with ``model-rejected``. These tests
pin that down: each upload is refused with a reason, and nothing is written anywhere in the
deployment (no model file, no extracted path, no ledger row).
"""

from __future__ import annotations

import gzip
import io
import tarfile
import zipfile
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from gateway.api.app import create_app
from gateway.sdk.request_signing import SignedRequestAuth
from tests.conftest import make_researcher


def _zip(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _tar_with_symlink() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        link = tarfile.TarInfo("model/variables")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc"
        archive.addfile(link)
        data = b'{"format": "keras-json-v1"}'
        member = tarfile.TarInfo("model/model.json")
        member.size = len(data)
        archive.addfile(member, io.BytesIO(data))
    return buffer.getvalue()


def _graph_with_op(op: str) -> bytes:
    """Bytes shaped like a SavedModel archive whose graph names a dangerous op."""
    return _zip({"saved_model.pb": b"\x0a\x10" + op.encode() + b"\x12\x04/etc/passwd",
                 "variables/variables.index": b"\x00" * 16})


CORPUS = {
    "zip slip": _zip({"../../outside.txt": b"escaped", "model.json": b"{}"}),
    "symlink": _tar_with_symlink(),
    "zip bomb": _zip({f"layer{i}.bin": b"\x00" * 4_000_000 for i in range(4)}),
    "gzip bomb": gzip.compress(b"[" * 10_000_000),
    "ReadFile op": _graph_with_op("ReadFile"),
    "WriteFile op": _graph_with_op("WriteFile"),
    "py_func": _graph_with_op("EagerPyFunc"),
}


def _files(root: Path) -> set[Path]:
    return {path.relative_to(root) for path in root.rglob("*") if path.is_file()}


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_archive_shaped_upload_is_refused_and_nothing_is_written(node_dir: Path, name: str) -> None:
    alice = make_researcher(node_dir, "alice")
    body = CORPUS[name]
    headers = {"Content-Type": "application/octet-stream"}
    if name == "gzip bomb":
        headers["Content-Encoding"] = "gzip"  # never honoured: the bytes stay compressed
    outside = node_dir.parent / "outside.txt"
    with TestClient(create_app(node_dir)) as client:
        client.auth = SignedRequestAuth(alice)
        before = _files(node_dir)
        response = client.post("/v1/models", content=body, headers=headers)
        after = _files(node_dir)
    assert response.status_code == 422, response.text
    problem = response.json()
    assert problem["type"].endswith(":model-rejected")
    assert "JSON" in problem["detail"] or "json" in problem["detail"]
    assert not outside.exists()
    assert after == before
