import csv
import json
import os
import subprocess
import sys

import pytest
from conftest import CORPUS, REPO

from dialsum_raw import compare, lora, modeling
from dialsum_raw.config import Settings
from dialsum_raw.data import write_csv
from dialsum_raw.errors import UserError
from dialsum_raw.generation import summarize
from dialsum_raw.metrics import pair_scores
from dialsum_raw.summarize import to_dialogsum


@pytest.fixture(scope="module")
def hub_layout(corpus, tmp_path_factory):
    """The test split in the hub's flattened CSV layout: each dialogue on 3 rows."""
    folder = tmp_path_factory.mktemp("hub")
    write_csv(corpus["test"], folder / "test.csv")
    return str(folder)


def test_evaluate_command_writes_comparison(tiny, trained, hub_layout, tmp_path):
    out = tmp_path / "eval"
    cmd = [sys.executable, os.path.join(REPO, "evaluate.py"), "--base", tiny, "--instruct", trained["full"],
           "--adapter", trained["lora"], "--data", hub_layout, "--split", "test", "--output-dir", str(out),
           "--limit", "6", "--batch-size", "4", "--num-beams", "2", "--max-new-tokens", "24", "--show", "2,5",
           "--bootstrap", "200"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr[-2000:]
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["id", "dialogue", "human_baseline_summaries", "original_model_summaries",
                             "instruct_model_summaries", "peft_model_summaries"]
    assert len(rows) == 18 and rows[0]["id"] == "test_0_1" and rows[2]["id"] == "test_0_3"
    assert all(r[c] for r in rows for c in rows[0])
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"meta", "original", "instruct", "peft", "intervals"}
    assert metrics["intervals"]["resamples"] == 200 and set(metrics["intervals"]["differences"]) == {
        "peft vs original", "peft vs instruct", "instruct vs original"}
    with open(out / "scores.csv", newline="") as f:
        scores = list(csv.DictReader(f))
    assert len(scores) == 18 and [s["model"] for s in scores[::6]] == ["original", "instruct", "peft"]
    assert metrics["meta"]["dialogues"] == 6 and metrics["meta"]["rows"] == 18
    for name, column in (("original", "original_model_summaries"), ("peft", "peft_model_summaries"),
                         ("instruct", "instruct_model_summaries")):
        pairs = pair_scores([r[column] for r in rows], [r["human_baseline_summaries"] for r in rows])
        for k, v in metrics[name]["per_row"].items():
            assert v == pytest.approx(sum(p[k] for p in pairs) / 18, abs=1e-12)
            per_dialogue = [float(s[f"{k}_best"]) for s in scores if s["model"] == name]
            assert per_dialogue == pytest.approx(
                [max(p[k] for p in pairs[i : i + 3]) for i in range(0, 18, 3)], abs=1e-12
            )
        assert set(metrics[name]) >= {"per_row", "multi_ref_max", "multi_ref_mean"}
    report = (out / "report.md").read_text()
    for needle in (
        "| peft vs original |",
        "| peft vs instruct |",
        "| instruct vs original |",
        "## Dialogue 2 (test_2)",
        "## Dialogue 5 (test_5)",
        "- **peft**:",
        "paired-bootstrap interval (200 resamples of the dialogues, seed 0)",
        "- peft vs instruct: ",
    ):
        assert needle in report
    # CI installs the [plot] extra; tests/test_report.py covers its absence
    assert (out / "rouge.png").read_bytes()[:4] == b"\x89PNG" and "](rouge.png)" in report
    assert res.stdout.strip().endswith("report.md, rouge.png")
    assert "## Dialogue 2" in res.stdout
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr


def test_base_loaded_once_and_peft_matches_base_plus_adapter(tiny, trained, corpus, tmp_path, monkeypatch):
    loads = []
    real = modeling.load_model
    monkeypatch.setattr(
        compare, "load_model", lambda path, *a, **k: loads.append(path) or real(path, *a, **k)
    )
    s = Settings(model=tiny, adapter=(trained["lora"],), data=CORPUS, output_dir=str(tmp_path / "e"), limit=4,
                 eval_batch_size=4, num_beams=2, max_new_tokens=16, precision="fp32")
    result = compare.run(s)
    assert loads == [tiny]
    model = real(tiny)
    lora.load_adapter(model, trained["lora"])  # unmerged: the plain LoRA forward
    texts = [d.dialogue for d in corpus["test"][:4]]
    assert result["summaries"]["peft"] == summarize(model, modeling.load_tokenizer(tiny), texts, s)


