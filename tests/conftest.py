"""Shared test setup."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Speed only: the test models are tiny, and on a busy 2-core machine two intra-op
    threads wait on each other (a tiny GPT's step goes from ~10 ms to ~200 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
