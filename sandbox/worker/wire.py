"""The wire format between the host and the sandbox worker, and between the worker and each job child.

A frame is a fixed prefix (magic, header length, body length), a JSON header that lists the sizes of the binary
parts, and those parts back to back (`.npy` arrays; `allow_pickle=False` both ways). `encode_fold`/`decode_fold`
carry one fold's data (ndarray, DataFrame or Series with their dtypes, categories, missing values and index).

This is the only module of the worker package the host imports; it needs the standard library and numpy (pandas
lazily), because it also runs inside the sandbox.
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
import sys

import numpy as np

MAGIC = b"EtpW"
_PREFIX = struct.Struct(">4sIQ")  # magic, header length, body length


class ProtocolError(Exception):
    """The peer sent something that is not a well-formed frame."""


# ----------------------------------------------------------------------------------------------------- framing

def encode_frame(header: dict, blobs: list[bytes] = ()) -> bytes:
    """One message: fixed prefix, a JSON header (which lists the blob sizes), then the blobs back to back."""
    header = dict(header, blob_sizes=[len(b) for b in blobs])
    head = json.dumps(header, allow_nan=False).encode()
    body = b"".join(blobs)
    return _PREFIX.pack(MAGIC, len(head), len(body)) + head + body


def read_frame(read_exact, max_header: int = 16 << 20, max_body: int = 1 << 34) -> tuple[dict, list[bytes]]:
    """Read one frame with `read_exact(n) -> bytes`; sizes are checked before anything is allocated."""
    magic, head_len, body_len = _PREFIX.unpack(read_exact(_PREFIX.size))
    if magic != MAGIC:
        raise ProtocolError(f"bad frame magic {magic!r}")
    if head_len > max_header or body_len > max_body:
        raise ProtocolError(f"frame too large (header {head_len} B, body {body_len} B)")
    # The whole frame is read before the header is judged: a stream stays in step even when the header is bad.
    head, body = read_exact(head_len), read_exact(body_len)
    header = loads_bounded(head)
    sizes = header.get("blob_sizes") if isinstance(header, dict) else None
    if not isinstance(sizes, list) or not all(isinstance(s, int) and s >= 0 for s in sizes) or sum(sizes) != body_len:
        raise ProtocolError("frame blob sizes do not match its body")
    blobs, offset = [], 0
    for size in sizes:
        blobs.append(body[offset:offset + size])
        offset += size
    return header, blobs


MAX_JSON_DEPTH = 32  # frames nest a few levels (header -> report -> usage; fold meta -> parts -> categories)
_MAX_INT = 1 << 63


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def loads_bounded(text: bytes):
    """`json.loads` that can only fail with ProtocolError: no NaN or Infinity, integers within 64 bits, nesting at
    most MAX_JSON_DEPTH deep (the C decoder recurses; a deeper document would raise RecursionError, or succeed in
    one process and fail in the next, whose stack is deeper)."""
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError, MemoryError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ProtocolError(f"frame header is not bounded JSON: {type(exc).__name__}: {str(exc)[:200]}") from None
    stack = [(value, 1)]
    while stack:  # iterative: the check itself must not recurse
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            if isinstance(item, int) and not -_MAX_INT <= item < _MAX_INT:
                raise ProtocolError("frame header holds an integer beyond 64 bits")
            continue
        if depth > MAX_JSON_DEPTH:
            raise ProtocolError(f"frame header nests deeper than {MAX_JSON_DEPTH} levels")
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list | int))
    return value


def parse_frame(data: bytes, max_header: int = 16 << 20) -> tuple[dict, list[bytes]]:
    """`read_frame` over a complete byte string; trailing bytes are an error."""
    view = io.BytesIO(data)

    def read_exact(n: int) -> bytes:
        chunk = view.read(n)
        if len(chunk) != n:
            raise ProtocolError("frame is truncated")
        return chunk

    frame = read_frame(read_exact, max_header=max_header, max_body=len(data))
    if view.tell() != len(data):
        raise ProtocolError("trailing bytes after frame")
    return frame


# ------------------------------------------------------------------------------------------------ array codec

def array_to_npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array, allow_pickle=False)
    return out.getvalue()


def npy_to_array(data: bytes) -> np.ndarray:
    """Decode `.npy` bytes; object arrays (which would need pickle) are refused."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def _json_scalar(value):
    """A JSON-safe stand-in for one cell of an object column: None for missing, else a str/bool/int/float."""
    if value is None or value is getattr(_pandas(), "NA", None):
        return None
    if isinstance(value, float | np.floating) and math.isnan(value):
        return None
    if isinstance(value, str | bool | np.bool_):
        return value if isinstance(value, str) else bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else str(value)
    return str(value)


