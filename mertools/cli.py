"""The ``mertools`` command: thin click commands over the library's functions.

Exit codes: 0 success; 1 ``verify`` found problems; 2 bad input or usage (one line on stderr, no traceback).
"""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

import click

from mer_runtime.errors import MerError

# Only what every command needs: each command imports its own implementation when it runs, so a start (and --help)
# does not pay for numpy, gguf and every other command's code (tests/test_startup.py keeps it so).
from .errors import MertoolsError
from .units import human_bytes


def _fail(msg: str) -> None:
    click.echo(f"error: {msg}", err=True)
    sys.exit(2)


def _where(exc: OSError) -> str:
    return f"{exc.filename}: " if exc.filename else ""


def _describe(exc: BaseException) -> tuple[str, int]:
    """The one line (and exit code) for an exception that escaped a command: the CLI's only error table."""
    if isinstance(exc, MerError):  # ours: the message already names the file and what to do
        return str(exc), 2
    if isinstance(exc, MemoryError) or (isinstance(exc, OSError) and exc.errno == errno.ENOMEM):
        return "out of memory; ask for less (fewer --cache-slots, a part of the model with --layers/--experts)", 2
    if isinstance(exc, PermissionError):
        return f"{_where(exc)}permission denied; choose a place you may write to, or fix its permissions", 2
    if isinstance(exc, FileNotFoundError):
        return f"{_where(exc)}no such file or folder; check the path (a folder for an output must exist)", 2
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{_where(exc)}no space left on the device; free some space or choose another place", 2
    if isinstance(exc, OSError):
        return f"{_where(exc)}{exc.strerror or exc}", 2
    if isinstance(exc, (ValueError, OverflowError)):
        return f"invalid value: {_short(exc)}", 2
    return (f"unexpected {type(exc).__name__}: {_short(exc)} (a bug: please report it with the output of the same "
            "command run with MERTOOLS_DEBUG=1)"), 2


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _debug_traceback() -> None:
    if os.environ.get("MERTOOLS_DEBUG") == "1":
        import traceback  # the error paths import what only they use (a start would pay for it)

        traceback.print_exc()


class _Command(click.Command):
    def invoke(self, ctx: click.Context) -> Any:
        from mer_runtime import kernels  # numpy and gguf: once the arguments are parsed, so --help goes without them

        kernels.threads()  # refuses a bad MER_THREADS before any work, not halfway through
        return super().invoke(ctx)


class _Group(click.Group):
    """Every command runs through ``invoke``: one place turns exceptions into one line on stderr, as
    huggingface_hub's CLI does. ``MERTOOLS_DEBUG=1`` prints the traceback too."""

    command_class = _Command

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise  # usage errors: click prints them its own way, exit code 2
        except KeyboardInterrupt as exc:
            import signal  # the error paths import what only they use (a start would pay for it)

            _debug_traceback()
            signum = getattr(exc, "signum", signal.SIGINT)
            click.echo(f"{exc if getattr(exc, 'signum', None) else 'interrupted; no partial output was left behind'}",
                       err=True)
            sys.exit(128 + signum)
        except Exception as exc:
            _debug_traceback()
            msg, code = _describe(exc)
            click.echo(f"error: {msg}", err=True)
            sys.exit(code)


class _Bar:
    """tqdm over bytes, or nothing when quiet; returned by the library's progress callback."""

    def __init__(self, quiet: bool, desc: str, unit: str = "B"):
        self.quiet, self.desc, self.unit, self.bar = quiet, desc, unit, None

    def __call__(self, total: int, items: int) -> Callable[[int], None]:
        if self.quiet:
            return lambda n: None
        from tqdm import tqdm

        scale = self.unit == "B"
        self.bar = tqdm(total=total, unit=self.unit, unit_scale=scale, unit_divisor=1024, desc=self.desc,
                        file=sys.stderr, leave=False, dynamic_ncols=True)
        return self.bar.update

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> "_Bar":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _emit(data: dict[str, Any]) -> None:
    click.echo(json.dumps(data, indent=1, default=str))


def _print_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    """click.version_option's output, with the version read (importlib.metadata: 15-20 ms) only when asked."""
    if not value or ctx.resilient_parsing:
        return
    from . import __version__

    click.echo(f"mertools, version {__version__}", color=ctx.color)
    ctx.exit()


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Show the version and exit.")
def main() -> None:
    """Turn Mixture-of-Experts models into aligned per-expert shards for SSD streaming.

    Errors print one line and exit 2; set MERTOOLS_DEBUG=1 to see the traceback too.
    """


