"""The CUDA kernels of `kernels/cuda/*.cu` compiled at run time by NVRTC and launched through the driver API.

No CUDA toolkit is needed: NVRTC (`libnvrtc`, the `nvidia-cuda-nvrtc` wheel) and `cuda_fp16.h` (the
`nvidia-cuda-runtime` wheel) come with PyTorch's CUDA wheels, and the driver (`libcuda`) with the GPU. A
compiled kernel is a cubin for the GPU's architecture (`sm_89`, `sm_90`, ...; PTX for the driver to finish where
this NVRTC does not know the GPU), cached on disk under `ATHENA_KERNEL_CACHE` (default
`$ATHENA_CACHE_DIR/kernels`, i.e. `~/.cache/athena/kernels`), keyed by the sources, the template instantiation,
the options, the architecture, the NVRTC version and the fp16 header. Launches go to the current PyTorch stream
with `cuLaunchKernel`, so CUDA graphs capture them like any other kernel.

`Toolchain.find()` says what is missing when something is (the caller falls back, loudly); `Kernel` holds one
compiled template instance on one device. Everything here is read once per process and kept (`toolchain()`).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from athena_runtime.format.environment import Environment

log = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).parent / "cuda"
CU_FUNC_ATTRIBUTE_NUM_REGS, CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES = 4, 3
CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8


class KernelUnavailable(RuntimeError):
    """NVRTC, the fp16 header or the driver is missing, or a kernel did not compile or load (message: why)."""


def _wheel_dirs(sub: str) -> list[Path]:
    """`nvidia/<x>/<sub>` folders of the NVIDIA wheels (cu13/ for CUDA 13, cuda_runtime/ and cuda_nvrtc/ for 12)."""
    try:
        import nvidia  # namespace package of the nvidia-* wheels
    except ImportError:
        return []
    return sorted(d for root in nvidia.__path__ for d in Path(root).glob(f"*/{sub}") if d.is_dir())


def _load_nvrtc() -> tuple[ctypes.CDLL, str]:
    """libnvrtc from the wheels (its builtins library first, which it opens by name), else the system's."""
    major = (torch.version.cuda or "13").split(".")[0]
    for lib_dir in _wheel_dirs("lib"):
        path = next(iter(sorted(lib_dir.glob(f"libnvrtc.so.{major}*"))), None)
        if path is not None:
            for builtins in sorted(lib_dir.glob("libnvrtc-builtins.so.*")):
                if ".alt." not in builtins.name:
                    ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)
            return ctypes.CDLL(str(path)), str(path)
    name = f"nvrtc64_{major}0_0.dll" if sys.platform == "win32" else f"libnvrtc.so.{major}"
    try:
        return ctypes.CDLL(name), name
    except OSError as e:
        raise KernelUnavailable(f"no NVRTC library (no nvidia-cuda-nvrtc wheel, no {name}): {e}") from e


def _find_fp16_header() -> Path:
    """The folder holding cuda_fp16.h: the nvidia-cuda-runtime wheel, else a CUDA toolkit's include folder."""
    cands = _wheel_dirs("include")
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            cands.append(Path(os.environ[var]) / "include")
    cands.append(Path("/usr/local/cuda/include"))
    for d in cands:
        if (d / "cuda_fp16.h").is_file():
            return d
    raise KernelUnavailable(
        "cuda_fp16.h not found (install the nvidia-cuda-runtime wheel that CUDA builds of PyTorch depend on)"
    )


