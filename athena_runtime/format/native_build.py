"""C sources compiled once with the system C compiler into a shared library cached under `<cache>/kernels/`: the
runtime's CPU kernels (`athena_runtime/cpu/build.py`) and the quantizer's k-means (`quantize/kmeans_native.py`).

The compiler is `$CC`, else the first of cc / gcc / clang on PATH. The library is `<name>-<hash>.so`, the hash
covering the sources and headers, the flags, the compiler and this CPU's feature flags (a cache shared between
machines never hands one CPU another's build); it is written whole, then renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from athena_runtime.format.source import cache_dir

log = logging.getLogger(__name__)

COMPILERS = ("cc", "gcc", "clang")


def compiler() -> str | None:
    for cc in ([os.environ["CC"]] if os.environ.get("CC") else []) + list(COMPILERS):
        path = shutil.which(cc)
        if path:
            return path
    return None


def cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def build_shared_library(
    name: str, sources: Sequence[Path], headers: Sequence[Path], cflags: Sequence[str], *, what: str, timeout: int
) -> Path:
    """The cached library of `sources` (built now if missing); RuntimeError saying why when it cannot be built."""
    cc = compiler()
    if cc is None:
        raise RuntimeError(f"no C compiler found (set CC or install one of {', '.join(COMPILERS)})")
    src = "\n".join(p.read_text() for p in (*sources, *headers))
    key = hashlib.sha1("\n".join([src, " ".join(cflags), cc, cpu_flags()]).encode()).hexdigest()[:12]
    out = cache_dir() / "kernels" / f"{name}-{key}.so"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        cmd = [cc, *cflags, *map(str, sources), "-lm", "-o", str(tmp)]
        log.info("building %s: %s", what, " ".join(cmd))
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if res.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr.strip()[-2000:]}")
        tmp.replace(out)
    return out
