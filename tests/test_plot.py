import json
import sys

import pytest

from dialsum_raw import plot
from dialsum_raw.errors import UserError


def _run(folder, rouge):
    """A metrics.jsonl as training writes it: train lines carry "loss", validation lines "val_loss"."""
    folder.mkdir()
    lines = []
    for step in range(1, 7):
        lines.append(
            {"step": step, "tokens": 1000 * step, "seconds": step, "lr": 1e-3 / step, "loss": 5 - step / 2}
        )
        if step % 3 == 0:
            lines.append(
                {
                    "step": step,
                    "tokens": 1000 * step,
                    "seconds": step,
                    "lr": 1e-3 / step,
                    "val_loss": 4 - step / 3,
                    **({"rouge1": 0.1 * step, "rouge2": 0.05 * step, "rougeL": 0.08 * step} if rouge else {}),
                }
            )
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    return str(folder)


@pytest.fixture
def drawn(monkeypatch):
    """The figures plot draws, kept open for inspection instead of only saved."""
    figures = []
    save = plot._save
    monkeypatch.setattr(plot, "_save", lambda fig, plt, out: figures.append(fig) or save(fig, plt, out))
    return figures


def _lines(ax):
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines}


def test_runs_share_one_figure_with_train_validation_lr_and_rouge(tmp_path, drawn, capsys):
    lora, full = _run(tmp_path / "lora", rouge=True), _run(tmp_path / "full", rouge=False)
    plot.main([lora, full, "--out", str(tmp_path / "curves.png")])
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert capsys.readouterr().out == f"wrote {tmp_path / 'curves.png'}\n"
    by_step, by_tokens, lr, rouge = drawn[0].axes
    got = _lines(by_step)
    assert got[f"{lora} train"] == ([1, 2, 3, 4, 5, 6], [4.5, 4, 3.5, 3, 2.5, 2])
    assert got[f"{full} validation"] == ([3, 6], [3, 2])
    assert _lines(by_tokens)[f"{lora} validation"][0] == [3000, 6000]
    assert _lines(lr)[full] == ([1, 2, 3, 4, 5, 6], pytest.approx([1e-3 / s for s in range(1, 7)]))
    assert _lines(rouge)[f"{lora} rouge2"] == ([3, 6], [pytest.approx(15), pytest.approx(30)])
    assert sorted(_lines(rouge)) == [f"{lora} rouge1", f"{lora} rouge2", f"{lora} rougeL"]
    assert {t.get_text() for t in by_step.get_legend().get_texts()} == set(got)


def test_an_evaluation_folder_gives_the_rouge_chart(tmp_path, drawn):
    ci = {
        "level": 0.95,
        "resamples": 10,
        "models": {m: {"per_row": {"rouge1": [0.1, 0.3]}} for m in ("a", "b")},
    }
    evaluation = {"meta": {"split": "test", "dialogues": 3}, "a": {"per_row": {"rouge1": 0.2}},
                  "b": {"per_row": {"rouge1": 0.25}}, "intervals": ci}
    (tmp_path / "metrics.json").write_text(json.dumps(evaluation))
    plot.main([str(tmp_path), "--out", str(tmp_path / "rouge.png")])
    ax = drawn[0].axes[0]
    assert [round(p.get_height(), 6) for p in ax.patches] == [20, 25]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b"]
    with pytest.raises(UserError, match="is an evaluation: give it alone"):
        plot.main([str(tmp_path), str(tmp_path), "--out", str(tmp_path / "x.png")])


def test_without_matplotlib_one_line_says_what_to_install(tmp_path, monkeypatch):
    run = _run(tmp_path / "run", rouge=False)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(UserError) as e:
        plot.main([run, "--out", str(tmp_path / "x.png")])
    assert str(e.value) == 'matplotlib is not installed: pip install -e ".[plot]"'
    with pytest.raises(UserError, match="no metrics.jsonl"):
        plot.main([str(tmp_path), "--out", str(tmp_path / "x.png")])
