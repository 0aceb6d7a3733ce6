"""InlineExtension's build cache (ATHENA_CUDA_CACHE): a cached module is imported, a broken one is
rebuilt, a failed build is a RuntimeError remembered for later calls. load_inline is replaced by a
stand-in (no nvcc or GPU here)."""
import types

import pytest

from athena_runtime.kernels import cuda_build
from athena_runtime.kernels.cuda_build import InlineExtension


def _ext():
    return InlineExtension("athena_test_ext", "a test extension", "void f();", lambda: "// source", ["f"])


def test_broken_cached_module_is_rebuilt_and_copied(tmp_path, monkeypatch):
    ext = _ext()
    src = ext.cuda_source()
    import hashlib
    name = f"athena_test_ext_{hashlib.sha1(src.encode()).hexdigest()[:12]}"
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / f"{name}.so").write_bytes(b"not a shared object")
    built = tmp_path / "built.so"
    built.write_bytes(b"fresh build")
    calls = []

    def fake_load_inline(**kw):
        calls.append(kw["name"])
        return types.SimpleNamespace(__file__=str(built))

    monkeypatch.setenv("ATHENA_CUDA_CACHE", str(cache))
    monkeypatch.setattr("torch.utils.cpp_extension.load_inline", fake_load_inline)
    module = ext.load()
    assert calls == [name] and module.__file__ == str(built)
    assert (cache / f"{name}.so").read_bytes() == b"fresh build"  # the cache now holds the new build
    assert ext.load() is module  # built once


def test_cached_module_is_imported_without_building(tmp_path, monkeypatch):
    ext = _ext()
    cache = tmp_path / "cache"
    cache.mkdir()
    sentinel = types.SimpleNamespace(f=lambda: 1)
    monkeypatch.setenv("ATHENA_CUDA_CACHE", str(cache))
    monkeypatch.setattr(cuda_build, "_import_built", lambda name, path: sentinel)
    import hashlib
    (cache / f"athena_test_ext_{hashlib.sha1(b'// source').hexdigest()[:12]}.so").write_bytes(b"x")
    monkeypatch.setattr("torch.utils.cpp_extension.load_inline",
                        lambda **kw: pytest.fail("must not build when the cache has the module"))
    assert ext.load() is sentinel


def test_failed_build_is_a_remembered_runtime_error(monkeypatch):
    ext = _ext()
    monkeypatch.delenv("ATHENA_CUDA_CACHE", raising=False)

    def failing(**kw):
        raise OSError("nvcc not found")

    monkeypatch.setattr("torch.utils.cpp_extension.load_inline", failing)
    with pytest.raises(RuntimeError, match="build failed: OSError: nvcc not found"):
        ext.load()
    monkeypatch.setattr("torch.utils.cpp_extension.load_inline", lambda **kw: pytest.fail("retried"))
    with pytest.raises(RuntimeError, match="build failed"):
        ext.load()
