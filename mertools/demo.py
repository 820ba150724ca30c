"""``mertools demo``: extract, deep-verify and smoke-run a small model, printing each step's summary."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from .describe import describe, render as render_inspect
from .errors import OutputError
from .extract import extract
from .verify import verify

BUNDLED = Path("fixtures") / "real" / "mixtral-q4_0.gguf"
DEMO_MARK = ".mertools-demo"  # written into every folder the demo makes: the only folders it will replace


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


def demo_home() -> Path:
    """The demo's own folder, reused by every run: $XDG_CACHE_HOME/mertools/demo (default ~/.cache/...).

    >>> demo_home().name
    'demo'
    """
    base = os.environ.get("XDG_CACHE_HOME") or ""
    root = Path(base) if os.path.isabs(base) else Path.home() / ".cache"  # the XDG spec ignores relative values
    return root / "mertools" / "demo"


def _is_demo_output(folder: Path) -> bool:
    return (folder / DEMO_MARK).is_file()


def _check_out(out: Path, default: bool) -> bool:
    """Whether OUT holds an earlier demo output that this run may replace. Anything else must be absent or empty."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise OutputError(f"{out}: exists and is not a folder; give --out an absent or empty folder")
    if not out.exists() or not any(out.iterdir()):
        return False
    if _is_demo_output(out):
        return True
    hint = ("it is the demo's folder but holds something else; move that away" if default
            else "the demo writes only into an absent or empty folder (or one an earlier demo wrote)")
    raise OutputError(f"{out}: not empty and not written by the demo; {hint}. Nothing was changed")


def run_demo(model: Path | None, out: Path | None, *, tokens: int = 300,
             echo: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Extract, deep-verify and smoke-run ``model`` (default: the bundled fixture, else a generated model).

    ``out`` must be absent, empty, or an earlier demo output (recognised by the ``.mertools-demo`` file the demo
    writes into it); default :func:`demo_home`. Nothing else is ever deleted or replaced.

    >>> r = run_demo(None, None, tokens=20, echo=None)   # doctest: +SKIP
    >>> r["verify"]["ok"]                                # doctest: +SKIP
    True
    """
    from mer_runtime.smoke import SmokeConfig, render as render_smoke, run_smoke

    say = echo or (lambda s: None)
    default = out is None
    out = Path(os.path.abspath(out or demo_home()))
    replace = _check_out(out, default)
    with tempfile.TemporaryDirectory(prefix="mertools-demo-") as work:
        if model is None:
            model = BUNDLED if BUNDLED.is_file() else _generated_model(Path(work))
        say(f"== inspect {model}")
        say(render_inspect(describe(model)))
        # marker=DEMO_MARK: even if OUT changed since the check above, only an earlier demo output is replaced
        r = extract(model, out, overwrite=replace, marker=DEMO_MARK)
        (out / DEMO_MARK).write_text("written by `mertools demo`; the next demo run may replace this folder\n")
        say(f"\n== extract -> {out}\nwrote {r.experts} experts ({r.expert_bytes} bytes of shards) in "
            f"{r.seconds:.2f} s")
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
