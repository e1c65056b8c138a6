"""Set-up: fetch the pinned llama-cpp-python sdist, apply patches/, build patched + stock, install.

Everything lands in a cache (``$PI_CACHE``, default ``~/.cache/powerinfer_gguf``) keyed by the sdist
version, the hash of patches/ and the build flags, so a second set-up, or a fresh clone on the same
machine, rebuilds nothing:

    sdist/llama_cpp_python-0.3.36.tar.gz      the pinned sdist (or a GPU pack, see ``pack``)
    src/stock-<sdist>/                        unpacked, untouched (vendor/llama.cpp inside)
    src/patched-<sdist>/                      llama.cpp + patches/ (one commit each) + csrc/ (one commit)
    build/stock-<sdist>-<flags>/bin/          static llama-bench, llama-completion, llama-quantize, ...
    build/patched-<sdist>-<flags>/bin/        shared libllama + libggml*, the same tools, test-backend-ops

Our C/C++ is plain source in csrc/, laid out as it sits in the llama.cpp tree, and copied in after
patches/ (hooks into upstream files only). Each tree and build holds a stamp naming what it was
made from (patched: the hash of csrc/ and patches/); a change re-applies over the stock commit,
keeps the mtimes of files that come out the same, and rebuilds incrementally in the same folders.

The patched shared libraries are copied into the installed ``llama_cpp/lib/``, so ``import llama_cpp``
loads them (llama-cpp-python's Python part is installed with ``-DLLAMA_BUILD=OFF``: no C++ compiled).
This module uses the standard library only: it runs before anything else is installed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

SDIST_PACKAGE = "llama-cpp-python"
SDIST_VERSION = "0.3.36"
LLAMA_CPP_COMMIT = "0c1e57098"  # what SDIST_VERSION vendors
SDIST_FILE = f"llama_cpp_python-{SDIST_VERSION}.tar.gz"
SDIST_DIR = f"llama_cpp_python-{SDIST_VERSION}"

REPO_ROOT = Path(__file__).resolve().parent.parent
PATCHES_DIR = REPO_ROOT / "patches"
CSRC_DIR = REPO_ROOT / "csrc"
SOURCES_COMMIT = "powerinfer_gguf sources (csrc/)"

STOCK_TARGETS = ["llama-bench", "llama-completion", "llama-perplexity", "llama-quantize", "llama-server", "ggml-rpc-server"]
PATCHED_TARGETS = ["llama", "llama-bench", "llama-completion", "llama-quantize", "llama-server", "ggml-rpc-server",
                   "test-backend-ops", "test-pi-sparse-ffn"]
# What a GPU machine needs to build (no models/, docs/, tests data): ~6.4 MB packed with xz.
PACK_LLAMA_DIRS = ["ggml", "src", "include", "common", "tools", "cmake", "vendor", "app", "licenses",
                   "gguf-py", "tests", "CMakeLists.txt", "LICENSE", "build-info.cmake", "scripts/ui-assets.cmake",
                   "models/ggml-vocab-llama-spm.gguf", "models/ggml-vocab-llama-bpe.gguf"]
# ... less what no Linux CUDA/CPU build reads (the web UI's sources: llama-server builds without
# it, but its CMakeLists is read; other backends' sources).
PACK_SKIP = ["tools/ui/src", "tools/ui/static", "tools/ui/tests", "ggml/src/ggml-" + "cann", "ggml/src/ggml-openvino", "ggml/src/ggml-webgpu",
             "ggml/src/ggml-et", "ggml/src/ggml-metal", "ggml/src/ggml-hexagon", "ggml/src/ggml-sycl",
             "ggml/src/ggml-vulkan", "ggml/src/ggml-opencl", "ggml/src/ggml-musa", "ggml/src/ggml-zdnn"]
STAMP = ".pi-ok"


class BuildError(RuntimeError):
    """A set-up step failed; the message names the step and the log file."""


def log(msg: str) -> None:
    print(f"[pi-setup] {msg}", flush=True)


def cache_root() -> Path:
    return Path(os.environ.get("PI_CACHE", Path.home() / ".cache" / "powerinfer_gguf")).expanduser()


def patch_files() -> list[Path]:
    return sorted(p for p in PATCHES_DIR.glob("[0-9][0-9][0-9][0-9]-*.patch"))


def source_files() -> list[Path]:
    """Our C/C++ files, relative to csrc/ (= their place in the llama.cpp tree)."""
    if not CSRC_DIR.is_dir():
        return []
    return sorted(p.relative_to(CSRC_DIR) for p in CSRC_DIR.rglob("*") if p.is_file())


def patches_hash() -> str:
    """What the patched side is built from: the hooks (patches/) and our sources (csrc/)."""
    h = hashlib.sha256(SDIST_VERSION.encode())
    for p in patch_files():
        h.update(p.name.encode())
        h.update(p.read_bytes())
    for rel in source_files():
        h.update(b"csrc/" + rel.as_posix().encode())
        h.update((CSRC_DIR / rel).read_bytes())
    return h.hexdigest()[:12]


@dataclass(frozen=True)
class BuildConfig:
    """The flags that change what gets compiled (part of the cache key)."""

    cuda_arch: str | None  # e.g. "90"; None: CPU only
    native: bool = True
    cuda_fa: bool = True   # FlashAttention kernels: ~40% of a CUDA build's compile time
    cpu_isa: tuple[str, ...] | None = None  # explicit GGML_<ISA> options instead of -march=native

    @property
    def cuda(self) -> bool:
        return self.cuda_arch is not None

    def cmake_flags(self, shared: bool) -> list[str]:
        flags = [
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DBUILD_SHARED_LIBS={'ON' if shared else 'OFF'}",
            "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
            # test-backend-ops checks our ops on every backend: the patched side builds it.
            f"-DLLAMA_BUILD_TESTS={'ON' if shared else 'OFF'}", "-DLLAMA_BUILD_EXAMPLES=OFF",
            # llama-server for pi-serve --parallel and its benchmark, without its web UI (npm, or a download)
            "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_APP=OFF",
            # llama.cpp's RPC backend and rpc-server: a model over several hosts (each side its own protocol)
            "-DGGML_RPC=ON",
            f"-DGGML_NATIVE={'ON' if self.native and self.cpu_isa is None else 'OFF'}",
            # Binaries find the shared libs beside them wherever the folder is copied.
            "-DCMAKE_BUILD_RPATH=$ORIGIN", "-DCMAKE_INSTALL_RPATH=$ORIGIN",
        ]
        if self.cpu_isa is not None:
            flags += [f"-DGGML_{isa}={'ON' if isa in self.cpu_isa else 'OFF'}" for isa in _ISA_FLAGS.values()]
        if self.cuda:
            flags += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={self.cuda_arch}",
                      "-DGGML_CUDA_NCCL=OFF", f"-DGGML_CUDA_FA={'ON' if self.cuda_fa else 'OFF'}"]
        return flags

    def key(self) -> str:
        cpu = "cpu" if self.cpu_isa is None else "cpu" + hashlib.sha256(",".join(self.cpu_isa).encode()).hexdigest()[:6]
        if not self.cuda:
            return cpu
        return cpu + "-cuda" + self.cuda_arch + ("" if self.cuda_fa else "-nofa")


# /proc/cpuinfo flag -> ggml CMake option. AMX is left out unless PI_AMX=1: its tiles need the
# kernel's permission and virtual machines here report the flags but fault on use (seen: a SIGSEGV
# in ggml_backend_amx_mul_mat on Q4_0, with -march=native on a Sapphire Rapids VM).
_ISA_FLAGS = {"sse4_2": "SSE42", "avx": "AVX", "avx2": "AVX2", "bmi2": "BMI2", "fma": "FMA", "f16c": "F16C",
              "avx_vnni": "AVX_VNNI", "avx512f": "AVX512", "avx512vbmi": "AVX512_VBMI",
              "avx512_vnni": "AVX512_VNNI", "avx512_bf16": "AVX512_BF16",
              "amx_tile": "AMX_TILE", "amx_int8": "AMX_INT8", "amx_bf16": "AMX_BF16"}


def _cpu_isa() -> tuple[str, ...] | None:
    """This CPU's instruction sets as ggml options (x86 Linux); None: let -march=native decide."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    have = set(line.split(":", 1)[-1].split())
    if "avx2" not in have:
        return None
    isa = [opt for flag, opt in _ISA_FLAGS.items() if flag in have]
    if os.environ.get("PI_AMX") != "1":
        isa = [i for i in isa if not i.startswith("AMX")]
    return tuple(isa)


