"""README.md and docs/*.md against the code: every relative link resolves (the file, and the #anchor to one
of its headings), every `python -m dialsum_raw.X` they show is a command, and every `--flag` is one that
command's --help lists (train.py, evaluate.py, python -m dialsum_raw.X [subcommand]). A flag outside a
command line (prose, a comment) must belong to one of the commands; flags of other programs (torchrun, pip,
pytest, Slurm) are skipped where their command is named on the line. The help texts come from running
each command's --help in this process (no subprocess start-ups)."""

import contextlib
import functools
import io
import os
import re
import runpy
import sys
import warnings

import pytest

from conftest import REPO

DOCS = ["README.md"] + sorted(os.path.join("docs", n) for n in os.listdir(os.path.join(REPO, "docs"))
                              if n.endswith(".md"))
FENCE = re.compile(r"^(```|~~~)([^\n]*)\n(.*?)^\1[ \t]*$", re.S | re.M)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FLAG = re.compile(r"(?<![\w-])--[a-zA-Z][\w-]*")
FRONTS = {"train.py", "evaluate.py"}
# Programs whose flags are their own: after one of these on a line, flags are skipped until one of ours
# starts.
FOREIGN = {
    "torchrun",
    "pip",
    "pytest",
    "sbatch",
    "srun",
    "git",
    "ruff",
    "torch.distributed.run",
    "pip3",
    "conda",
}


def _text(name):
    with open(os.path.join(REPO, name), encoding="utf-8") as f:
        return f.read()


def _prose(text):
    """The page without its fenced code blocks."""
    return FENCE.sub("", text)


def slug(heading):
    """GitHub's anchor for a heading: markup and punctuation dropped, lower case, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text):
    """Every heading's anchor, repeats numbered as GitHub numbers them (-1, -2, ...)."""
    seen, out = {}, set()
    for line in _prose(text).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            out.add(base if base not in seen else f"{base}-{seen[base]}")
            seen[base] = seen.get(base, 0) + 1
    return out


def broken_links(name, text):
    """'page: target: why' for each relative link of `text` (the page `name`, relative to REPO) that does
    not resolve."""
    broken = []
    for target in LINK.findall(_prose(text)):
        if re.match(r"[a-zA-Z][\w+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (
            os.path.normpath(os.path.join(REPO, os.path.dirname(name), path))
            if path
            else os.path.join(REPO, name)
        )
        if not os.path.exists(file):
            broken.append(f"{name}: {target}: no such file")
        elif (
            anchor
            and file.endswith(".md")
            and anchor not in anchors(_text(os.path.relpath(file, REPO)) if path else text)
        ):
            broken.append(f"{name}: {target}: no heading with that anchor")
    return broken


def _paragraphs(text):
    """The prose's paragraphs, each on one line (an inline code span may cross a line break)."""
    return [" ".join(p.split("\n")) for p in re.split(r"\n\s*\n", _prose(text))]


def command_lines(text):
    """The page's command lines, with the prose before each (the sentence that introduces it): each line of
    its non-Python code blocks (a trailing backslash joins the next), with no prose, and each inline code
    span of its paragraphs."""
    lines = []
    for _, lang, body in FENCE.findall(text):
        if lang.strip() not in ("python", "py", "toml", "json"):
            lines += [(line, "") for line in body.replace("\\\n", " ").splitlines()]
    for paragraph in _paragraphs(text):
        for m in re.finditer(r"`([^`]+)`", paragraph):
            lines.append((m.group(1), re.split(r"[.:;]\s", paragraph[:m.start()])[-1]))
    return lines


def _subcommands(command):
    """The first positional's choices in the command's usage line ({a,b,c}), if any."""
    usage = help_text(command).split("\n\n")[0]
    m = re.search(r"\{([\w,-]+)\}", usage)
    return set(m.group(1).split(",")) if m else set()


def named_flags(line):
    """(command, flag) for each --flag on a shell line, the command being the one it follows: "train.py",
    "evaluate.py", "dialsum_raw.X" or "dialsum_raw.X sub"; None where no command precedes it (prose), and
    flags of other programs left out. A comment's flags count as prose."""
    code, _, comment = line.partition(" #") if not line.lstrip().startswith("#") else ("", "", line)
    found = [(None, flag) for flag in FLAG.findall(comment)]
    command = None
    tokens = code.split()
    for i, token in enumerate(tokens):
        token = token.strip("`'\"()")
        if token in (";", "&&", "||", "|"):
            command = None
        elif os.path.basename(token) in FRONTS:
            command = os.path.basename(token)
        elif token.startswith("dialsum_raw.") and i and tokens[i - 1] == "-m":
            command = token
            help_text(command)  # a module that is not a command fails here
            if tokens[i + 1:i + 2] and tokens[i + 1] in _subcommands(token):
                command = f"{token} {tokens[i + 1]}"
        elif os.path.basename(token) in FOREIGN or (
            i and tokens[i - 1] == "-m" and token in FOREIGN | {"pip"}
        ):
            command = "foreign"
        elif token.startswith("--") and FLAG.fullmatch(token.split("=")[0]):
            if command != "foreign":
                found.append((command, token.split("=")[0]))
    return found


