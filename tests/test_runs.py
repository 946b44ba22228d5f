import csv
import json
import math
import os

import pytest

from dialsum_raw import runs


def _fake_run(folder, settings, val_losses, summary=True, rouge=None):
    """A run folder as training.py leaves it: settings.toml, metrics.jsonl, summary.json (numbers chosen
    here)."""
    os.makedirs(folder)
    with open(os.path.join(folder, "settings.toml"), "w") as f:
        f.write("".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items()))
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        for i, v in enumerate(val_losses, 1):
            f.write(
                json.dumps({"step": 10 * i, "lr": 0.1, "tokens": 100 * i, "seconds": i, "loss": v + 1}) + "\n"
            )
            f.write(json.dumps({"step": 10 * i, "lr": 0.1, "tokens": 100 * i, "seconds": i, "val_loss": v,
                                **(rouge or {})}) + "\n")
    if summary:
        best = min(val_losses)
        with open(os.path.join(folder, "summary.json"), "w") as f:
            json.dump(
                {
                    "best_metric": "val_loss",
                    "best_value": best,
                    "best_step": 10 * (val_losses.index(best) + 1),
                    "seconds": 20.0 * len(val_losses),
                    "tokens_per_second": 1000.0 * len(val_losses),
                },
                f,
            )


@pytest.fixture
def folder(tmp_path):
    """Two seeds of LoRA r=8 (final val_loss 1 and 3), one of r=64 (with ROUGE), a folder that is not a run,
    and a run that has not finished, under one sweep-like folder."""
    root = tmp_path / "sweep"
    _fake_run(root / "r8-s1", {"lora_rank": 8, "seed": 1, "output_dir": "a"}, [2.0, 1.0])
    _fake_run(root / "r8-s2", {"lora_rank": 8, "seed": 2, "output_dir": "b"}, [4.0, 3.5, 3.0])
    _fake_run(root / "r64-s1", {"lora_rank": 64, "seed": 1, "output_dir": "c"}, [5.0],
              rouge={"rouge1": 0.25, "rouge2": 0.1, "rougeL": 0.2})
    _fake_run(root / "running", {"lora_rank": 8, "seed": 3}, [2.0], summary=False)
    os.makedirs(root / "notes" / "empty")
    return root


def test_table_groups_seeds_with_mean_std_and_n(folder, tmp_path, capsys):
    out = tmp_path / "runs.csv"
    runs.main([str(folder), str(tmp_path / "nowhere"), "--csv", str(out)])
    printed, notes = capsys.readouterr()
    assert "running: not finished" in notes and "python train.py --resume" in notes
    assert "nowhere: not a folder; skipped" in notes
    head = printed.splitlines()[0].split()
    assert head == [
        "run",
        "lora_rank",
        "seed",
        "best_metric",
        "best_value",
        "best_step",
        "val_loss",
        "rouge1",
        "rouge2",
        "rougeL",
        "tokens/s",
        "wall_s",
    ]  # output_dir differs but is never a column
    group = next(line for line in printed.splitlines() if line.startswith("lora_rank=8 "))
    # r8: best 1.0 and 3.0 -> mean 2, sample std sqrt(2); wall 40 s and 60 s -> 50 ± sqrt(200)
    assert group.split()[:5] == ["lora_rank=8", "2", "2", "±", f"{math.sqrt(2):.4g}"]
    assert f"50 ± {math.sqrt(200):.4g}" in group
    assert next(line for line in printed.splitlines() if line.startswith("lora_rank=64 ")).split()[1] == "1"

    rows = list(csv.DictReader(open(out)))
    by_run = {(r["group"], r["run"]): r for r in rows}
    assert float(by_run["lora_rank=8", str(folder / "r8-s2")]["val_loss"]) == 3.0
    assert float(by_run["lora_rank=64", str(folder / "r64-s1")]["rouge1"]) == 0.25
    mean, std = by_run["lora_rank=8", "mean"], by_run["lora_rank=8", "std"]
    assert (mean["n"], mean["lora_rank"], float(mean["best_value"]), float(mean["tokens/s"])) == (
        "2",
        "8",
        2.0,
        2500.0,
    )
    assert float(std["best_value"]) == pytest.approx(math.sqrt(2)) and float(
        std["best_step"]
    ) == pytest.approx(math.sqrt(50))
    assert by_run["lora_rank=64", "std"]["best_value"] == ""  # n = 1: no spread


def test_only_notes_is_a_user_error(tmp_path, capsys):
    from dialsum_raw.errors import UserError
    (tmp_path / "x").mkdir()
    with pytest.raises(UserError, match="no finished training run"):
        runs.main([str(tmp_path / "x")])
    assert "not a training run" in capsys.readouterr().err


