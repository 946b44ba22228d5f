"""Settings declared once: every front's parser, the resume policy and the checks derive from the fields."""

import dataclasses
import os

import pytest

from conftest import REPO
from dialsum_raw import config
from dialsum_raw.config import EVALUATE, SUMMARIZE, TRAIN, Settings, build_parser, settings_from
from dialsum_raw.errors import UserError
from dialsum_raw.lora import VARIANTS

PRESET_LORA = os.path.join(REPO, "configs", "notebook-lora.toml")


def _settings(front, argv, default_config=None):
    return settings_from(build_parser(front, "test").parse_args(argv), default_config)


def test_every_field_declares_help_fronts_and_a_known_resume_policy():
    for f in dataclasses.fields(Settings):
        assert f.metadata["help"], f.name
        assert f.metadata["fronts"] and set(f.metadata["fronts"]) <= {TRAIN, EVALUATE, SUMMARIZE}, f.name
        assert f.metadata["resume"] in ("fixed", "free", "rouge"), f.name


def test_parsers_expose_exactly_the_fields_of_their_front():
    for front in (TRAIN, EVALUATE, SUMMARIZE):
        dests = {a.dest for a in build_parser(front, "t")._actions} - {"help", "config"}
        assert dests == {f.name for f in config.fields_of(front)}, front


def test_batch_size_is_two_settings_one_per_front():
    assert _settings(TRAIN, ["--batch-size", "3"]).batch_size == 3
    s = _settings(EVALUATE, ["--batch-size", "5", "--output-dir", "x"])
    assert (s.eval_batch_size, s.batch_size) == (5, Settings().batch_size)
    assert _settings(EVALUATE, ["--base", "m", "--output-dir", "x"]).model == "m"


def test_resume_policy_derives_from_the_fields():
    with_val = config.resume_may_change("val_loss")
    assert {"save_every", "precision", "eval_rouge", "num_beams", "eval_batch_size"} <= with_val
    assert not {"lr", "seed", "batch_size", "lora_rank", "lora_variant", "dropout_impl", "fsdp"} & with_val
    assert "eval_rouge" not in config.resume_may_change("rouge1")  # ROUGE picks best/: its settings are fixed


def test_dora_flag_is_an_alias_of_the_variant():
    assert _settings(TRAIN, ["--dora"]).lora_variant == "dora"
    assert _settings(TRAIN, ["--lora-variant", "dora"]).dora
    with pytest.raises(
        UserError, match="--dora is the same as --lora-variant dora, but --lora-variant is vera"
    ):
        _settings(TRAIN, ["--dora", "--lora-variant", "vera"])


def test_choices_are_checked_with_the_flag_name():
    with pytest.raises(UserError, match=f"--lora-variant must be one of {', '.join(VARIANTS)}, got 'lorax'"):
        _settings(TRAIN, ["--lora-variant", "lorax"])
    with pytest.raises(UserError, match="--dropout-impl must be one of fast, torch, got 'slow'"):
        _settings(TRAIN, ["--dropout-impl", "slow"])


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--lora-alpha", "32"),
        ("--lora-targets", "q,k"),
        ("--lora-dropout", "0.1"),
        ("--lora-variant", "vera"),
        ("--vera-rank", "64"),
    ],
)
def test_full_fine_tuning_refuses_lora_flags_given_on_the_command_line(flag, value):
    with pytest.raises(UserError, match=f"{flag} is a LoRA setting, but --lora-rank 0 is full fine-tuning"):
        _settings(TRAIN, ["--lora-rank", "0", flag, value])


def test_a_presets_own_lora_values_do_not_count_as_given():
    s = _settings(TRAIN, ["--config", PRESET_LORA, "--lora-rank", "0"])
    assert s.lora_rank == 0 and s.lora_alpha == 16  # the preset's alpha is kept, not refused


def test_negative_show_index_is_refused():
    with pytest.raises(UserError, match=r"--show takes dialogue indices \(>= 0\), got -1"):
        _settings(EVALUATE, ["--show", "-1", "--output-dir", "x"])


def test_a_run_saved_before_a_setting_existed_resumes_with_the_value_it_ran_with(tmp_path):
    """Runs saved before --dropout-impl used nn.Dropout: a resume must not switch them to the fast masks."""
    from dialsum_raw import training
    run = tmp_path / "old-run"
    run.mkdir()
    (run / config.SETTINGS_FILE).write_text('lora_rank = 8\nlr = 0.001\nseed = 3\n')
    s = _settings(TRAIN, ["--resume", str(run)], default_config=str(run / config.SETTINGS_FILE))
    assert s.dropout_impl == "torch"
    training.check_resume_settings(s, {}, 1)  # nothing changed
    s.dropout_impl = "fast"
    with pytest.raises(UserError, match="dropout_impl 'torch' -> 'fast'"):
        training.check_resume_settings(s, {}, 1)
