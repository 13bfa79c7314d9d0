"""The kNN table's verdict: a gain counts only beyond two binomial standard errors of the test split."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _common import verdict  # noqa: E402
from build_md import readme_status  # noqa: E402


def row(trained: float, random: float, data: str = "embedded") -> dict:
    return {"trained": trained, "random": random, "data": data}


def test_verdict_uses_two_standard_errors_of_the_test_split():
    # 40% on 1,000 images: s.e. = sqrt(0.4 * 0.6 / 1000) = 1.549 points, margin 3.098
    assert verdict(row(40.0, 36.8)) == "above"  # +3.2
    assert verdict(row(40.0, 37.0)) == "within noise"  # +3.0
    assert verdict(row(40.0, 43.2)) == "below"  # -3.2
    # 10,000 images: margin 0.98 points
    assert verdict(row(40.0, 38.9, "cifar10")) == "above"
    assert verdict(row(40.0, 39.1, "cifar10")) == "within noise"


def test_verdict_unknown_test_size():
    assert verdict(row(40.0, 10.0, "/some/folder")) == "?"
    # a row that records its test split's size (an ImageFolder of 10,000 test images)
    assert verdict({**row(40.0, 38.9, "/some/folder"), "test_images": 10000}) == "above"


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_margin_is_symmetric(p):
    t = 100 * p
    assert verdict(row(t, t)) == "within noise"


def test_readme_status_prefers_the_first_rows_dir_and_names_the_test_size(tmp_path):
    import json

    big, small = tmp_path / "knn_rows_c10k", tmp_path / "knn_rows"
    for d in (big, small):
        d.mkdir()
    (big / "simclr.json").write_text(json.dumps({**row(41.7, 34.3, "/data/c10"), "test_images": 10000}))
    (small / "simclr.json").write_text(json.dumps(row(39.3, 31.8)))
    (small / "jigsaw.json").write_text(json.dumps(row(25.5, 31.8)))
    readme = tmp_path / "README.md"
    readme.write_text("| a | <!-- knn:simclr -->old<!-- /knn --> |\n| b | <!-- knn:jigsaw -->old<!-- /knn --> |\n"
                      "| c | <!-- knn:mae -->kept<!-- /knn --> |\n")
    readme_status([big, small], readme)
    text = readme.read_text()
    assert "beats random init: kNN 41.7 vs 34.3 (+7.4) after the CPU budget, 10,000 test images" in text
    assert "below random init: kNN 25.5 vs 31.8 (-6.3) after the CPU budget, 1,000 test images" in text
    assert "<!-- knn:mae -->kept<!-- /knn -->" in text  # no row anywhere: the cell is left alone
    # a second seed that disagrees makes the cell "not settled"
    seeds = tmp_path / "seed1"
    seeds.mkdir()
    (seeds / "simclr.json").write_text(json.dumps({**row(34.6, 34.3, "/data/c10"), "test_images": 10000}))
    readme_status([big, small], readme, seed_dir=seeds)
    text = readme.read_text()
    assert ("not settled: kNN 41.7 vs 34.3 (+7.4) after the CPU budget, 10,000 test images; "
            "with trainer.seed=1 34.6 vs 34.3 (+0.3, within noise)") in text
    assert "below random init: kNN 25.5 vs 31.8" in text  # no second seed: unchanged
    # a row from a folder of unknown size still gets a cell
    (small / "mae.json").write_text(json.dumps(row(40.0, 30.0, "/some/folder")))
    readme_status([big, small], readme)
    assert ("not judged (test size unknown): kNN 40.0 vs 30.0 (+10.0) after the CPU budget, an unknown number of "
            "test images") in readme.read_text()


def test_knn_table_refuses_an_unknown_method_before_running_anything(tmp_path, monkeypatch, capsys):
    import knn_table

    out = tmp_path / "t.md"
    monkeypatch.setattr(sys, "argv", ["knn_table.py", "--methods", "barlow", "simclr", "--out", str(out)])
    with pytest.raises(SystemExit) as exc:
        knn_table.main()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "no configs/NAME/cifar10.yaml for barlow; methods: barlow_twins," in err
    assert not out.exists() and not (tmp_path / "knn_rows").exists()  # nothing ran, nothing written
