"""Every `ATHENA_*` environment override of the quantizer, the runtime and the benchmarks, read here and only here.

`Environment.read()` reads them all at once and checks their values; each program reads it where it starts the part
the variable affects (a model runner, a kernel toolchain, the cache folder of a command), never at import. The
server's own settings (`ATHENA_<FIELD>` of every `athena serve` flag) are read by its settings class,
server/settings.py.

    ATHENA_CACHE_DIR       converted and compressed models, compiled kernels (default ~/.cache/athena)
    ATHENA_KERNEL_CACHE    NVRTC cubins (default $ATHENA_CACHE_DIR/kernels)
    ATHENA_PQ_PATH         force one PQ matmul backend (kernels/backends.py NAMES; tests, benchmarks)
    ATHENA_FUSED_EPILOGUE  0: the one-token split-K epilogue as a second launch (A/B runs; default 1)
    ATHENA_CPU_PATH        auto | fast | reference: the CPU execution path (cpu/path.py; default auto)
    ATHENA_CPU_WEIGHTS     auto | fp16 | int8: the CPU fast path's weight format (default auto)
    ATHENA_CPU_THREADS     N: torch threads on the CPU (default: PyTorch's)
    ATHENA_API_KEY         the key `athena bench serve` sends when --api-key is not given (the server reads it as a
                           setting)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Environment:
    cache_dir: Path
    kernel_cache: Path
    pq_path: str | None
    fused_epilogue: bool
    cpu_path: str
    cpu_weights: str
    cpu_threads: int | None
    api_key: str | None

    @classmethod
    def read(cls, env: Mapping[str, str] | None = None) -> Environment:
        """The overrides in `env` (default: the process environment); ValueError naming a variable that is invalid."""
        env = os.environ if env is None else env
        cache_dir = Path(env.get("ATHENA_CACHE_DIR") or Path.home() / ".cache" / "athena")
        threads = env.get("ATHENA_CPU_THREADS") or None
        try:
            threads = int(threads) if threads is not None else None
        except ValueError:
            raise ValueError(f"ATHENA_CPU_THREADS must be an integer, got {threads!r}") from None
        fused = env.get("ATHENA_FUSED_EPILOGUE", "1")
        if fused not in ("0", "1"):
            raise ValueError(f"ATHENA_FUSED_EPILOGUE must be 0 or 1, got {fused!r}")
        return cls(
            cache_dir=cache_dir,
            kernel_cache=Path(env.get("ATHENA_KERNEL_CACHE") or cache_dir / "kernels"),
            pq_path=env.get("ATHENA_PQ_PATH") or None,
            fused_epilogue=fused == "1",
            cpu_path=env.get("ATHENA_CPU_PATH") or "auto",
            cpu_weights=env.get("ATHENA_CPU_WEIGHTS") or "auto",
            cpu_threads=threads,
            api_key=env.get("ATHENA_API_KEY") or None,
        )
