"""Property-based: no input makes ingestion or argument parsing raise anything but a reasoned UserError."""
import io
import zipfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.__main__ import build_parser
from engine.core.errors import UserError
from engine.data import imagedata
from tests.imgs import png, zip_bytes

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SEEDS = {"png": png(size=(24, 24), seed=1), "jpeg": png(fmt="JPEG", size=(24, 24), seed=1),
         "gif": png(fmt="GIF", size=(24, 24)), "webp": png(fmt="WEBP", size=(24, 24)), "tiff": png(fmt="TIFF", size=(24, 24))}


def _mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    buf = bytearray(data)
    for pos, val in edits:
        buf[pos % len(buf)] = val
    return bytes(buf[:cut] if cut else buf)


def _decode_or_reason(data: bytes) -> None:
    try:
        im = imagedata.decode_image(data)
        assert im.mode == "RGB" and min(im.size) >= 16
    except UserError as err:
        assert str(err).strip()


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes_never_crash_decoding(data):
    _decode_or_reason(data)


@FUZZ
@given(st.sampled_from(sorted(SEEDS)), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=12),
       st.one_of(st.none(), st.integers(1, 4000)))
def test_mutated_images_never_crash_decoding(kind, edits, cut):
    _decode_or_reason(_mutate(SEEDS[kind], edits, cut))


ZIP = zip_bytes({"a/1.png": SEEDS["png"], "a/2.png": SEEDS["jpeg"], "b/1.png": SEEDS["gif"], "b/2.png": SEEDS["webp"]})


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 100_000), st.integers(0, 255)), max_size=12), st.one_of(st.none(), st.integers(1, 6000)))
def test_mutated_zips_never_crash(edits, cut):
    try:
        col = imagedata.read_zip(_mutate(ZIP, edits, cut))
    except UserError as err:
        assert str(err).strip()
        return
    assert all(r["reason"].strip() for r in col.rejected)
    valid, rejected = imagedata.validate_collected(col)
    assert all(r["reason"].strip() for r in rejected)


@FUZZ
@pytest.mark.filterwarnings("ignore:Duplicate name")  # repeated member names are part of the hostility
@given(st.lists(st.text(min_size=1, max_size=30), min_size=1, max_size=5))
def test_hostile_member_names(names):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for n in names:
            try:
                zf.writestr(n, SEEDS["png"])
            except (ValueError, UnicodeEncodeError, IndexError):  # names zipfile itself cannot write
                return
    try:
        col = imagedata.read_zip(buf.getvalue())
    except UserError as err:
        assert str(err).strip()
        return
    for m in col.members:
        assert ".." not in m.name.split("/") and not m.name.startswith("/")


ARGS = st.lists(st.one_of(st.sampled_from(["info", "data", "check", "import", "finetune", "predict", "export", "generate",
                                           "--json", "--name", "--epochs", "-1", "0", "x", "--lr", "nan", "--model", "--help"]),
                          st.text(max_size=12)), max_size=6)


@FUZZ
@given(ARGS)
def test_argument_parsing_never_tracebacks(argv):
    try:
        build_parser().parse_args(argv)
    except UserError as err:
        assert str(err).strip()
    except SystemExit as exit_:  # --help
        assert exit_.code == 0


@pytest.mark.parametrize("name", ["../../etc/passwd", "a/b\\c.png", "x" * 5000 + ".png", "caf\udce9.png", "nul\x00.png"])
def test_hostile_upload_names_never_become_paths(name, workspace_home):
    imagedata.create_dataset("d")
    rows = imagedata.add_images("d", "cls", [(name, SEEDS["png"])])
    assert rows[0]["status"] == "accepted"
    stored = list((workspace_home / "images").glob("*/*"))
    assert len(stored) == 1 and stored[0].resolve().is_relative_to(workspace_home.resolve())
    assert "/" not in imagedata.list_images("d", "cls")[0]["original_name"]
