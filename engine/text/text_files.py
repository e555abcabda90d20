"""Text a user brings for fine-tuning: uploads and pastes decoded safely, .txt files read, a size cap."""
from __future__ import annotations

import logging
from pathlib import Path

from engine.core import workspace
from engine.core.errors import UserError

log = logging.getLogger(__name__)


MAX_TEXT_BYTES = 5 * 2**20  # per uploaded / pasted text for fine-tuning
# A text in a style anyone recognises, bundled so fine-tuning can be shown in one click: the Book of
# Genesis in the King James Version (public domain; Debian's bible-kjv, verse numbers removed).
EXAMPLE_TEXT = workspace.ASSETS / "texts" / "genesis-kjv.txt"
EXAMPLE_TITLE = "Genesis (King James Version)"
EXAMPLE_PROMPT = "And the LORD said"


# ----------------------------------------------------------------------------- text input
def decode_text(data: bytes, name: str = "text") -> str:
    """UTF-8 text from an upload or paste, with a message naming the byte offset when it is not UTF-8."""
    if len(data) > MAX_TEXT_BYTES:
        raise UserError(f"{name} is {len(data) / 2**20:.1f} MB; the limit is {MAX_TEXT_BYTES // 2**20} MB per text")
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]  # a UTF-8 byte-order mark
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        bad = data[err.start : err.start + 4].hex(" ")
        hint = "it looks like UTF-16; save it as UTF-8" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else "save it as UTF-8 (e.g. in your editor's Save As dialog)"
        raise UserError(f"{name} is not valid UTF-8: invalid byte(s) {bad} at byte offset {err.start}; {hint}") from None
    if "\x00" in text:
        raise UserError(f"{name} contains NUL characters at offset {text.index(chr(0))}; it looks like a binary file, not text")
    text = text.replace("\r\n", "\n")
    if not text.strip():
        raise UserError(f"{name} is empty")
    return text


def read_text_files(paths: list[str | Path]) -> str:
    """Several .txt files joined with blank lines, each validated by decode_text."""
    parts = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise UserError(f"text file not found: {p}")
        parts.append(decode_text(path.read_bytes(), path.name))
    return "\n\n".join(parts)