def _gpu_arch() -> str | None:
    """Compute capability of the first NVIDIA GPU as CMake wants it ("90"), or None."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0 or not out.stdout.strip():
        return None
    return out.stdout.strip().splitlines()[0].strip().replace(".", "")


def detect_config() -> BuildConfig:
    """CUDA when a GPU answers (or PI_CUDA=1 / PI_CUDA=<arch>); PI_CUDA=0 forces CPU.
    PI_CUDA_FA=0 leaves FlashAttention kernels out (a faster build; both sides alike)."""
    want = os.environ.get("PI_CUDA", "").strip()
    native = os.environ.get("PI_NATIVE", "1") != "0"
    fa = os.environ.get("PI_CUDA_FA", "1") != "0"
    isa = _cpu_isa() if native else None
    if want == "0":
        return BuildConfig(None, native, fa, isa)
    if want and want != "1":
        return BuildConfig(want, native, fa, isa)
    arch = _gpu_arch()
    if want == "1" and arch is None:
        arch = "90"  # asked for CUDA on a machine without a GPU: build for Hopper
    return BuildConfig(arch, native, fa, isa)


def _run(cmd: list[str], step: str, logfile: Path, cwd: Path | None = None,
         env: dict | None = None) -> None:
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with open(logfile, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        r = subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise BuildError(f"{step} failed (exit {r.returncode}); log: {logfile}")


# ---------------------------------------------------------------------------------------------
# sources


def sdist_path() -> Path:
    """The pinned sdist (downloaded once), or the pack named by PI_SDIST (GPU machine)."""
    override = os.environ.get("PI_SDIST")
    if override:
        p = Path(override).resolve()
        if not p.is_file():
            raise BuildError(f"PI_SDIST={override}: no such file")
        return p
    dest = cache_root() / "sdist" / SDIST_FILE
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    log(f"downloading {SDIST_PACKAGE}=={SDIST_VERSION} sdist (~76 MB)")
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
              f"{SDIST_PACKAGE}=={SDIST_VERSION}", "-d", tmp], "sdist download",
             cache_root() / "logs" / "download.log")
        got = list(Path(tmp).glob("*.tar.gz"))
        if len(got) != 1:
            raise BuildError(f"sdist download: expected one .tar.gz, got {[g.name for g in got]}")
        os.replace(got[0], dest)
    return dest


def _sdist_tag(sdist: Path) -> str:
    if sdist.name == SDIST_FILE:
        return SDIST_VERSION
    return SDIST_VERSION + "-" + hashlib.sha256(sdist.name.encode()).hexdigest()[:8]


def stock_source() -> Path:
    """Unpacked sdist root (llama.cpp under vendor/llama.cpp), never modified."""
    sdist = sdist_path()
    dest = cache_root() / "src" / f"stock-{_sdist_tag(sdist)}"
    if (dest / STAMP).is_file():
        return dest
    log(f"unpacking {sdist.name}")
    shutil.rmtree(dest, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        with tarfile.open(sdist) as tf:
            tf.extractall(tmp, filter="data")
        roots = [p for p in Path(tmp).iterdir() if p.is_dir()]
        if len(roots) != 1 or not (roots[0] / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
            raise BuildError(f"{sdist}: not a llama-cpp-python sdist (no vendor/llama.cpp)")
        (roots[0] / STAMP).write_text(sdist.name + "\n")
        os.replace(roots[0], dest)
    return dest


def stock_llama_source() -> Path:
    return stock_source() / "vendor" / "llama.cpp"


def _git(args: list[str], cwd: Path, step: str, logfile: Path) -> None:
    env = dict(os.environ, GIT_AUTHOR_NAME="pi-setup", GIT_AUTHOR_EMAIL="pi-setup@localhost",
               GIT_COMMITTER_NAME="pi-setup", GIT_COMMITTER_EMAIL="pi-setup@localhost")
    _run(["git", *args], step, logfile, cwd=cwd, env=env)


def patched_source() -> Path:
    """llama.cpp with patches/ applied in order (one commit each) and csrc/ copied in (one commit),
    as a git repo so that a developer edits an upstream file there and `git diff`s the next hook.
    vendor/llama.cpp in the repo links here.

    The tree stays at one path whatever the sources are, and a change re-applies everything over the
    stock commit: only the files that changed get a new mtime, so the patched build is incremental."""
    stock = stock_llama_source()
    dest = cache_root() / "src" / f"patched-{_sdist_tag(sdist_path())}"
    want = patches_hash()
    stamp = dest / STAMP
    if not (stamp.is_file() and stamp.read_text().strip() == want):
        logfile = cache_root() / "logs" / "patches.log"
        logfile.unlink(missing_ok=True)
        log(f"applying {len(patch_files())} patch(es) and {len(source_files())} source file(s) to llama.cpp {LLAMA_CPP_COMMIT}")
        if not (dest / ".git").is_dir():
            shutil.rmtree(dest, ignore_errors=True)
            tmp = dest.with_name(dest.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            _init_tree(stock, tmp, logfile)
            os.replace(tmp, dest)
        _refuse_edits(dest)
        stamp.unlink(missing_ok=True)
        before = _patched_files_state(dest)
        _git(["reset", "-q", "--hard", "stock"], dest, "reset to stock", logfile)
        _git(["clean", "-q", "-fd"], dest, "clean", logfile)
        for p in patch_files():
            try:
                _git(["apply", "--index", "--whitespace=nowarn", str(p)], dest, f"patch {p.name}", logfile)
            except BuildError as e:
                _git(["reset", "-q", "--hard", "stock"], dest, "reset to stock", logfile)
                raise BuildError(f"patches/{p.name} no longer applies to llama.cpp {LLAMA_CPP_COMMIT}; "
                                 f"log: {logfile}") from e
            _git(["commit", "-q", "-m", p.name], dest, f"commit {p.name}", logfile)
        _copy_sources(dest, logfile)
        _keep_unchanged_mtimes(dest, before)
        stamp.write_text(want + "\n")
    link = REPO_ROOT / "vendor" / "llama.cpp"
    link.parent.mkdir(exist_ok=True)
    if link.is_symlink() or not link.exists():
        if not (link.is_symlink() and Path(os.readlink(link)) == dest):
            link.unlink(missing_ok=True)
            link.symlink_to(dest)
    return dest


def _refuse_edits(tree: Path) -> None:
    """Edits made in the tree would be lost by a re-apply: say where they belong."""
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=tree, capture_output=True, text=True).stdout
    names = [line[3:] for line in dirty.splitlines() if line.strip()]
    if not names:
        return
    ours = {rel.as_posix() for rel in source_files()}
    mine = [n for n in names if n in ours]
    if mine:
        raise BuildError(f"{tree / mine[0]} (vendor/llama.cpp) was edited: our sources live in csrc/{mine[0]}; "
                         "copy your edit there (or discard it: git -C vendor/llama.cpp checkout .) and run set-up again")
    raise BuildError(f"{tree} (vendor/llama.cpp) has uncommitted edits ({names[0]}...): make them a hook in "
                     "patches/ (tools/make-patch.sh) or discard them (git -C vendor/llama.cpp stash) and run set-up again")


def _copy_sources(tree: Path, logfile: Path) -> None:
    """csrc/ into the tree at the same relative paths, as one commit; a file may not replace upstream's."""
    files = source_files()
    if not files:
        return
    stock_files = set(subprocess.run(["git", "ls-tree", "-r", "--name-only", "stock"], cwd=tree,
                                     capture_output=True, text=True).stdout.split())
    for rel in files:
        if rel.as_posix() in stock_files:
            raise BuildError(f"csrc/{rel} would replace llama.cpp's own file: edit upstream files through a hook in patches/")
        dst = tree / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(CSRC_DIR / rel, dst)
    _git(["add", "-A", "--", *[rel.as_posix() for rel in files]], tree, "git add csrc", logfile)
    _git(["commit", "-q", "-m", SOURCES_COMMIT], tree, "commit csrc", logfile)