def _pandas():
    import pandas

    return pandas


def encode_data(value, blobs: list[bytes]) -> dict:
    """Describe `value` (ndarray, DataFrame or Series) in JSON, appending binary parts to `blobs`.

    Keeps what a data-science program looks at: dtypes (numeric, bool, datetime, nullable, string, object),
    categoricals with their categories and order, missing values, column names and the index.
    """
    pd = sys.modules.get("pandas")
    if pd is not None and isinstance(value, pd.DataFrame):
        return {"kind": "frame", "index": _encode_index(value.index, blobs), "parts": _encode_parts(value, blobs)}
    if pd is not None and isinstance(value, pd.Series):
        return {"kind": "series", "name": _json_scalar(value.name), "index": _encode_index(value.index, blobs),
                "data": _encode_column(value, blobs)}
    array = np.asarray(value)
    if array.dtype.kind in "biufcmMSU":
        blobs.append(array_to_npy(array))
        return {"kind": "ndarray", "blob": len(blobs) - 1}
    return {"kind": "list", "shape": list(array.shape), "values": [_json_scalar(v) for v in array.ravel().tolist()]}


def _plain(dtype) -> bool:
    """A NumPy dtype whose values are raw numbers (also booleans and datetimes): stored as `.npy`."""
    return isinstance(dtype, np.dtype) and dtype.kind in "biufcmM"


def _encode_parts(frame, blobs: list[bytes]) -> list[dict]:
    """A frame's columns in order; each run of adjacent columns with one plain dtype travels as one 2-D block.

    One `.npy` per block instead of per column: data-science frames are mostly wide runs of floats, and per-column
    headers and Series made encoding plus decoding cost ~15 ms per standard job, most of a step's sandbox overhead.
    """
    dtypes, parts, start = list(frame.dtypes), [], 0
    while start < len(dtypes):
        stop = start + 1
        if _plain(dtypes[start]):
            while stop < len(dtypes) and dtypes[stop] == dtypes[start]:
                stop += 1
            blobs.append(array_to_npy(frame.iloc[:, start:stop].to_numpy()))
            parts.append({"codec": "block", "blob": len(blobs) - 1,
                          "names": [_json_scalar(name) for name in frame.columns[start:stop]]})
        else:
            parts.append(dict(_encode_column(frame.iloc[:, start], blobs), name=_json_scalar(frame.columns[start])))
        start = stop
    return parts


def _encode_index(index, blobs: list[bytes]) -> dict:
    pd = _pandas()
    if isinstance(index, pd.RangeIndex):
        return {"codec": "range", "start": index.start, "stop": index.stop, "step": index.step}
    return _encode_column(index.to_series(), blobs)


def _encode_column(series, blobs: list[bytes]) -> dict:
    pd = _pandas()
    dtype = series.dtype
    if isinstance(dtype, pd.CategoricalDtype):
        codes = series.cat.codes.to_numpy()
        blobs.append(array_to_npy(codes))
        cats = _encode_column(pd.Series(dtype.categories), blobs)
        return {"codec": "category", "codes": len(blobs) - 1, "categories": cats, "ordered": bool(dtype.ordered)}
    if _plain(dtype):
        blobs.append(array_to_npy(series.to_numpy()))
        return {"codec": "npy", "blob": len(blobs) - 1}
    if isinstance(dtype, pd.api.extensions.ExtensionDtype) and getattr(dtype, "numpy_dtype", None) is not None \
            and dtype.numpy_dtype.kind in "biuf" and not isinstance(dtype, pd.StringDtype):
        mask = series.isna().to_numpy()
        blobs.append(array_to_npy(series.to_numpy(dtype=dtype.numpy_dtype, na_value=0)))
        blobs.append(array_to_npy(mask))
        return {"codec": "masked", "dtype": str(dtype), "blob": len(blobs) - 2, "mask": len(blobs) - 1}
    kind = "string" if isinstance(dtype, pd.StringDtype) else "object"
    return {"codec": kind, "dtype": str(dtype), "values": [_json_scalar(v) for v in series.tolist()]}


