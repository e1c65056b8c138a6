"""Set-up: patches apply in order, builds are cached, a broken patch is named."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from powerinfer_gguf import build


def test_patches_are_numbered_and_documented():
    patches = build.patch_files()
    assert patches, "patches/ holds at least the first patch"
    readme = (build.PATCHES_DIR / "README.md").read_text()
    for p in patches:
        assert p.name in readme, f"{p.name} is not in patches/README.md"
        head = p.read_text().split("diff --git", 1)[0]
        assert "Subject:" in head, f"{p.name} has no header saying what it does"


def test_second_setup_rebuilds_nothing():
    """The test session's own `make setup` built everything; a second run finds it all cached."""
    stamps = {side: build.build_dir(side) / build.STAMP for side in ("patched", "stock")}
    before = {s: p.stat().st_mtime for s, p in stamps.items()}
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "powerinfer_gguf.build", "setup"],
                       capture_output=True, text=True, cwd=build.REPO_ROOT)
    assert r.returncode == 0, r.stderr
    assert "patched: cached" in r.stdout and "stock: cached" in r.stdout, r.stdout
    assert "building" not in r.stdout and "installing" not in r.stdout, r.stdout
    assert {s: p.stat().st_mtime for s, p in stamps.items()} == before
    assert time.time() - t0 < 60


def test_vendor_link_is_the_patched_tree():
    link = build.REPO_ROOT / "vendor" / "llama.cpp"
    assert link.is_symlink() and link.resolve() == build.patched_source().resolve()
    log = subprocess.run(["git", "log", "--format=%s"], cwd=link, capture_output=True, text=True).stdout
    for p in build.patch_files():
        assert p.name in log  # one commit per patch, in order


def test_patch_that_no_longer_applies_is_named(tmp_path, monkeypatch):
    """In a cache of its own (the real patched tree stays as it is)."""
    monkeypatch.setenv("PI_SDIST", str(build.sdist_path()))
    monkeypatch.setenv("PI_CACHE", str(tmp_path / "cache"))
    patches = tmp_path / "patches"
    patches.mkdir()
    (patches / "0001-fine.patch").write_text(build.patch_files()[0].read_text())
    (patches / "0002-broken.patch").write_text(
        "Subject: broken on purpose\n\ndiff --git a/src/llama.cpp b/src/llama.cpp\n"
        "--- a/src/llama.cpp\n+++ b/src/llama.cpp\n@@ -1,1 +1,1 @@\n"
        "-this line is not in llama.cpp\n+nor is this one\n")
    monkeypatch.setattr(build, "PATCHES_DIR", patches)
    monkeypatch.setattr(build, "REPO_ROOT", tmp_path)  # its own vendor/ link
    with pytest.raises(build.BuildError, match="0002-broken.patch no longer applies"):
        build.patched_source()
    tree = build.cache_root() / "src" / f"patched-{build.SDIST_VERSION}"
    assert not (tree / build.STAMP).exists()  # not taken for a finished tree
    (patches / "0002-broken.patch").unlink()
    assert build.patched_source() == tree  # fixed patches/: re-applied over the stock commit
    assert (tree / "include" / "llama-powerinfer.h").is_file()
    assert (tmp_path / "vendor" / "llama.cpp").resolve() == tree.resolve()


def test_reapply_keeps_mtimes_of_unchanged_files(tmp_path, monkeypatch):
    """A changed patches/ is re-applied over the stock commit; files whose content comes out the
    same keep their mtime (the incremental build skips them), changed ones get a new one."""
    import os
    monkeypatch.setenv("PI_SDIST", str(build.sdist_path()))
    monkeypatch.setenv("PI_CACHE", str(tmp_path / "cache"))
    patches = tmp_path / "patches"
    patches.mkdir()
    first, second = build.patch_files()[:2]
    (patches / first.name).write_text(first.read_text())
    (patches / second.name).write_text(second.read_text())
    monkeypatch.setattr(build, "PATCHES_DIR", patches)
    monkeypatch.setattr(build, "REPO_ROOT", tmp_path)
    tree = build.patched_source()
    api_h, impl_h = tree / "include" / "llama-powerinfer.h", tree / "src" / "llama-powerinfer-impl.h"
    old = 1_000_000_000 * 10**9  # 2001: older than any write the re-apply makes
    for f in (api_h, impl_h):
        os.utime(f, ns=(old, old))
    # the second patch's header text changes (new hash, same content): nothing it touches changes
    body = second.read_text().split("diff --git", 1)[1]
    (patches / second.name).write_text("Subject: reworded\n\ndiff --git" + body)
    assert build.patched_source() == tree
    assert api_h.stat().st_mtime_ns == old and impl_h.stat().st_mtime_ns == old
    # without the second patch: its new file is gone, a file both patches edit changes (new
    # mtime), the first patch's own header does not (old mtime)
    both = tree / "src" / "llama-powerinfer.cpp"
    os.utime(both, ns=(old, old))
    (patches / second.name).unlink()
    build.patched_source()
    assert api_h.stat().st_mtime_ns == old and not impl_h.exists()
    assert both.stat().st_mtime_ns > old


def test_missing_tool_says_run_setup(monkeypatch, tmp_path):
    monkeypatch.setenv("PI_CACHE", str(tmp_path))
    monkeypatch.setenv("PI_SDIST", str(build.sdist_path()))
    with pytest.raises(FileNotFoundError, match="make setup"):
        build.bin_path("stock", "llama-bench")


def test_pack_for_gpu_machine_is_small(tmp_path):
    pack = build.pack(tmp_path / "src.tar.xz")
    assert pack.stat().st_size < 20e6
    import tarfile
    names = tarfile.open(pack).getnames()
    assert any(n.endswith("vendor/llama.cpp/CMakeLists.txt") for n in names)
    assert any(n.endswith("llama_cpp/llama.py") for n in names)
    models = {n.rsplit("/", 1)[-1] for n in names if "/vendor/llama.cpp/models/" in n}
    assert models == {"ggml-vocab-llama-spm.gguf", "ggml-vocab-llama-bpe.gguf"}  # vocabularies only
    assert not any("/tools/ui/" in n or "/.git/" in n for n in names)
