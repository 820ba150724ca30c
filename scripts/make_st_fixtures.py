#!/usr/bin/env python3
"""Write the tiny deterministic SafeTensors checkpoints under fixtures/safetensors/gen/ with the safetensors library.

One folder per expert layout of ``mertools/sources/layouts.py`` (config.json + model.safetensors, or an index and
shards), as ``save_pretrained`` lays them out: the tensor names, shapes and storage orders are those of each
model's Hugging Face checkpoints (``../shared/notes/formats.md`` section 3). Weights are seeded random; run it
again and the files come out identical. Needs ``ml_dtypes`` for BF16 and FP8 (``pip install ml_dtypes``).

    python scripts/make_st_fixtures.py [--out fixtures/safetensors/gen]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any, Callable

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

SEED = 20261129
H, F, E, VOCAB = 64, 32, 2, 16  # d_model, expert width (non-square, to catch transposes), experts, vocab
BF16 = ml_dtypes.bfloat16


def rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([SEED, *key])


def w(shape: tuple[int, ...], *key: int, dtype: Any = BF16) -> np.ndarray:
    return (rng(*key).standard_normal(shape) * 0.02).astype(np.float32).astype(dtype)


def dense_common(prefix: str, layers: int, dtype: Any = BF16, embed: str = "model.embed_tokens.weight",
                 norm: str = "model.norm.weight") -> dict[str, np.ndarray]:
    t = {embed: w((VOCAB, H), 900, dtype=dtype), norm: np.ones(H, np.float32).astype(dtype)}
    for layer in range(layers):
        p = prefix.format(layer=layer)
        t[p + "input_layernorm.weight"] = np.ones(H, np.float32).astype(dtype)
        t[p + "self_attn.k_proj.weight"] = w((8, H), 901, layer, dtype=dtype)
    return t


def per_expert(prefix: str, stem: str, names: tuple[str, str, str], layers: list[int], n_exp: int = E,
               dtype: Any = BF16, f: int = F, h: int = H) -> dict[str, np.ndarray]:
    t = {}
    for layer in layers:
        for e in range(n_exp):
            for r, (name, shape) in enumerate(zip(names, ((f, h), (f, h), (h, f)))):
                t[prefix.format(layer=layer) + f"{stem}{e}.{name}"] = w(shape, layer, e, r, dtype=dtype)
    return t


def cfg(model_type: str, layers: int, **kw: Any) -> dict[str, Any]:
    c = {"model_type": model_type, "hidden_size": H, "num_hidden_layers": layers, "vocab_size": VOCAB,
         "num_attention_heads": 4, "torch_dtype": "bfloat16"}
    c.update(kw)
    return c


P = "model.layers.{layer}."
MIX = ("w1.weight", "w3.weight", "w2.weight")
MLP = ("gate_proj.weight", "up_proj.weight", "down_proj.weight")


def mixtral_like(model_type: str, dtype: Any = BF16, **kw: Any) -> Callable[[], tuple[dict, dict]]:
    def make() -> tuple[dict, dict]:
        t = dense_common(P, 2, dtype)
        t.update(per_expert(P, "block_sparse_moe.experts.", MIX, [0, 1], dtype=dtype))
        for layer in range(2):
            t[P.format(layer=layer) + "block_sparse_moe.gate.weight"] = w((E, H), 50, layer, dtype=dtype)
            if model_type == "minimax_m2":
                t[P.format(layer=layer) + "block_sparse_moe.e_score_correction_bias"] = w((E,), 51, layer,
                                                                                          dtype=np.float32)
        return cfg(model_type, 2, num_local_experts=E, num_experts_per_tok=2, intermediate_size=F, **kw), t
    return make


def qwen_like(model_type: str, shared: bool, count_key: str = "num_experts", block: str = "mlp",
              selection: str | None = None, dense_first: int = 0, mtp: int = 0,
              moe_layers: list[int] | None = None, n_layers: int = 2, **kw: Any) -> Callable[[], tuple[dict, dict]]:
    def make() -> tuple[dict, dict]:
        layers = moe_layers if moe_layers is not None else list(range(dense_first, n_layers + mtp))
        t = dense_common(P, n_layers)
        t.update(per_expert(P, f"{block}.experts.", MLP, layers))
        for layer in range(n_layers + mtp):
            p = P.format(layer=layer)
            if layer not in layers:
                for r, (name, shape) in enumerate(zip(MLP, ((F, H), (F, H), (H, F)))):
                    t[p + f"{block}.{name}"] = w(shape, 60, layer, r)  # a dense FFN layer
                continue
            t[p + (f"{block}.router.weight" if block == "feed_forward" else f"{block}.gate.weight")] = \
                w((E, H), 50, layer)
            if selection:
                t[p + selection] = w((1, E) if "moe_statics" in selection else (E,), 51, layer, dtype=np.float32)
            if shared:
                sh = "mlp.shared_expert." if model_type.startswith("qwen") else "mlp.shared_experts."
                for r, (name, shape) in enumerate(zip(MLP, ((F, H), (F, H), (H, F)))):
                    t[p + sh + name] = w(shape, 70, layer, r)
                if model_type.startswith("qwen"):
                    t[p + "mlp.shared_expert_gate.weight"] = w((1, H), 71, layer)
        c = cfg(model_type, n_layers, num_experts_per_tok=2, moe_intermediate_size=F, **kw)
        c[count_key] = E
        if dense_first:
            c["first_k_dense_replace"] = dense_first
        if mtp:
            c["num_nextn_predict_layers"] = mtp
        if shared:
            c["n_shared_experts" if not model_type.startswith("qwen") else "shared_expert_intermediate_size"] = \
                1 if not model_type.startswith("qwen") else F
        return c, t
    return make


def fused_rows(model_type: str, stem: str = "mlp.experts.", gate_up: str = "gate_up_proj", down: str = "down_proj",
               router: str = "mlp.gate.weight", per_expert_layer: int | None = None,
               **kw: Any) -> Callable[[], tuple[dict, dict]]:
    """[E, 2F, H] gate rows first + [E, H, F]; optionally one per-expert layer (Qwen3.5 mixes them)."""
    def make() -> tuple[dict, dict]:
        t = dense_common(P, 2)
        for layer in range(2):
            p = P.format(layer=layer)
            t[p + router] = w((E, H), 50, layer)
            if layer == per_expert_layer:
                t.update({k: v for k, v in per_expert(P, "mlp.experts.", MLP, [layer]).items()})
                continue
            t[p + stem + gate_up] = w((E, 2 * F, H), layer, 1)
            t[p + stem + down] = w((E, H, F), layer, 2)
        return cfg(model_type, 2, num_experts=E, num_local_experts=E, num_experts_per_tok=2,
                   moe_intermediate_size=F, **kw), t
    return make


def input_major(model_type: str, prefix: str, block: str, router: str, wrap: bool) -> Callable[[], tuple[dict, dict]]:
    """Llama 4 / Qwen3-VL-MoE: gate_up [E, H, 2F] (gate = first F columns), down [E, F, H]."""
    def make() -> tuple[dict, dict]:
        t = dense_common(prefix, 2, embed=prefix.split("layers")[0] + "embed_tokens.weight",
                         norm=prefix.split("layers")[0] + "norm.weight")
        for layer in range(2):
            p = prefix.format(layer=layer)
            t[p + router] = w((E, H), 50, layer)
            t[p + f"{block}.experts.gate_up_proj"] = w((E, H, 2 * F), layer, 1)
            t[p + f"{block}.experts.down_proj"] = w((E, F, H), layer, 2)
            if model_type == "llama4":
                for r, (name, shape) in enumerate(zip(MLP, ((F, H), (F, H), (H, F)))):
                    t[p + f"{block}.shared_expert.{name}"] = w(shape, 70, layer, r)
        text = {"model_type": model_type + ("_text" if model_type == "llama4" else "_text"), "hidden_size": H,
                "num_hidden_layers": 2, "num_local_experts" if model_type == "llama4" else "num_experts": E,
                "num_experts_per_tok": 1 if model_type == "llama4" else 2,
                "intermediate_size" if model_type == "llama4" else "moe_intermediate_size": F}
        c = {"model_type": model_type, "text_config": text} if wrap else text
        return c, t
    return make


def granite() -> tuple[dict, dict]:
    t = dense_common(P, 2)
    for layer in range(2):
        p = P.format(layer=layer)
        t[p + "block_sparse_moe.router.layer.weight"] = w((E, H), 50, layer)
        t[p + "block_sparse_moe.input_linear.weight"] = w((E, 2 * F, H), layer, 1)
        t[p + "block_sparse_moe.output_linear.weight"] = w((E, H, F), layer, 2)
        t[p + "shared_mlp.input_linear.weight"] = w((2 * F, H), 70, layer)
        t[p + "shared_mlp.output_linear.weight"] = w((H, F), 71, layer)
    return cfg("granitemoeshared", 2, num_local_experts=E, num_experts_per_tok=2, intermediate_size=F,
               shared_intermediate_size=F), t


def dbrx() -> tuple[dict, dict]:
    pre = "transformer.blocks.{layer}."
    t = {"transformer.wte.weight": w((VOCAB, H), 900), "transformer.norm_f.weight": np.ones(H, np.float32).astype(BF16)}
    for layer in range(2):
        p = pre.format(layer=layer)
        t[p + "norm_attn_norm.attn.Wqkv.weight"] = w((24, H), 901, layer)
        t[p + "ffn.router.layer.weight"] = w((E, H), 50, layer)
        t[p + "ffn.experts.mlp.w1"] = w((E * F, H), layer, 1)
        t[p + "ffn.experts.mlp.v1"] = w((E * F, H), layer, 2)
        t[p + "ffn.experts.mlp.w2"] = w((E * F, H), layer, 3)  # per expert [F, H] = [in, out]
    return {"model_type": "dbrx", "d_model": H, "n_layers": 2, "vocab_size": VOCAB,
            "ffn_config": {"moe_num_experts": E, "moe_top_k": 2, "ffn_hidden_size": F}}, t


def gpt_oss_bf16() -> tuple[dict, dict]:
    t = dense_common(P, 2)
    for layer in range(2):
        p = P.format(layer=layer)
        t[p + "mlp.router.weight"] = w((E, H), 50, layer)
        t[p + "mlp.router.bias"] = w((E,), 51, layer)
        t[p + "mlp.experts.gate_up_proj"] = w((E, H, 2 * F), layer, 1)  # input-major, gate/up interleaved columns
        t[p + "mlp.experts.gate_up_proj_bias"] = w((E, 2 * F), layer, 2)
        t[p + "mlp.experts.down_proj"] = w((E, F, H), layer, 3)
        t[p + "mlp.experts.down_proj_bias"] = w((E, H), layer, 4)
    return cfg("gpt_oss", 2, num_local_experts=E, num_experts_per_tok=2, intermediate_size=F, swiglu_limit=7.0), t


def gpt_oss_mxfp4() -> tuple[dict, dict]:
    """As released: *_blocks [E, rows, in/32, 16] U8 + *_scales [E, rows, in/32] U8 (E8M0), gate/up rows interleaved."""
    t = dense_common(P, 2)
    for layer in range(2):
        p = P.format(layer=layer)
        t[p + "mlp.router.weight"] = w((E, H), 50, layer)
        t[p + "mlp.router.bias"] = w((E,), 51, layer)
        for name, rows, cols, k in (("gate_up_proj", 2 * F, H, 1), ("down_proj", H, F, 3)):
            t[p + f"mlp.experts.{name}_blocks"] = rng(layer, k).integers(0, 256, (E, rows, cols // 32, 16), np.uint8)
            t[p + f"mlp.experts.{name}_scales"] = rng(layer, k, 1).integers(118, 127, (E, rows, cols // 32), np.uint8)
        t[p + "mlp.experts.gate_up_proj_bias"] = w((E, 2 * F), layer, 2)
        t[p + "mlp.experts.down_proj_bias"] = w((E, H), layer, 4)
    c = cfg("gpt_oss", 2, num_local_experts=E, num_experts_per_tok=2, intermediate_size=F, swiglu_limit=7.0)
    c["quantization_config"] = {"quant_method": "mxfp4"}
    return c, t


def fp8(a: np.ndarray) -> np.ndarray:
    # e4m3fn has no infinity: a value past its largest finite 448 would become NaN
    return np.clip(a, -448, 448).astype(np.float32).astype(ml_dtypes.float8_e4m3fn)


FP8_H, FP8_F = 160, 32  # in/out spans two 128-wide scale blocks on one side


def deepseek_fp8() -> tuple[dict, dict]:
    """DeepSeek-V3 FP8: F8_E4M3 weights, each with weight_scale_inv [ceil(out/128), ceil(in/128)] (F32)."""
    t: dict[str, np.ndarray] = {"model.embed_tokens.weight": w((VOCAB, FP8_H), 900),
                                "model.norm.weight": np.ones(FP8_H, np.float32).astype(BF16)}
    for layer in range(2):
        p = P.format(layer=layer)
        t[p + "mlp.gate.weight"] = w((E, FP8_H), 50, layer)
        t[p + "mlp.gate.e_score_correction_bias"] = w((E,), 51, layer, dtype=np.float32)
        q = fp8(rng(902, layer).standard_normal((FP8_H, FP8_H)) * 100)
        t[p + "self_attn.q_proj.weight"] = q
        t[p + "self_attn.q_proj.weight_scale_inv"] = (rng(903, layer).random((2, 2)) * 1e-3).astype(np.float32)
        for e in range(E):
            for r, (name, shape) in enumerate(zip(MLP, ((FP8_F, FP8_H), (FP8_F, FP8_H), (FP8_H, FP8_F)))):
                name_ = p + f"mlp.experts.{e}.{name}"
                t[name_] = fp8(rng(layer, e, r).standard_normal(shape) * 100)
                sshape = (-(-shape[0] // 128), -(-shape[1] // 128))
                t[name_ + "_scale_inv"] = (rng(layer, e, r, 7).random(sshape) * 1e-3 + 1e-4).astype(np.float32)
    c = {"model_type": "deepseek_v3", "hidden_size": FP8_H, "num_hidden_layers": 2, "n_routed_experts": E,
         "num_experts_per_tok": 2, "moe_intermediate_size": FP8_F, "routed_scaling_factor": 2.5,
         "norm_topk_prob": True, "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128],
                                                         "fmt": "e4m3"}}
    return c, t


FIXTURES: dict[str, Callable[[], tuple[dict, dict]]] = {
    "mixtral": mixtral_like("mixtral"),
    "phimoe": mixtral_like("phimoe", dtype=np.float16),
    "minimax": mixtral_like("minimax", dtype=np.float32),
    "minimax_m2": mixtral_like("minimax_m2"),
    "qwen2_moe": qwen_like("qwen2_moe", True),
    "qwen3_moe": qwen_like("qwen3_moe", False, count_key="num_local_experts"),
    "qwen3_next": qwen_like("qwen3_next", True),
    "olmoe": qwen_like("olmoe", False),
    "deepseek_v2": qwen_like("deepseek_v2", True, count_key="n_routed_experts", dense_first=1, n_layers=3),
    "glm4_moe": qwen_like("glm4_moe", True, count_key="n_routed_experts", dense_first=1, n_layers=2, mtp=1,
                          selection="mlp.gate.e_score_correction_bias"),
    "ernie4_5_moe": qwen_like("ernie4_5_moe", False, count_key="moe_num_experts",
                              selection="mlp.moe_statics.e_score_correction_bias"),
    "jamba": qwen_like("jamba", False, block="feed_forward", moe_layers=[1, 3], n_layers=4, expert_layer_period=2,
                       expert_layer_offset=1),
    "qwen3_5_moe": fused_rows("qwen3_5_moe", per_expert_layer=1),
    "granitemoeshared": granite,
    "llama4": input_major("llama4", "language_model.model.layers.{layer}.", "feed_forward",
                          "feed_forward.router.weight", True),
    "qwen3_vl_moe": input_major("qwen3_vl_moe", "model.language_model.layers.{layer}.", "mlp", "mlp.gate.weight",
                                True),
    "dbrx": dbrx,
    "gpt_oss_bf16": gpt_oss_bf16,
    "gpt_oss_mxfp4": gpt_oss_mxfp4,
    "deepseek_v3_fp8": deepseek_fp8,
}
SHARDED = {"deepseek_v2": 3, "glm4_moe": 2}  # written as index + shards; experts of a layer span shards


def write(name: str, out: Path) -> None:
    config, tensors = FIXTURES[name]()
    d = out / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    n = SHARDED.get(name)
    if not n:
        save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
        return
    names = sorted(tensors)
    chunks = [names[i::n] for i in range(n)]  # interleaved: a layer's experts land in every shard
    weight_map, total = {}, 0
    for i, chunk in enumerate(chunks, 1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file({k: tensors[k] for k in chunk}, d / fname, metadata={"format": "pt"})
        for k in chunk:
            weight_map[k] = fname
            total += tensors[k].nbytes
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "fixtures/safetensors/gen")
    args = ap.parse_args()
    for name in FIXTURES:
        write(name, args.out)
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"wrote {len(FIXTURES)} checkpoints to {args.out} ({size} bytes)")


if __name__ == "__main__":
    main()
