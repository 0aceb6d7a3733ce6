"""GPU tests are chosen by the `gpu` marker: `pytest -m gpu` (bench/gpu_suite.sh tests) imports only modules that
carry it; any other selection collects everything as usual."""

from types import SimpleNamespace

import conftest


def _config(markexpr: str):
    return SimpleNamespace(getoption=lambda name, default=None: markexpr if name == "markexpr" else default)


def test_gpu_selection_skips_unmarked_modules_only(tmp_path):
    marked, plain = tmp_path / "test_marked.py", tmp_path / "test_plain.py"
    marked.write_text("import pytest\npytestmark = pytest.mark.gpu\n")
    plain.write_text("import fastapi\n")
    assert conftest.pytest_ignore_collect(plain, _config("gpu")) is True
    assert conftest.pytest_ignore_collect(marked, _config("gpu")) is None
    for expr in ("", "not slow", "gpu and slow"):  # only the GPU suite's exact selection prunes
        assert conftest.pytest_ignore_collect(plain, _config(expr)) is None


def test_the_gpu_suite_and_the_marker_agree():
    """The suite selects by the marker (no hand list), and the marker is registered."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    suite = (root / "bench" / "gpu_suite.sh").read_text()
    assert "-m gpu tests" in suite and "tests/test_" not in suite
    assert '"gpu: ' in (root / "pyproject.toml").read_text()
    assert "mark.gpu" in (root / "tests" / "test_pq_kernels.py").read_text()


def test_every_module_with_cuda_tests_carries_the_marker():
    """A test module that runs on CUDA when there is one is selected by `pytest -m gpu` (else the GPU suite skips
    it without a word)."""
    from pathlib import Path

    here = Path(__file__).resolve()
    needles = ("torch.cuda.is_available()", "needs a CUDA GPU")
    unmarked = [
        p.name
        for p in here.parent.glob("test_*.py")
        if p != here and any(n in p.read_text() for n in needles) and "mark.gpu" not in p.read_text()
    ]
    assert unmarked == []


def test_the_gpu_suite_stages_exist():
    """Every stage the suite's header lists has a case and every case is listed; every script a stage runs exists."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    suite = (root / "bench" / "gpu_suite.sh").read_text()
    listed = re.search(r"stages: (.*)", suite).group(1).split()
    cases = re.findall(r"^ {4}([a-z0-9-]+)\)", suite, re.M)
    assert sorted(listed) == sorted(cases) and len(set(cases)) == len(cases)
    modules = set(re.findall(r"python3 -m ((?:bench|server)[\w.]*)", suite))
    scripts = set(re.findall(r"python3 (bench/[\w/]+\.py)", suite))
    assert "bench.diag.ttft_profile" in modules and "bench/kernels.py" in scripts
    missing = [m for m in modules if not (root / (m.replace(".", "/") + ".py")).is_file()]
    missing += [s for s in scripts if not (root / s).is_file()]
    assert missing == []
