"""Parsing of command-line values."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nnresume.config import format_bytes, parse_memory, parse_spacing
from nnresume.errors import UsageError


@pytest.mark.parametrize("text, expected", [
    ("28G", 28 * 2**30), ("28g", 28 * 2**30), ("28GB", 28 * 2**30), ("28GiB", 28 * 2**30),
    ("512M", 512 * 2**20), ("1.5T", int(1.5 * 2**40)), ("100K", 102400), ("123456789B", 123456789),
    (" 4G ", 4 * 2**30),
])
def test_sizes(text: str, expected: int) -> None:
    assert parse_memory(text).bytes == expected and parse_memory(text).fraction is None


@pytest.mark.parametrize("text, fraction", [("0.8", 0.8), (".5", 0.5), ("0.99", 0.99), ("0.05", 0.05)])
def test_fractions(text: str, fraction: float) -> None:
    assert parse_memory(text).fraction == fraction and parse_memory(text).bytes is None


@pytest.mark.parametrize("text", ["", "G", "-1G", "abc", "28X", "1..2G", "0", "0G"])
def test_rejected(text: str) -> None:
    with pytest.raises(UsageError):
        parse_memory(text)


@pytest.mark.parametrize("text", ["1.5", "1", "1.0", "2400", "28"])
def test_bare_numbers_from_one_up_are_ambiguous(text: str) -> None:
    with pytest.raises(UsageError, match="ambiguous") as e:
        parse_memory(text)
    assert f"{text}G" in (e.value.hint or "")


def test_a_budget_below_what_nnresume_needs_is_refused() -> None:
    from nnresume.config import MIN_BUDGET, MemoryBudget, check_budget

    check_budget(MIN_BUDGET, MemoryBudget(bytes=MIN_BUDGET))
    with pytest.raises(UsageError, match="1 KiB, less than"):
        check_budget(1024, parse_memory("1K"))
    with pytest.raises(UsageError, match="0.001 of available memory"):
        check_budget(10 << 20, parse_memory("0.001"))


@given(st.integers(min_value=1, max_value=2**50), st.sampled_from(["B", "K", "M", "G", "T"]))
def test_integer_sizes_roundtrip(n: int, unit: str) -> None:
    factor = {"B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[unit]
    assert parse_memory(f"{n}{unit}").bytes == n * factor


@given(st.text(max_size=12))
def test_parser_never_crashes(text: str) -> None:
    try:
        budget = parse_memory(text)
    except UsageError:
        return
    assert (budget.bytes or 0) > 0 or (budget.fraction or 0) > 0


def test_spacing() -> None:
    assert parse_spacing(("1", "0.5", "0.5")) == (1.0, 0.5, 0.5)
    assert parse_spacing(()) is None
    for bad in (("1", "2"), ("a", "b", "c"), ("1", "0", "1")):
        with pytest.raises(UsageError):
            parse_spacing(bad)


def test_format_bytes() -> None:
    assert format_bytes(512) == "512 B"
    assert format_bytes(3 * 2**30) == "3.0 GiB"
    assert format_bytes(2400 * 2**20) == "2.3 GiB"
    assert format_bytes(None) == "?"
