"""Packaging and the repository's user-facing files: the source distribution carries every file
the build needs (compared with csrc/), the licence, one version number, the console scripts,
the Makefile's rebuild rule (compile only when a source changed), and README/docs that point to
nothing outside the repository."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

import mamlpp_ext

REPO = Path(__file__).resolve().parents[1]

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None


def _pyproject() -> dict:
    if tomllib is None:
        pytest.skip("tomllib needs Python >= 3.11")
    return tomllib.loads((REPO / "pyproject.toml").read_text())


# What a working checkout holds besides its sources: anywhere (caches, compiled modules) and at
# the top (environments, build products, runs, data).
_ANYWHERE = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info", ".pytest_cache", ".hypothesis")
_AT_TOP = {".git", ".venv", "build", "dist", "runs", "data", "gpu_data", "out", ".cache"}


def _not_sources(folder: str, names: list[str]) -> set[str]:
    top = _AT_TOP if Path(folder).resolve() == REPO.resolve() else set()
    return set(_ANYWHERE(folder, names)) | (top & set(names))


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> tuple[list[str], str]:
    """The file names in a source distribution built from a copy of this checkout (the copy
    keeps the build's temporary folders out of the repository), and its PKG-INFO."""
    tmp = tmp_path_factory.mktemp("sdist")
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=_not_sources)
    env = {**os.environ, "MAMLPP_NO_CUDA": "1"}  # nothing is compiled; this only skips the CUDA probe
    out = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp), "sdist",
                          "--dist-dir", str(tmp / "dist")], cwd=src, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (archive,) = (tmp / "dist").glob("*.tar.gz")
    with tarfile.open(archive) as tf:
        names = [m.name for m in tf.getmembers() if m.isfile()]
        top = names[0].split("/")[0]
        pkg_info = tf.extractfile(f"{top}/PKG-INFO").read().decode()
    return sorted(n[len(top) + 1:] for n in names if n.startswith(top + "/")), pkg_info


def test_sdist_carries_every_build_source(sdist):
    members, _ = sdist
    csrc = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "csrc").rglob("*") if p.is_file())
    assert any(p.endswith(".cuh") for p in csrc) and any(p.endswith(".h") for p in csrc)
    missing = [p for p in csrc if p not in members]
    assert not missing, f"csrc files missing from the sdist (add them to MANIFEST.in): {missing}"
    shipped_csrc = sorted(m for m in members if m.startswith("csrc/"))
    assert shipped_csrc == csrc
    for f in ("setup.py", "pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"):
        assert f in members, f
    py = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "mamlpp_ext").rglob("*.py"))
    assert not [p for p in py if p not in members]
    assert not [m for m in members if m.endswith(".so")], "a compiled module in the sdist"
    # the docs the README links to travel with it
    assert not [p for p in (REPO / "docs").glob("*.md") if p.relative_to(REPO).as_posix() not in members]


def test_version_is_single_sourced(sdist):
    _, pkg_info = sdist
    assert re.fullmatch(r"\d+\.\d+\.\d+(\.\w+)?", mamlpp_ext.__version__)
    meta = _pyproject()
    assert "version" not in meta["project"] and "version" in meta["project"]["dynamic"]
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "mamlpp_ext.__version__"}
    assert f"\nVersion: {mamlpp_ext.__version__}\n" in pkg_info


def test_license(sdist):
    _, pkg_info = sdist
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("MIT License") and "the mamlpp_ext authors" in text
    meta = _pyproject()
    assert meta["project"]["license"] == "MIT" and meta["project"]["license-files"] == ["LICENSE"]
    assert "License-Expression: MIT" in pkg_info and "License-File: LICENSE" in pkg_info


def test_console_scripts_resolve():
    import importlib

    scripts = _pyproject()["project"]["scripts"]
    assert {"mamlpp-train", "mamlpp-eval", "mamlpp-plot", "mamlpp-reproduce", "mamlpp-data"} <= set(scripts)
    for name, target in scripts.items():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), name


