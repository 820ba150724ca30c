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

    def __init__(self, quiet: bool, desc: str):
        self.quiet, self.desc, self.bar = quiet, desc, None

    def __call__(self, total: int, items: int) -> Callable[[int], None]:
        if self.quiet:
            return lambda n: None
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=self.desc,
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
            f"wrote {r.experts} experts in {r.layers} layers to {r.out}: {r.bytes_written / 1e9:.3f} GB "
            f"({r.expert_bytes / 1e9:.3f} GB shards + {r.dense_bytes / 1e9:.3f} GB dense.gguf) "
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
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def verify(out: Path, as_json: bool, quiet: bool) -> None:
    """Check every shard of OUT: present, right size and alignment, every checksum right.

    Exits 1 and lists each problem if anything is wrong.

    \b
    Example:
      mertools verify out/
    """
    bar = _Bar(quiet or as_json, "verify")
    with _errors():
        if not out.is_dir():
            raise click.UsageError(f"{out}: not a folder")
        try:
            r = do_verify(out, progress=bar)
        finally:
            bar.close()
    if as_json:
        _emit(r.as_dict())
    else:
        for w in r.warnings:
            click.echo(f"warning: {w}", err=True)
        for p in r.problems:
            click.echo(f"FAIL {p}")
        gbps = r.bytes_read / r.seconds / 1e9 if r.seconds else 0
        status = "OK" if r.ok else f"{len(r.problems)} problem(s)"
        click.echo(f"{status}: {r.experts_checked} experts, {r.bytes_read / 1e9:.3f} GB read in {r.seconds:.2f} s "
                   f"({gbps:.2f} GB/s)")
    sys.exit(0 if r.ok else 1)


if __name__ == "__main__":  # pragma: no cover
    main()
