"""DialogSum in, padded batches out.

Three layouts give the same records: the official jsonl files (``fname``, test with
``summary1..3``), the hub CSV layout (``id,dialogue,summary,topic``, test flattened to
``test_N_1..3``) and a hub id read through ``datasets``. One dialogue keeps all of its
references, because ROUGE against several references differs from ROUGE row by row.
"""

import argparse
import csv
import json
import os
import random
import re
import sys
from dataclasses import dataclass, field

import torch

from .errors import UserError, run_cli

PROMPT = "Summarize the following conversation.\n\n{dialogue}\n\nSummary:"
SPLITS = ("train", "validation", "test")
# File names tried per split inside a folder: official release first, then the hub CSV names.
FILES = {
    "train": ("dialogsum.train.jsonl", "train.jsonl", "train.csv"),
    "validation": ("dialogsum.dev.jsonl", "dev.jsonl", "validation.jsonl", "validation.csv", "dev.csv"),
    "test": ("dialogsum.test.jsonl", "test.jsonl", "test.csv"),
}
ENCODING = (
    "utf-8-sig"  # UTF-8, and the byte-order mark spreadsheet programs put first is not part of the header
)
_FLAT_ID = re.compile(r"^(.+_\d+)_(\d+)$")  # hub test rows: test_12_3 is reference 3 of test_12


@dataclass
class Dialogue:
    id: str
    dialogue: str
    refs: list = field(default_factory=list)
    topic: str = ""


def prompt(dialogue: str) -> str:
    return PROMPT.format(dialogue=dialogue)


# ---------------------------------------------------------------- reading

def load_splits(source: str, splits=SPLITS) -> dict:
    """{split: [Dialogue]} from a folder, a single file (split from its name) or a hub id."""
    if os.path.isdir(source):
        out = {}
        for split in splits:
            path = next(
                (os.path.join(source, n) for n in FILES[split] if os.path.isfile(os.path.join(source, n))),
                None,
            )
            if path is None:
                raise UserError(
                    f"{source}: no file for split '{split}' (expected one of {', '.join(FILES[split])})"
                )
            out[split] = _nonempty(read_file(path), path, split)
        return out
    if os.path.isfile(source):
        name = os.path.basename(source)
        split = next((s for s in SPLITS if any(name == n for n in FILES[s])), None)
        split = split or next((s for s in SPLITS if s in name or (s == "validation" and "dev" in name)), None)
        if split is None:
            raise UserError(
                f"{source}: cannot tell the split from the file name (expected train, dev/validation or test "
                "in it)"
            )
        missing = [s for s in splits if s != split]
        if missing and splits != SPLITS:
            raise UserError(f"{source} holds only the '{split}' split, but '{missing[0]}' is needed; "
                            "pass the folder that holds all the split files")
        return {split: _nonempty(read_file(source), source, split)}
    if re.fullmatch(r"[\w.-]+/[\w.-]+", source) and not source.startswith("."):
        return _from_hub(source, splits)
    raise UserError(
        f"data not found: {source} is neither a folder, a file nor a hub id like knkarthick/dialogsum"
    )


def _nonempty(dialogues, where, split):
    """A split with no dialogue would train on nothing or report ROUGE 0.00 over nothing: refused here."""
    if not dialogues:
        raise UserError(
            f"{where}: the '{split}' split holds no dialogue (an empty file, or only blank lines)"
        )
    return dialogues


def read_file(path: str) -> list:
    """Dialogues from one .jsonl or .csv file; errors name the file and line."""
    if path.endswith(".jsonl") or path.endswith(".json"):
        rows = _jsonl_rows(path)
    elif path.endswith(".csv"):
        rows = _csv_rows(path)
    else:
        raise UserError(f"{path}: unknown layout (expected a .jsonl file with fname/id, dialogue, summary "
                        "or a .csv file with id,dialogue,summary,topic)")
    try:
        return to_dialogues(rows)
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})")