def _patched_files_state(tree: Path) -> dict[str, tuple[str, int]]:
    """Content hash and mtime of every file the applied patches touch (against the stock tag)."""
    r = subprocess.run(["git", "diff", "-z", "--name-only", "stock", "HEAD"], cwd=tree, capture_output=True, text=True)
    state = {}
    for name in r.stdout.split("\0") if r.returncode == 0 else []:
        if not name:
            continue
        f = tree / name
        if f.is_file():
            state[name] = (hashlib.sha256(f.read_bytes()).hexdigest(), f.stat().st_mtime_ns)
    return state


def _keep_unchanged_mtimes(tree: Path, before: dict[str, tuple[str, int]]) -> None:
    """A re-apply rewrites every patched file; those whose content came out the same get their old
    mtime back, so the incremental build recompiles what really changed (a patch that touches a
    header as widely included as ggml.h otherwise rebuilds most of the tree: ~7 min here)."""
    for name, (digest, mtime) in before.items():
        f = tree / name
        if f.is_file() and hashlib.sha256(f.read_bytes()).hexdigest() == digest:
            os.utime(f, ns=(mtime, mtime))


def _init_tree(stock: Path, tmp: Path, logfile: Path) -> None:
    """Copy the stock tree to ``tmp`` as a git repo whose first commit is tagged ``stock``."""
    # Top-level models/ (vocab files, read from the stock tree) and docs/ are not needed here.
    def skip(folder: str, names: list[str]) -> list[str]:
        return [n for n in names if n == ".git" or (Path(folder) == stock and n in ("models", "docs"))]
    shutil.copytree(stock, tmp, symlinks=True, ignore=skip)
    _git(["init", "-q"], tmp, "git init of the patched tree", logfile)
    with open(tmp / ".git" / "info" / "exclude", "a") as f:
        f.write(f"/{STAMP}\n")
    _git(["add", "-A"], tmp, "git add", logfile)
    _git(["commit", "-q", "-m", f"llama.cpp {LLAMA_CPP_COMMIT} (llama-cpp-python {SDIST_VERSION})"],
         tmp, "git commit", logfile)
    _git(["tag", "stock"], tmp, "git tag", logfile)


