"""The built-in default job runs offline and its numbers make sense."""

import math

from lightning_lowprec.demo import main, run
from lightning_lowprec.formats import FORMATS


def test_demo_reports_every_format_with_sensible_errors():
    rows = {row["format"]: row for row in run("pythia-14m", seed=0)}
    assert set(rows) == set(FORMATS)
    for row in rows.values():
        assert math.isfinite(row["weight SQNR dB"]) and math.isfinite(row["logits SQNR dB"])
    sqnr = {name: row["weight SQNR dB"] for name, row in rows.items()}
    # Each extra mantissa bit buys ~6 dB: INT8 (6 fraction bits) > E4M3/E2M3 (3) > E5M2/E3M2 (2)
    # > E2M1 (1).
    assert sqnr["mxint8"] > sqnr["mxfp8_e4m3"] > sqnr["mxfp8_e5m2"] > sqnr["mxfp4_e2m1"]
    assert abs(sqnr["mxfp6_e2m3"] - sqnr["mxfp8_e4m3"]) < 1.0  # same mantissa, no saturation
    assert rows["mxfp4_e2m1"]["bits/element"] == 4.25


def test_demo_cli_prints_a_table(capsys):
    main(["--model", "pythia-14m"])
    out = capsys.readouterr().out
    assert out.count("\n|") >= len(FORMATS) + 1
    assert "mxfp6_e2m3" in out
