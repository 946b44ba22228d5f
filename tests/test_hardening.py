"""Issue 29: silent wrong results, unresumable runs and tracebacks an adversarial review found, each held
here by a test that failed before its fix."""

import json
import types

import pytest

from dialsum_raw import training


def test_resume_trims_a_log_with_blank_and_damaged_lines(tmp_path):
    """A blank line (a hand edit, a copy) and a line a crash cut short: the resume's trim drops them with a
    note naming the line, and keeps every good line up to the checkpoint's step."""
    lines = [{"step": 2, "loss": 1.0}, {"step": 4, "loss": 0.5}, {"step": 6, "loss": 0.25}]
    log = tmp_path / "metrics.jsonl"
    log.write_text(json.dumps(lines[0]) + "\n\n" + json.dumps(lines[1]) + "\n" + json.dumps(lines[2]) + '\n{"st')
    said = []
    run = types.SimpleNamespace(out=str(tmp_path), progress={"step": 4}, log=said.append)
    training.trim_metrics(run)
    assert log.read_text() == "".join(json.dumps(m) + "\n" for m in lines[:2])
    assert said == [f"{log} line 5: damaged (not a JSON object with a step: '{{\"st'); skipped"]


def _adapter(tiny, folder, **cfg):
    """An adapter folder of the tiny model, as training saves it."""
    from dialsum_raw import lora
    from dialsum_raw.modeling import load_model
    model = load_model(tiny).eval()
    lora.inject(model, lora.LoRAConfig(**{"targets": ("q", "v"), "rank": 4, **cfg}))
    lora.save_adapter(model, folder, base_model="tiny")
    return folder / "adapter.json"


@pytest.mark.parametrize("cfg, edit, message", [
    ({"alpha": 64.0}, {"alpha": None}, "adapter field 'alpha' is missing: format dialsum_raw-lora/2 holds every field"),
    ({"variant": "dora"}, {"variant": None}, "adapter field 'variant' is missing"),
    ({"init": "gaussian"}, {"init": None}, "adapter field 'init' is missing"),
    ({}, {"rank": 4.0}, "adapter rank must be an integer, got 4.0"),
    ({}, {"rslora": 1}, "adapter rslora must be true or false, got 1"),
    ({}, {"alpha": True}, "adapter alpha must be a number, got True"),
    ({}, {"scale": 2}, "adapter field 'scale' is not one of targets, rank"),
])
def test_an_adapter_json_missing_or_mistyping_a_field_is_the_adapters_fault(tiny, tmp_path, cfg, edit, message):
    """Format 2 holds every field that changes the computation: a default would run an alpha-64 adapter at
    alpha 16 (logits off by 3.81), a missing variant read as "does not fit this base model"."""
    from dialsum_raw import lora
    from dialsum_raw.errors import UserError
    from dialsum_raw.modeling import load_model
    path = _adapter(tiny, tmp_path / "ad", **cfg)
    saved = {**json.loads(path.read_text()), **edit}
    path.write_text(json.dumps({k: v for k, v in saved.items() if v is not None}))
    with pytest.raises(UserError) as e:
        lora.load_adapter(load_model(tiny), tmp_path / "ad")
    assert str(e.value).startswith(f"{path}: {message}") and "\n" not in str(e.value)


def test_a_format_1_adapter_keeps_its_documented_defaults(tiny, tmp_path):
    """Format 1 (before LoRAConfig) wrote no alpha when it was the default 16: it still loads so."""
    from dialsum_raw import lora
    path = _adapter(tiny, tmp_path / "ad", alpha=16.0)
    path.write_text(json.dumps({"format": "dialsum_raw-lora/1", "rank": 4, "targets": ["q", "v"]}))
    cfg, _, _ = lora.read_adapter(tmp_path / "ad")
    assert (cfg.alpha, cfg.dropout, cfg.rslora, cfg.variant, cfg.init) == (16.0, 0.0, False, "lora", "kaiming")
