import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("DIALSUM_SHARED", os.path.join(os.path.dirname(REPO), "shared"))
CORPUS = os.path.join(SHARED, "dialogsum")
FLAN = os.path.join(SHARED, "flan-t5-small")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny random T5 with flan-t5-small's tokenizer (fast tests)."""
    from dialsum_raw.standin import build
    return build(FLAN, str(tmp_path_factory.mktemp("models") / "tiny"), tiny=True)


@pytest.fixture(scope="session")
def small(tmp_path_factory):
    """flan-t5-small's exact architecture with random weights."""
    from dialsum_raw.standin import build
    return build(FLAN, str(tmp_path_factory.mktemp("models") / "small"))


@pytest.fixture(scope="session")
def tokenizer():
    from dialsum_raw.modeling import load_tokenizer
    return load_tokenizer(FLAN)


@pytest.fixture(scope="session")
def corpus():
    from dialsum_raw.data import load_splits
    return load_splits(CORPUS)