def test_speaker_names_become_tags_and_back(trained):
    dialogue, tags = to_dialogsum("Ann: Lunch at noon?\n\nBob: Sure.\nAnn: Great, see you.")
    assert dialogue == "#Person1#: Lunch at noon?\n#Person2#: Sure.\n#Person1#: Great, see you."
    assert tags == {"#Person1#": "Ann", "#Person2#": "Bob"}
    assert to_dialogsum("#Person1#: Hi.\n#Person2#: Hello.") == ("#Person1#: Hi.\n#Person2#: Hello.", {})
    res = subprocess.run([sys.executable, "-m", "dialsum_raw.summarize", "--model", trained["full"],
                          "--max-new-tokens", "20"], input="Ann: Lunch at noon?\nBob: Sure.\n",
                         capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0 and res.stdout.strip() and "#Person" not in res.stdout


@pytest.fixture(scope="module")
def random_models(tiny, tmp_path_factory):
    """Two different random adapters on the tiny base and a full model folder (the base with a third merged
    in): no training, so their summaries run to max_new_tokens, but they differ from each other."""
    from test_lora_combine import _adapter
    root = tmp_path_factory.mktemp("random_models")
    a, b, c = (_adapter(tiny, root / name, seed) for name, seed in (("a", 1), ("b", 2), ("c", 3)))
    lora.merge_to_model(tiny, c, str(root / "full"))
    return {"a": a, "b": b, "full": str(root / "full")}


def _settings(tiny, tmp_path, out, **fields):
    return Settings(
        model=tiny,
        data=CORPUS,
        output_dir=str(tmp_path / out),
        limit=3,
        eval_batch_size=3,
        num_beams=2,
        max_new_tokens=10,
        precision="fp32",
        bootstrap=50,
        **fields,
    )


def test_each_adapter_of_a_multi_adapter_run_equals_its_run_alone(tiny, random_models, tmp_path, monkeypatch):
    """fp32, bit for bit: a, then b applied to the same base, as evaluated alone (each alone is the notebook's
    peft)."""
    loads = []
    real = modeling.load_model
    monkeypatch.setattr(
        compare, "load_model", lambda path, *a, **k: loads.append(path) or real(path, *a, **k)
    )
    a, b = random_models["a"], random_models["b"]
    both = compare.run(_settings(tiny, tmp_path, "both", adapter=(f"a={a}", f"b={b}")))["summaries"]
    assert loads == [tiny] and list(both) == ["original", "a", "b"]
    alone = {name: compare.run(_settings(tiny, tmp_path, name, adapter=(folder,)))["summaries"]
             for name, folder in (("a", a), ("b", b))}
    assert both["a"] != both["b"] != both["original"]  # a left on the base would change b's summaries
    for name in ("a", "b"):
        assert both[name] == alone[name]["peft"] and both["original"] == alone[name]["original"]


def test_many_models_in_one_report(tiny, random_models, tmp_path, capsys):
    """The notebook's columns stay (a bare --instruct fills "instruct"), each named model adds its own; a row
    per model in scores.csv and metrics.json; every model vs the original and the reference (default the first
    adapter) vs every other, in one table per aggregate; rouge.png draws them all."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("evaluate_front", os.path.join(REPO, "evaluate.py"))
    front = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(front)
    out = tmp_path / "eval"
    front.main(
        [
            "--base",
            tiny,
            "--instruct",
            random_models["full"],
            "--adapter",
            f"a={random_models['a']}",
            "--adapter",
            f"b={random_models['b']}",
            "--data",
            CORPUS,
            "--output-dir",
            str(out),
            "--limit",
            "3",
            "--batch-size",
            "3",
            "--num-beams",
            "2",
            "--max-new-tokens",
            "10",
            "--bootstrap",
            "50",
            "--precision",
            "fp32",
        ]
    )
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["id", "dialogue", "human_baseline_summaries", "original_model_summaries",
                             "instruct_model_summaries", "peft_model_summaries", "a_model_summaries",
                             "b_model_summaries"]
    assert all(r["peft_model_summaries"] == "" and r["instruct_model_summaries"] and r["b_model_summaries"]
               for r in rows)
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == ["meta", "original", "instruct", "a", "b", "intervals"]
    assert metrics["meta"]["reference"] == "a" and list(metrics["meta"]["models"]) == [
        "original",
        "instruct",
        "a",
        "b",
    ]
    assert list(metrics["intervals"]["differences"]) == [
        "instruct vs original",
        "a vs original",
        "b vs original",
        "a vs instruct",
        "a vs b",
    ]
    with open(out / "scores.csv", newline="") as f:
        assert [s["model"] for s in csv.DictReader(f)][::3] == ["original", "instruct", "a", "b"]
    report = (out / "report.md").read_text()
    assert report.count("| a vs b |") == 3 and report.count("| instruct vs original |") == 3
    assert (out / "rouge.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert all(f"{n:9s} generation" in printed for n in ("original", "instruct", "a", "b"))


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            {"adapter": ("x={a}", "x={b}")},
            "--adapter x={b}: the name 'x' is given twice; name each model once, NAME=DIR",
        ),
        (
            {"adapter": ("{a}",), "instruct": ("peft={full}",)},
            "--adapter peft={a}: the name 'peft' is given twice",
        ),
        ({"adapter": ("original={a}",)}, "--adapter original={a}: the name 'original' is reserved"),
        ({"adapter": ("x={a}", "y={full}")}, "{full} is not an adapter folder (expected adapter.json and"),
        ({"instruct": ("x={a}",)}, "--instruct {a} is not a model folder (no config.json)"),
        ({"adapter": ("x={a}",), "reference": "y"}, "--reference y is not one of the models evaluated (x)"),
    ],
)
def test_a_bad_model_is_one_line_before_any_generation(
    tiny, random_models, tmp_path, monkeypatch, flags, message
):
    monkeypatch.setattr(compare, "summarize", lambda *a, **k: pytest.fail("generated before refusing"))
    fields = {k: tuple(v.format(**random_models) for v in vs) if isinstance(vs, tuple) else vs
              for k, vs in flags.items()}
    with pytest.raises(UserError) as e:
        compare.run(_settings(tiny, tmp_path, "e", **fields))
    assert message.format(**random_models) in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "e" / "metrics.json").exists()
