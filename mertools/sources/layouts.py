"""The one table of Hugging Face expert layouts: which tensors hold a model's routed experts, and how.

A checkpoint's ``config.json`` ``model_type`` picks a row of ``MODEL_TYPES``; the row lists the candidate layouts
(a family can mix them: Qwen3.5's main layers are fused, its MTP layer per-expert; re-saved fine-tunes are often
per-expert again), and each MoE layer is matched against the candidates by the tensor names it actually holds.
The same tensor name means different shapes in different models (``mlp.experts.gate_up_proj`` is ``[E, 2F, H]``
gate-first in Qwen3.5, ``[E, H, 2F]`` in Llama 4, ``[E, H, 2F]`` interleaved in GPT-OSS), which is why the choice
goes by ``model_type`` and never by name alone. Facts and their sources: ``../shared/notes/formats.md`` section 3.

Patterns hold ``{layer}`` and ``{expert}``; ``{p}`` is the layer prefix (``model.layers.{layer}.`` and its VLM
variants, found from the names present; a separate MTP block's layers, ``MTP_PREFIX``, are matched against the same
candidates). Each role is a ``Part``:

- ``kind="per_expert"``: one tensor per expert, already ``[out, in]``.
- ``kind="stacked"``: one tensor for all experts; expert ``e`` is index ``e`` of ``expert_axis`` 0 (``experts_flat``:
  the tensor is ``[E*rows, cols]`` and is viewed as ``[E, rows, cols]``, as DBRX stores it). Then ``take`` picks a
  half or the even/odd positions along ``take_axis`` (``first``/``second``/``even``/``odd``), and ``transpose``
  turns an input-major ``[in, out]`` matrix into ``[out, in]``.
- ``kind="mxfp4"``: GPT-OSS's ``*_blocks [E, rows, in/32, 16]`` + ``*_scales [E, rows, in/32]``, repacked into
  ggml MXFP4 blocks; ``take`` picks rows.

The transform a projection goes through is named in the manifest (``none``, ``transpose``, ``deinterleave``,
``deinterleave+transpose``, ``repack``, ``deinterleave+repack``, and ``+quantize`` when ``--dtype`` converts it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import SourceError

PREFIXES = (
    "model.layers.{layer}.",
    "model.language_model.layers.{layer}.",
    "language_model.model.layers.{layer}.",
    "transformer.blocks.{layer}.",
)
# Qwen3-Next and Qwen3.5/3.6 keep their multi-token-prediction block outside the decoder, at the top level even in
# the multimodal wrappers (``mtp.layers.0.mlp.experts.{e}.gate_proj.weight`` in Qwen3.5, per expert;
# ``mtp.layers.0.mlp.experts.gate_up_proj`` in Qwen3.6, fused): its layer i is numbered num_hidden_layers + i, as
# DeepSeek's MTP layer (``model.layers.{num_hidden_layers}``) is numbered in its own checkpoints.
MTP_PREFIX = "mtp.layers.{layer}."


@dataclass(frozen=True)
class Part:
    """Where one role (gate, up, down, or a bias) of expert ``{expert}`` lives."""

    pattern: str
    kind: str = "per_expert"  # per_expert | stacked | mxfp4
    take: str | None = None  # first | second | even | odd
    take_axis: int = 0  # axis of the expert's own slice that `take` applies to
    transpose: bool = False
    experts_flat: bool = False  # [E*rows, cols] stored flat (DBRX)

    def transform(self) -> str:
        steps = []
        if self.take in ("even", "odd"):
            steps.append("deinterleave")
        if self.kind == "mxfp4":
            steps.append("repack")
        if self.transpose:
            steps.append("transpose")
        return "+".join(steps) or "none"


@dataclass(frozen=True)
class Layout:
    """One way a layer can store its routed experts, with the tensors around them that describe routing."""

    name: str
    kind: str  # per_expert | fused (how the routed experts sit on disk)
    roles: dict[str, Part]
    router: str | None = None  # router weight, relative to the layer prefix
    router_bias: str | None = None
    selection_bias: str | None = None  # e_score_correction_bias and friends
    shared: tuple[str, ...] = ()  # prefixes (relative to the layer) of shared-expert tensors, for model info


def _per_expert(stem: str, gate: str, up: str, down: str, **kw: Any) -> Layout:
    e = stem + "{expert}."
    roles = {"gate": Part("{p}" + e + gate), "up": Part("{p}" + e + up), "down": Part("{p}" + e + down)}
    return Layout(kw.pop("name", "per_expert"), "per_expert", roles, **kw)


MIXTRAL = _per_expert("block_sparse_moe.experts.", "w1.weight", "w3.weight", "w2.weight", name="mixtral_w1w3w2",
                      router="block_sparse_moe.gate.weight",
                      selection_bias="block_sparse_moe.e_score_correction_bias")


def _mlp(block: str = "mlp", **kw: Any) -> Layout:
    return _per_expert(f"{block}.experts.", "gate_proj.weight", "up_proj.weight", "down_proj.weight",
                       name=kw.pop("name", f"{block}_experts"), **kw)


# transformers v5 / Qwen3.5 natively fused: gate_up [E, 2F, H] gate rows first, down [E, H, F].
def _fused_rows(block: str = "mlp", gate_up: str = "experts.gate_up_proj", down: str = "experts.down_proj",
                **kw: Any) -> Layout:
    roles = {
        "gate": Part("{p}" + f"{block}.{gate_up}", "stacked", take="first"),
        "up": Part("{p}" + f"{block}.{gate_up}", "stacked", take="second"),
        "down": Part("{p}" + f"{block}.{down}", "stacked"),
    }
    return Layout(kw.pop("name", "fused_gate_up"), "fused", roles, **kw)


# Llama 4 and Qwen3-VL-MoE: gate_up [E, H, 2F] input-major, gate = first F columns; down [E, F, H].
def _fused_input_major(block: str, **kw: Any) -> Layout:
    gu = "{p}" + f"{block}.experts.gate_up_proj"
    roles = {
        "gate": Part(gu, "stacked", take="first", take_axis=1, transpose=True),
        "up": Part(gu, "stacked", take="second", take_axis=1, transpose=True),
        "down": Part("{p}" + f"{block}.experts.down_proj", "stacked", transpose=True),
    }
    return Layout(kw.pop("name", "fused_input_major"), "fused", roles, **kw)


QWEN_ROUTER = {"router": "mlp.gate.weight"}
DS_ROUTER = {"router": "mlp.gate.weight", "selection_bias": "mlp.gate.e_score_correction_bias",
             "shared": ("mlp.shared_experts.",)}

GRANITE = Layout("granite_input_output_linear", "fused", {
    "gate": Part("{p}block_sparse_moe.input_linear.weight", "stacked", take="first"),
    "up": Part("{p}block_sparse_moe.input_linear.weight", "stacked", take="second"),
    "down": Part("{p}block_sparse_moe.output_linear.weight", "stacked"),
}, router="block_sparse_moe.router.layer.weight", shared=("shared_mlp.",))

# DBRX: [E*F, H] flat, no `.weight`; w1 (gate) and v1 (up) are [out, in] per expert, w2 is [in, out].
DBRX = Layout("dbrx_w1v1w2", "fused", {
    "gate": Part("{p}ffn.experts.mlp.w1", "stacked", experts_flat=True),
    "up": Part("{p}ffn.experts.mlp.v1", "stacked", experts_flat=True),
    "down": Part("{p}ffn.experts.mlp.w2", "stacked", experts_flat=True, transpose=True),
}, router="ffn.router.layer.weight")

# GPT-OSS, dequantized (bf16) form: gate_up [E, H, 2F] input-major, gate = even columns, up = odd; biases alike.
GPT_OSS_BF16 = Layout("gpt_oss_bf16", "fused", {
    "gate": Part("{p}mlp.experts.gate_up_proj", "stacked", take="even", take_axis=1, transpose=True),
    "up": Part("{p}mlp.experts.gate_up_proj", "stacked", take="odd", take_axis=1, transpose=True),
    "down": Part("{p}mlp.experts.down_proj", "stacked", transpose=True),
    "gate_bias": Part("{p}mlp.experts.gate_up_proj_bias", "stacked", take="even"),
    "up_bias": Part("{p}mlp.experts.gate_up_proj_bias", "stacked", take="odd"),
    "down_bias": Part("{p}mlp.experts.down_proj_bias", "stacked"),
}, router="mlp.router.weight", router_bias="mlp.router.bias")

# GPT-OSS as released: MXFP4 blocks, gate/up interleaved by row (even rows gate), rows already [out, in].
GPT_OSS_MXFP4 = Layout("gpt_oss_mxfp4", "fused", {
    "gate": Part("{p}mlp.experts.gate_up_proj", "mxfp4", take="even"),
    "up": Part("{p}mlp.experts.gate_up_proj", "mxfp4", take="odd"),
    "down": Part("{p}mlp.experts.down_proj", "mxfp4"),
    "gate_bias": Part("{p}mlp.experts.gate_up_proj_bias", "stacked", take="even"),
    "up_bias": Part("{p}mlp.experts.gate_up_proj_bias", "stacked", take="odd"),
    "down_bias": Part("{p}mlp.experts.down_proj_bias", "stacked"),
}, router="mlp.router.weight", router_bias="mlp.router.bias")


@dataclass(frozen=True)
class ModelType:
    """A config.json model_type: its candidate layouts, GGUF architecture name and expert activation."""

    gguf_arch: str
    layouts: tuple[Layout, ...]
    activation: dict[str, Any] = field(default_factory=lambda: {"kind": "swiglu"})


def _mt(arch: str, *layouts: Layout, **kw: Any) -> ModelType:
    return ModelType(arch, layouts, **kw)


_QWEN_FUSED = _fused_rows(**QWEN_ROUTER, shared=("mlp.shared_expert.",))
_DS_FUSED = _fused_rows(**DS_ROUTER)

MODEL_TYPES: dict[str, ModelType] = {
    "mixtral": _mt("llama", MIXTRAL, _fused_rows(router="mlp.gate.weight")),
    "phimoe": _mt("phimoe", MIXTRAL, _fused_rows(router="mlp.gate.weight")),
    "minimax": _mt("minimax", MIXTRAL, _fused_rows(router="mlp.gate.weight")),
    "minimax_m2": _mt("minimax-m2", MIXTRAL, _fused_rows(router="mlp.gate.weight")),
    "qwen2_moe": _mt("qwen2moe", _mlp(**QWEN_ROUTER, shared=("mlp.shared_expert.",)), _QWEN_FUSED),
    "qwen3_moe": _mt("qwen3moe", _mlp(**QWEN_ROUTER), _QWEN_FUSED),
    "qwen3_next": _mt("qwen3next", _mlp(**QWEN_ROUTER, shared=("mlp.shared_expert.",)), _QWEN_FUSED),
    "qwen3_5_moe": _mt("qwen35moe", _QWEN_FUSED, _mlp(**QWEN_ROUTER, shared=("mlp.shared_expert.",))),
    "qwen3_vl_moe": _mt("qwen3vlmoe", _fused_input_major("mlp", router="mlp.gate.weight"), _mlp(**QWEN_ROUTER)),
    "olmoe": _mt("olmoe", _mlp(**QWEN_ROUTER), _fused_rows(router="mlp.gate.weight")),
    "deepseek_v2": _mt("deepseek2", _mlp(router="mlp.gate.weight", shared=("mlp.shared_experts.",)), _DS_FUSED),
    "deepseek_v3": _mt("deepseek2", _mlp(**DS_ROUTER), _DS_FUSED),
    "kimi_k2": _mt("deepseek2", _mlp(**DS_ROUTER), _DS_FUSED),
    "glm4_moe": _mt("glm4moe", _mlp(**DS_ROUTER), _DS_FUSED),
    "ernie4_5_moe": _mt("ernie4_5-moe", _mlp(router="mlp.gate.weight",
                                             selection_bias="mlp.moe_statics.e_score_correction_bias",
                                             shared=("mlp.shared_experts.",))),
    "jamba": _mt("jamba", _mlp("feed_forward", router="feed_forward.router.weight")),
    "granitemoe": _mt("granitemoe", GRANITE),
    "granitemoeshared": _mt("granitemoeshared", GRANITE),
    "granitemoehybrid": _mt("granitehybrid", GRANITE),
    "llama4": _mt("llama4", _fused_input_major("feed_forward", router="feed_forward.router.weight",
                                               shared=("feed_forward.shared_expert.",))),
    "llama4_text": _mt("llama4", _fused_input_major("feed_forward", router="feed_forward.router.weight",
                                                    shared=("feed_forward.shared_expert.",))),
    "dbrx": _mt("dbrx", DBRX),
    "gpt_oss": _mt("gpt-oss", GPT_OSS_MXFP4, GPT_OSS_BF16, activation={"kind": "swiglu_oai", "alpha": 1.702,
                                                                       "limit": 7.0}),
}

# config.json keys, in the order they are tried; a dotted key looks inside a nested dict (DBRX's ffn_config).
ALIASES: dict[str, tuple[str, ...]] = {
    "n_experts": ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts",
                  "ffn_config.moe_num_experts"),
    "n_experts_used": ("num_experts_per_tok", "num_experts_per_token", "experts_per_token", "moe_k", "moe_top_k",
                       "ffn_config.moe_top_k"),
    "d_ff": ("moe_intermediate_size", "expert_dim", "ffn_config.ffn_hidden_size", "intermediate_size"),
    "d_model": ("hidden_size", "d_model", "n_embd"),
    "n_layers": ("num_hidden_layers", "n_layers", "num_layers"),
    "n_shared_experts": ("n_shared_experts", "moe_num_shared_experts", "num_shared_experts"),
    "d_ff_shared": ("shared_expert_intermediate_size", "shared_intermediate_size"),
    "n_dense_layers": ("first_k_dense_replace",),
    "n_mtp_layers": ("num_nextn_predict_layers", "mtp_num_hidden_layers"),
    "swiglu_limit": ("swiglu_limit",),
    "expert_weights_scale": ("routed_scaling_factor",),
    "expert_weights_norm": ("norm_topk_prob",),
}


def config_value(config: dict[str, Any], what: str) -> Any:
    """The first alias of `what` present in config.json (or in its text_config, for multimodal wrappers).

    >>> config_value({"ffn_config": {"moe_num_experts": 16}}, "n_experts")
    16
    """
    return config_key(config, what)[1]


def config_key(config: dict[str, Any], what: str) -> tuple[str | None, Any]:
    """(the config.json key that gave it, value) for `what`, as ``config_value`` finds it; (None, None) if absent."""
    for scope, prefix in ((config.get("text_config") or {}, "text_config."), (config, "")):
        for key in ALIASES[what]:
            v: Any = scope
            for part in key.split("."):
                v = v.get(part) if isinstance(v, dict) else None
            if v is not None:
                return prefix + key, v
    return None, None


def config_int(config: dict[str, Any], what: str, where: Any, lo: int = 0, hi: int = 1 << 24) -> int | None:
    """``config_value`` as a whole number in [lo, hi], None when absent; anything else (a string, a float, a list,
    a bool, a number out of range) is refused naming config.json and the key, since every count and width of the
    plan comes from here.

    >>> config_int({"num_local_experts": 8}, "n_experts", "config.json")
    8
    """
    key, v = config_key(config, what)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise SourceError(f"{where}: {key} is {str(v)[:60]!r} ({type(v).__name__}), expected a whole number from "
                          f"{lo} to {hi}; fix config.json (or download it again)")
    return v


def config_float(config: dict[str, Any], what: str, where: Any) -> float | None:
    """``config_value`` as a finite number, None when absent; anything else is refused naming the key."""
    key, v = config_key(config, what)
    if v is None:
        return None
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not abs(v) < 1e30:
        raise SourceError(f"{where}: {key} is {str(v)[:60]!r} ({type(v).__name__}), expected a finite number; "
                          "fix config.json (or download it again)")
    return float(v)


def check_config(config: dict[str, Any], where: Any) -> None:
    """The parts of config.json every reader of it relies on: ``text_config`` (multimodal wrappers) is an object."""
    tc = config.get("text_config")
    if tc is not None and not isinstance(tc, dict):
        raise SourceError(f"{where}: text_config is {str(tc)[:60]!r} ({type(tc).__name__}), expected an object; "
                          "fix config.json (or download it again)")


def model_type_of(config: dict[str, Any]) -> str | None:
    """``model_type``, or the text model's for a multimodal wrapper whose own type is not in the table; a value
    that is not a string is returned as is (the caller refuses it)."""
    mt = config.get("model_type")
    known = isinstance(mt, str) and mt in MODEL_TYPES
    tc = config.get("text_config")
    if not known and isinstance(tc, dict) and "model_type" in tc:
        mt = tc["model_type"]
    return mt


def moe_layers_from_config(config: dict[str, Any], n_layers: int) -> set[int]:
    """The blocks below `n_layers` that each model's modeling code makes MoE, from its config keys.

    >>> sorted(moe_layers_from_config({"expert_layer_period": 2, "expert_layer_offset": 1}, 4))
    [1, 3]
    """
    c = {**config, **(config.get("text_config") or {})}

    def num(key: str, default: int) -> int:
        v = c.get(key)
        return v if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 20 else default

    layers = set(range(n_layers))
    if "expert_layer_period" in c:  # Jamba
        period = max(1, num("expert_layer_period", 1))
        layers = {i for i in layers if i % period == num("expert_layer_offset", 0)}
    if "first_k_dense_replace" in c:  # DeepSeek, GLM-4.5, Kimi
        freq = max(1, num("moe_layer_freq", 1))
        layers = {i for i in layers if i >= num("first_k_dense_replace", 0) and i % freq == 0}
    if "moe_layer_interval" in c:  # ERNIE-4.5
        end = num("moe_layer_end_index", n_layers - 1) if c.get("moe_layer_end_index", -1) != -1 else n_layers - 1
        step = max(1, num("moe_layer_interval", 1))
        layers = {i for i in layers if (i + 1) % step == 0 and num("moe_layer_start_index", 0) <= i <= end}
    for key in ("decoder_sparse_step", "interleave_moe_layer_step"):  # Qwen2/3-MoE, Llama 4
        if key in c:
            step = max(1, num(key, 1))
            layers = {i for i in layers if (i + 1) % step == 0}
    explicit = c.get("moe_layers")  # Llama 4 may list them outright
    if isinstance(explicit, list) and all(isinstance(i, int) for i in explicit):
        layers = {i for i in explicit if 0 <= i < n_layers}
    mlp_only = c.get("mlp_only_layers")
    if isinstance(mlp_only, list):
        layers -= {i for i in mlp_only if isinstance(i, int)}
    return layers