def test_plot_colours_by_group(folder, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    drawn = {}
    monkeypatch.setattr(runs, "_save", lambda fig, plt, out: drawn.update(
        {tuple(line.get_ydata()): line.get_color() for line in fig.axes[0].lines}))
    runs.main([str(folder), "--plot", str(tmp_path / "v.png")])
    assert drawn[(2.0, 1.0)] == drawn[(4.0, 3.5, 3.0)] != drawn[(5.0,)]  # the seeds of r=8 share a colour
    monkeypatch.undo()
    runs.main([str(folder), "--plot", str(tmp_path / "v.png")])
    assert os.path.getsize(tmp_path / "v.png") > 0


def test_damaged_metrics_lines_are_skipped_with_a_note_and_n_counts_runs_with_the_metric(tmp_path, capsys):
    """A garbage line, a bare number and a line a crash cut short cost only themselves; a run without any
    validation line is not counted in its group's val_loss."""
    root = tmp_path / "sweep"
    for seed, losses in ((1, [2.0, 1.0]), (2, [4.0, 3.0]), (3, [5.0])):
        _fake_run(root / f"s{seed}", {"lora_rank": 8, "seed": seed}, losses)
    log = root / "s1" / "metrics.jsonl"
    good = log.read_text().splitlines(keepends=True)
    log.write_text(good[0] + "}garbage{\n" + "5\n" + "".join(good[1:]) + '{"step": 30, "val_lo')
    (root / "s3" / "metrics.jsonl").write_text("")  # logged nothing: no val_loss, but a summary
    runs.main([str(root)])
    printed, notes = capsys.readouterr()
    assert (
        f"{log} line 2: damaged" in notes
        and f"{log} line 3: damaged" in notes
        and f"{log} line 7: damaged" in notes
    )
    s1 = next(line for line in printed.splitlines() if line.startswith(str(root / "s1")))
    assert s1.split()[-3] == "1"  # s1 keeps its final val_loss (the line after the damaged ones)
    group = next(line for line in printed.splitlines() if line.startswith("all "))
    assert group.split()[1] == "3"  # three runs; val_loss over the two that logged it
    assert f"2 ± {math.sqrt(2):.4g} (n=2)" in group


@pytest.mark.parametrize(
    "content, says",
    [
        ('{"best_value": 1.0, "seco', "damaged"),
        ("[]", "expected a JSON object"),
        ("null", "expected a JSON object"),
        ("", "damaged"),
    ],
)
def test_a_damaged_summary_is_a_note_not_a_traceback(tmp_path, capsys, content, says):
    _fake_run(tmp_path / "ok", {"seed": 1}, [1.0])
    _fake_run(tmp_path / "bad", {"seed": 2}, [2.0])
    (tmp_path / "bad" / "summary.json").write_text(content)
    runs.main([str(tmp_path)])
    printed, notes = capsys.readouterr()
    assert (
        f"{tmp_path / 'bad' / 'summary.json'}: damaged" in notes
        and says in notes
        and "not finished" not in notes
    )
    assert str(tmp_path / "ok") in printed and str(tmp_path / "bad") not in printed


def test_a_group_whose_runs_share_a_seed_is_flagged(tmp_path, capsys):
    """A sweep rerun under new folder names trains the same seeds again: n = 4 from two seeds is not n = 4."""
    for folder, seed, loss in (("seed=1", 1, 1.0), ("seed=2", 2, 2.0), ("lora_rank=0,seed=1", 1, 1.0),
                               ("lora_rank=0,seed=2", 2, 2.0)):
        _fake_run(tmp_path / folder, {"lora_rank": 0, "seed": seed}, [loss])
    runs.main([str(tmp_path)])
    printed, notes = capsys.readouterr()
    assert f"group all: {tmp_path / 'lora_rank=0,seed=1'} and {tmp_path / 'seed=1'} share seed 1" in notes
    assert next(line for line in printed.splitlines() if line.startswith("all ")).split()[1:3] == ["4", "(2"]


def test_evaluated_runs_show_test_rouge_with_group_mean_std_and_n(folder, capsys):
    """sweep --evaluate leaves evaluation.json in each run: its test ROUGE stands beside the validation
    figures, and the seed group gets mean ± std and n over the runs that have it; a damaged file is a note,
    not a traceback."""
    for run, r1 in (("r8-s1", 0.30), ("r8-s2", 0.20)):
        (folder / run / runs.EVALUATION_FILE).write_text(json.dumps(
            {"split": "test", "dialogues": 50, "report": "x/report.md", "model": run,
             "rouge": {"rouge1": r1, "rouge2": r1 / 2, "rougeL": r1 - 0.05, "rougeLsum": r1}}))
    (folder / "r64-s1" / runs.EVALUATION_FILE).write_text('{"split": "test"')
    runs.main([str(folder)])
    printed, notes = capsys.readouterr()
    head = printed.splitlines()[0].split()
    assert head[head.index("rougeL") + 1 : head.index("tokens/s")] == [
        "test_rouge1",
        "test_rouge2",
        "test_rougeL",
    ]
    r8 = {
        line.split()[0].rsplit("/", 1)[-1]: line.split() for line in printed.splitlines() if "/r8-s" in line
    }
    assert r8["r8-s1"][head.index("test_rouge1")] == "0.3" and r8["r8-s2"][head.index("test_rouge2")] == "0.1"
    group = next(line for line in printed.splitlines() if line.startswith("lora_rank=8 "))
    assert f"0.25 ± {math.sqrt(0.005):.4g}" in group  # test_rouge1 over the two seeds, n = 2
    assert f"r64-s1/{runs.EVALUATION_FILE}: damaged" in notes
