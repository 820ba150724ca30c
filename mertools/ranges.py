"""Number selections such as ``--layers 0-3,7``, kept as intervals: ``0-99999999999`` costs two integers, not a list."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from .errors import MertoolsError

MAX_SPEC = 10_000  # characters; a selection longer than this is a mistake, not a request


@dataclass(frozen=True)
class Ranges:
    """A set of non-negative integers as sorted, disjoint, non-adjacent closed intervals ``(lo, hi)``.

    Example:
        >>> r = Ranges.parse("0-3,7", "layers")
        >>> 2 in r, 5 in r, 7 in r
        (True, False, True)
        >>> str(Ranges.parse("5-99999999999", "layers").missing({5, 6}))
        '7-99999999999'
    """

    intervals: tuple[tuple[int, int], ...]

    @classmethod
    def of(cls, numbers: Iterable[int]) -> "Ranges":
        return cls._merged((n, n) for n in numbers)

    @classmethod
    def _merged(cls, pairs: Iterable[tuple[int, int]]) -> "Ranges":
        out: list[tuple[int, int]] = []
        for lo, hi in sorted(pairs):
            if out and lo <= out[-1][1] + 1:
                out[-1] = (out[-1][0], max(out[-1][1], hi))
            else:
                out.append((lo, hi))
        return cls(tuple(out))

    @classmethod
    def parse(cls, spec: str, what: str) -> "Ranges":
        """'0-3,7' -> intervals (0, 3), (7, 7); a bad spec raises MertoolsError naming the option ``--what``."""
        bad = MertoolsError(f"--{what} {spec[:80]!r}: expected numbers and ranges such as 0-3,7")
        if len(spec) > MAX_SPEC:
            raise bad
        pairs = []
        for part in spec.split(","):
            part = part.strip()
            try:
                a, dash, b = part.partition("-")
                lo = int(a)
                hi = int(b) if dash else lo
            except ValueError:
                raise bad from None
            if lo < 0 or hi < lo:
                raise bad
            pairs.append((lo, hi))
        return cls._merged(pairs)

    def __contains__(self, n: object) -> bool:
        if not isinstance(n, int):
            return False
        lo_i, hi_i = 0, len(self.intervals)
        while lo_i < hi_i:  # binary search: a selection may hold many intervals
            mid = (lo_i + hi_i) // 2
            lo, hi = self.intervals[mid]
            if n < lo:
                hi_i = mid
            elif n > hi:
                lo_i = mid + 1
            else:
                return True
        return False

    def __bool__(self) -> bool:
        return bool(self.intervals)

    def missing(self, have: Iterable[int]) -> "Ranges":
        """The numbers in this selection that are not in ``have`` (a small set, e.g. the model's layers)."""
        present = sorted(set(have))
        out: list[tuple[int, int]] = []
        for lo, hi in self.intervals:
            cur = lo
            for h in present:
                if h < cur:
                    continue
                if h > hi:
                    break
                if h > cur:
                    out.append((cur, h - 1))
                cur = h + 1
            if cur <= hi:
                out.append((cur, hi))
        return Ranges(tuple(out))

    def __str__(self) -> str:
        shown = [f"{lo}" if lo == hi else f"{lo}-{hi}" for lo, hi in self.intervals[:8]]
        more = len(self.intervals) - len(shown)
        return ",".join(shown) + (f",... ({more} more ranges)" if more > 0 else "")


def parse_ranges(spec: str | None, what: str) -> Ranges | None:
    """'0-3,7' -> Ranges; None, '' or 'all' -> None (everything).

    >>> 3 in parse_ranges("0-3,7", "layers")
    True
    >>> parse_ranges("all", "layers") is None
    True
    """
    if spec is None or spec.strip() in ("", "all"):
        return None
    return Ranges.parse(spec, what)


def as_ranges(sel: Iterable[int] | Ranges | None) -> Ranges | None:
    """A library caller may pass a set of ints; everything downstream works on Ranges."""
    if sel is None or isinstance(sel, Ranges):
        return sel
    return Ranges.of(sel)