@main.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--layers", help="Only these MoE layers, e.g. 0-3,7 (default: all).")
@click.option("--experts", help="Only these experts in each layer, e.g. 0-7 (default: all).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it is an earlier output (it holds manifest.json), only "
              "once the new output is complete; refused if a source lies inside OUT.")
@click.option("--no-fsync", is_flag=True, help="Skip fsync (faster; the output may not survive a power cut).")
@click.option("--wait", is_flag=True, help="If another run is writing OUT, wait for it instead of failing.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--dtype", type=click.Choice(["q4_0", "q8_0", "f16", "bf16"]), default=None,
              help="Convert expert weights to this type while extracting (default: keep the source type).")
def extract(src: Path, out: Path, layers: str | None, experts: str | None, overwrite: bool, no_fsync: bool,
            wait: bool, as_json: bool, quiet: bool, dtype: str | None) -> None:
    """Write each expert of SRC to OUT. SRC: a .gguf file (the first part of a split set), or a SafeTensors
    checkpoint folder (config.json with model.safetensors or model.safetensors.index.json and its shards).

    From a SafeTensors folder, its other top-level files (tokenizer, generation config, chat template, *.py remote
    code, README, LICENSE; not weights, not hidden, at most 64 MiB each) are copied byte for byte into OUT/hf/;
    a file left out is named on stderr (and in --json) with the reason.

    \b
    Examples:
      mertools extract mixtral-q4_0.gguf out/
      mertools extract model-00001-of-00004.gguf out/ --layers 0-3 --json
      mertools extract Mixtral-8x7B-Instruct-v0.1/ out/ --dtype q4_0
    """
    from .extract import extract as do_extract
    from .ranges import parse_ranges

    layer_sel, expert_sel = parse_ranges(layers, "layers"), parse_ranges(experts, "experts")
    with _Bar(quiet or as_json, "extract") as bar:
        r = do_extract(src, out, layers=layer_sel, experts=expert_sel, overwrite=overwrite, fsync=not no_fsync,
                       wait=wait, progress=bar, dtype=dtype)
    if as_json:
        _emit(r.as_dict())
    else:
        _companion_notes(r.companions_skipped)
        kept = f", {len(r.companions)} companion files in hf/" if r.companions else ""
        click.echo(
            f"wrote {r.experts} experts in {r.layers} layers to {r.out}: {human_bytes(r.bytes_written)} "
            f"({human_bytes(r.expert_bytes)} shards + {human_bytes(r.dense_bytes)} dense.gguf{kept}) "
            f"in {r.seconds:.2f} s, {r.gb_per_s:.2f} GB/s"
        )


def _companion_notes(skipped: list[dict[str, str]]) -> None:
    """One stderr line per file of the checkpoint that the companion rule left out, and why (never a failure)."""
    for x in skipped:
        click.echo(f"note: {x['name']!r} not kept in hf/: {x['why']}", err=True)


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def inspect(path: Path, as_json: bool) -> None:
    """Describe a GGUF model (and what extract would write) or an extracted folder.

    \b
    Examples:
      mertools inspect mixtral-q4_k_m.gguf
      mertools inspect out/ --json
    """
    from .describe import describe, render

    d = describe(path)
    _emit(d) if as_json else click.echo(render(d))


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--deep", is_flag=True, help="Also run every expert through the runtime and compare with a float64 "
              "reference (tolerance 1e-4 relative).")
@click.option("--against", type=click.Path(path_type=Path, exists=True),
              help="With --deep: the source model (.gguf or SafeTensors folder), for a reference from its own bytes.")
