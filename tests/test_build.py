"""Set-up: hooks apply in order, our sources are copied in, builds are cached, a broken patch is named."""
from __future__ import annotations

import subprocess
import sys
import time

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


def test_patches_only_hook_upstream_files():
    """Our code is plain source in csrc/; a patch edits upstream files only, each file in one patch."""
    owner = {}
    added = 0
    for p in build.patch_files():
        text = p.read_text()
        assert "new file mode" not in text, f"{p.name} creates a file: put it in csrc/"
        for line in text.splitlines():
            if line.startswith("diff --git a/"):
                name = line.split(" b/", 1)[1]
                assert name not in owner, f"{name} is edited by {owner[name]} and {p.name}"
                owner[name] = p.name
            elif line.startswith("+") and not line.startswith("+++"):
                added += 1
    assert added <= 350, f"patches/ adds {added} lines: hooks only"
    stock = build.stock_llama_source()
    for rel in build.source_files():
        assert not (stock / rel).exists(), f"csrc/{rel} would replace llama.cpp's own file"


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
    assert log.splitlines()[0] == build.SOURCES_COMMIT  # then csrc/, one commit
    for rel in build.source_files():
        assert (link / rel).read_bytes() == (build.CSRC_DIR / rel).read_bytes()


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


def _own_cache(tmp_path, monkeypatch, n_patches: int):
    """A cache, patches/ and csrc/ of the test's own (the real patched tree stays as it is)."""
    import shutil
    monkeypatch.setenv("PI_SDIST", str(build.sdist_path()))
    monkeypatch.setenv("PI_CACHE", str(tmp_path / "cache"))
    patches = tmp_path / "patches"
    patches.mkdir()
    for p in build.patch_files()[:n_patches]:
        (patches / p.name).write_text(p.read_text())
    shutil.copytree(build.CSRC_DIR, tmp_path / "csrc")
    monkeypatch.setattr(build, "PATCHES_DIR", patches)
    monkeypatch.setattr(build, "CSRC_DIR", tmp_path / "csrc")
    monkeypatch.setattr(build, "REPO_ROOT", tmp_path)
    return patches, tmp_path / "csrc"


def test_reapply_keeps_mtimes_of_unchanged_files(tmp_path, monkeypatch):
    """A change re-applies everything over the stock commit; files whose content comes out the same
    keep their mtime (the incremental build skips them), changed ones get a new one."""
    import os
    patches, csrc = _own_cache(tmp_path, monkeypatch, 2)
    tree = build.patched_source()
    ours, cmake, ggml_h = (tree / "include" / "llama-powerinfer.h", tree / "src" / "CMakeLists.txt",
                           tree / "ggml" / "include" / "ggml.h")  # csrc/, patch 0001, patch 0002
    old = 1_000_000_000 * 10**9  # 2001: older than any write the re-apply makes
    for f in (ours, cmake, ggml_h):
        os.utime(f, ns=(old, old))
    second = sorted(patches.iterdir())[1]
    body = second.read_text().split("diff --git", 1)[1]
    second.write_text("Subject: reworded\n\ndiff --git" + body)  # new hash, same content
    assert build.patched_source() == tree
    assert all(f.stat().st_mtime_ns == old for f in (ours, cmake, ggml_h))
    second.unlink()  # ggml.h goes back to stock: new mtime; the rest keep theirs
    build.patched_source()
    assert ours.stat().st_mtime_ns == old and cmake.stat().st_mtime_ns == old
    assert ggml_h.stat().st_mtime_ns > old
    (csrc / "include" / "llama-powerinfer.h").write_text(ours.read_text() + "// edited\n")
    build.patched_source()  # an edited source: copied again, and only it is newer
    assert ours.read_text().endswith("// edited\n") and ours.stat().st_mtime_ns > old
    assert cmake.stat().st_mtime_ns == old


def test_edit_of_a_copy_in_the_tree_is_refused(tmp_path, monkeypatch):
    """An edit made in vendor/llama.cpp to one of our files would be lost: set-up names csrc/."""
    patches, csrc = _own_cache(tmp_path, monkeypatch, 1)
    tree = build.patched_source()
    (tree / "src" / "llama-powerinfer-plan.cpp").write_text("// lost?\n")
    (csrc / "src" / "llama-powerinfer-plan.cpp").write_text("// a change elsewhere: a new hash\n")
    with pytest.raises(build.BuildError, match="csrc/src/llama-powerinfer-plan.cpp"):
        build.patched_source()


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
    assert not any("/tools/ui/src/" in n or "/.git/" in n for n in names)  # the web UI's sources stay out ...
    # ... but what llama-server's configure reads comes (it builds without an embedded UI)
    assert any(n.endswith("vendor/llama.cpp/tools/ui/CMakeLists.txt") for n in names)
    assert any(n.endswith("vendor/llama.cpp/scripts/ui-assets.cmake") for n in names)
