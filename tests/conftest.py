"""Shared test setup."""

import shutil

import pytest
import torch

from tests.helpers import DATA


@pytest.fixture(autouse=True, scope="session")
def test_data_folder():
    """The session's prepared datasets (tests.helpers.DATA) go when the session ends."""
    yield
    shutil.rmtree(DATA, ignore_errors=True)


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Speed only: the test models are tiny, and on a busy 2-core machine two intra-op
    threads wait on each other (a tiny GPT's step goes from ~10 ms to ~200 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class StandInHub:
    """GPT2LMHeadModel.from_pretrained against a stand-in Hugging Face cache and Hub that hold
    a tiny GPT-2 (1 layer, width 8, GPT-2's vocabulary and context), so that no test downloads
    500 MB. `cached` and `online` say where the weights can be found; `calls` records each
    lookup's local_files_only."""

    def __init__(self, transformers):
        torch.manual_seed(0)
        config = transformers.GPT2Config(n_embd=8, n_layer=1, n_head=2, activation_function="gelu_new",
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        self.model = transformers.GPT2LMHeadModel(config).eval()
        self.cached, self.online, self.calls = True, True, []

    def from_pretrained(self, name: str, local_files_only: bool = False):
        self.calls.append(local_files_only)
        if not (self.cached if local_files_only else self.online):
            raise OSError(f"We couldn't connect to 'https://huggingface.co' to load the files of {name},\n"
                          "and couldn't find them in the cached files.")
        return self.model


@pytest.fixture
def gpt2_hub(monkeypatch) -> StandInHub:
    """`init_from='gpt2'` served by StandInHub (GPT.PRETRAINED's gpt2 entry shrunk to match)."""
    import transformers

    from model import GPT
    hub = StandInHub(transformers)
    monkeypatch.setattr(transformers.GPT2LMHeadModel, "from_pretrained", hub.from_pretrained)
    monkeypatch.setitem(GPT.PRETRAINED, "gpt2", dict(n_layer=1, n_head=2, n_embd=8))
    return hub
