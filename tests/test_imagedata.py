"""Image ingestion: every bad input gets a clear reason, nothing stored is lost."""
import io
import json
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from engine.core import workspace
from engine.core.errors import UserError
from engine.data import imagedata
from tests.imgs import class_folder, png, zip_bytes


def reason(data, **kw):
    with pytest.raises(UserError) as e:
        imagedata.decode_image(data, "x", **kw)
    return str(e.value)


# ----------------------------------------------------------------------------- single images
def test_valid_formats_decode_to_rgb():
    for fmt in ("PNG", "JPEG", "BMP", "WEBP", "TIFF", "GIF"):
        im = imagedata.decode_image(png(fmt=fmt))
        assert im.mode == "RGB" and im.size == (32, 32)


def test_not_an_image_and_empty():
    assert "not an image" in reason(b"hello world, not pixels at all")
    assert "empty" in reason(b"")


def test_truncated_png_and_jpeg():
    assert "corrupt or truncated" in reason(png(size=(64, 64), seed=1)[:200])
    jpg = png(fmt="JPEG", size=(64, 64), seed=1)
    assert "corrupt or truncated" in reason(jpg[: len(jpg) // 2])


def test_unsupported_formats_are_named():
    assert "SVG" in reason(b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"></svg>')
    assert "PDF" in reason(b"%PDF-1.4\n1 0 obj\n")
    assert "EPS" in reason(b"%!PS-Adobe-3.0 EPSF-3.0\n")
    assert "HEIC" in reason(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic")


def _png_with_declared_size(w, h) -> bytes:
    """A PNG whose header claims w x h (a bomb shape), with almost no data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 10)) + chunk(b"IEND", b"")


def test_decompression_bomb_is_an_error_not_a_warning():
    # just above the limit (Pillow would only warn) and far above it (Pillow raises)
    limits = imagedata.Limits(max_pixels=10_000)
    assert "too large" in reason(_png_with_declared_size(101, 100), limits=limits)
    assert "too large" in reason(_png_with_declared_size(60_000, 60_000))


def test_limit_is_configurable(monkeypatch):
    monkeypatch.setenv("TRANSFER_STUDIO_MAX_PIXELS", "500")
    assert "too large" in reason(png(size=(32, 32)))


def test_tiny_images_refused():
    assert "too small" in reason(png(size=(15, 40)))
    assert imagedata.decode_image(png(size=(16, 16))).size == (16, 16)


def test_animated_gif_first_frame():
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    im = imagedata.decode_image(buf.getvalue())
    r, g, b = im.getpixel((5, 5))
    assert r > 200 and b < 50


def test_exif_orientation_applied():
    im = Image.new("RGB", (40, 20), (0, 255, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif)
    assert imagedata.decode_image(buf.getvalue()).size == (20, 40)


@pytest.mark.parametrize("mode", ["P", "RGBA", "LA", "CMYK", "L", "1"])
def test_modes_convert_to_rgb(mode):
    data = png((10, 200, 10), mode=mode, fmt="TIFF" if mode == "CMYK" else "PNG")
    im = imagedata.decode_image(data)
    assert im.mode == "RGB"


def test_transparency_composited_on_white():
    im = Image.new("RGBA", (32, 32), (255, 0, 0, 0))  # fully transparent red
    buf = io.BytesIO()
    im.save(buf, "PNG")
    assert imagedata.decode_image(buf.getvalue()).getpixel((3, 3)) == (255, 255, 255)


def test_16_bit_greyscale_scaled_not_clipped():
    arr = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60)  # 0 .. ~61k
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")  # uint16 -> mode I;16
    im = imagedata.decode_image(buf.getvalue())
    lo, hi = im.convert("L").getextrema()
    assert lo == 0 and hi == 255  # the full range is used, not all-white


# ----------------------------------------------------------------------------- ZIPs
def _entries(classes=("red", "blue"), n=3, root=""):
    colors = {"red": (220, 20, 20), "blue": (20, 20, 220)}
    return {f"{root}{c}/{i}.png": png(colors[c], seed=i) for c in classes for i in range(n)}


def test_zip_layouts_with_and_without_root():
    for root in ("", "mydata/"):
        col = imagedata.read_zip(zip_bytes(_entries(root=root)))
        assert sorted({m.cls for m in col.members}) == ["blue", "red"] and not col.rejected


def test_zip_slip_rejects_whole_zip():
    for bad in ("../evil.png", "/etc/evil.png", "red/../../evil.png", "C:/evil.png"):
        with pytest.raises(UserError, match="unsafe path"):
            imagedata.read_zip(zip_bytes(_entries() | {bad: png()}))


def test_zip_symlink_and_nested_archive_rejected_per_file():
    data = zip_bytes(_entries() | {"red/inner.zip": zip_bytes({"a.png": png()})}, symlinks={"red/link.png": "/etc/passwd"})
    col = imagedata.read_zip(data)
    reasons = {r["file"]: r["reason"] for r in col.rejected}
    assert "symbolic link" in reasons["red/link.png"] and "nested archive" in reasons["red/inner.zip"]
    assert len(col.members) == 6


def test_zip_bombs_refused_before_extracting():
    with pytest.raises(UserError, match="zip bomb"):
        imagedata.read_zip(zip_bytes({"red/a.png": b"\0" * (20 * 2**20)}))
    with pytest.raises(UserError, match="entries"):
        imagedata.read_zip(zip_bytes(_entries()), imagedata.Limits(zip_max_members=3))
    with pytest.raises(UserError, match="expand"):
        imagedata.read_zip(zip_bytes(_entries()), imagedata.Limits(zip_max_bytes=100))


def test_zip_ignores_macos_and_dotfiles_and_explains_layout():
    data = zip_bytes(_entries() | {"__MACOSX/red/._0.png": b"junk", "red/.DS_Store": b"junk", "loose.png": png()})
    col = imagedata.read_zip(data)
    assert len(col.members) == 6
    assert [r["file"] for r in col.rejected] == ["loose.png"]


def test_a_zip_to_predict_is_read_flat_with_the_same_rules():
    """Predict's ZIP -> CSV reads any layout (loose files too) through the dataset reader's guards."""
    data = zip_bytes(_entries() | {"loose.png": png(), "red/inner.zip": zip_bytes({"a.png": png()}), "__MACOSX/._x.png": b"junk"},
                     symlinks={"red/link.png": "/etc/passwd"})
    got = {name: (blob, why) for name, blob, why in imagedata.zip_files(data)}
    assert set(got) == set(_entries()) | {"loose.png", "red/inner.zip", "red/link.png"}  # ZIP order, macOS junk skipped
    assert got["loose.png"][0] == png() and not got["loose.png"][1]
    assert got["red/inner.zip"][0] is None and "nested archive" in got["red/inner.zip"][1]
    assert got["red/link.png"][0] is None and "symbolic link" in got["red/link.png"][1]
    for bad in ("../evil.png", "/etc/evil.png"):
        with pytest.raises(UserError, match="unsafe path"):
            list(imagedata.zip_files(zip_bytes(_entries() | {bad: png()})))
    with pytest.raises(UserError, match="zip bomb"):
        list(imagedata.zip_files(zip_bytes({"a.png": b"\0" * (20 * 2**20)})))
    with pytest.raises(UserError, match="not a valid ZIP"):
        list(imagedata.zip_files(b"PK\x03\x04garbage"))


def test_uploads_are_kept_under_their_content_hash(workspace_home):
    a = workspace.save_upload(b"weights", "weights", suffix=".safetensors")
    assert a.read_bytes() == b"weights" and a.parent.name == "weights" and a.suffix == ".safetensors"
    assert workspace.save_upload(b"weights", "weights", suffix=".safetensors") == a  # the same bytes: stored once
    b = workspace.save_upload(b"zip", "uploads", "../../etc/my model!.zip", ".zip")
    assert b.name == "my_model_.zip" and b.parent.parent == workspace.subdir("uploads")  # the name is only a label


def test_not_a_zip():
    with pytest.raises(UserError, match="not a valid ZIP"):
        imagedata.read_zip(b"PK\x03\x04garbage")


# ----------------------------------------------------------------------------- the store
def test_import_dedupes_and_reports_each_file():
    imagedata.create_dataset("d")
    rows = imagedata.add_images("d", "red", [("a.png", png(seed=1)), ("b.png", png(seed=1)), ("c.txt", b"text"), ("d.png", png(seed=2))])
    assert [r["status"] for r in rows] == ["accepted", "duplicate", "rejected", "accepted"]
    assert imagedata.dataset_counts("d") == {"red": 2}
    assert len(list((workspace.home() / "images").glob("*/*"))) == 2


def test_rejected_zip_leaves_dataset_exactly_as_it_was():
    imagedata.create_dataset("d")
    imagedata.import_zip("d", zip_bytes(_entries()))
    before = imagedata.dataset_counts("d")
    files_before = sorted(p.name for p in (workspace.home() / "images").glob("*/*"))
    with pytest.raises(UserError):
        imagedata.import_zip("d", zip_bytes(_entries(n=5) | {"../x.png": png()}))
    assert imagedata.dataset_counts("d") == before
    assert sorted(p.name for p in (workspace.home() / "images").glob("*/*")) == files_before


def test_rename_delete_and_persistence():
    imagedata.create_dataset("d")
    imagedata.import_zip("d", zip_bytes(_entries()))
    imagedata.rename_class("d", "red", "rouge")
    imagedata.rename_dataset("d", "e")
    workspace._local.conn = None  # a fresh connection, as after a restart
    assert imagedata.dataset_counts("e") == {"blue": 3, "rouge": 3}
    img = imagedata.list_images("e", "rouge")[0]
    imagedata.delete_image(img["id"])
    assert imagedata.dataset_counts("e")["rouge"] == 2
    imagedata.delete_class("e", "blue")
    imagedata.delete_dataset("e")
    assert imagedata.list_datasets() == [] and not list((workspace.home() / "images").glob("*/*"))
    with pytest.raises(UserError, match="empty"):
        imagedata.create_dataset("  ")


def test_split_is_stratified_seeded_and_stable(tmp_path):
    root = class_folder(tmp_path / "data", n=10)
    a = imagedata.training_data(str(root))
    b = imagedata.training_data(str(root))
    assert a.version == b.version and a.val == b.val
    assert sum(1 for _, y in a.val if y == 0) == 2 and sum(1 for _, y in a.val if y == 1) == 2
    c = imagedata.training_data(str(root), seed=1)
    assert c.version != a.version


def test_training_data_refuses_unusable(tmp_path):
    root = class_folder(tmp_path / "one", classes=("red",), n=3)
    with pytest.raises(UserError, match="only one class"):
        imagedata.training_data(str(root))
    (root / "blue").mkdir()
    with pytest.raises(UserError, match="fewer than 2"):
        imagedata.training_data(str(root))


# ----------------------------------------------------------------------------- CLI
def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True, env=env)


def test_cli_data_check_json_and_exit_codes(tmp_path, workspace_home):
    import os

    env = dict(os.environ)
    root = class_folder(tmp_path / "good", n=3)
    (root / "red" / "bad.png").write_bytes(b"not an image")
    r = cli("data", "check", str(root), "--json", env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["classes"] == {"blue": 3, "red": 3} and out["usable"] is True
    assert out["rejected"][0]["file"] == "red/bad.png" and "not an image" in out["rejected"][0]["reason"]

    zpath = tmp_path / "evil.zip"
    zpath.write_bytes(zip_bytes(_entries() | {"../../evil.png": png()}))
    r = cli("data", "check", str(zpath), env=env)
    assert r.returncode == 2 and r.stderr.startswith("error: unsafe path") and "Traceback" not in r.stderr
    assert not (tmp_path.parent / "evil.png").exists()

    one = class_folder(tmp_path / "one", classes=("red",), n=3)
    r = cli("data", "check", str(one), env=env)
    assert r.returncode == 2 and "only one class" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not workspace_home.exists() or not (workspace_home / "images").exists()  # check writes nothing

    r = cli("data", "import", str(root), "--name", "colours", env=env)
    assert r.returncode == 0, r.stderr
    r = cli("data", "list", "--json", env=env)
    assert json.loads(r.stdout)["datasets"][0]["images"] == 6