def _jsonl_rows(path):
    with open(path, encoding=ENCODING) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: malformed JSON ({e.msg}, column {e.colno})")
            if not isinstance(row, dict):
                raise UserError(
                    f"{path}:{lineno}: expected a JSON object with dialogue and summary, got "
                    f"{type(row).__name__}"
                )
            yield f"{path}:{lineno}", row


def _csv_rows(path):
    with open(path, encoding=ENCODING, newline="") as f:
        reader = csv.DictReader(f)
        try:
            header = reader.fieldnames or []
            if "dialogue" not in header:
                raise UserError(f"{path}:1: unknown CSV layout: header is {','.join(header) or '(empty)'}; "
                                "expected id,dialogue,summary,topic")
            while True:
                start = reader.line_num + 1
                try:
                    row = next(reader)
                except StopIteration:
                    return
                if None in row:
                    raise UserError(
                        f"{path}:{start}: malformed CSV: more fields than the header's {len(header)} "
                        "(unquoted comma?)"
                    )
                yield f"{path}:{start}", row
        except csv.Error as e:
            raise UserError(f"{path}:{reader.line_num}: malformed CSV ({e})")


def _from_hub(hub_id, splits):
    try:
        import datasets
        loaded = datasets.load_dataset(hub_id)
    except Exception as e:  # offline, unknown id, gated: all end the same way for the user
        raise UserError(f"could not load dataset {hub_id} from the Hugging Face Hub ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); offline? pass a local folder, "
                        "e.g. --data ../shared/dialogsum")
    out = {}
    for split in splits:
        name = split if split in loaded else ("dev" if split == "validation" and "dev" in loaded else None)
        if name is None:
            raise UserError(f"{hub_id}: no split '{split}' (has {', '.join(loaded)})")
        out[split] = _nonempty(
            to_dialogues((f"{hub_id}[{name}] row {i}", row) for i, row in enumerate(loaded[name])),
            hub_id,
            split,
        )
    return out


def _text(where, row, key):
    value = row.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise UserError(f"{where}: field '{key}' must be text, got {type(value).__name__}")
    if not value.strip():
        raise UserError(f"{where}: empty {key}")
    return value.strip()


def to_dialogues(rows) -> list:
    """Normalize (where, row) pairs of any layout into Dialogues, regrouping flattened references."""
    by_id = {}
    for where, row in rows:
        rid = row.get("id") if row.get("id") is not None else row.get("fname")
        if rid is None or str(rid).strip() == "":
            raise UserError(f"{where}: missing field 'id' (or 'fname')")
        dialogue = _text(where, row, "dialogue")
        if dialogue is None:
            raise UserError(f"{where}: missing field 'dialogue'")
        numbered = sorted((k for k in row if re.fullmatch(r"summary\d+", str(k))), key=lambda k: int(k[7:]))
        keys = ["summary"] if "summary" in row else numbered
        refs = [_text(where, row, k) for k in keys]
        if not keys or any(r is None for r in refs):
            raise UserError(f"{where}: missing field 'summary' (or summary1..N)")
        topic = row.get("topic") or row.get("topic1") or ""
        rid = str(rid).strip()
        flat = _FLAT_ID.match(rid)
        key = flat.group(1) if flat else rid
        if key in by_id:
            seen = by_id[key]
            if not flat or seen.dialogue != dialogue:
                raise UserError(f"{where}: duplicate id '{rid}'" if not flat else
                                f"{where}: '{rid}' has a different dialogue than the other rows of '{key}'")
            seen.refs.extend(refs)
        else:
            by_id[key] = Dialogue(key, dialogue, refs, str(topic))
    return list(by_id.values())


def flatten(dialogues):
    """The hub layout: one (row id, Dialogue, reference) per reference; ids get _1.._N when several."""
    for d in dialogues:
        for j, ref in enumerate(d.refs, 1):
            yield (f"{d.id}_{j}" if len(d.refs) > 1 else d.id), d, ref


