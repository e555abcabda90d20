"""Untrusted safetensors files checked before anything reads them: the header's size, JSON, dtypes
and offsets, and the total size, so a hostile upload is refused with a reason instead of loaded."""
from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

from engine.core.errors import UserError

log = logging.getLogger(__name__)


DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
MAX_HEADER_BYTES = 10 * 2**20
MAX_MODEL_BYTES = 1024 * 2**20
MAX_JSON_BYTES = 2**20


# ============================================================================= safetensors checks
def check_safetensors_header(path_or_bytes: Path | bytes) -> dict:
    """Parse and check a safetensors header without trusting it; return {name: (dtype, shape)}.

    Format: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape,
    data_offsets: [begin, end]}, "__metadata__": {str: str}}, then the data. A lying header
    (sizes that do not add up, ranges outside the file, overlaps, absurd header sizes) is refused.
    """
    if isinstance(path_or_bytes, (bytes, bytearray)):
        total = len(path_or_bytes)
        head = bytes(path_or_bytes[:8])
        read_header = lambda n: bytes(path_or_bytes[8:8 + n])  # noqa: E731
        name = "upload"
    else:
        p = Path(path_or_bytes)
        if not p.is_file():
            raise UserError(f"weights file not found: {p}")
        name, total = p.name, p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            header_bytes = f.read(min(n, MAX_HEADER_BYTES)) if n else b""
        read_header = lambda n: header_bytes  # noqa: E731
    if len(head) < 8:
        raise UserError(f"{name}: not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", head)
    if n == 0 or n > MAX_HEADER_BYTES or 8 + n > total:
        raise UserError(f"{name}: not a safetensors file (bad header length {n})")
    try:
        header = json.loads(read_header(n).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{name}: not a safetensors file (header is not JSON; pickle checkpoints are refused)") from None
    if not isinstance(header, dict):
        raise UserError(f"{name}: bad safetensors header")
    data_len = total - 8 - n
    out, ranges = {}, []
    for key, spec in header.items():
        if key == "__metadata__":
            if not isinstance(spec, dict) or not all(isinstance(v, str) for v in spec.values()):
                raise UserError(f"{name}: bad safetensors metadata")
            continue
        try:
            dtype, shape, (begin, end) = spec["dtype"], spec["shape"], spec["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{name}: bad safetensors entry for {key!r}") from None
        if dtype not in DTYPE_BYTES:
            raise UserError(f"{name}: tensor {key!r} has unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and 0 <= d < 2**31 for d in shape):
            raise UserError(f"{name}: tensor {key!r} has a bad shape {shape!r}")
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= data_len):
            raise UserError(f"{name}: tensor {key!r} points outside the file (a truncated or lying header)")
        numel = 1
        for d in shape:
            numel *= d
        if numel * DTYPE_BYTES[dtype] != end - begin:
            raise UserError(f"{name}: tensor {key!r} header says {shape} {dtype} but has {end - begin} bytes")
        ranges.append((begin, end, key))
        out[key] = (dtype, tuple(shape))
    ranges.sort()
    for (b1, e1, k1), (b2, e2, k2) in zip(ranges, ranges[1:]):
        if b2 < e1:
            raise UserError(f"{name}: tensors {k1!r} and {k2!r} overlap in the file")
    if not out:
        raise UserError(f"{name}: the safetensors file holds no tensors")
    return out


def safetensors_metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})
