import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from opd.models import load_model, load_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer("tiny:student")


@pytest.fixture(scope="session")
def teacher():
    return load_model("tiny:teacher").eval()


@pytest.fixture()
def student():
    """A fresh copy of the bundled student per test (tests train it)."""
    torch.manual_seed(0)
    return load_model("tiny:student")
