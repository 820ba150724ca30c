"""Canary: the gguf package internals mertools relies on. A gguf release that changes any of them fails here,
in one place, with the name of what moved, instead of somewhere deep in extract.

What mertools uses: `_CheckedReader` subclasses `GGUFReader` and only adds a bounded header walk before
`GGUFReader.__init__(path, "r")`, which must then parse the same header the same way (versions, value type ids,
alignment, recursion once per array nesting level); `field_value` reads `ReaderField.parts/data/types`; the plan
reads `ReaderTensor` fields; dense.py drives `GGUFWriter` with the calls pinned below.
"""

from __future__ import annotations

import inspect
import struct

import gguf
import numpy as np
from gguf import gguf_reader
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType as VT

from mertools.gguf_header import MIN_SIZE, SCALAR_SIZES, SUPPORTED_VERSIONS, scan_header
from mertools.gguf_source import field_value


def test_reader_entry_points():
    sig = inspect.signature(gguf.GGUFReader.__init__)
    assert list(sig.parameters)[:3] == ["self", "path", "mode"], sig
    assert gguf_reader.READER_SUPPORTED_VERSIONS == list(SUPPORTED_VERSIONS)
    assert gguf.ReaderField._fields == ("offset", "name", "parts", "data", "types")
    assert gguf.ReaderTensor._fields == (
        "name", "tensor_type", "shape", "n_elements", "n_bytes", "data_offset", "data", "field")
    # Nesting is parsed by recursion, once per level: the walk's depth limit is what keeps it bounded.
    assert "self._get_field_parts(" in inspect.getsource(gguf.GGUFReader._get_field_parts)


def test_value_type_ids_and_sizes():
    ids = {t.name: int(t) for t in VT}
    assert ids == {"UINT8": 0, "INT8": 1, "UINT16": 2, "INT16": 3, "UINT32": 4, "INT32": 5, "FLOAT32": 6, "BOOL": 7,
                   "STRING": 8, "ARRAY": 9, "UINT64": 10, "INT64": 11, "FLOAT64": 12}
    for t, size in SCALAR_SIZES.items():
        assert np.dtype(gguf.GGUFReader.gguf_scalar_to_np[t]).itemsize == size
    assert set(MIN_SIZE) == set(VT)
    assert GGML_QUANT_SIZES[GGMLQuantizationType.Q4_0] == (32, 18)


def test_writer_calls_used_by_dense():
    w = gguf.GGUFWriter
    for name in ("add_custom_alignment", "add_key_value", "add_tensor_info", "write_header_to_file",
                 "write_kv_data_to_file", "write_ti_data_to_file", "write_tensor_data", "close"):
        assert callable(getattr(w, name, None)), name
    assert list(inspect.signature(w.add_key_value).parameters)[:5] == ["self", "key", "val", "vtype", "sub_type"]
    assert "raw_dtype" in inspect.signature(w.add_tensor_info).parameters


def _s(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b


def test_field_layout(tmp_path):
    """parts/data/types of every kind of value, as field_value and the walk expect them."""
    kvs = [
        _s(b"a.str") + struct.pack("<I", VT.STRING) + _s(b"h\xffi"),
        _s(b"a.u32") + struct.pack("<II", VT.UINT32, 7),
        _s(b"a.strs") + struct.pack("<IIQ", VT.ARRAY, VT.STRING, 2) + _s(b"x") + _s(b"yz"),
        _s(b"a.f32s") + struct.pack("<IIQ", VT.ARRAY, VT.FLOAT32, 3) + struct.pack("<3f", 1, 2, 3),
        _s(b"a.nested") + struct.pack("<IIQ", VT.ARRAY, VT.ARRAY, 2)
        + struct.pack("<IQ", VT.UINT8, 2) + b"\1\2" + struct.pack("<IQ", VT.UINT8, 1) + b"\3",
    ]
    name = b"t"
    head = b"GGUF" + struct.pack("<IQQ", 3, 1, len(kvs)) + b"".join(kvs)
    head += _s(name) + struct.pack("<IQIQ", 1, 32, int(GGMLQuantizationType.F32), 0)
    head += bytes(-len(head) % 32)
    blob = head + np.arange(32, dtype=np.float32).tobytes()
    f = tmp_path / "all.gguf"
    f.write_bytes(blob)
    r = gguf.GGUFReader(f)
    fl = r.fields
    assert fl["a.str"].types == [VT.STRING] and bytes(fl["a.str"].parts[-1]) == b"h\xffi"
    assert field_value(fl["a.str"], raw_strings=True) == b"h\xffi"
    assert field_value(fl["a.u32"]) == 7 and fl["a.u32"].types == [VT.UINT32]
    assert fl["a.strs"].types == [VT.ARRAY, VT.STRING] and field_value(fl["a.strs"]) == ["x", "yz"]
    assert fl["a.f32s"].types == [VT.ARRAY, VT.FLOAT32] and field_value(fl["a.f32s"]) == [1.0, 2.0, 3.0]
    assert fl["a.nested"].types == [VT.ARRAY, VT.ARRAY, VT.UINT8]
    t = r.tensors[0]
    assert (t.name, int(t.data_offset), int(t.n_bytes), t.data.dtype) == ("t", len(head), 128, np.float32)
    h = scan_header(f, blob)  # the walk builds the same type lists and ranges
    assert h.kv_types == {k: v.types for k, v in fl.items() if not k.startswith("GGUF.")}
    assert (h.data_offset, h.tensors[0].start, h.tensors[0].nbytes) == (r.data_offset, t.data_offset, t.n_bytes)
