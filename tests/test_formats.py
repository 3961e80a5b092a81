"""The format table: names, parse(), and agreement with the reference's own constants."""

from __future__ import annotations

import pytest
import torch
from mx_reference import BLOCK_SIZE, REFERENCE_FORMATS, element_grid

from lightning_lowprec import formats
from lightning_lowprec.formats import FORMATS, Format, parse

NAMES = [
    "mxfp8_e4m3",
    "mxfp8_e5m2",
    "mxfp6_e3m2",
    "mxfp6_e2m3",
    "mxfp4_e2m1",
    "mxint8",
    "fp8_e4m3",
    "fp8_e5m2",
]


def test_names_are_exactly_the_issue_names():
    assert sorted(FORMATS) == sorted(NAMES)
    assert sorted(REFERENCE_FORMATS) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_parse_returns_the_format(name):
    fmt = parse(name)
    assert isinstance(fmt, Format)
    assert fmt is FORMATS[name]
    assert fmt.name == name
    assert parse(fmt) is fmt  # a Format passes through


@pytest.mark.parametrize("bad", ["mxfp8", "MXFP8_E4M3", "", "fp4", None, 3])
def test_unknown_name_lists_every_valid_name(bad):
    with pytest.raises(ValueError) as info:
        parse(bad)
    message = str(info.value)
    for name in NAMES:
        assert name in message


@pytest.mark.parametrize("name", NAMES)
def test_table_agrees_with_the_reference_table(name):
    fmt, ref = FORMATS[name], REFERENCE_FORMATS[name]
    assert fmt.max == ref.max
    assert fmt.emax == ref.emax
    assert fmt.mbits == ref.mbits
    assert fmt.scaling == ("tensor" if ref.per_tensor else "block")
    assert fmt.element == ("int" if ref.integer else "float")
    assert fmt.block_size == (None if ref.per_tensor else BLOCK_SIZE)
    if not ref.integer:
        assert fmt.emin == ref.emin
        assert fmt.min_normal == 2.0**ref.emin
        assert fmt.min_subnormal == 2.0 ** (ref.emin - ref.mbits)
        assert fmt.bits == 1 + fmt.ebits + fmt.mbits
        assert fmt.bias == 1 - ref.emin
    else:
        assert fmt.min_subnormal == 2.0**-6
    assert formats.MX_BLOCK_SIZE == BLOCK_SIZE


@pytest.mark.parametrize("name", ["mxfp8_e4m3", "mxfp8_e5m2", "fp8_e4m3", "fp8_e5m2"])
def test_fp8_constants_agree_with_torch(name):
    """torch's own float8 dtypes are a third, independent source for the FP8 constants."""
    dtype = torch.float8_e4m3fn if name.endswith("e4m3") else torch.float8_e5m2
    assert FORMATS[name].torch_dtype == dtype
    info = torch.finfo(dtype)
    assert REFERENCE_FORMATS[name].max == info.max
    assert 2.0 ** REFERENCE_FORMATS[name].emin == info.smallest_normal
    # Every finite non-negative value of the dtype, from all 256 bit patterns, is the grid.
    values = torch.arange(256, dtype=torch.int16).to(torch.uint8).view(dtype).float()
    values = values[torch.isfinite(values) & (values >= 0)].unique().tolist()
    assert sorted(values) == element_grid(name)


@pytest.mark.parametrize(
    ("name", "grid_size", "expected_head", "expected_tail"),
    [
        ("mxfp4_e2m1", 8, [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], [6.0]),
        ("mxfp6_e2m3", 32, [0.0, 0.125, 0.25], [6.5, 7.0, 7.5]),
        ("mxfp6_e3m2", 32, [0.0, 0.0625, 0.125], [20.0, 24.0, 28.0]),
        ("mxint8", 128, [0.0, 1 / 64, 2 / 64], [126 / 64, 127 / 64]),
    ],
)
def test_reference_grids_of_narrow_formats(name, grid_size, expected_head, expected_tail):
    """The non-negative codes of each format: 2**(bits-1) of them, all finite."""
    grid = element_grid(name)
    assert len(grid) == grid_size
    assert grid[: len(expected_head)] == expected_head
    assert grid[-len(expected_tail) :] == expected_tail