@dataclass(frozen=True)
class Toolchain:
    """What compiles the kernels here: NVRTC (path, version), the fp16 header folder, the cubin cache folder."""

    nvrtc: ctypes.CDLL
    nvrtc_path: str
    version: tuple[int, int]
    archs: tuple[int, ...]  # the compute capabilities this NVRTC builds machine code for (89, 90, ...)
    include_dir: Path
    cache_dir: Path

    @staticmethod
    def find() -> "Toolchain":
        lib, path = _load_nvrtc()
        major, minor, n = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        _check_nvrtc(lib, lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)))
        _check_nvrtc(lib, lib.nvrtcGetNumSupportedArchs(ctypes.byref(n)))
        archs = (ctypes.c_int * n.value)()
        _check_nvrtc(lib, lib.nvrtcGetSupportedArchs(archs))
        cache = Environment.read().kernel_cache
        return Toolchain(lib, path, (major.value, minor.value), tuple(archs), _find_fp16_header(), cache)

    def describe(self) -> str:
        return f"NVRTC {self.version[0]}.{self.version[1]} ({self.nvrtc_path}), cuda_fp16.h from {self.include_dir}"

    def target(self, cc: int) -> tuple[str, bool]:
        """(NVRTC architecture option, cubin?) for compute capability `cc` (e.g. 90): machine code where this NVRTC
        knows the GPU, else PTX of the newest architecture it knows below it (the driver compiles that)."""
        if cc in self.archs:
            return f"sm_{cc}", True
        below = [a for a in self.archs if a < cc]
        if not below:
            raise KernelUnavailable(f"NVRTC {self.version} builds for {self.archs}, not compute capability {cc}")
        return f"compute_{max(below)}", False

    def compile(
        self,
        file: str,
        name: str,
        arch: str,
        options: tuple[str, ...] = (),
        source_dir: Path = SOURCE_DIR,
    ) -> tuple[bytes, str, str]:
        """Compile `cuda/<file>` with the template instance `name` (e.g. "athena::lut_kernel<1, 6, 4>") for `arch`
        (from `target`): (cubin or PTX, lowered name, NVRTC's log); the result is cached on disk. `source_dir`: another
        copy of the sources (bench/nvrtc_gap.py)."""
        opts = [
            f"--gpu-architecture={arch}",
            "-std=c++17",
            "-lineinfo",
            f"-I{source_dir}",
            f"-I{self.include_dir}",
            *options,
        ]
        key = self._key(file, name, opts, source_dir)
        path = self.cache_dir / f"{Path(file).stem}-{key}"
        try:
            meta = json.loads(path.with_suffix(".json").read_text())
            return path.with_suffix(".bin").read_bytes(), meta["lowered"], meta["log"]
        except (OSError, ValueError, KeyError):
            pass
        t0 = time.perf_counter()
        image, lowered, text = self._nvrtc(source_dir / file, name, opts, arch.startswith("sm_"))
        seconds = time.perf_counter() - t0
        log.info("NVRTC: %s [%s] for %s in %.1f s", file, name, arch, seconds)
        try:  # written whole, then renamed: a reader never sees half a file
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            for suffix, data in (
                (".bin", image),
                (".json", json.dumps(dict(lowered=lowered, log=text, seconds=seconds)).encode()),
            ):
                tmp = path.with_suffix(f"{suffix}.{os.getpid()}.{threading.get_ident()}")
                tmp.write_bytes(data)
                os.replace(tmp, path.with_suffix(suffix))
        except OSError as e:
            log.warning(
                "NVRTC: cannot cache %s in %s (%s); it is compiled again in the next process", file, self.cache_dir, e
            )
        return image, lowered, text

    def _key(self, file: str, name: str, opts: list[str], source_dir: Path) -> str:
        h = hashlib.sha256()
        for src in sorted(source_dir.glob("*.cu*")):
            h.update(src.name.encode() + b"\0" + src.read_bytes() + b"\0")
        h.update((self.include_dir / "cuda_fp16.h").read_bytes() + (self.include_dir / "cuda_fp16.hpp").read_bytes())
        h.update("\0".join([file, name, *opts, f"nvrtc {self.version}"]).encode())
        return h.hexdigest()[:20]

    def _nvrtc(self, path: Path, name: str, opts: list[str], cubin: bool) -> tuple[bytes, str, str]:
        lib, prog, file = self.nvrtc, ctypes.c_void_p(), path.name
        _check_nvrtc(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), path.read_bytes(), file.encode(), 0, None, None))
        try:
            _check_nvrtc(lib, lib.nvrtcAddNameExpression(prog, name.encode()))
            c_opts = (ctypes.c_char_p * len(opts))(*(o.encode() for o in opts))
            rc = lib.nvrtcCompileProgram(prog, len(opts), c_opts)
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            buf = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, buf)
            text = buf.value.decode(errors="replace")
            if rc != 0:
                raise KernelUnavailable(f"NVRTC could not compile {file} [{name}]:\n{text[-4000:]}")
            get_size, get = (
                (lib.nvrtcGetCUBINSize, lib.nvrtcGetCUBIN) if cubin else (lib.nvrtcGetPTXSize, lib.nvrtcGetPTX)
            )
            _check_nvrtc(lib, get_size(prog, ctypes.byref(size)))
            image = ctypes.create_string_buffer(size.value)
            _check_nvrtc(lib, get(prog, image))
            lowered = ctypes.c_char_p()
            _check_nvrtc(lib, lib.nvrtcGetLoweredName(prog, name.encode(), ctypes.byref(lowered)))
            return image.raw, lowered.value.decode(), text
        finally:
            lib.nvrtcDestroyProgram(ctypes.byref(prog))


def _check_nvrtc(lib, rc: int):
    if rc != 0:
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        raise KernelUnavailable(f"NVRTC error {rc}: {lib.nvrtcGetErrorString(rc).decode()}")


@functools.lru_cache(maxsize=1)
def toolchain() -> Toolchain:
    """This process's toolchain (KernelUnavailable, raised again on every call, when there is none)."""
    return Toolchain.find()


# ------------------------------------------------------------------------------------------ the driver
@functools.lru_cache(maxsize=1)
def _driver() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL("nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1")
    except OSError as e:
        raise KernelUnavailable(f"no CUDA driver library: {e}") from e
    lib.cuGetErrorString.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    lib.cuLaunchKernel.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p] * 3
    return lib


