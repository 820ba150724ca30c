"""``mertools demo``: extract, deep-verify and smoke-run a small model, printing each step's summary."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable

from .describe import describe, render as render_inspect
from .extract import extract
from .verify import verify

BUNDLED = Path("fixtures") / "real" / "mixtral-q4_0.gguf"


def _generated_model(folder: Path) -> Path:
    """A small Mixtral-like Q4_0 MoE written with the gguf package, for installs without the repo's fixtures."""
    import gguf
    import numpy as np
    from gguf.quants import quantize

    path = folder / "demo-mixtral-q4_0.gguf"
    rng = np.random.default_rng(20261128)
    h, f, n_exp, layers = 256, 512, 8, 4
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(layers)
    w.add_embedding_length(h)
    w.add_expert_count(n_exp)
    w.add_expert_used_count(2)
    for b in range(layers):
        w.add_tensor(f"blk.{b}.ffn_gate_inp.weight", (rng.standard_normal((n_exp, h)) * 0.1).astype(np.float32))
        for role, shape in (("gate", (f, h)), ("up", (f, h)), ("down", (h, f))):
            data = (rng.standard_normal((n_exp, *shape)) * 0.02).astype(np.float32)
            w.add_tensor(f"blk.{b}.ffn_{role}_exps.weight", quantize(data, gguf.GGMLQuantizationType.Q4_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q4_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def run_demo(model: Path | None, out: Path | None, *, tokens: int = 300,
             echo: Callable[[str], None] | None = print) -> dict[str, Any]:
    from mer_runtime.smoke import SmokeConfig, render as render_smoke, run_smoke

    say = echo or (lambda s: None)
    work = Path(tempfile.mkdtemp(prefix="mertools-demo-"))
    if model is None:
        model = BUNDLED if BUNDLED.is_file() else _generated_model(work)
    out = out or work / "shards"
    say(f"== inspect {model}")
    say(render_inspect(describe(model)))
    r = extract(model, out, overwrite=True)
    say(f"\n== extract -> {out}\nwrote {r.experts} experts ({r.expert_bytes} bytes of shards) in {r.seconds:.2f} s")
    v = verify(out, deep=True, against=model)
    d = v.deep or {}
    say(f"\n== verify --deep --against {model.name}\n{'OK' if v.ok else 'FAILED'}: {v.experts_checked} experts "
        f"checksummed; {d.get('experts_run')} run through the runtime, worst relative error "
        f"{d.get('worst_rel_err', 0):.2e} (tolerance {d.get('tolerance')})")
    for p in v.problems:
        say(f"FAIL {p}")
    s = run_smoke(out, SmokeConfig(tokens=tokens, cache_slots=4, workload="router"))
    say("\n== smoke (router workload)\n" + render_smoke(s))
    return {"model": str(model), "out": str(out), "extract": r.as_dict(), "verify": v.as_dict(), "smoke": s}
