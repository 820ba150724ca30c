#!/usr/bin/env python3
"""Write the tiny deterministic GGUF fixtures under fixtures/generated/ with the gguf package's writer.

Every MoE fixture but the K-quant one holds the same expert weights (seeded), so the layouts can be checked
against each other byte for byte. Run it again and the files come out identical.

    python scripts/make_fixtures.py [--out fixtures/generated]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import gguf
import numpy as np
from gguf.constants import GGMLQuantizationType as T
from gguf.quants import quantize

SEED = 20261128
H, F, E, VOCAB = 64, 96, 4, 32  # d_model, expert d_ff (non-square to catch transposes), experts, vocab
MOE_LAYERS = (1, 2)  # block 0 is a dense FFN layer, as in DeepSeek's first_k_dense_replace
TOKENS = [b"<unk>", b"<s>", b"</s>", b"hello", b"\xff\xfe not utf-8"] + [f"t{i}".encode() for i in range(VOCAB - 5)]


def rng_for(*key: int) -> np.random.Generator:
    return np.random.default_rng([SEED, *key])


def weights(layer: int, expert: int, role: str, h: int = H, f: int = F) -> np.ndarray:
    """float32 [out, in] for one projection, the same whatever the layout it is written in."""
    shape = (f, h) if role in ("gate", "up") else (h, f)
    return (rng_for(layer, expert, ("gate", "up", "down").index(role)).standard_normal(shape) * 0.02).astype(np.float32)


def bias(layer: int, expert: int, role: str) -> np.ndarray:
    n = H if role == "down" else F
    return (rng_for(layer, expert, 10 + ("gate", "up", "down").index(role)).standard_normal(n) * 0.02).astype(np.float32)


def encode(a: np.ndarray, qtype: T) -> tuple[np.ndarray, T | None]:
    if qtype == T.F32:
        return a.astype(np.float32), None
    if qtype == T.F16:
        return a.astype(np.float16), None
    return quantize(a, qtype), qtype


def base_writer(path: Path, arch: str = "llama", **kw) -> gguf.GGUFWriter:
    w = gguf.GGUFWriter(path, arch, **kw)
    w.add_name("mertools-fixture")
    w.add_block_count(3)
    w.add_context_length(128)
    w.add_embedding_length(H)
    w.add_feed_forward_length(F)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_expert_count(E)
    w.add_expert_used_count(2)
    w.add_tokenizer_model("llama")
    w.add_token_list(TOKENS)  # one token is not valid UTF-8: the dense copy must keep its bytes
    w.add_token_scores([float(-i) for i in range(VOCAB)])
    w.add_uint32("mertools.fixture.seed", SEED)
    return w


def add_common(w: gguf.GGUFWriter, moe_layers=MOE_LAYERS, router=True) -> None:
    r = rng_for(999)
    w.add_tensor("token_embd.weight", (r.standard_normal((VOCAB, H)) * 0.02).astype(np.float16))
    w.add_tensor("output_norm.weight", np.ones(H, np.float32))
    for b in range(3):
        w.add_tensor(f"blk.{b}.attn_norm.weight", np.ones(H, np.float32))
        w.add_tensor(f"blk.{b}.attn_q.weight", (r.standard_normal((H, H)) * 0.02).astype(np.float16))
        w.add_tensor(f"blk.{b}.ffn_norm.weight", np.ones(H, np.float32))
        if b not in moe_layers:
            for role in ("gate", "up", "down"):
                w.add_tensor(f"blk.{b}.ffn_{role}.weight", weights(b, 99, role).astype(np.float16))
        elif router:
            w.add_tensor(f"blk.{b}.ffn_gate_inp.weight", (r.standard_normal((E, H)) * 0.1).astype(np.float32))


def finish(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def merged(path: Path, qtype: T, *, split_max_tensors: int = 0) -> None:
    w = base_writer(path, split_max_tensors=split_max_tensors)
    add_common(w)
    for b in MOE_LAYERS:
        for role in ("gate", "up", "down"):
            data, raw = encode(np.stack([weights(b, e, role) for e in range(E)]), qtype)
            w.add_tensor(f"blk.{b}.ffn_{role}_exps.weight", data, raw_dtype=raw)
    finish(w)


def fused(path: Path, qtype: T) -> None:
    w = base_writer(path)
    add_common(w)
    for b in MOE_LAYERS:
        gate_up = np.stack([np.concatenate([weights(b, e, "gate"), weights(b, e, "up")]) for e in range(E)])
        data, raw = encode(gate_up, qtype)
        w.add_tensor(f"blk.{b}.ffn_gate_up_exps.weight", data, raw_dtype=raw)
        data, raw = encode(np.stack([weights(b, e, "down") for e in range(E)]), qtype)
        w.add_tensor(f"blk.{b}.ffn_down_exps.weight", data, raw_dtype=raw)
    finish(w)


def per_expert(path: Path, qtype: T) -> None:
    w = base_writer(path)
    add_common(w)
    for b in MOE_LAYERS:
        for e in range(E):  # interleaved with other tensors so experts are not contiguous in the file
            for role in ("gate", "down", "up"):
                data, raw = encode(weights(b, e, role), qtype)
                w.add_tensor(f"blk.{b}.ffn_{role}.{e}.weight", data, raw_dtype=raw)
    finish(w)


def gptoss_biases(path: Path) -> None:
    """GPT-OSS-style: MXFP4 merged experts with F32 expert biases and a router bias."""
    w = base_writer(path, arch="gpt-oss")
    add_common(w)
    for b in MOE_LAYERS:
        w.add_tensor(f"blk.{b}.ffn_gate_inp.bias", np.zeros(E, np.float32))
        for role in ("gate", "up", "down"):
            data, raw = encode(np.stack([weights(b, e, role) for e in range(E)]), T.MXFP4)
            w.add_tensor(f"blk.{b}.ffn_{role}_exps.weight", data, raw_dtype=raw)
            w.add_tensor(f"blk.{b}.ffn_{role}_exps.bias", np.stack([bias(b, e, role) for e in range(E)]))
    finish(w)


def kquant_block_bytes(r: np.random.Generator, qtype: T, n_blocks: int) -> np.ndarray:
    """Random but valid K-quant blocks: every f16 scale finite and small (gguf cannot quantize K-quants)."""
    _, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = r.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)

    def f16(n: int) -> np.ndarray:
        return (r.uniform(1e-4, 2e-3, n)).astype(np.float16).view(np.uint8).reshape(n, 2)

    if qtype == T.Q4_K:  # d, dmin first
        raw[:, 0:2], raw[:, 2:4] = f16(n_blocks), f16(n_blocks)
    elif qtype == T.Q6_K:  # d last
        raw[:, -2:] = f16(n_blocks)
    else:
        raise ValueError(qtype)
    return raw


def kquants(path: Path) -> None:
    """Q4_K gate/up and Q6_K down (the Q4_K_M mix), rows of 256 as K-quants need."""
    h = f = 256
    w = gguf.GGUFWriter(path, "qwen3moe")
    w.add_block_count(2)
    w.add_embedding_length(h)
    w.add_expert_feed_forward_length(f)
    w.add_expert_count(E)
    w.add_expert_used_count(2)
    r = rng_for(4242)
    for b in range(2):
        w.add_tensor(f"blk.{b}.ffn_gate_inp.weight", (r.standard_normal((E, h)) * 0.1).astype(np.float32))
        for role, qt in (("gate", T.Q4_K), ("up", T.Q4_K), ("down", T.Q6_K)):
            rows = f if role != "down" else h
            blocks = kquant_block_bytes(r, qt, E * rows * (h if role != "down" else f) // 256)
            w.add_tensor(f"blk.{b}.ffn_{role}_exps.weight", blocks.reshape(E, rows, -1), raw_dtype=qt)
    finish(w)


def dense_model(path: Path) -> None:
    """A plain (non-MoE) model: extract must refuse it."""
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(3)
    w.add_embedding_length(H)
    r = rng_for(7)
    w.add_tensor("token_embd.weight", (r.standard_normal((VOCAB, H)) * 0.02).astype(np.float16))
    for b in range(3):
        for role in ("gate", "up", "down"):
            data, raw = encode(weights(b, 0, role), T.Q8_0)
            w.add_tensor(f"blk.{b}.ffn_{role}.weight", data, raw_dtype=raw)
    finish(w)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "fixtures" / "generated")
    out = ap.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    for qt in (T.Q4_0, T.Q8_0, T.F16, T.BF16, T.F32, T.MXFP4):
        merged(out / f"moe-merged-{qt.name.lower()}.gguf", qt)
    for qt in (T.Q4_0, T.F16):
        per_expert(out / f"moe-perexpert-{qt.name.lower()}.gguf", qt)
    fused(out / "moe-fused-q8_0.gguf", T.Q8_0)
    merged(out / "moe-split-q4_0.gguf", T.Q4_0, split_max_tensors=4)
    gptoss_biases(out / "moe-gptoss-mxfp4-bias.gguf")
    kquants(out / "moe-q4_k-q6_k.gguf")
    dense_model(out / "dense-llama-q8_0.gguf")
    from importlib.metadata import version

    (out / "WRITTEN_WITH").write_text(f"gguf {version('gguf')}\n")
    for p in sorted(out.glob("*.gguf")):
        print(f"{p.stat().st_size:9d}  {p.name}")


if __name__ == "__main__":
    main()