@functools.lru_cache(maxsize=None)
def help_text(command):
    """What `command --help` prints, run in this process: train.py / evaluate.py, or `dialsum_raw.X [sub]`
    as `python -m` runs it. Raises AssertionError if it is not a command that answers --help."""
    program, *sub = command.split()
    argv, out = [program, *sub, "--help"], io.StringIO()
    saved = sys.argv
    sys.argv = argv
    try:
        with contextlib.redirect_stdout(out), warnings.catch_warnings(), pytest.raises(SystemExit) as done:
            warnings.simplefilter(
                "ignore", RuntimeWarning
            )  # runpy: the module is already imported (as a library)
            if program in FRONTS:
                runpy.run_path(os.path.join(REPO, program), run_name="__main__")
            else:
                runpy.run_module(program, run_name="__main__")
    except pytest.fail.Exception:
        raise AssertionError(f"{command} --help did not exit: not a command") from None
    except ImportError:
        raise AssertionError(f"{command}: no such module") from None
    finally:
        sys.argv = saved
    assert done.value.code in (0, None) and "usage:" in out.getvalue(), (
        f"{command} --help failed: {out.getvalue()}"
    )
    return out.getvalue()


def foreign_flags(text):
    """The flags the page gives to another program anywhere (code, spans or prose): those right after its
    name, as in `torchrun --standalone --nproc_per_node 8 train.py` or "torchrun --max-restarts N"."""
    found = set()
    for line in [line for line, _ in command_lines(text)] + [p.replace("`", " ") for p in _paragraphs(text)]:
        tokens = line.split()
        for i, token in enumerate(tokens):
            if os.path.basename(token.strip("(*")) in FOREIGN:
                for j in range(i + 1, len(tokens)):
                    flag = tokens[j].split("=")[0].strip("*,;:()")
                    if FLAG.fullmatch(flag):
                        found.add(flag)
                    elif not tokens[j - 1].startswith("-"):  # neither a flag nor a flag's value
                        break
    return found


def named_in(text):
    """(command, flag) for every flag the page names: on command lines, in comments, in plain prose (None for
    the command there). A flag outside a command line that the page gives to another program elsewhere
    (foreign_flags), or that the sentence before its code span gives to one ("torchrun's `--nnodes`"), is
    left out."""
    named, foreign_here = [], foreign_flags(text)
    for line, before in command_lines(text):
        foreign = re.search(r"\b(" + "|".join(map(re.escape, FOREIGN)) + r")\b", before)
        named += [(c, f) for c, f in named_flags(line) if c or not (foreign or f in foreign_here)]
    named += [(None, flag) for p in _paragraphs(text) for flag in FLAG.findall(re.sub(r"`[^`]*`", "", p))
              if flag not in foreign_here]
    return named


@functools.lru_cache(maxsize=None)
def every_flag():
    """Every flag of every command the docs name (subcommands included), train.py's and evaluate.py's."""
    commands = FRONTS | {c for name in DOCS for c, _ in named_in(_text(name)) if c}
    return frozenset().union(*(FLAG.findall(help_text(c)) for c in commands))


def unknown_flags(name, text):
    """'page: command flag' for each flag the page names that its command's --help does not list (a flag
    named outside a command: that no command of the docs lists)."""
    try:
        named = named_in(text)
    except AssertionError as e:  # a module that is not a command
        raise AssertionError(f"{name}: {e}") from None
    return [f"{name}: {command or '(prose)'} {flag}" for command, flag in named
            if flag not in (FLAG.findall(help_text(command)) if command else every_flag())]


def test_every_relative_link_resolves():
    assert [b for name in DOCS for b in broken_links(name, _text(name))] == []


def test_every_command_and_flag_the_docs_name_is_in_its_help():
    assert [u for name in DOCS for u in unknown_flags(name, _text(name))] == []


def test_the_checks_catch_a_broken_link_an_anchor_and_an_unknown_flag():
    """The checks themselves can fail: a planted page with a missing file, a missing anchor, a flag train.py
    lacks, a flag given to the wrong command, a module that is not a command and one that does not exist."""
    page = (
        "# Top\n\nSee [a](docs/nowhere.md), [b](docs/tests.md#no-such-heading), [c](#top), "
        "[d](docs/tests.md).\n\n"
        "```bash\npython train.py --lora-rnak 8\npython -m dialsum_raw.lora merge --resume x\n"
        "torchrun --nproc_per_node 2 train.py --fsdp\n```\n"
    )
    assert broken_links("README.md", page) == [
        "README.md: docs/nowhere.md: no such file",
        "README.md: docs/tests.md#no-such-heading: no heading with that anchor",
    ]
    assert unknown_flags("README.md", page) == ["README.md: train.py --lora-rnak",
                                                "README.md: dialsum_raw.lora merge --resume"]
    with pytest.raises(AssertionError, match="not a command"):
        unknown_flags("README.md", "Run `python -m dialsum_raw.metrics --x`.")
    with pytest.raises(AssertionError, match="no such module"):
        unknown_flags("README.md", "```bash\npython -m dialsum_raw.nosuch\n```\n")
