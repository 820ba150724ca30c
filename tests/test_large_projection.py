"""Projections larger than the 256 KiB hash piece and the 4 MiB copy segment, extracted and read through every
loader (several chunks per projection, chunks that straddle projections), checked against NumPy float64."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from mer_runtime import open_shards, uring
from mer_runtime.loader import BACKENDS

H, F, E = 1024, 2304, 2  # F16 gate/up/down: 1024 x 2304 x 2 bytes = 4.5 MiB each, past 4 MiB and 256 KiB

BACKEND_PARAMS = [
    pytest.param(b, marks=pytest.mark.skipif(b == "io_uring" and uring.probe() is not None,
                                             reason=f"io_uring refused here: {uring.probe()}"))
    for b in BACKENDS
]


def weights(e: int, role: str) -> np.ndarray:
    shape = (F, H) if role in ("gate", "up") else (H, F)
    r = np.random.default_rng([7, e, ("gate", "up", "down").index(role)])
    return (r.standard_normal(shape) * 0.02).astype(np.float16)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    from mertools import extract

    d = tmp_path_factory.mktemp("big")
    src = d / "big.gguf"
    w = gguf.GGUFWriter(src, "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(H)
    w.add_feed_forward_length(F)
    w.add_head_count(8)
    w.add_head_count_kv(8)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_expert_count(E)
    w.add_expert_used_count(1)
    w.add_tensor("output_norm.weight", np.ones(H, np.float32))
    for role in ("gate", "up", "down"):
        w.add_tensor(f"blk.0.ffn_{role}_exps.weight", np.stack([weights(e, role) for e in range(E)]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out = d / "out"
    extract(src, out, fsync=False)
    return out


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("block_size", [1 << 20, 3 << 20])
def test_large_projections_through_every_loader(big, backend, block_size):
    x = np.random.default_rng(3).standard_normal(H).astype(np.float32)
    with open_shards(big, io=backend, cache_slots=2, block_size=block_size, checksums="always") as s:
        for e in range(E):
            with s.load(0, e) as ex:
                for role in ("gate", "up", "down"):
                    assert ex.tensors[role].raw.nbytes > 4 << 20
                    assert ex.tensors[role].raw.tobytes() == weights(e, role).tobytes()
            g, u, dn = (weights(e, r).astype(np.float64) for r in ("gate", "up", "down"))
            a = g @ x
            ref = dn @ (a / (1 + np.exp(-a)) * (u @ x))
            got = s.ffn(0, e, x)
            assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-5
