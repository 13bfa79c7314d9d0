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


def test_readme_status_leads_with_the_gpu_row(tmp_path):
    import json

    cpu, gpu = tmp_path / "knn_rows_c10k", tmp_path / "knn_rows_gpu"
    for d in (cpu, gpu):
        d.mkdir()
    c10k = {"data": "/data/c10", "test_images": 10000}
    (cpu / "beit.json").write_text(json.dumps({**row(34.7, 33.6), **c10k}))
    (gpu / "beit.json").write_text(json.dumps({**row(46.3, 33.8), **c10k, "train_images": 50000,
                                               "command": "python -m selfsup pretrain trainer.epochs=30"}))
    (gpu / "mae.json").write_text(json.dumps({**row(48.7, 35.0), **c10k, "command": "x trainer.epochs=45"}))
    (gpu / "jigsaw.json").write_text(json.dumps({"error": "out of memory", "data": "/data/c10"}))
    (cpu / "jigsaw.json").write_text(json.dumps({**row(28.4, 34.3), **c10k}))
    readme = tmp_path / "README.md"
    readme.write_text("<!-- knn:beit -->old<!-- /knn -->\n<!-- knn:mae -->old<!-- /knn -->\n"
                      "<!-- knn:jigsaw -->old<!-- /knn -->\n")
    readme_status([cpu], readme, gpu_dir=gpu)
    text = readme.read_text()
    assert ("<!-- knn:beit -->beats random init after the GPU budget: kNN 46.3 vs 33.8 (+12.5), 30 epochs of 50,000 "
            "training images, 10,000 test images; beats random init: kNN 34.7 vs 33.6 (+1.1) after the CPU budget, "
            "10,000 test images<!-- /knn -->") in text
    # a GPU row alone makes the whole cell; a failed GPU row leaves the CPU cell as it was
    assert ("<!-- knn:mae -->beats random init after the GPU budget: kNN 48.7 vs 35.0 (+13.7), 45 epochs of the "
            "training images, 10,000 test images<!-- /knn -->") in text
    assert "<!-- knn:jigsaw -->below random init: kNN 28.4 vs 34.3 (-5.9) after the CPU budget" in text


def test_knn_table_gpu_budget_keeps_the_recipe_backbone_and_one_epoch_count(tmp_path, monkeypatch):
    import subprocess
    from types import SimpleNamespace

    import knn_table

    seen, real = [], subprocess.run

    def fake(cmd, **kw):  # the pretrain command is recorded, not run; anything else (machine facts) runs
        if "pretrain" not in cmd:
            return real(cmd, **kw)
        seen.append(cmd)
        return SimpleNamespace(returncode=1, stderr="x")

    monkeypatch.setattr(subprocess, "run", fake)
    for budget in ("cpu", "gpu"):
        args = SimpleNamespace(paper_recipes=False, budget=budget, data="/d", epochs=30, batch_size=512, jobs=1)
        r = knn_table.run_method("mae", args, [], str(tmp_path), 4)
        assert r["error"] == "x" and r["budget"] == budget
    cpu, gpu = seen
    assert "backbone.depth=4" in cpu and cpu[-1] == "trainer.epochs=20"  # the CPU budget's cut ViT, MAE's 20 epochs
    assert "optim.warmup_epochs=3" in cpu and "optim.warmup_epochs=3" in gpu  # a tenth of --epochs
    assert not any(o.startswith("backbone.") for o in gpu)
    assert [o for o in gpu if o.startswith("trainer.epochs=")] == ["trainer.epochs=30"]


def test_knn_table_says_how_jigsaw_features_are_read_unless_the_row_overrode_it(tmp_path):
    import json
    from types import SimpleNamespace

    import knn_table

    rows = tmp_path / "rows"
    rows.mkdir()
    base = {"data": "embedded", "batch": 128, "trained": 21.7, "random": 17.3, "img_s": 400, "train_s": 150,
            "mem": 900, "why": "", "machine": "m", "date": "d", "command": "x trainer.epochs=10"}
    (rows / "jigsaw.json").write_text(json.dumps({**base, "method": "jigsaw", "short": ""}))
    args = SimpleNamespace(title="t", out=tmp_path / "t.md")
    assert "- jigsaw: the mean of the backbone's features of the 3x3 grid's central tiles" in knn_table.write_table(args, rows)
    (rows / "jigsaw_b.json").write_text(json.dumps({**base, "method": "jigsaw", "short": "optim.lr=0.1"}))
    assert knn_table.write_table(args, rows).count("central tiles") == 1  # once per method, not per row
    for whole in ("method.eval_input=image", "method.input=image method.tile_norm=false"):
        for name in ("jigsaw", "jigsaw_b"):
            (rows / f"{name}.json").write_text(json.dumps({**base, "method": "jigsaw", "short": whole}))
        assert "central tiles" not in knn_table.write_table(args, rows)


def test_knn_table_tag_keys_one_run_and_a_note_beside_the_rows_is_kept(tmp_path, monkeypatch, capsys):
    import json
    from types import SimpleNamespace

    import knn_table

    monkeypatch.setattr(sys, "argv", ["knn_table.py", "--methods", "simclr", "byol", "--tag", "x",
                                      "--out", str(tmp_path / "t.md")])
    with pytest.raises(SystemExit) as exc:
        knn_table.main()
    assert exc.value.code == 2 and "--tag names one run" in capsys.readouterr().err
    rows = tmp_path / "rows"
    rows.mkdir()
    (rows / "NOTE.md").write_text("Why these rows exist.\n")
    (rows / "a.json").write_text(json.dumps({"method": "simclr", "data": "embedded", "batch": 128, "trained": 40.0,
                                             "random": 30.0, "img_s": 1, "train_s": 1, "mem": 1, "why": "",
                                             "short": "optim.lr=1", "machine": "m", "date": "d",
                                             "command": "x trainer.epochs=10"}))
    text = knn_table.write_table(SimpleNamespace(title="t", out=tmp_path / "t.md"), rows)
    assert "\nWhy these rows exist.\n" in text and "| simclr | embedded | 10 |" in text
