"""mamlpp-data download: real HTTP round trips against a server on 127.0.0.1 serving small
generated archives with the official file names and paths (this machine has no internet).

Covered: the files arrive byte for byte and load; files present with the right checksum are not
fetched again; a checksum mismatch, a short transfer, an HTTP error and a refused connection
each fail with a message that says what happened and what to do, and leave no file (not even a
temporary one) behind; the command line's exit codes and messages; the recorded checksum of the
official one-shot archive against the real file when it is present.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import socket
import threading
import zipfile
from functools import partial
from pathlib import Path

import pytest

from mamlpp_ext.data import download as DL
from mamlpp_ext.data import get_dataset, load_omniglot, load_one_shot_runs, register_dataset
from mamlpp_ext.data.synthetic import make_fake_omniglot


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; ``/short/<path>`` announces more bytes than it sends, then closes."""

    requests: list = []

    def log_message(self, *args):  # keep the test output clean
        pass

    def do_GET(self):
        type(self).requests.append(self.path)
        if self.path.startswith("/short/"):
            body = (Path(self.directory) / self.path[len("/short/"):]).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body) + 1000))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A local HTTP server whose /python/ holds generated Omniglot archives and an all_runs.zip,
    laid out like the official repository; yields (base URL, table of RemoteFile with the generated
    files' checksums, the served python/ folder, the handler class that records request paths)."""
    site = tmp_path_factory.mktemp("site")
    py = site / "python"
    make_fake_omniglot(py, alphabets=(2, 1), characters=3, drawings=2, layout="zip")
    (py / "one-shot-classification").mkdir()
    (py / "one-shot-classification" / "all_runs.zip").write_bytes(_fake_all_runs())
    table = tuple(DL.RemoteFile(rf.name, rf.path, hashlib.md5((py / rf.path).read_bytes()).hexdigest(),
                                size=(py / rf.path).stat().st_size if rf.size else None, what=rf.what,
                                optional=rf.optional)
                  for rf in DL.OMNIGLOT_FILES)

    class Handler(_Handler):
        requests: list = []

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", table, py, Handler
    finally:
        server.shutdown()
        server.server_close()


def _fake_all_runs() -> bytes:
    """A one-run all_runs.zip with the benchmark's layout (2 classes)."""
    from PIL import Image

    def png(v: int) -> bytes:
        buf = io.BytesIO()
        Image.new("1", (105, 105), v).save(buf, format="PNG")
        return buf.getvalue()

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("run01/class_labels.txt", "run01/test/item01.png run01/training/class01.png\n"
                                              "run01/test/item02.png run01/training/class02.png\n")
        for i, name in enumerate(("training/class01.png", "training/class02.png", "test/item01.png",
                                  "test/item02.png")):
            zf.writestr(f"run01/{name}", png(i % 2))
    return buf.getvalue()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_round_trip_then_load(served, tmp_path):
    base, table, py, handler = served
    dest = tmp_path / "omniglot"
    out = DL.download_omniglot(dest, base_url=base + "/python", files=table, progress=False, log=lambda m: None)
    assert [r["status"] for r in out] == ["downloaded"] * 3
    for rf in table:
        assert (dest / rf.name).read_bytes() == (py / rf.path).read_bytes()
    assert _leftovers(dest) == sorted(rf.name for rf in table)  # no temporary files
    data = load_omniglot(dest, cache_dir=tmp_path / "cache", check_counts=False, progress=False, num_workers=0)
    assert data.num_classes == 9
    assert len(load_one_shot_runs(dest)) == 1

    # present with the right checksum: nothing is fetched again
    handler.requests.clear()
    out = DL.download_omniglot(dest, base_url=base + "/python", files=table, progress=False, log=lambda m: None)
    assert [r["status"] for r in out] == ["present"] * 3 and handler.requests == []
    # a damaged file is fetched again; --force fetches everything
    (dest / "images_evaluation.zip").write_bytes(b"damaged")
    out = DL.download_omniglot(dest, base_url=base + "/python", files=table, progress=False, log=lambda m: None)
    assert [r["status"] for r in out] == ["present", "downloaded", "present"]
    assert (dest / "images_evaluation.zip").read_bytes() == (py / "images_evaluation.zip").read_bytes()
    out = DL.download_omniglot(dest, base_url=base + "/python", files=table, one_shot=False, force=True,
                               progress=False, log=lambda m: None)
    assert [r["name"] for r in out] == ["images_background.zip", "images_evaluation.zip"]
    assert all(r["status"] == "downloaded" for r in out)


def test_progress_bar(served, tmp_path, capsys):
    base, table, py, _ = served
    DL.fetch(base + "/python/images_background.zip", tmp_path / "a.zip", md5=table[0].md5, progress=True)
    err = capsys.readouterr().err
    assert "a.zip" in err and "100%" in err


def test_checksum_mismatch_leaves_nothing(served, tmp_path):
    base, table, _, _ = served
    dest = tmp_path / "omniglot"
    with pytest.raises(DL.DownloadError, match="checksum mismatch") as e:
        DL.download_omniglot(dest, base_url=base + "/python", progress=False, log=lambda m: None)  # official MD5s
    assert "images_background.zip" in str(e.value) and "by hand" in str(e.value)
    assert _leftovers(dest) == []


def test_short_transfer_leaves_nothing(served, tmp_path):
    base, table, _, _ = served
    with pytest.raises(DL.DownloadError, match="broke off|incomplete") as e:
        DL.fetch(base + "/short/python/images_background.zip", tmp_path / "x.zip", md5=table[0].md5, progress=False)
    assert "again" in str(e.value)
    assert _leftovers(tmp_path) == []


def test_known_size_is_checked(served, tmp_path):
    base, table, _, _ = served
    rf = table[2]
    with pytest.raises(DL.DownloadError, match="known size is 12"):
        DL.fetch(base + "/python/" + rf.path, tmp_path / "r.zip", md5=rf.md5, size=12, progress=False)
    assert _leftovers(tmp_path) == []


def test_http_and_network_errors(served, tmp_path):
    base, table, _, _ = served
    with pytest.raises(DL.DownloadError, match="HTTP 404"):
        DL.fetch(base + "/python/nothing.zip", tmp_path / "n.zip", md5="0" * 32, progress=False)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DL.DownloadError, match="could not download .*network connection") as e:
        DL.download_omniglot(tmp_path / "o", base_url=f"http://127.0.0.1:{port}/python", files=table,
                             progress=False, log=lambda m: None, timeout=5)
    assert "by hand" in str(e.value)
    assert _leftovers(tmp_path / "o") == []


