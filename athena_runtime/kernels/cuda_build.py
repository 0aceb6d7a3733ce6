"""Build-once holder for a CUDA extension compiled with `torch.utils.cpp_extension.load_inline`.

The first `load()` compiles (needs nvcc; cached by torch under ~/.cache/torch_extensions, keyed by a
hash of the source) and later calls return the module; a failed build is remembered and re-raised
as RuntimeError with the compiler's message, and `available()` logs it once and says False, so the
caller can fall back to another path — loudly, never silently.

ATHENA_CUDA_CACHE=DIR keeps a copy of each built module as DIR/<name>.so (the name holds the source
hash) and imports it from there on later runs, on this or another machine with the same torch and
CUDA: benchmark runs on fresh GPU machines skip the minute-long nvcc build.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import threading
from pathlib import Path
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)


class InlineExtension:
    def __init__(self, name: str, what: str, cpp_decl: str, cuda_source: Callable[[], str], functions: list[str]):
        self.name, self.what, self.cpp_decl, self.cuda_source, self.functions = name, what, cpp_decl, cuda_source, functions
        self._ext = None
        self._error: str | None = None
        self._lock = threading.Lock()

    def load(self, verbose: bool = False):
        with self._lock:
            if self._ext is not None:
                return self._ext
            if self._error is not None:
                raise RuntimeError(self._error)
            from torch.utils.cpp_extension import load_inline
            src = self.cuda_source()
            name = f"{self.name}_{hashlib.sha1(src.encode()).hexdigest()[:12]}"
            cache = os.environ.get("ATHENA_CUDA_CACHE")
            if cache and (Path(cache) / f"{name}.so").is_file():
                try:
                    self._ext = _import_built(name, Path(cache) / f"{name}.so")
                    log.info("loaded %s from %s", self.what, Path(cache) / f"{name}.so")
                    return self._ext
                except Exception as e:  # noqa: BLE001 - e.g. built for another torch: build it again
                    log.warning("%s: cannot load %s (%s: %s); building it", self.what,
                                Path(cache) / f"{name}.so", type(e).__name__, e)
            log.info("building %s (%s; first use takes about a minute)", self.what, name)
            try:
                self._ext = load_inline(name=name, cpp_sources=self.cpp_decl, cuda_sources=src,
                                        functions=self.functions, extra_cuda_cflags=["-O3", "-lineinfo"],
                                        verbose=verbose)
            except Exception as e:  # noqa: BLE001 - any build failure disables this kernel, loudly
                self._error = f"{self.what}: build failed: {type(e).__name__}: {e}"
                raise RuntimeError(self._error) from e
            if cache:
                Path(cache).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(self._ext.__file__, Path(cache) / f"{name}.so")
            return self._ext

    def available(self) -> bool:
        """True when the extension is (or can be) built here; never raises (the error is logged once)."""
        if not torch.cuda.is_available():
            return False
        if self._ext is not None:
            return True
        if self._error is not None:
            return False
        try:
            self.load()
            return True
        except RuntimeError as e:
            log.warning("%s", e)
            return False


def _import_built(name: str, path: Path):
    """Import a module that load_inline built earlier (its init symbol is PyInit_<name>)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