FOLD_PARTS = ("X_fit", "y_fit", "X_eval")


def encode_fold(X_fit, y_fit, X_eval) -> bytes:
    """One fold as a frame of its own: the worker hands it to that fold's child alone."""
    blobs: list[bytes] = []
    meta = {part: encode_data(value, blobs) for part, value in zip(FOLD_PARTS, (X_fit, np.asarray(y_fit), X_eval))}
    return encode_frame(meta, blobs)


def decode_fold(frame: bytes) -> tuple:
    """Inverse of `encode_fold`: (X_fit, y_fit, X_eval)."""
    meta, blobs = parse_frame(frame)
    return tuple(decode_data(meta[part], blobs) for part in FOLD_PARTS)


def decode_data(meta: dict, blobs: list[bytes]):
    """Inverse of `encode_data`."""
    kind = meta["kind"]
    if kind == "ndarray":
        return npy_to_array(blobs[meta["blob"]])
    if kind == "list":
        return np.array([np.nan if v is None else v for v in meta["values"]], dtype=object).reshape(meta["shape"])
    pd = _pandas()
    index = _decode_index(meta["index"], blobs)
    if kind == "series":
        return pd.Series(_decode_column(meta["data"], blobs), index=index, name=meta["name"])
    parts = meta["parts"]
    if len(parts) == 1 and parts[0]["codec"] == "block":  # the common all-numeric frame: no copy
        return pd.DataFrame(npy_to_array(blobs[parts[0]["blob"]]), index=index, columns=parts[0]["names"])
    names, arrays = [], []
    for part in parts:
        if part["codec"] == "block":
            block = npy_to_array(blobs[part["blob"]])
            names += part["names"]
            arrays += [block[:, j] for j in range(block.shape[1])]
        else:
            names.append(part["name"])
            arrays.append(_decode_column(part, blobs))
    # Positional keys, then the names: duplicate column names survive.
    frame = pd.DataFrame(dict(enumerate(arrays)), index=index)
    frame.columns = pd.Index(names, tupleize_cols=False)
    return frame


def _decode_index(meta: dict, blobs: list[bytes]):
    pd = _pandas()
    if meta["codec"] == "range":
        return pd.RangeIndex(int(meta["start"]), int(meta["stop"]), int(meta["step"]))
    return pd.Index(_decode_column(meta, blobs))


def _decode_column(meta: dict, blobs: list[bytes]):
    pd = _pandas()
    codec = meta["codec"]
    if codec == "npy":
        return npy_to_array(blobs[meta["blob"]])
    if codec == "category":
        categories = pd.Index(_decode_column(meta["categories"], blobs))
        codes = npy_to_array(blobs[meta["codes"]])
        return pd.Categorical.from_codes(codes, categories=categories, ordered=meta["ordered"])
    if codec == "masked":
        values = npy_to_array(blobs[meta["blob"]])
        mask = npy_to_array(blobs[meta["mask"]])
        array = pd.array(values, dtype=meta["dtype"])
        array[mask] = pd.NA
        return array
    values = meta["values"]
    if codec == "string":
        return pd.array(values, dtype=meta["dtype"])
    return np.array([np.nan if v is None else v for v in values], dtype=object)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def fd_reader(fd: int):
    """`read_exact(n)` over a blocking file descriptor; EOFError when the writer closes before any byte came."""
    def read_exact(n: int) -> bytes:
        chunks, got = [], 0
        while got < n:
            chunk = os.read(fd, min(n - got, 1 << 20))
            if not chunk:
                raise EOFError if got == 0 else ProtocolError("job frame truncated")
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    return read_exact
