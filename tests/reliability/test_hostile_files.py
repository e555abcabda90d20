"""Hostile files are refused cleanly: nothing written outside the workspace, no code executed."""
import io
import json
import pickle
import struct
import zipfile

import pytest
from PIL import Image

from engine.core import workspace
from engine.core.errors import UserError
from engine.data import imagedata
from engine.vision import export, network
from tests.imgs import png

MARKER = "hostile-payload-ran"


class Payload:
    """Unpickling this runs code: it creates a marker file. It must never be unpickled."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _pickle_file(path, marker):
    path.write_bytes(pickle.dumps({"fc.weight": Payload(marker)}))
    return path


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".zip"])
def test_pickle_checkpoint_never_runs(tmp_path, suffix):
    marker = tmp_path / MARKER
    f = _pickle_file(tmp_path / f"model{suffix}", marker)
    with pytest.raises(UserError):
        network.safe_load_state(f) if suffix != ".zip" else export.import_model(f)
    if suffix != ".zip":
        with pytest.raises(UserError):
            export.import_model(f)
    assert not marker.exists()


def _safetensors(header: dict, data: bytes = b"") -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


@pytest.mark.parametrize("blob", [
    _safetensors({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}, b"\0" * 8),        # points past the end
    _safetensors({"w": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 16]}}, b"\0" * 16),  # shape lies about size
    _safetensors({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                  "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, b"\0" * 24),          # overlapping tensors
    _safetensors({f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(200_000)}),  # huge tensor count
    struct.pack("<Q", 2**60) + b"{}",                                                                   # absurd header length
    b"\x00" * 3,                                                                                       # too short
])
def test_lying_safetensors_headers_are_refused(tmp_path, blob):
    f = tmp_path / "w.safetensors"
    f.write_bytes(blob)
    with pytest.raises(UserError):
        network.safe_load_state(f)


def test_polyglot_image_is_stored_re_encoded(workspace_home):
    """A JPEG with a ZIP (or HTML) glued on is an image to us, and only the pixels are kept."""
    jpeg = png(fmt="JPEG", size=(32, 32), seed=3)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("evil.html", "<script>alert(1)</script>")
    imagedata.create_dataset("d")
    rows = imagedata.add_images("d", "c", [("poly.jpg", jpeg + buf.getvalue() + b"<html><script>x()</script>")])
    assert rows[0]["status"] == "accepted"
    stored = next((workspace_home / "images").glob("*/*")).read_bytes()
    assert b"PK\x03\x04" not in stored and b"<script>" not in stored


def test_jpeg_with_bad_huffman_table_is_refused():
    jpeg = bytearray(png(fmt="JPEG", size=(64, 64), seed=3))
    dht = jpeg.find(b"\xff\xc4")
    assert dht > 0
    jpeg[dht + 5: dht + 21] = b"\xff" * 16  # code counts that cannot form a Huffman table
    with pytest.raises(UserError, match="corrupt"):
        imagedata.decode_image(bytes(jpeg))


def test_zip_with_100k_entries_is_refused_fast(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for i in range(100_000):
            zf.writestr(f"c/{i}", b"")
    with pytest.raises(UserError, match="100,000 entries"):
        imagedata.read_zip(buf.getvalue())


def test_nothing_written_outside_the_workspace(tmp_path, workspace_home):
    workspace.home()
    before = set(tmp_path.iterdir())
    imagedata.create_dataset("d")
    zip_data = io.BytesIO()
    with zipfile.ZipFile(zip_data, "w") as zf:
        zf.writestr("c/ok.png", png())
        zf.writestr("c/../../escape.png", png())
    with pytest.raises(UserError):
        imagedata.import_zip("d", zip_data.getvalue())
    imagedata.add_images("d", "c", [("../../../escape2.png", png(seed=9))])
    assert set(tmp_path.iterdir()) == before
    assert all(p.resolve().is_relative_to(workspace_home.resolve()) for p in workspace_home.rglob("*"))
    assert workspace.db().execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_huge_declared_png_dimensions_refused_before_decoding():
    im = Image.new("RGB", (32, 32))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", 100_000, 100_000)  # IHDR width/height (CRC now wrong too)
    with pytest.raises(UserError):
        imagedata.decode_image(bytes(data))


def test_workspace_disk_limit_refuses_new_data_and_keeps_old(monkeypatch):
    imagedata.create_dataset("d")
    assert imagedata.add_images("d", "c", [("a.png", png(seed=1))])[0]["status"] == "accepted"
    monkeypatch.setenv("TRANSFER_STUDIO_MAX_WORKSPACE_GB", "0.000001")  # ~1 KB
    workspace._usage.clear()
    rows = imagedata.add_images("d", "c", [("b.png", png(seed=2))])
    assert rows[0]["status"] == "rejected" and "GB limit" in rows[0]["reason"]
    assert imagedata.dataset_counts("d") == {"c": 1}
    from engine import jobs

    with pytest.raises(UserError, match="GB limit"):
        jobs.get_manager().submit("finetune", {"data": "d"}, "too big")
