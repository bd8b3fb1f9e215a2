"""Fixtures shared by several test files: a generated Omniglot tree, a temporary preprocessing
cache, and the real Omniglot (skipped, saying how to provide it, when absent)."""

import pytest
import torch

from mamlpp_ext.data.synthetic import make_fake_omniglot


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
    """A small generated Omniglot tree: 4 background + 2 evaluation alphabets, 6 characters, 4 drawings."""
    root = tmp_path_factory.mktemp("omniglot")
    make_fake_omniglot(root, alphabets=(4, 2), characters=6, drawings=4)
    return root


@pytest.fixture
def tmp_cache(tmp_path_factory, monkeypatch):
    """Preprocessing cache in the session's temp folder (use with pytest.mark.usefixtures)."""
    monkeypatch.setenv("MAMLPP_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def real_omniglot_root():
    """The real Omniglot root as the loader resolves it ($MAMLPP_OMNIGLOT_ROOT, else the default
    folder); the test is skipped with the reason when there is none."""
    from mamlpp_ext.data import DatasetNotFoundError, resolve_omniglot_root

    try:
        return resolve_omniglot_root()
    except DatasetNotFoundError:
        pytest.skip("the real Omniglot is not available: set MAMLPP_OMNIGLOT_ROOT to a complete copy "
                    "(`mamlpp-data download omniglot` fetches one; .ci/run sets it where the developers' copy exists)")


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """Tiny networks: one intra-op thread is as fast, and immune to OpenMP spin-waiting when other
    processes share the cores (which slowed such tests down 20x on a busy 2-core machine). Use
    with ``pytestmark = pytest.mark.usefixtures("one_intra_op_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
