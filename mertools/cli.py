"""The ``mertools`` command: thin click commands over the library's functions.

Exit codes: 0 success; 1 ``verify`` found problems; 2 bad input or usage (one line on stderr, no traceback).
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import click

from mer_runtime.errors import MerError

from . import __version__
from .describe import describe, render
from .extract import extract as do_extract
from .extract import parse_ranges
from .units import human_bytes
from .verify import verify as do_verify


def _fail(msg: str) -> None:
    click.echo(f"error: {msg}", err=True)
    sys.exit(2)


@contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except MerError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        click.echo("interrupted; no partial output was left behind", err=True)
        sys.exit(130)


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


def _emit(data: dict[str, Any]) -> None:
    click.echo(json.dumps(data, indent=1, default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mertools")
def main() -> None:
    """Turn Mixture-of-Experts models into aligned per-expert shards for SSD streaming."""


@main.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--layers", help="Only these MoE layers, e.g. 0-3,7 (default: all).")
@click.option("--experts", help="Only these experts in each layer, e.g. 0-7 (default: all).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it is not empty (only once the new output is complete).")
@click.option("--no-fsync", is_flag=True, help="Skip fsync (faster; the output may not survive a power cut).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def extract(src: Path, out: Path, layers: str | None, experts: str | None, overwrite: bool, no_fsync: bool,
            as_json: bool, quiet: bool) -> None:
    """Write each expert of SRC (a .gguf file, or the first part of a split set) to OUT.

    \b
    Examples:
      mertools extract mixtral-q4_0.gguf out/
      mertools extract model-00001-of-00004.gguf out/ --layers 0-3 --json
    """
    bar = _Bar(quiet or as_json, "extract")
    with _errors():
        try:
            r = do_extract(src, out, layers=parse_ranges(layers, "layers"), experts=parse_ranges(experts, "experts"),
                           overwrite=overwrite, fsync=not no_fsync, progress=bar)
        finally:
            bar.close()
    if as_json:
        _emit(r.as_dict())
    else:
        click.echo(
            f"wrote {r.experts} experts in {r.layers} layers to {r.out}: {human_bytes(r.bytes_written)} "
            f"({human_bytes(r.expert_bytes)} shards + {human_bytes(r.dense_bytes)} dense.gguf) "
            f"in {r.seconds:.2f} s, {r.gb_per_s:.2f} GB/s"
        )


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
    with _errors():
        d = describe(path)
    _emit(d) if as_json else click.echo(render(d))


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--deep", is_flag=True, help="Also run every expert through the runtime and compare with a float64 "
              "reference (tolerance 1e-4 relative).")
@click.option("--against", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="With --deep: the source model, for a reference computed from its own bytes.")
@click.option("--io", type=click.Choice(["auto", "io_uring", "pread", "buffered"]), default="auto",
              show_default=True, help="With --deep: how the runtime reads shards.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def verify(out: Path, deep: bool, against: Path | None, io: str, as_json: bool, quiet: bool) -> None:
    """Check every shard of OUT: present, right size and alignment, every checksum right.

    Exits 1 and lists each problem if anything is wrong.

    \b
    Examples:
      mertools verify out/
      mertools verify out/ --deep --against mixtral-q4_0.gguf
    """
    if against and not deep:
        _fail("--against needs --deep")
    bar, deep_bar = _Bar(quiet or as_json, "verify"), _Bar(quiet or as_json, "deep", unit="expert")
    with _errors():
        if not out.is_dir():
            raise click.UsageError(f"{out}: not a folder")
        try:
            r = do_verify(out, deep=deep, against=against, io=io, progress=bar, deep_progress=deep_bar)
        finally:
            bar.close()
            deep_bar.close()
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
@click.option("--pin-top", type=click.IntRange(0), default=0, show_default=True,
              help="Pin the N experts the trace uses most (its routing profile); at most cache slots - 1.")
@click.option("--emit-golden", type=click.Path(path_type=Path, dir_okay=False),
              help="Also write, for every expert, a seeded input and its float64 reference output (.npz).")
@click.option("--json", "as_json", is_flag=True)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def smoke(out: Path, tokens: int, cache_slots: int, seed: int, workload: str, trace: Path | None, io: str,
          no_prefetch: bool, pin_top: int, emit_golden: Path | None, as_json: bool, quiet: bool) -> None:
    """Stream routing decisions through the runtime (loader, cache, prefetcher, kernels) and report telemetry.

    \b
    Examples:
      mertools smoke out/ --tokens 2000 --workload router
      mertools smoke out/ --workload replay --trace routes.jsonl --json
      mertools smoke out/ --io pread --no-prefetch --emit-golden golden.npz
    """
    from mer_runtime.smoke import SmokeConfig, emit_golden as do_golden, render, run_smoke

    if (workload == "replay") != (trace is not None):
        _fail("--workload replay and --trace FILE go together")
    cfg = SmokeConfig(tokens=tokens, cache_slots=cache_slots, seed=seed, workload=workload,
                      replay=str(trace) if trace else None, io=io, prefetch=not no_prefetch, pin_top=pin_top)
    bar = _Bar(quiet or as_json, "smoke", unit="tok")
    with _errors():
        try:
            r = run_smoke(out, cfg, progress=bar)
        finally:
            bar.close()
        if emit_golden:
            r["golden"] = do_golden(out, emit_golden, seed)
    if as_json:
        _emit(r)
    else:
        click.echo(render(r))
        if emit_golden:
            click.echo(f"  golden: {r['golden']['experts']} experts' inputs and float64 outputs in {emit_golden}")


@main.command()
@click.option("--model", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="A GGUF MoE model (default: the bundled llama.cpp-made Mixtral Q4_0, or a generated one).")
@click.option("--out", type=click.Path(path_type=Path), help="Where to write the shards (default: a temp folder).")
@click.option("--tokens", type=click.IntRange(1), default=300, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def demo(model: Path | None, out: Path | None, tokens: int, as_json: bool) -> None:
    """The whole path on a bundled model: extract, verify --deep against the source, a short smoke run.

    \b
    Example:
      mertools demo
    """
    from .demo import run_demo

    with _errors():
        r = run_demo(model, out, tokens=tokens, echo=None if as_json else click.echo)
    if as_json:
        _emit(r)
    if not r["verify"]["ok"]:
        sys.exit(1)


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

    Resumable: run it again after an interruption and nothing verified or converted is fetched again.
    HF_HUB_OFFLINE=1 converts from the local Hugging Face cache.

    \b
    Examples:
      mertools pull TheBloke/Mixtral-8x7B-v0.1-GGUF out/ --gguf '*Q4_0.gguf'
      mertools pull mistralai/Mixtral-8x7B-v0.1 out/ --revision main --json
    """
    from .hub.pull import pull as do_pull

    bars = _Bars(quiet or as_json)
    with _errors():
        try:
            r = do_pull(repo, out, revision=revision, gguf=gguf_pat, include=list(include) or None, dtype=dtype,
                        keep_source=keep_source, overwrite=overwrite, progress=bars)
        finally:
            bars.close()
    if as_json:
        _emit(r.as_dict())
    elif r.already:
        click.echo(f"{r.out} already holds {r.repo}@{r.commit[:12]}; nothing to do")
    else:
        how = "from the local cache" if r.offline else (
            f"downloaded {human_bytes(r.downloaded_bytes)}, reused {human_bytes(r.reused_bytes)}")
        click.echo(f"pulled {r.repo}@{r.commit[:12]} ({r.kind}, {len(r.files)} files, every sha256 checked; {how}) "
                   f"into {r.out}: {r.extract.get('experts', '?')} experts in {r.seconds:.2f} s")


@main.command()
@click.argument("out", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.argument("repo")
@click.option("--revision", help="Branch to commit to (default: main; created if missing).")
@click.option("--private", is_flag=True, help="Create the repo private (if it does not exist yet).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def push(out: Path, repo: str, revision: str | None, private: bool, as_json: bool, quiet: bool) -> None:
    """Verify the shard folder OUT, then upload it to a hub repo with a generated model card.

    Re-running resumes: files the hub already holds with the same sha256 are not sent again.

    \b
    Examples:
      mertools push out/ me/mixtral-8x7b-mer-shards
      mertools push out/ me/mixtral-8x7b-mer-shards --revision q4_0 --private
    """
    from .hub.push import push as do_push

    with _errors():
        r = do_push(out, repo, revision=revision, private=private, quiet=quiet or as_json)
    if as_json:
        _emit(r)
    else:
        click.echo(f"pushed {out} to {r['repo']}@{r['revision']}: {r['uploaded_files']} file(s) sent "
                   f"({human_bytes(r['uploaded_bytes'])}), {r['skipped_files']} already on the hub; commit "
                   f"{(r['commit'] or 'none')[:12]}")


if __name__ == "__main__":  # pragma: no cover
    main()
