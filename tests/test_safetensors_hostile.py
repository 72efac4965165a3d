"""The safetensors reader against hostile files: named errors for every malformed header or layout, and a
seeded fuzz run (random headers, offsets and truncations) that never raises anything but CheckpointError and
never returns bytes outside a tensor's own range."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from common.safetensors_io import DTYPES, CheckpointError, SafetensorsFile, write_safetensors

FUZZ_CASES = 3000


def raw_file(path: Path, header: object, data: bytes, hlen: int | None = None) -> Path:
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(hb) if hlen is None else hlen) + hb + data)
    return path


def base_header() -> tuple[dict, bytes]:
    """Two float32 tensors back to back: a [2, 3] (24 bytes) then b [4] (16 bytes)."""
    data = np.arange(10, dtype=np.float32).tobytes()
    return {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
            "b": {"dtype": "F32", "shape": [4], "data_offsets": [24, 40]}}, data


def refused(path: Path, *needles: str) -> None:
    with pytest.raises(CheckpointError) as e:
        SafetensorsFile(path)
    for n in needles:
        assert n in str(e.value), (n, str(e.value))


@pytest.mark.parametrize("mutate, needles", [
    (lambda h: h["b"].update(data_offsets=[-16, 0]), ("'b'", "0 <= begin")),
    (lambda h: h["b"].update(data_offsets=[8, 24]), ("'b'", "overlaps")),
    (lambda h: h["a"].update(data_offsets=[8, 32]) or h["b"].update(data_offsets=[0, 16]), ("'a'", "overlaps")),
    (lambda h: h["b"].update(data_offsets=[32, 48]), ("'b'", "truncated")),
    (lambda h: h["b"].update(data_offsets=[24, 36], shape=[3]), ("bytes after the last tensor", "'b'")),
    (lambda h: h["b"].update(data_offsets=["24", "40"]), ("'b'", "data_offsets", "pair of integers")),
    (lambda h: h["b"].update(data_offsets=[24.0, 40.0]), ("'b'", "pair of integers")),
    (lambda h: h["b"].update(data_offsets=[24, 40, 56]), ("'b'", "pair of integers")),
    (lambda h: h["a"].update(shape=[2, -3]), ("'a'", "non-negative")),
    (lambda h: h["a"].update(shape=[2, 4]), ("'a'", "spans 24 bytes", "need 32")),
    (lambda h: h["a"].update(dtype="F33"), ("'a'", "unsupported dtype")),
    (lambda h: h["a"].update(extra=1), ("'a'", "dtype, shape and data_offsets")),
    (lambda h: h.update(c="x"), ("'c'", "header entry")),
    (lambda h: h.update(__metadata__={"k": 1}), ("__metadata__",)),
])
def test_malformed_layouts_are_named(tmp_path, mutate, needles):
    h, data = base_header()
    mutate(h)
    refused(raw_file(tmp_path / "m.safetensors", h, data), *needles)


def test_offsets_shifted_into_the_header_are_refused(tmp_path):
    """The issue's case: offsets moved so a tensor's bytes would come from the header."""
    f = tmp_path / "m.safetensors"
    write_safetensors(f, {"w": np.ones((4, 4), np.float32), "z": np.zeros(8, np.float32)})
    raw = f.read_bytes()
    (hlen,) = struct.unpack("<Q", raw[:8])
    h = json.loads(raw[8:8 + hlen])
    h["w"]["data_offsets"] = [-40, 24]
    raw_file(f, h, raw[8 + hlen:])
    refused(f, "'w'")


@pytest.mark.parametrize("header, needle", [
    ([1, 2, 3], "a JSON list"),
    ("text", "a JSON str"),
    (b"{\"a\": {", "corrupt safetensors header"),
    (b"\xff\xfe{}", "corrupt safetensors header"),
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": '
     b'{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', "appears twice"),
])
def test_header_that_is_not_an_object_of_entries(tmp_path, header, needle):
    refused(raw_file(tmp_path / "m.safetensors", header, b"\0" * 4), needle)


def test_header_length_beyond_the_file(tmp_path):
    h, data = base_header()
    refused(raw_file(tmp_path / "m.safetensors", h, data, hlen=10**6), "truncated or not safetensors")


def test_a_valid_file_still_reads(tmp_path):
    f = tmp_path / "m.safetensors"
    tensors = {"x": np.arange(6, dtype=np.float32).reshape(2, 3), "e": np.zeros((0, 3), np.float32),
               "i": np.arange(5, dtype=np.int8)}
    write_safetensors(f, tensors, {"format": "pt"})
    st = SafetensorsFile(f)
    for k, v in tensors.items():
        np.testing.assert_array_equal(st.get(k), v)
    assert st.metadata == {"format": "pt"}


def test_a_fifo_is_named_as_such(tmp_path):
    import os

    fifo = tmp_path / "m.safetensors"
    os.mkfifo(fifo)
    refused(fifo, "not a regular file")


# ---- fuzz ------------------------------------------------------------------------------------------------

_NAMES = ["a", "b", "c", "layers.0.w", "__metadata__", ""]
_DT = list(DTYPES)


def _random_value(rng: np.random.Generator, depth: int = 0) -> object:
    k = int(rng.integers(0, 9 if depth < 3 else 6))
    if k == 6:
        return [_random_value(rng, depth + 1) for _ in range(rng.integers(0, 4))]
    if k == 7:
        return {_NAMES[rng.integers(len(_NAMES))]: _random_value(rng, depth + 1) for _ in range(rng.integers(0, 3))}
    if k == 8:
        return [int(rng.integers(-64, 128)) for _ in range(2)]
    return [None, True, int(rng.integers(-2**40, 2**40)), float(rng.normal()), "s", "F32"][k]


def _case(rng: np.random.Generator) -> tuple[object, bytes, int | None]:
    """A header (mostly near-valid), a data buffer and an optional wrong header length."""
    n = int(rng.integers(0, 5))
    header: dict[str, object] = {}
    off = 0
    for i in range(n):
        dt = _DT[rng.integers(len(_DT))]
        shape = [int(s) for s in rng.integers(0, 4, size=rng.integers(0, 3))]
        size = int(np.prod(shape, dtype=np.int64)) * DTYPES[dt].itemsize
        header[f"t{i}"] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + size]}
        off += size
    data = rng.integers(0, 256, size=off, dtype=np.uint8).tobytes()
    kind = rng.integers(0, 10)
    names = [k for k in header]
    if kind == 0:
        header = _random_value(rng)  # anything at all
    elif kind in (1, 2, 3) and names:  # offsets moved, swapped, negative, huge, mistyped
        t = header[names[rng.integers(len(names))]]
        b, e = t["data_offsets"]
        choice = rng.integers(0, 6)
        if choice == 0:
            d = int(rng.integers(-64, 64))
            t["data_offsets"] = [b + d, e + d]
        elif choice == 1:
            t["data_offsets"] = [e, b]
        elif choice == 2:
            t["data_offsets"] = [int(rng.integers(-2**63, 2**63)), int(rng.integers(-2**63, 2**63))]
        elif choice == 3:
            t["data_offsets"] = _random_value(rng)
        elif choice == 4:
            t["data_offsets"] = [b, e + int(rng.integers(-8, 9))]
        else:
            other = header[names[rng.integers(len(names))]]
            t["data_offsets"], other["data_offsets"] = other["data_offsets"], t["data_offsets"]
    elif kind == 4 and names:  # shape / dtype changed under fixed offsets
        t = header[names[rng.integers(len(names))]]
        if rng.integers(0, 2):
            t["shape"] = _random_value(rng) if rng.integers(0, 3) == 0 else \
                [int(s) for s in rng.integers(-2, 2**20, size=rng.integers(0, 4))]
        else:
            t["dtype"] = _DT[rng.integers(len(_DT))] if rng.integers(0, 3) else _random_value(rng)
    elif kind == 5:  # truncated or padded data
        cut = int(rng.integers(0, len(data) + 1)) if data else 0
        data = data[:cut] if rng.integers(0, 2) else data + bytes(int(rng.integers(1, 16)))
    elif kind == 6 and names:  # an entry replaced by junk
        header[names[rng.integers(len(names))]] = _random_value(rng)
    elif kind == 7:
        header["__metadata__"] = _random_value(rng)
    raw = json.dumps(header).encode()
    hlen = None
    if kind == 8:  # corrupted header bytes
        raw = bytearray(raw)
        for _ in range(int(rng.integers(1, 4))):
            if raw:
                raw[int(rng.integers(len(raw)))] = int(rng.integers(0, 256))
        raw = bytes(raw)
    elif kind == 9:  # header length field that lies
        hlen = int(rng.integers(0, 2**64, dtype=np.uint64)) if rng.integers(0, 2) else \
            max(0, len(raw) + int(rng.integers(-8, 9)))
    return raw, data, hlen


def test_fuzz_reader_never_crashes_and_never_reads_outside_a_tensor(tmp_path):
    rng = np.random.default_rng(20261126)
    f = tmp_path / "f.safetensors"
    opened = refused_n = 0
    for case in range(FUZZ_CASES):
        raw, data, hlen = _case(rng)
        raw_file(f, raw, data, hlen)
        try:
            st = SafetensorsFile(f)
        except CheckpointError:
            refused_n += 1
            continue
        except Exception as e:  # pragma: no cover - the failure this test exists to catch
            pytest.fail(f"case {case}: {type(e).__name__}: {e} (header {raw[:200]!r})")
        opened += 1
        blob = f.read_bytes()
        spans = []
        for name, info in st.tensors.items():
            assert 0 <= info.begin <= info.end <= len(blob) - st.data_start, (case, name)
            arr = st.get(name)
            assert arr.nbytes == info.end - info.begin, (case, name)
            assert arr.tobytes() == blob[st.data_start + info.begin:st.data_start + info.end], (case, name)
            spans.append((info.begin, info.end))
        spans.sort()
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False)), (case, spans)
        st.close()
    # the generator must exercise both sides: enough valid files read, enough hostile ones refused
    assert opened > FUZZ_CASES // 10 and refused_n > FUZZ_CASES // 3, (opened, refused_n)
