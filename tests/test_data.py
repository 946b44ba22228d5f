import json
import os
import subprocess
import sys

import pytest

from conftest import CORPUS, FLAN, REPO
from dialsum_raw import data
from dialsum_raw.data import Collator, Dialogue, LengthGroupedBatchSampler, load_splits, read_file, write_csv
from dialsum_raw.errors import UserError


def test_official_layout_counts(corpus):
    assert {k: len(v) for k, v in corpus.items()} == {"train": 12460, "validation": 500, "test": 500}
    assert [sum(len(d.refs) for d in v) for v in corpus.values()] == [12460, 500, 1500]
    first = corpus["test"][0]
    assert first.id == "test_0" and len(first.refs) == 3 and first.dialogue.startswith("#Person1#:")


def test_hub_csv_layout_round_trip(corpus, tmp_path):
    path = tmp_path / "test.csv"
    write_csv(corpus["test"], path)
    lines = path.read_text().count("\ntest_")
    assert lines == 1500  # flattened: one row per reference, ids test_N_k
    back = read_file(str(path))
    assert len(back) == 500
    assert [(d.id, d.dialogue, d.refs) for d in back] == [(d.id, d.dialogue, d.refs) for d in corpus["test"]]


def test_hub_id_goes_through_datasets(corpus, tmp_path, monkeypatch):
    """The hub path: same records once datasets hands over the CSV rows (the Hub is offline here)."""
    import datasets
    write_csv(corpus["test"][:20], tmp_path / "test.csv")
    write_csv(corpus["validation"][:5], tmp_path / "validation.csv")
    local = datasets.load_dataset("csv", data_files={"test": str(tmp_path / "test.csv"),
                                                     "validation": str(tmp_path / "validation.csv")})
    monkeypatch.setattr(datasets, "load_dataset", lambda hub_id: local)
    got = load_splits("knkarthick/dialogsum", ("validation", "test"))
    assert [(d.id, d.refs) for d in got["test"]] == [(d.id, d.refs) for d in corpus["test"][:20]]
    assert len(got["validation"]) == 5


def test_hub_offline_is_a_clear_error(monkeypatch):
    import datasets

    def boom(hub_id):
        raise ConnectionError("no route to host")
    monkeypatch.setattr(datasets, "load_dataset", boom)
    with pytest.raises(UserError, match="could not load dataset knkarthick/dialogsum.*local folder"):
        load_splits("knkarthick/dialogsum")


