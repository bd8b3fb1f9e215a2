"""Fixtures shared by the training tests (test_train_cli.py, test_distributed.py)."""

import pytest

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