# ---------------------------------------------------------------------------------------------
# builds


def build_dir(side: str, cfg: BuildConfig | None = None) -> Path:
    """Where a side's build lives; the name carries the whole cache key."""
    cfg = cfg or detect_config()
    if side not in ("patched", "stock"):
        raise ValueError(f"unknown build side {side!r}")
    tag = _sdist_tag(sdist_path()) + "-" + cfg.key() + ("" if cfg.native else "-generic")
    return cache_root() / "build" / f"{side}-{tag}"


def _build_key(side: str) -> str:
    """What a finished build's stamp must say: the patched side is keyed by patches/ too, both by
    the targets they build (a target added later builds into the cached tree, not beside it)."""
    targets = ",".join(PATCHED_TARGETS if side == "patched" else STOCK_TARGETS)
    return (patches_hash() if side == "patched" else SDIST_VERSION) + "+" + targets


def _is_built(side: str, out: Path) -> bool:
    stamp = out / STAMP
    if not stamp.is_file():
        return False
    try:
        return json.loads(stamp.read_text()).get("key") == _build_key(side)
    except ValueError:
        return False


def build(side: str, cfg: BuildConfig | None = None, jobs: int | None = None) -> Path:
    """Configure and build one side; returns its bin/ folder. A finished build is never redone."""
    cfg = cfg or detect_config()
    out = build_dir(side, cfg)
    if _is_built(side, out):
        log(f"{side}: cached ({out})")
        return out / "bin"
    key = _build_key(side)  # taken before building: patches/ may change while it runs
    src = patched_source() if side == "patched" else stock_llama_source()
    shared = side == "patched"
    targets = PATCHED_TARGETS if shared else STOCK_TARGETS
    logfile = out / "build.log"
    out.mkdir(parents=True, exist_ok=True)
    logfile.unlink(missing_ok=True)
    (out / STAMP).unlink(missing_ok=True)
    jobs = jobs or os.cpu_count() or 2
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    t0 = time.time()
    log(f"{side}: configuring ({'CUDA sm_' + cfg.cuda_arch if cfg.cuda else 'CPU'}); log: {logfile}")
    flags = cfg.cmake_flags(shared)
    if side == "patched":
        flags.append(f"-DLLAMA_PI_PATCHES={patches_hash()}")  # llama_pi_patch_series() returns it
    _run(["cmake", "-S", str(src), "-B", str(out), *gen, *flags],
         f"{side} cmake configure", logfile)
    log(f"{side}: building {', '.join(targets)} with -j{jobs} (CPU ~2-4 min on 2 cores; CUDA ~5 min on 16)")
    _run(["cmake", "--build", str(out), "-j", str(jobs), "--target", *targets],
         f"{side} build", logfile)
    (out / STAMP).write_text(json.dumps({"key": key, "seconds": round(time.time() - t0, 1),
                                         "flags": flags, "targets": targets}))
    log(f"{side}: built in {time.time() - t0:.0f} s")
    return out / "bin"