@pytest.fixture
def use_table():
    """Point a dataset's registry entry at a table of generated files' checksums for one test."""
    saved = []

    def use(name, table):
        spec = get_dataset(name)
        saved.append(spec)
        register_dataset(dataclasses.replace(spec, downloads=tuple(table)), replace=True)

    yield use
    for spec in reversed(saved):
        register_dataset(spec, replace=True)


def test_command_line(served, tmp_path, monkeypatch, capsys, use_table):
    base, table, py, _ = served
    dest = tmp_path / "cli"
    # the official checksums against the generated files: exit code 1, the reason on stderr
    assert DL.main(["download", "omniglot", "--root", str(dest), "--base-url", base + "/python",
                    "--no-progress"]) == 1
    assert "checksum mismatch" in capsys.readouterr().err
    # with this table in the registry entry the same command succeeds and says what to do next
    use_table("omniglot", table)
    assert DL.main(["download", "omniglot", "--root", str(dest), "--base-url", base + "/python",
                    "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "ready in" in out and "--dataset-root" in out and "MAMLPP_OMNIGLOT_ROOT" in out
    assert _leftovers(dest) == sorted(rf.name for rf in table)
    # without --root: $MAMLPP_OMNIGLOT_ROOT, else the default folder
    monkeypatch.setenv("MAMLPP_OMNIGLOT_ROOT", str(tmp_path / "env"))
    assert DL.main(["download", "omniglot", "--base-url", base + "/python", "--no-progress", "--no-one-shot"]) == 0
    assert _leftovers(tmp_path / "env") == ["images_background.zip", "images_evaluation.zip"]
    monkeypatch.delenv("MAMLPP_OMNIGLOT_ROOT")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert DL.main(["download", "omniglot", "--base-url", base + "/python", "--no-progress"]) == 0
    assert "--dataset-root" not in capsys.readouterr().out  # found there without options
    assert len(_leftovers(tmp_path / "xdg" / "mamlpp_ext" / "omniglot")) == 3
    # mini-ImageNet and unknown names are refused with a reason
    for name, text in (("mini-imagenet", "cannot be downloaded"), ("cifar", "unknown dataset")):
        with pytest.raises(SystemExit) as e:
            DL.main(["download", name])
        assert e.value.code == 2 and text in capsys.readouterr().err


def test_where(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MAMLPP_OMNIGLOT_ROOT", str(tmp_path))
    monkeypatch.delenv("MAMLPP_MINIIMAGENET_ROOT", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert DL.main(["where"]) == 0
    out = capsys.readouterr().out
    assert f"Omniglot: {tmp_path} ($MAMLPP_OMNIGLOT_ROOT; exists)" in out
    assert f"mini-ImageNet: {tmp_path / 'xdg' / 'mamlpp_ext' / 'mini-imagenet'} (default" in out


def test_official_one_shot_checksum_matches_the_real_file(real_omniglot_root, tmp_path):
    """The MD5 and size recorded for all_runs.zip, checked by serving the real file over HTTP."""
    src = real_omniglot_root / "all_runs.zip"
    if not src.is_file():
        pytest.skip(f"no all_runs.zip in {real_omniglot_root}")
    site = tmp_path / "site" / "python" / "one-shot-classification"
    site.mkdir(parents=True)
    (site / "all_runs.zip").write_bytes(src.read_bytes())
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_Handler, directory=str(tmp_path / "site")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        rf = next(f for f in DL.OMNIGLOT_FILES if f.name == "all_runs.zip")
        out = DL.download_omniglot(tmp_path / "dl", base_url=f"http://127.0.0.1:{server.server_address[1]}/python",
                                   files=[rf], progress=False, log=lambda m: None)
    finally:
        server.shutdown()
        server.server_close()
    assert out[0]["status"] == "downloaded" and out[0]["bytes"] == rf.size
