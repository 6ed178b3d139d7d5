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


def _rd_module():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import rd
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return rd


def test_transparency_and_dominance_follow_each_models_quality_bounds():
    rd = _rd_module()
    ref = {"top1": 0.9283, "mrr": 0.4721, "within_50c": 1.0}
    assert rd.transparent("fashion_cnn", {"top1": 0.9273}, ref)
    assert not rd.transparent("fashion_cnn", {"top1": 0.9272}, ref)
    assert rd.transparent("minilm", {"mrr": 0.4671, "mean_cosine": 0.999}, ref)
    assert not rd.transparent("minilm", {"mrr": 0.48, "mean_cosine": 0.9989}, ref)
    # CREPE: one more tone of 500 off by over 50 cents is allowed; its pitch difference is bounded above
    assert rd.transparent("crepe", {"within_50c": 0.998, "cents_to_ref": 1.0}, ref)
    assert not rd.transparent("crepe", {"within_50c": 0.996, "cents_to_ref": 0.5}, ref)
    assert not rd.transparent("crepe", {"within_50c": 1.0, "cents_to_ref": 1.01}, ref)
    a, b = {"within_50c": 1.0, "cents_to_ref": 0.6}, {"within_50c": 1.0, "cents_to_ref": 0.8}
    assert rd.no_worse("crepe", a, b) and not rd.no_worse("crepe", b, a)


def test_report_of_a_model_with_an_upper_bound_metric():
    """The summary's columns and IOQ comparison come from the model's bounds: a gradient point with a
    smaller pitch difference reaches IOQ's point, one with a larger difference does not."""
    rd = _rd_module()

    def row(method, setting, nbytes, cents, wall=""):
        return {"method": method, "setting": setting, "bytes": nbytes, "within_50c": 1.0, "cents_to_ref": cents,
                "transparent": cents <= 1.0, "opt_wall_s": wall}

    rows = [row("float", "float32", 1948384, 0.0), row("nncodec", "qp=-14", 180324, 0.967),
            row("nncjax-ioq", "lam=0.003", 159257, 0.816, 38.0),
            row("nncjax-sens", "lam=0.001", 150000, 0.9, 3.0),
            row("nncjax-sens-gptq-ft", "lam=0.003", 104754, 0.684, 114.0)]
    text = rd.summary(rows, "crepe")
    assert "pitch difference to float32 [cents] ≤ 1" in text
    assert "| nncjax-sens-gptq-ft | 104754 | 0.581 (41.9 % smaller) | lam=0.003 | 1.0000 | 0.684 | 114.0 |" in text
    assert "| 0.003 | 159257 | 1.0000 | 38.0 | nncjax-sens-gptq-ft lam=0.003 | 104754 | 1.0000 | 114.0 | 0.3x |" in text


def test_rd_quick_run_on_the_held_out_model(tmp_path):
    """CREPE's path (its own quality bounds, LSA without folding) runs end to end too."""
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "rd.py"), "--quick", "--models", "crepe",
                          "--methods", "sens", "sens-bnf", "--subset", "50", "--out", str(tmp_path)],
                         check=False, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    with open(tmp_path / "rd_crepe.csv", newline="") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"float", "nncjax-sens", "nncjax-sens-bnf"}
    assert float(rows["float"]["cents_to_ref"]) == 0.0
    for m in ("nncjax-sens", "nncjax-sens-bnf"):
        assert 0 < int(rows[m]["bytes"]) < 1948384 / 5 and 0.0 < float(rows[m]["cents_to_ref"]) < 50.0
    assert (tmp_path / "rd_crepe.png").stat().st_size > 10_000
    assert "pitch difference to float32 [cents] ≤ 1" in (tmp_path / "RD.md").read_text()
