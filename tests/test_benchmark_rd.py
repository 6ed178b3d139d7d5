"""benchmarks/rd.py end to end on the Fashion-MNIST CNN (quick mode, an evaluation subset): the script
that produces the README's RD evidence runs, measures every fast method and writes its CSV, plot and
report. NNCodec's rows need the oracle and are covered by the interop tests."""

import csv
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_rd_quick_run_writes_csv_plot_and_report(tmp_path):
    methods = ["ioq", "sens", "sens-bc", "sens-gptq", "sens-gptq-ft"]
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "rd.py"), "--quick", "--models", "fashion_cnn",
                          "--methods", *methods, "--subset", "500", "--out", str(tmp_path)],
                         check=False, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    with open(tmp_path / "rd_fashion_cnn.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["method"] for r in rows} == {"float", *(f"nncjax-{m}" for m in methods)}
    for r in rows:
        assert int(r["bytes"]) > 0 and 0.0 < float(r["top1"]) <= 1.0
        if r["method"] != "float":
            assert int(r["bytes"]) < 1567400 / 5 and float(r["opt_wall_s"]) > 0  # coded, and timed
    assert (tmp_path / "rd_fashion_cnn.png").stat().st_size > 10_000
    report = (tmp_path / "RD.md").read_text()
    assert "nncjax-sens-bc" in report and "Does gradient RD reach each IOQ point?" in report