def write_csv(dialogues, path):
    """Write dialogues in the hub CSV layout (id,dialogue,summary,topic)."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "dialogue", "summary", "topic"])
        w.writerows([rid, d.dialogue, ref, d.topic] for rid, d, ref in flatten(dialogues))


# ---------------------------------------------------------------- tokens

def tokenize(tokenizer, texts, max_len):
    """Token ids per text, cut to max_len with EOS kept (as truncation=True does); also the uncut lengths."""
    ids = tokenizer(list(texts), add_special_tokens=True, verbose=False)["input_ids"]
    full = [len(x) for x in ids]
    return [x if len(x) <= max_len else x[: max_len - 1] + x[-1:] for x in ids], full


def encode_sources(tokenizer, dialogues, max_len):
    """Model inputs for dialogue texts: the prompt's ids, at most max_len; also the uncut lengths.

    A prompt that fits is its ids whole. A longer one loses the end of its dialogue, not of the prompt, so
    the model still sees the instruction and "Summary:" + EOS: the prompt's ids with the dialogue's last
    ones cut out. T5's Metaspace pre-tokenizer splits at the whitespace around {dialogue}, so the template's
    head and tail are runs of ids of their own at the two ends of every prompt (tests check this on every
    DialogSum dialogue): each prompt is tokenized once, and the cut never reaches into them.
    """
    ids = tokenizer([prompt(d) for d in dialogues], add_special_tokens=True, verbose=False)["input_ids"]
    full = [len(x) for x in ids]
    if max(full) > max_len:
        parts = tokenizer(PROMPT.split("{dialogue}"), add_special_tokens=False)["input_ids"]
        head, tail = (len(x) for x in parts)
        keep = max_len - tail - 1  # the head and the dialogue's first ids; then the tail and EOS
        if keep <= head:
            raise UserError(
                f"a source length of {max_len} tokens leaves no room for the dialogue: the prompt "
                f"alone takes {head + tail + 1}; raise --max-source-len"
            )
        ids = [x if len(x) <= max_len else x[:keep] + x[len(x) - tail - 1:] for x in ids]
    return ids, full


def encode(dialogues, tokenizer, max_source_len, max_target_len):
    """Training examples, one per (dialogue, reference): {"input_ids", "labels"} lists of ints,
    and how many sources (dialogues shortened, see encode_sources) and targets were cut to the limits."""
    sources, source_len = encode_sources(tokenizer, [d.dialogue for d in dialogues], max_source_len)
    refs = [r for d in dialogues for r in d.refs]
    targets, target_len = tokenize(tokenizer, refs, max_target_len)
    owners = [i for i, d in enumerate(dialogues) for _ in d.refs]
    examples = [{"input_ids": sources[i], "labels": t} for i, t in zip(owners, targets)]
    return examples, {"truncated_sources": sum(n > max_source_len for n in source_len),
                      "truncated_targets": sum(n > max_target_len for n in target_len)}


class Collator:
    """Pads to the longest item of the batch; labels pad with -100 so the loss ignores them."""

    def __init__(self, pad_id: int, pad_to_multiple_of: int = 1):
        self.pad_id, self.multiple = pad_id, pad_to_multiple_of

    def _pad(self, seqs, value):
        n = max(len(s) for s in seqs)
        n = -(-n // self.multiple) * self.multiple
        return torch.tensor([s + [value] * (n - len(s)) for s in seqs], dtype=torch.long)

    def __call__(self, items):
        input_ids = self._pad([it["input_ids"] for it in items], self.pad_id)
        labels = self._pad([it["labels"] for it in items], -100)
        return {"input_ids": input_ids, "attention_mask": (input_ids != self.pad_id).long(), "labels": labels}


class LengthGroupedBatchSampler:
    """Shuffled batches of similar source length; yields this rank's micro-batches of each global batch.

    A global batch (batch_size x world_size x accum examples: one optimiser step) is formed first and
    then cut into `accum` micro-batches, each split across ranks. So N processes, or accumulation
    over N micro-batches, see exactly the examples of one process with the global batch size. The
    last incomplete global batch is dropped so every rank steps together. Batches depend only on
    (seed, epoch), which makes the position resumable: set_epoch(epoch, skip micro-batches).
    """

    def __init__(self, lengths, batch_size, world_size=1, rank=0, seed=0, megabatch=50, accum=1):
        self.lengths, self.batch_size, self.world, self.rank = list(lengths), batch_size, world_size, rank
        self.seed, self.megabatch, self.accum = seed, megabatch, accum
        self.epoch, self.skip = 0, 0
        if len(self) == 0:
            raise UserError(f"{len(self.lengths)} training examples cannot fill one global batch of "
                            f"{batch_size * world_size * accum} (batch x processes x accumulation); "
                            "lower --batch-size, --grad-accum or --subsample")

    def set_epoch(self, epoch: int, skip: int = 0):
        self.epoch, self.skip = epoch, skip

    def global_batches(self, epoch):
        rng = random.Random(self.seed * 1_000_003 + epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        size = self.batch_size * self.world * self.accum
        chunk = size * self.megabatch
        batches = []
        for start in range(0, len(order), chunk):
            mega = sorted(order[start:start + chunk], key=lambda i: -self.lengths[i])
            batches += [mega[i:i + size] for i in range(0, len(mega) - size + 1, size)]
        rng.shuffle(batches)
        return batches

    def __len__(self):
        return len(self.lengths) // (self.batch_size * self.world * self.accum) * self.accum

    def __iter__(self):
        micro = self.batch_size * self.world
        for batch in self.global_batches(self.epoch)[self.skip // self.accum:]:
            for k in range(self.accum):
                part = batch[k * micro:(k + 1) * micro]
                yield part[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]


# ---------------------------------------------------------------- statistics

def stats(splits, tokenizer=None, max_source_len=512, max_target_len=128) -> dict:
    """Counts per split; with a tokenizer also token lengths and how many dialogues and targets were cut."""
    out = {}
    for name, dialogues in splits.items():
        refs = [r for d in dialogues for r in d.refs]
        s = {"dialogues": len(dialogues), "references": len(refs),
             "non_ascii_dialogues": sum(any(ord(c) > 127 for c in d.dialogue) for d in dialogues)}
        if tokenizer is not None:
            src, src_len = encode_sources(tokenizer, [d.dialogue for d in dialogues], max_source_len)
            _, tgt_len = tokenize(tokenizer, refs, max_target_len)
            s.update(
                {
                    "source_tokens_mean": round(sum(src_len) / len(src_len), 1),
                    "source_tokens_max": max(src_len),
                    "target_tokens_mean": round(sum(tgt_len) / len(tgt_len), 1),
                    "target_tokens_max": max(tgt_len),
                    "shortened_dialogues": sum(n > max_source_len for n in src_len),
                    "truncated_targets": sum(n > max_target_len for n in tgt_len),
                    "unk_tokens_in_sources": sum(x.count(tokenizer.unk_token_id) for x in src),
                }
            )
        out[name] = s
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m dialsum_raw.data",
                                description="Print DialogSum split statistics as JSON (run before training).")
    p.add_argument("source", help="hub id, folder of jsonl/csv files, or one file")
    p.add_argument(
        "--tokenizer", default="google/flan-t5-small", help="tokenizer for token counts (hub id or folder)"
    )
    p.add_argument("--max-source-len", type=int, default=512)
    p.add_argument("--max-target-len", type=int, default=128)
    a = p.parse_args(argv)
    splits = load_splits(a.source)
    from .modeling import load_tokenizer
    try:
        tok = load_tokenizer(a.tokenizer, what="tokenizer")
    except UserError as e:
        print(f"warning: token statistics skipped: {e}", file=sys.stderr)
        tok = None
    print(json.dumps({"source": a.source, "tokenizer": a.tokenizer if tok else None,
                      "max_source_len": a.max_source_len, "max_target_len": a.max_target_len,
                      "splits": stats(splits, tok, a.max_source_len, a.max_target_len)}, indent=2))


if __name__ == "__main__":
    run_cli(main)