@click.option("--io", type=click.Choice(["auto", "io_uring", "pread", "buffered"]), default="auto",
              show_default=True, help="With --deep: how the runtime reads shards.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def verify(out: Path, deep: bool, against: Path | None, io: str, as_json: bool, quiet: bool) -> None:
    """Check every shard of OUT: present, right size and alignment, every checksum right; dense.gguf, the
    reassembly record and the companion files in hf/ (tokenizer, ...) likewise.

    Exits 1 and lists each problem if anything is wrong.

    \b
    Examples:
      mertools verify out/
      mertools verify out/ --deep --against mixtral-q4_0.gguf
    """
    if against and not deep:
        _fail("--against needs --deep")
    if not out.is_dir():
        raise MertoolsError(f"{out}: not a folder; give the folder extract wrote")
    from .verify import verify as do_verify

    with _Bar(quiet or as_json, "verify") as bar, _Bar(quiet or as_json, "deep", unit="expert") as deep_bar:
        r = do_verify(out, deep=deep, against=against, io=io, progress=bar, deep_progress=deep_bar)
    if as_json:
        _emit(r.as_dict())
    else:
        for w in r.warnings:
            click.echo(f"warning: {w}", err=True)
        for p in r.problems:
            click.echo(f"FAIL {p}")
        status = "OK" if r.ok else f"{len(r.problems)} problem(s)"
        click.echo(f"{status}: {r.experts_checked} experts, {human_bytes(r.bytes_read)} checksummed in "
                   f"{r.checksum_seconds:.2f} s ({r.gb_per_s:.2f} GB/s)")
        if r.deep:
            d = r.deep
            click.echo(f"deep: {d['experts_run']} experts run through the runtime ({d['io']}); reference: "
                       f"{d['reference']}; worst max relative error {d['worst_rel_err']:.2e} "
                       f"(tolerance {d['tolerance']:g})")
    sys.exit(0 if r.ok else 1)


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--tokens", type=click.IntRange(1), default=5000, show_default=True,
              help="Tokens to run; one token = one top-k step through every MoE layer.")
@click.option("--cache-slots", type=click.IntRange(2), default=16, show_default=True)
@click.option("--seed", type=int, default=12648430, show_default=True)
@click.option("--workload", type=click.Choice(["zipf", "markov", "uniform", "router", "replay"]), default="zipf",
              show_default=True, help="Routing decisions: synthetic, the model's own router, or a JSONL trace.")
@click.option("--trace", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="With --workload replay: JSONL, one line per token: {\"experts\": [[e, ...] per MoE layer]}.")
@click.option("--io", type=click.Choice(["auto", "io_uring", "pread", "buffered"]), default="auto", show_default=True)
@click.option("--no-prefetch", is_flag=True, help="Turn the Markov prefetcher off.")
@click.option("--evict", type=click.Choice(["layer", "lru"]), default="layer", show_default=True,
              help="The cache's victims: by the layer order (with the prefetcher's odds), or least recently used.")
@click.option("--pin-top", type=click.IntRange(0), default=0, show_default=True,
              help="Pin the N experts the trace uses most (its routing profile); at most cache slots - 1.")
@click.option("--emit-golden", type=click.Path(path_type=Path, dir_okay=False),
              help="Also write, for every expert, a seeded input and its float64 reference output (.npz).")
@click.option("--overwrite", is_flag=True, help="With --emit-golden: replace FILE if it exists (only once the new one "
              "is complete).")
@click.option("--json", "as_json", is_flag=True)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def smoke(out: Path, tokens: int, cache_slots: int, seed: int, workload: str, trace: Path | None, io: str,
          no_prefetch: bool, evict: str, pin_top: int, emit_golden: Path | None, overwrite: bool, as_json: bool,
          quiet: bool) -> None:
    """Stream routing decisions through the runtime (loader, cache, prefetcher, kernels) and report telemetry.

    \b
    Examples:
      mertools smoke out/ --tokens 2000 --workload router
      mertools smoke out/ --workload replay --trace routes.jsonl --json
      mertools smoke out/ --io pread --no-prefetch --emit-golden golden.npz
    """
    from mer_runtime.smoke import SmokeConfig, emit_golden as do_golden, render, run_smoke

    from .commit import check_file_target, file_output, refuse_folder_file
    from .memory import check_cache_memory

    if (workload == "replay") != (trace is not None):
        _fail("--workload replay and --trace FILE go together")
    cfg = SmokeConfig(tokens=tokens, cache_slots=cache_slots, seed=seed, workload=workload,
                      replay=str(trace) if trace else None, io=io, prefetch=not no_prefetch, pin_top=pin_top,
                      evict=evict)
    if overwrite and not emit_golden:
        _fail("--overwrite needs --emit-golden")
    if emit_golden:  # found now, not after the whole run
        if not emit_golden.parent.is_dir():
            what = "is not a folder" if emit_golden.parent.exists() else "does not exist"
            raise MertoolsError(f"{emit_golden}: its folder {emit_golden.parent} {what}; create it or write the "
                                "golden file elsewhere")
        # --overwrite replaces an earlier golden, never a file of the folder being read (its dense.gguf, manifest)
        from mer_runtime.manifest import load_manifest

        from .reassemble import folder_files

        refuse_folder_file(emit_golden, out, folder_files(load_manifest(out)))
        if trace and emit_golden.resolve() == trace.resolve():  # the run reads it before the golden replaces it
            raise MertoolsError(f"{emit_golden}: is the --trace file; write the golden file elsewhere")
        check_file_target(emit_golden, overwrite)
    check_cache_memory(out, cache_slots)
    with _Bar(quiet or as_json, "smoke", unit="tok") as bar:
        r = run_smoke(out, cfg, progress=bar)
    if emit_golden:
        with file_output(emit_golden, overwrite) as tmp:  # never a half-written golden, nor one replaced unasked
            r["golden"] = {**do_golden(out, tmp, seed), "file": str(emit_golden)}
    if as_json:
        _emit(r)
    else:
        click.echo(render(r))
        if emit_golden:
            click.echo(f"  golden: {r['golden']['experts']} experts' inputs and float64 outputs in {emit_golden}")