@pytest.mark.parametrize("content,message", [
    ('{"fname": "a", "dialogue": "x", "summary": "y"}\n{"fname": "b", "dialogue": \n', r":2: malformed JSON"),
    ('{"fname": "a", "dialogue": "x"}\n', r":1: missing field 'summary'"),
    ('{"fname": "a", "summary": "y"}\n', r":1: missing field 'dialogue'"),
    ('{"fname": "a", "dialogue": "  ", "summary": "y"}\n', r":1: empty dialogue"),
    ('\n{"fname": "a", "dialogue": "x", "summary1": ""}\n', r":2: empty summary1"),
    ('[1, 2]\n', r":1: expected a JSON object"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "dialogsum.test.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=str(path).replace(".", r"\.") + message):
        read_file(str(path))


def test_bad_csv_names_file_and_line(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text('id,dialogue,summary,topic\ntrain_0,"a\nb",s,t\ntrain_1,d,,t\n')
    with pytest.raises(UserError, match=r"train\.csv:4: empty summary"):
        read_file(str(path))
    path.write_text("name,text\nx,y\n")
    with pytest.raises(UserError, match=r"train\.csv:1: unknown CSV layout"):
        read_file(str(path))


def test_unknown_layout_and_missing_path(tmp_path):
    (tmp_path / "test.txt").write_text("hello")
    with pytest.raises(UserError, match="unknown layout"):
        read_file(str(tmp_path / "test.txt"))
    with pytest.raises(UserError, match="data not found"):
        load_splits(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="no file for split 'train'"):
        load_splits(str(tmp_path))


def test_non_ascii_and_other_speaker_formats_are_kept(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text(
        json.dumps({"id": "x", "dialogue": "Zoë: Ça va?\nBob: Très bien.", "summary": "Zoë greets Bob."})
        + "\n"
    )
    (d,) = read_file(str(path))
    assert d.dialogue == "Zoë: Ça va?\nBob: Très bien." and d.refs == ["Zoë greets Bob."]


def test_a_byte_order_mark_is_not_part_of_the_header(tmp_path):
    """Spreadsheet programs start a UTF-8 CSV with a byte-order mark; read as plain UTF-8 it would glue
    itself to the first header name ('\ufeffid'), and every row would lack its id."""
    csv_path, jsonl_path = tmp_path / "test.csv", tmp_path / "test.jsonl"
    csv_path.write_bytes(b"\xef\xbb\xbf" + "id,dialogue,summary,topic\nt_0,Zoë: Hi,Zoë greets.,x\n".encode())
    jsonl_path.write_bytes(
        b"\xef\xbb\xbf" + json.dumps({"id": "t_0", "dialogue": "Zoë: Hi", "summary": "Zoë greets."}).encode()
    )
    for path in (csv_path, jsonl_path):
        (d,) = read_file(str(path))
        assert (d.id, d.dialogue, d.refs) == ("t_0", "Zoë: Hi", ["Zoë greets."])


HEAD = "Summarize the following conversation."
TAIL = "\n\nSummary:"


def test_encode_shortens_the_dialogue_not_the_prompt(tokenizer):
    long = Dialogue("x", "#Person1#: " + "word " * 2000, ["short summary"])
    (ex,), cut = data.encode([long], tokenizer, 64, 16)
    assert cut == {"truncated_sources": 1, "truncated_targets": 0}
    whole = tokenizer(data.prompt(long.dialogue))["input_ids"]
    assert ex["input_ids"] == whole[:61] + tokenizer(TAIL)["input_ids"]
    assert ex["labels"] == tokenizer("short summary")["input_ids"]


@pytest.fixture(scope="module")
def whole_prompts(corpus, tokenizer):
    """Each split's prompts tokenized whole, untruncated: what sources were before shortening existed."""
    return {name: tokenizer([data.prompt(d.dialogue) for d in dialogues], verbose=False)["input_ids"]
            for name, dialogues in corpus.items()}


@pytest.mark.slow
@pytest.mark.parametrize("max_len,shortened", [(512, {"train": 260, "validation": 8, "test": 13}),
                                               (64, {"train": 12460, "validation": 500, "test": 500})])
def test_sources_keep_the_prompt_on_real_corpus(corpus, tokenizer, whole_prompts, max_len, shortened):
    """A source that fits is the whole prompt's ids; a longer one is its first max_len - 3 ids
    (head + start of the dialogue), then "Summary:" + EOS."""
    head, tail = tokenizer(HEAD, add_special_tokens=False)["input_ids"], tokenizer(TAIL)["input_ids"]
    counts = {}
    for name, dialogues in corpus.items():
        ids, lengths = data.encode_sources(tokenizer, [d.dialogue for d in dialogues], max_len)
        whole = whole_prompts[name]
        assert lengths == [len(w) for w in whole]
        counts[name] = 0
        for got, w in zip(ids, whole):
            assert w[-len(tail):] == tail  # the tail's ids alone are the whole prompt's ending
            if len(w) <= max_len:
                assert got == w
            else:
                counts[name] += 1
                assert len(got) == max_len and got[:len(head)] == head and got[-len(tail):] == tail
                assert got == w[:max_len - len(tail)] + tail
    assert counts == shortened


def test_source_exactly_at_the_limit_is_kept_whole(corpus, tokenizer):
    text = corpus["test"][0].dialogue
    whole = tokenizer(data.prompt(text))["input_ids"]
    n = len(whole)
    assert data.encode_sources(tokenizer, [text], n) == ([whole], [n])
    assert data.encode_sources(tokenizer, [text], n - 1)[0] == [whole[:n - 4] + tokenizer(TAIL)["input_ids"]]


def test_source_limit_below_the_prompt_is_a_clear_error(tokenizer):
    text = "#Person1#: hello there"
    prompt_only = len(tokenizer(HEAD + TAIL)["input_ids"])
    with pytest.raises(
        UserError, match=f"leaves no room for the dialogue: the prompt alone takes {prompt_only}"
    ):
        data.encode_sources(tokenizer, [text], prompt_only)
    (ids,), _ = data.encode_sources(tokenizer, [text], prompt_only + 1)
    assert ids == tokenizer(HEAD + " #" + TAIL)["input_ids"]


def test_collator_pads_dynamically():
    batch = Collator(pad_id=0)(
        [{"input_ids": [5, 6, 1], "labels": [7, 1]}, {"input_ids": [5, 1], "labels": [1]}]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 1], [5, 1, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[7, 1], [1, -100]]
    assert Collator(0, pad_to_multiple_of=8)([{"input_ids": [5], "labels": [1]}])["input_ids"].shape == (1, 8)


def test_sampler_groups_lengths_shards_and_is_seeded():
    lengths = [(i * 37) % 500 for i in range(1000)]
    one = LengthGroupedBatchSampler(lengths, 8, seed=3)
    batches = list(one)
    assert len(batches) == 125 and sorted(i for b in batches for i in b) == list(range(1000))
    assert batches == list(LengthGroupedBatchSampler(lengths, 8, seed=3))
    assert batches != list(LengthGroupedBatchSampler(lengths, 8, seed=4))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 50  # random batches of 8 from 0..500 would spread ~390
    ranks = [list(LengthGroupedBatchSampler(lengths, 4, world_size=2, rank=r, seed=3)) for r in range(2)]
    assert [a + b for a, b in zip(*ranks)] == batches  # 2 x 4 sees exactly what 1 x 8 sees
    one.set_epoch(0, skip=100)
    assert list(one) == batches[100:]


@pytest.mark.slow
def test_stats_cli_on_real_corpus(tmp_path):
    """The command on the corpus folder (every split's counts; a tokenizer it cannot load skips the token
    counts with a warning) and, with the tokenizer, on the test split's file (the split named by the file).
    The whole corpus's token counts at 512 are test_sources_keep_the_prompt_on_real_corpus's."""
    def stats(source, tokenizer):
        out = subprocess.run([sys.executable, "-m", "dialsum_raw.data", source, "--tokenizer", tokenizer],
                             capture_output=True, text=True, cwd=REPO, check=True)
        return json.loads(out.stdout)["splits"], out.stderr

    every, err = stats(CORPUS, str(tmp_path / "no-tokenizer"))
    assert "warning: token statistics skipped" in err
    assert {k: (v["dialogues"], v["references"]) for k, v in every.items()} == {
        "train": (12460, 12460), "validation": (500, 500), "test": (500, 1500)}
    s, _ = stats(os.path.join(CORPUS, "dialogsum.test.jsonl"), FLAN)
    assert list(s) == ["test"]
    assert [s["test"][k] for k in ("dialogues", "references", "shortened_dialogues")] == [500, 1500, 13]
    assert s["test"]["source_tokens_max"] > 512 and s["test"]["truncated_targets"] == 0


@pytest.mark.slow
def test_stats_cli_bad_input_is_one_line(tmp_path):
    bad = tmp_path / "dialogsum.dev.jsonl"
    bad.write_text("{not json\n")
    out = subprocess.run([sys.executable, "-m", "dialsum_raw.data", str(bad), "--tokenizer", FLAN],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert (
        out.stderr.strip()
        == f"error: {bad}:1: malformed JSON (Expecting property name enclosed in double quotes, column 2)"
    )


def test_single_file_gives_its_split_only():
    test_file = os.path.join(CORPUS, "dialogsum.test.jsonl")
    assert list(load_splits(test_file)) == ["test"] and len(load_splits(test_file, ("test",))["test"]) == 500
    with pytest.raises(UserError, match="holds only the 'test' split, but 'train' is needed"):
        load_splits(test_file, ("train", "validation"))