def _check_cu(rc: int, what: str):
    if rc != 0:
        msg = ctypes.c_char_p()
        _driver().cuGetErrorString(rc, ctypes.byref(msg))
        raise RuntimeError(f"CUDA driver: {what}: {(msg.value or b'error %d' % rc).decode()}")


_context = threading.local()


def _ensure_context(index: int):
    """Make device `index`'s primary context (the one PyTorch uses) current on this thread, once per thread."""
    done = getattr(_context, "devices", None)
    if done is None:
        done = _context.devices = set()
    if index in done:
        return
    lib, ctx, dev = _driver(), ctypes.c_void_p(), ctypes.c_int()
    torch.cuda.init()
    _check_cu(lib.cuDeviceGet(ctypes.byref(dev), index), "cuDeviceGet")
    _check_cu(lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
    _check_cu(lib.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    done.add(index)


class Kernel:
    """One template instance of a kernel of `cuda/<file>`, compiled (or read from the cache) and loaded on one device.

        k = Kernel("lut.cu", "athena::lut_kernel<1, 6, 4>", device, smem_max=48 * 1024)
        k.launch(grid, smem, [ctypes args ...])     # on the current stream
    `smem_max` above 48 KB opts the kernel in to that much dynamic shared memory. `image`: (cubin, lowered name)
    built elsewhere instead (bench/nvrtc_gap.py: nvcc), loaded the same way."""

    def __init__(
        self,
        file: str,
        name: str,
        device: torch.device,
        *,
        smem_max: int = 0,
        threads: int = 256,
        options: tuple[str, ...] = (),
        source_dir: Path = SOURCE_DIR,
        image: tuple[bytes, str] | None = None,
    ):
        self.file, self.name, self.threads = file, name, threads
        self.index = device.index if device.index is not None else torch.cuda.current_device()
        tc = toolchain()
        major, minor = torch.cuda.get_device_capability(self.index)
        arch, _ = tc.target(10 * major + minor)
        t0 = time.perf_counter()
        if image is None:
            image, lowered, self.build_log = tc.compile(file, name, arch, options, source_dir)
        else:
            (image, lowered), self.build_log = image, ""
        self.seconds = time.perf_counter() - t0  # compile (or cache read) time
        lib = _driver()
        _ensure_context(self.index)
        self._module, self._func = ctypes.c_void_p(), ctypes.c_void_p()
        _check_cu(lib.cuModuleLoadData(ctypes.byref(self._module), image), f"loading {file} [{name}]")
        _check_cu(
            lib.cuModuleGetFunction(ctypes.byref(self._func), self._module, lowered.encode()),
            f"finding {lowered} in {file}",
        )
        if smem_max > 48 * 1024:
            _check_cu(
                lib.cuFuncSetAttribute(self._func, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem_max),
                f"{name}: {smem_max} bytes of shared memory",
            )
        self.registers = self._attribute(CU_FUNC_ATTRIBUTE_NUM_REGS)
        self.spill_bytes = self._attribute(CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES)

    def _attribute(self, attr: int) -> int:
        v = ctypes.c_int()
        _check_cu(_driver().cuFuncGetAttribute(ctypes.byref(v), attr, self._func), "cuFuncGetAttribute")
        return v.value

    def occupancy(self, smem: int) -> int:
        """CTAs of this kernel that one SM holds at once with `smem` bytes of dynamic shared memory."""
        n = ctypes.c_int()
        _check_cu(
            _driver().cuOccupancyMaxActiveBlocksPerMultiprocessor(
                ctypes.byref(n), self._func, self.threads, ctypes.c_size_t(smem)
            ),
            "occupancy",
        )
        return n.value

    def launch(self, grid: tuple[int, int], smem: int, params: "ctypes.Array"):
        """Launch on the current stream of this kernel's device; `params` from `param_array`."""
        _ensure_context(self.index)
        stream = torch.cuda.current_stream(self.index).cuda_stream
        _check_cu(
            _driver().cuLaunchKernel(self._func, grid[0], grid[1], 1, self.threads, 1, 1, smem, stream, params, None),
            f"launching {self.name}",
        )


def ptr(t: torch.Tensor | None) -> ctypes.c_void_p:
    """A tensor's data pointer as a kernel argument (None: a null pointer)."""
    return ctypes.c_void_p(0 if t is None else t.data_ptr())


def param_array(values: list) -> "ctypes.Array":
    """The kernelParams array of cuLaunchKernel: a pointer to each argument (ctypes objects: c_void_p for pointers,
    c_int, c_longlong, or a ctypes.Structure passed by value). Keep `values` alive while the array is used."""
    bad = [
        (i, type(v).__name__)
        for i, v in enumerate(values)
        if not isinstance(v, (ctypes._SimpleCData, ctypes.Structure))
    ]
    if bad:
        raise TypeError(f"kernel arguments must be ctypes objects; not: {bad}")
    return (ctypes.c_void_p * len(values))(*(ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values))
