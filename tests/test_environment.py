"""ATHENA_* overrides: read and checked in one module (athena_runtime/format/environment.py), nowhere else."""

import re
from pathlib import Path

import pytest

from athena_runtime.cpu.path import CPUPathSettings
from athena_runtime.format.environment import Environment

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_and_overrides(tmp_path):
    e = Environment.read({})
    assert e.cache_dir == Path.home() / ".cache" / "athena" and e.kernel_cache == e.cache_dir / "kernels"
    assert (e.pq_path, e.fused_epilogue, e.cpu_path, e.cpu_weights, e.cpu_threads, e.api_key) == (
        None,
        True,
        "auto",
        "auto",
        None,
        None,
    )
    e = Environment.read(
        {
            "ATHENA_CACHE_DIR": str(tmp_path),
            "ATHENA_PQ_PATH": "lut",
            "ATHENA_FUSED_EPILOGUE": "0",
            "ATHENA_CPU_THREADS": "3",
            "ATHENA_API_KEY": "k",
        }
    )
    assert e.kernel_cache == tmp_path / "kernels" and e.pq_path == "lut" and not e.fused_epilogue
    assert e.cpu_threads == 3 and e.api_key == "k"
    assert Environment.read({"ATHENA_CACHE_DIR": str(tmp_path), "ATHENA_KERNEL_CACHE": "/k"}).kernel_cache == Path("/k")
    assert CPUPathSettings.from_env({"ATHENA_CPU_PATH": "fast", "ATHENA_CPU_WEIGHTS": "int8"}) == CPUPathSettings(
        "fast", "int8", None
    )


@pytest.mark.parametrize(
    "env,match",
    [
        ({"ATHENA_CPU_THREADS": "two"}, "ATHENA_CPU_THREADS must be an integer"),
        ({"ATHENA_FUSED_EPILOGUE": "no"}, "ATHENA_FUSED_EPILOGUE must be 0 or 1"),
    ],
)
def test_invalid_values_name_the_variable(env, match):
    with pytest.raises(ValueError, match=match):
        Environment.read(env)


def test_no_other_module_reads_athena_variables():
    """os.environ / getenv with an ATHENA_ name appears only in the environment module (the server's settings class
    reads its ATHENA_<FIELD> variables through pydantic-settings, by prefix)."""
    pattern = re.compile(r"(\.get\(|environ\[|getenv\()\s*[\"']ATHENA_")
    found = [
        str(p.relative_to(ROOT))
        for pkg in ("athena_runtime", "quantize", "server", "bench")
        for p in (ROOT / pkg).rglob("*.py")
        if pattern.search(p.read_text())
    ]
    assert found == ["athena_runtime/format/environment.py"]
