import subprocess
import sys

from conftest import FLAN, REPO


def test_standin_command_writes_a_loadable_model(tmp_path):
    out = tmp_path / "tiny"
    res = subprocess.run([sys.executable, "-m", "dialsum_raw.standin", "--config", FLAN, "--out", str(out), "--tiny"],
                         capture_output=True, text=True, cwd=REPO, check=True)
    assert res.stdout.strip() == f"wrote {out}: 4,310,016 parameters"
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
    model = AutoModelForSeq2SeqLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.d_model == 64 and tok("Hello")["input_ids"][-1] == tok.eos_token_id
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
    assert not (tmp_path / "tiny.tmp").exists()


def test_standin_without_config_is_a_clear_error(tmp_path):
    res = subprocess.run([sys.executable, "-m", "dialsum_raw.standin", "--config", str(tmp_path), "--out",
                          str(tmp_path / "x")], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 2 and res.stderr.strip().startswith(f"error: {tmp_path}: no config.json")