@main.command()
@click.option("--model", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="A GGUF MoE model (default: the bundled llama.cpp-made Mixtral Q4_0, or a generated one).")
@click.option("--out", type=click.Path(path_type=Path),
              help="Where to write the shards: an absent or empty folder (default: the demo's own folder in the user "
              "cache, $XDG_CACHE_HOME/mertools/demo, reused by every run).")
@click.option("--tokens", type=click.IntRange(1), default=300, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def demo(model: Path | None, out: Path | None, tokens: int, as_json: bool) -> None:
    """The whole path on a bundled model: extract, verify --deep against the source, a short smoke run.

    \b
    Example:
      mertools demo
    """
    from .demo import run_demo

    r = run_demo(model, out, tokens=tokens, echo=None if as_json else click.echo)
    if as_json:
        _emit(r)
    if not r["verify"]["ok"]:
        sys.exit(1)


# -- transport: reassemble, pack, unpack, export (issue 9) -----------------------------------------------------------


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--split", is_flag=True, help="Write the parts of a split GGUF source, as the source had them.")
@click.option("--overwrite", is_flag=True, help="Replace MODEL if it exists (only once the new file is complete).")
@click.option("--no-fsync", is_flag=True, help="Skip fsync (faster; the output may not survive a power cut).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def reassemble(out: Path, model: Path, split: bool, overwrite: bool, no_fsync: bool, as_json: bool,
               quiet: bool) -> None:
    """Rebuild the source model from the shard folder OUT into MODEL (a file, or an existing folder).

    A single-file GGUF source comes back byte-identical (checked against the source's xxh3); a split set with
    --split too; otherwise every tensor's bytes are the source's. A SafeTensors checkpoint comes back into the
    folder MODEL (made if absent) as its own shards, index, config.json and the companion files kept in OUT/hf/
    (tokenizer, generation config, ...), byte-identical, whether it was extracted or pulled from the Hub. A folder
    converted with --dtype (or FP8) is refused (exit 2, nothing written).

    \b
    Examples:
      mertools reassemble out/ model.gguf
      mertools reassemble out/ parts/ --split --json
      mertools reassemble out/ mixtral-again/
    """
    from .reassemble import reassemble as do_reassemble

    with _Bar(quiet or as_json, "reassemble") as bar:
        r = do_reassemble(out, model, split=split, overwrite=overwrite, fsync=not no_fsync, progress=bar)
    if as_json:
        _emit(r.as_dict())
        return
    for n in r.notes:
        click.echo(f"note: {n}", err=True)
    files = ", ".join(str(p) for p in r.out)
    click.echo(f"wrote {files}: {r.tensors} tensors, {human_bytes(r.bytes_written)} in {r.seconds:.2f} s; {r.how}")


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.argument("archive", type=click.Path(path_type=Path))
@click.option("--level", type=click.IntRange(1, 22), default=10, show_default=True, help="zstd level.")
@click.option("--threads", type=int, default=-1, show_default=True, help="Compression threads (-1: every core).")
@click.option("--no-long", is_flag=True, help="No long-distance matching (it needs a 128 MiB window to decode).")
@click.option("--overwrite", is_flag=True, help="Replace ARCHIVE if it exists (only once the new one is complete).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def pack(out: Path, archive: Path, level: int, threads: int, no_long: bool, overwrite: bool, as_json: bool,
         quiet: bool) -> None:
    """Write the shard folder OUT as one zstd-compressed tar, manifest first; every checksum checked as read.

    \b
    Examples:
      mertools pack out/ mixtral.tar.zst
      mertools pack out/ mixtral.tar.zst --level 19 --json
    """
    from .pack import pack as do_pack

    with _Bar(quiet or as_json, "pack") as bar:
        r = do_pack(out, archive, overwrite=overwrite, level=level, threads=threads, long=not no_long,
                    progress=bar)
    if as_json:
        _emit(r.as_dict())
    else:
        click.echo(f"wrote {r.archive}: {r.files} files, {human_bytes(r.bytes_in)} -> {human_bytes(r.bytes_out)} "
                   f"(ratio {r.ratio:.3f}) in {r.seconds:.2f} s")


@main.command()
@click.argument("archive", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--overwrite", is_flag=True, help="Replace OUT if it is not empty (only once the new one is complete).")
@click.option("--no-fsync", is_flag=True, help="Skip fsync (faster; the output may not survive a power cut).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def unpack(archive: Path, out: Path, overwrite: bool, no_fsync: bool, as_json: bool, quiet: bool) -> None:
    """Restore a folder written by `pack` into OUT; every checksum is checked before OUT appears.

    \b
    Examples:
      mertools unpack mixtral.tar.zst out/
    """
    from .pack import unpack as do_unpack

    with _Bar(quiet or as_json, "unpack") as bar:
        r = do_unpack(archive, out, overwrite=overwrite, fsync=not no_fsync, progress=bar)
    if as_json:
        _emit(r.as_dict())
    else:
        click.echo(f"restored {r.files} files ({human_bytes(r.bytes_written)}) into {r.out} in {r.seconds:.2f} s; "
                   "every checksum matches the manifest")


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--to", "target", type=click.Choice(["mer"]), required=True, help="The layout to write.")
@click.argument("dest", type=click.Path(path_type=Path))
@click.option("--router", is_flag=True, help="Also write each layer's router as gate_{layer}.bin (f32).")
@click.option("--overwrite", is_flag=True, help="Replace DEST if it is not empty (only once the new one is complete).")
@click.option("--no-fsync", is_flag=True, help="Skip fsync (faster; the output may not survive a power cut).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def export(out: Path, target: str, dest: Path, router: bool, overwrite: bool, no_fsync: bool, as_json: bool,
           quiet: bool) -> None:
    """Write the shard folder OUT in another engine's layout (MER: expert_{g}.bin + metadata.json) into DEST.

    Types are never converted: a type, bias or activation the layout cannot hold is refused. Only the experts (and
    routers) go: MER's layout has no place for dense.gguf or the companion files in OUT/hf/ (tokenizer, config.json,
    ...), which stay in OUT.

    \b
    Examples:
      mertools export out/ --to mer mer-model/
      mertools export out/ --to mer mer-model/ --router --json
    """
    from .export_mer import export_mer

    with _Bar(quiet or as_json, "export") as bar:
        r = export_mer(out, dest, router=router, overwrite=overwrite, fsync=not no_fsync, progress=bar)
    if as_json:
        _emit(r.as_dict())
    else:
        click.echo(f"wrote {r.experts} MER expert files ({r.dtype}, {human_bytes(r.expert_size)} each"
                   f"{f', {r.routers} router files' if r.routers else ''}) to {r.out} in {r.seconds:.2f} s")


# -- hub: pull and push --------------------------------------------------------------------------------------
class _Bars:
    """One tqdm bar per download or conversion step, or nothing when quiet."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bars: list[Any] = []

    def __call__(self, desc: str, total: int) -> Callable[[int], None]:
        if self.quiet:
            return lambda n: None
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, file=sys.stderr,
                   leave=False, dynamic_ncols=True)
        self.bars.append(bar)

        def tick(n: int) -> None:
            bar.update(n)
            if bar.n >= total:
                bar.close()

        return tick

    def close(self) -> None:
        for b in self.bars:
            b.close()


@main.command()
@click.argument("repo")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--revision", help="Branch, tag or commit sha (default: main); resolved to a commit sha once.")
@click.option("--gguf", "gguf_pat", help="The GGUF file (or glob) to pull when the repo holds several quants; "
              "a split set comes whole.")
@click.option("--include", multiple=True, help="Consider only repo files matching this glob (repeatable).")
@click.option("--dtype", type=click.Choice(["q4_0", "q8_0", "f16", "bf16"]),
              help="Quantize during conversion (SafeTensors sources).")
@click.option("--keep-source", is_flag=True, help="Keep the downloaded source files (in OUT.source/).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it is not empty (only once the new output is complete).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def pull(repo: str, out: Path, revision: str | None, gguf_pat: str | None, include: tuple[str, ...],
         dtype: str | None, keep_source: bool, overwrite: bool, as_json: bool, quiet: bool) -> None:
    """Download a hub repo (only what conversion needs), verify every sha256, and convert it into OUT.

    A SafeTensors repo also gives its top-level companion files (tokenizer, generation config, chat template,
    remote code, ...; the rule of `extract`), checked like every file and kept in OUT/hf/.

    Resumable: run it again after an interruption and nothing verified or converted is fetched again.
    HF_HUB_OFFLINE=1 converts from the local Hugging Face cache.

    \b
    Examples:
      mertools pull TheBloke/Mixtral-8x7B-v0.1-GGUF out/ --gguf '*Q4_0.gguf'
      mertools pull mistralai/Mixtral-8x7B-v0.1 out/ --revision main --json
    """
    from .hub.pulling import pull as do_pull

    bars = _Bars(quiet or as_json)
    try:
        r = do_pull(repo, out, revision=revision, gguf=gguf_pat, include=list(include) or None, dtype=dtype,
                    keep_source=keep_source, overwrite=overwrite, progress=bars)
    finally:
        bars.close()
    if not as_json:
        _companion_notes(r.companions_skipped)
    if as_json:
        _emit(r.as_dict())
    elif r.already:
        click.echo(f"{r.out} already holds {r.repo}@{r.commit[:12]}; nothing to do")
    else:
        how = "from the local cache" if r.offline else (
            f"downloaded {human_bytes(r.downloaded_bytes)}, reused {human_bytes(r.reused_bytes)}")
        click.echo(f"pulled {r.repo}@{r.commit[:12]} ({r.kind}, {len(r.files)} files, every sha256 checked; {how}) "
                   f"into {r.out}: {r.extract.get('experts', '?')} experts in {r.seconds:.2f} s"
                   + (f" ({r.extract['experts_resumed']} already written by an earlier run)"
                      if r.extract.get("experts_resumed") else ""))
        if r.extract.get("reassembly_lost"):
            click.echo(f"note: {r.extract['reassembly_lost']}")


@main.command()
@click.argument("out", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.argument("repo")
@click.option("--revision", help="Branch to commit to (default: main; created if missing).")
@click.option("--private", is_flag=True, help="Create the repo private (if it does not exist yet).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def push(out: Path, repo: str, revision: str | None, private: bool, as_json: bool, quiet: bool) -> None:
    """Verify the shard folder OUT, then upload it to a hub repo with a generated model card.

    Every file the manifest lists goes up, the companion files in hf/ (tokenizer, ...) included; nothing else.

    Re-running resumes: files the hub already holds with the same sha256 are not sent again.

    \b
    Examples:
      mertools push out/ me/mixtral-8x7b-mer-shards
      mertools push out/ me/mixtral-8x7b-mer-shards --revision q4_0 --private
    """
    from .hub.pushing import push as do_push

    r = do_push(out, repo, revision=revision, private=private, quiet=quiet or as_json)
    if as_json:
        _emit(r)
    else:
        click.echo(f"pushed {out} to {r['repo']}@{r['revision']}: {r['uploaded_files']} file(s) sent "
                   f"({human_bytes(r['uploaded_bytes'])}), {r['skipped_files']} already on the hub"
                   + (f", {r['deleted_files']} left by an earlier push deleted" if r["deleted_files"] else "")
                   + "; commit "
                   f"{(r['commit'] or 'none')[:12]}")


if __name__ == "__main__":  # pragma: no cover
    main()