def bin_path(side: str, name: str) -> Path:
    """A built tool (``llama-bench``...) of one side; a clear error when set-up has not run."""
    out = build_dir(side)
    exe = out / "bin" / name
    if not _is_built(side, out) or not exe.is_file():
        raise FileNotFoundError(f"{side} {name} is not built ({exe}); run `make setup` "
                                "(python -m powerinfer_gguf.build) first")
    return exe


def vocab_path(name: str = "llama-spm") -> Path:
    """A real tokenizer vocabulary shipped in the sdist (models/ggml-vocab-<name>.gguf)."""
    p = stock_llama_source() / "models" / f"ggml-vocab-{name}.gguf"
    if not p.is_file():
        have = sorted(x.name[len("ggml-vocab-"):-5] for x in p.parent.glob("ggml-vocab-*.gguf"))
        raise FileNotFoundError(f"no vocabulary {name!r} in the sdist; have: {', '.join(have)}")
    return p


# ---------------------------------------------------------------------------------------------
# Python side


def _py(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else ""


def _dist_version(name: str) -> str:
    return _py(f"import importlib.metadata as m; print(m.version({name!r}))")


def install_python(patched_bin: Path) -> None:
    """gguf-py and llama-cpp-python's Python part from the sdist, then our libs into llama_cpp/lib."""
    src = stock_source()
    logfile = cache_root() / "logs" / "pip.log"
    offline = os.environ.get("PI_OFFLINE") == "1"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps" if offline else "--upgrade-strategy=only-if-needed"]
    if offline:
        pip.append("--no-build-isolation")
    want_gguf = _py(f"import tomllib; print(tomllib.load(open({str(src / 'vendor/llama.cpp/gguf-py/pyproject.toml')!r},'rb'))['project']['version'])")
    if _dist_version("gguf") != want_gguf:
        log(f"installing gguf {want_gguf} from the vendored gguf-py")
        _run([*pip, str(src / "vendor" / "llama.cpp" / "gguf-py")], "pip install gguf-py", logfile)
    if _dist_version("llama_cpp_python") != SDIST_VERSION:
        log(f"installing llama-cpp-python {SDIST_VERSION} (Python part only, -DLLAMA_BUILD=OFF)")
        env = dict(os.environ, CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF")
        _run([*pip, str(src)], "pip install llama-cpp-python", logfile, env=env)
    pkg = _py("import importlib.util as u; print(list(u.find_spec('llama_cpp').submodule_search_locations)[0])")
    if not pkg:
        raise BuildError(f"llama_cpp is not importable after install; log: {logfile}")
    libdir = Path(pkg) / "lib"
    libdir.mkdir(exist_ok=True)
    stamp = libdir / STAMP
    key = f"{patched_bin} {patches_hash()}"
    if stamp.is_file() and stamp.read_text().strip() == key:
        log("llama_cpp/lib: up to date")
        return
    for old in libdir.glob("lib*.so*"):
        old.unlink()
    n = 0
    for lib in patched_bin.glob("lib*.so*"):
        # Keep the soname links as links: libllama.so -> libllama.so.0 -> the real file.
        dst = libdir / lib.name
        if lib.is_symlink():
            dst.symlink_to(os.readlink(lib))
        else:
            shutil.copy2(lib, dst)
        n += 1
    if not (libdir / "libllama.so").exists():
        raise BuildError(f"no libllama.so in {patched_bin}")
    stamp.write_text(key + "\n")
    log(f"llama_cpp/lib: {n} patched libraries from {patched_bin}")


def setup(jobs: int | None = None, python: bool = True, at_once: bool = False, only: str | None = None) -> dict:
    """The whole set-up; idempotent. Returns where things are."""
    t0 = time.time()
    cfg = detect_config()
    log(f"llama-cpp-python {SDIST_VERSION} (llama.cpp {LLAMA_CPP_COMMIT}), {len(patch_files())} patches "
        f"[{patches_hash()}], {'CUDA sm_' + cfg.cuda_arch if cfg.cuda else 'CPU'}; cache {cache_root()}")
    if only is not None:
        # one side alone (e.g. the patched side for a quick check on the GPU machine)
        built = build(only, cfg, jobs)
        if only == "patched" and python:
            install_python(built)
        log(f"set-up ({only} only) done in {time.time() - t0:.0f} s")
        return {f"{only}_bin": str(built)}
    if at_once:
        # Both sides side by side, half the cores each: on a 16-core GPU machine two CUDA builds
        # then fit one 10-minute call.
        from concurrent.futures import ThreadPoolExecutor

        patched_source()
        half = max(1, (jobs or os.cpu_count() or 2) // 2)
        with ThreadPoolExecutor(2) as ex:
            fp, fs = ex.submit(build, "patched", cfg, half), ex.submit(build, "stock", cfg, half)
            patched, stock = fp.result(), fs.result()
    else:
        patched = build("patched", cfg, jobs)
        stock = build("stock", cfg, jobs)
    if python:
        install_python(patched)
    log(f"set-up done in {time.time() - t0:.0f} s")
    return {"patched_bin": str(patched), "stock_bin": str(stock), "patched_src": str(patched_source())}


def pack(dest: Path) -> Path:
    """A trimmed source pack (tar.xz) that a registry-less GPU machine builds from: the sdist's
    Python part plus the llama.cpp folders a build needs. Use it there with PI_SDIST=<pack>."""
    src = stock_source()
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    with tarfile.open(tmp, "w:xz", preset=6) as tf:
        for item in sorted(src.iterdir()):
            if item.name in ("vendor", STAMP, ".git", "docs", "examples", "tests", "docker"):
                continue
            tf.add(item, arcname=f"{SDIST_DIR}/{item.name}")
        def keep(ti: tarfile.TarInfo) -> tarfile.TarInfo | None:
            rel = ti.name.split("/vendor/llama.cpp/", 1)[-1]
            return None if any(rel == d or rel.startswith(d + "/") for d in PACK_SKIP) else ti

        for name in PACK_LLAMA_DIRS:
            p = src / "vendor" / "llama.cpp" / name
            if p.exists():
                tf.add(p, arcname=f"{SDIST_DIR}/vendor/llama.cpp/{name}", filter=keep)
    os.replace(tmp, dest)
    log(f"packed {dest} ({dest.stat().st_size / 1e6:.1f} MB)")
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m powerinfer_gguf.build", description=__doc__.split("\n")[0])
    ap.add_argument("what", nargs="?", default="setup", choices=["setup", "pack", "paths"])
    ap.add_argument("-j", "--jobs", type=int, default=None)
    ap.add_argument("--no-python", action="store_true", help="build only; do not touch the environment")
    ap.add_argument("--sides-at-once", action="store_true", help="build patched and stock concurrently")
    ap.add_argument("--only", choices=["patched", "stock"], default=None, help="build one side only")
    ap.add_argument("-o", "--output", default="build/llama-src.tar.xz", help="pack: output file")
    a = ap.parse_args(argv)
    try:
        if a.what == "pack":
            pack(Path(a.output))
        elif a.what == "paths":
            print(json.dumps({"patched": str(build_dir("patched")), "stock": str(build_dir("stock")),
                              "patched_src": str(patched_source())}, indent=1))
        else:
            setup(a.jobs, python=not a.no_python, at_once=a.sides_at_once, only=a.only)
    except BuildError as e:
        print(f"pi-setup: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
