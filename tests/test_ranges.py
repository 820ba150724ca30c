"""--layers/--experts selections are intervals: membership and the 'not in the model' report never enumerate."""

from __future__ import annotations

import pytest

from mertools.errors import MertoolsError
from mertools.ranges import Ranges, as_ranges, parse_ranges


def test_parse_and_membership():
    r = parse_ranges(" 7, 0-3 ,2-5,9", "layers")
    assert r.intervals == ((0, 5), (7, 7), (9, 9))
    assert [n for n in range(12) if n in r] == [0, 1, 2, 3, 4, 5, 7, 9]
    assert "3" not in r and None not in r
    assert parse_ranges(None, "layers") is None and parse_ranges("all", "layers") is None


def test_huge_ranges_cost_nothing():
    r = parse_ranges("0-99999999999999999999,5", "experts")
    assert r.intervals == ((0, 99999999999999999999),)
    assert 10**19 in r and 10**20 not in r
    gone = r.missing({0, 1, 2, 3})
    assert gone.intervals == ((4, 99999999999999999999),) and str(gone) == "4-99999999999999999999"


def test_missing_between_and_around():
    r = Ranges.parse("0-10", "layers")
    assert str(r.missing({1, 2, 5})) == "0,3-4,6-10"
    assert not Ranges.parse("1-2", "layers").missing({1, 2, 3})
    many = Ranges.of(range(0, 40, 2))
    assert str(many.missing(set())).endswith(",... (12 more ranges)")


@pytest.mark.parametrize("spec", ["x-y", "3-1", "-1", "1-", "1,,2", "1-2-3", "9" * 5000, "1," * 6000])
def test_bad_specs(spec):
    with pytest.raises(MertoolsError, match="--layers .*expected numbers and ranges"):
        Ranges.parse(spec, "layers")


def test_library_callers_may_pass_sets():
    assert as_ranges({3, 1, 2}).intervals == ((1, 3),) and as_ranges(None) is None