# --------------------------------------------------------------------------- Makefile

FAKE_PYTHON = """#!/bin/sh
echo "$*" >> "$CALLS"
case "$*" in *"pip install"*) touch mamlpp_ext/_C.fake.so ;; esac
"""


def test_makefile_rebuilds_only_when_a_source_changed(tmp_path):
    """`make build/test/bench` with a stand-in python that logs its calls: the install (the
    compile) runs on the first build, after a change under csrc/, setup.py or pyproject.toml,
    and when the compiled module is gone; not otherwise."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("make not on PATH")
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    for f in ("csrc/ops.cpp", "csrc/cuda/k.cuh", "csrc/include/mamlpp/a.h", "setup.py", "pyproject.toml"):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("")
    (tmp_path / "mamlpp_ext").mkdir()
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(FAKE_PYTHON)
    (venv / "bin" / "python").chmod(0o755)
    (venv / ".deps-installed").write_text("")
    t0 = time.time() - 1000
    for p in tmp_path.rglob("*"):
        os.utime(p, (t0, t0))
    os.utime(venv / ".deps-installed", (t0 + 1, t0 + 1))  # newer than the Makefile: no reinstall
    calls = tmp_path / "calls.log"

    def make_(target: str) -> int:
        out = subprocess.run([make, "-s", target, f"VENV={venv}", "PYTEST_ARGS=-q"], cwd=tmp_path,
                             env={**os.environ, "CALLS": str(calls)}, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        return sum("pip install" in line for line in calls.read_text().splitlines())

    assert make_("build") == 1
    assert make_("test") == 1 and make_("bench") == 1  # `make bench` after `make test`: no compile
    assert "benchmarks/inner_loop.py" in calls.read_text() and "-m pytest tests" in calls.read_text()

    def edit(path: Path) -> None:
        """``path`` changed after the last build (times set explicitly: no dependence on the
        file system's timestamp resolution)."""
        os.utime(tmp_path / "build" / ".mamlpp_ext-built", (t0 + 2, t0 + 2))
        os.utime(path, (t0 + 3, t0 + 3))

    edit(tmp_path / "csrc" / "cuda" / "k.cuh")
    assert make_("bench") == 2 and make_("bench") == 2
    (tmp_path / "mamlpp_ext" / "_C.fake.so").unlink()
    assert make_("test") == 3 and make_("test") == 3
    edit(tmp_path / "setup.py")
    assert make_("build") == 4 and make_("build") == 4
    edit(tmp_path / "csrc" / "include" / "mamlpp" / "a.h")
    assert make_("test") == 5


# --------------------------------------------------------------------------- README and docs

USER_DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@pytest.mark.parametrize("doc", USER_DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_user_docs_point_only_inside_the_repository(doc):
    text = doc.read_text()
    assert "../shared" not in text and "shared/SPEC" not in text and "shared/data" not in text
    for m in re.finditer(r"(?<![\w/.])((?:\.\./)+[\w./-]*)", text):
        target = (doc.parent / m.group(1)).resolve()
        assert REPO.resolve() in target.parents or target == REPO.resolve(), \
            f"{doc.name} points outside the repository: {m.group(1)}"
    for m in re.finditer(r"\]\(([^)#\s]+)(#[^)]*)?\)", text):  # Markdown links to files
        link = m.group(1)
        if re.match(r"[a-z]+:", link):
            continue
        assert (doc.parent / link).exists(), f"{doc.name} links to a missing file: {link}"


def test_readme_first_screen_says_how_to_start():
    first = "\n".join((REPO / "README.md").read_text().splitlines()[:60])
    for needed in ("pip install", "mamlpp-data download omniglot", "mamlpp-train --preset omniglot-5way-1shot",
                   "mamlpp-eval", "mini-ImageNet", "train/", "--device"):
        assert needed in first, needed
