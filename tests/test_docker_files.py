"""Structure of docker/Dockerfile and docker/compose.yaml (no Docker engine here: nothing is built)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, backslash continuations joined."""
    out, buf = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue  # comment lines inside a continued instruction
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        instr, _, args = buf.strip().partition(" ")
        out.append((instr.upper(), args.strip()))
        buf = ""
    assert not buf, "dangling line continuation"
    return out


def arg_defaults(instrs: list[tuple[str, str]]) -> dict[str, str]:
    d = {}
    for instr, args in instrs:
        if instr == "ARG" and "=" in args:
            k, _, v = args.partition("=")
            d[k] = v.strip('"')
    return d


def expand(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), value)


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return dockerfile_instructions((DOCKER / "Dockerfile").read_text())


def values(instrs, name: str) -> list[str]:
    return [a for i, a in instrs if i == name]


def test_base_image_is_cuda_runtime(dockerfile):
    (base,) = values(dockerfile, "FROM")
    image = expand(base, arg_defaults(dockerfile))
    assert image.startswith("nvidia/cuda:") and "runtime" in image and "$" not in image


def test_runs_as_non_root_user_it_creates(dockerfile):
    users = values(dockerfile, "USER")
    assert users, "no USER instruction"
    user = expand(users[-1], arg_defaults(dockerfile)).split(":")[0]
    assert user not in ("root", "0", "")
    runs = " ".join(values(dockerfile, "RUN"))
    m = re.search(r"useradd\b[^&;]*", expand(runs, arg_defaults(dockerfile)))
    assert m and (
        f'--uid "{user}"' in m.group(0) or f"--uid {user}" in m.group(0) or m.group(0).rstrip().endswith(user)
    )
    # the USER comes after everything that needs root, and before the entrypoint
    order = [i for i, _ in dockerfile]
    assert max(k for k, i in enumerate(order) if i == "RUN") < max(k for k, i in enumerate(order) if i == "USER")


def test_port_health_check_and_entrypoint(dockerfile):
    assert "8000" in " ".join(values(dockerfile, "EXPOSE")).split()
    (health,) = values(dockerfile, "HEALTHCHECK")
    assert "CMD" in health and "curl" in health and re.search(r"127\.0\.0\.1:[^/]+/health(?![\w-])", health)
    assert re.search(r"apt-get install[^&]*\bcurl\b", " ".join(values(dockerfile, "RUN")))
    entry = " ".join(values(dockerfile, "ENTRYPOINT") + values(dockerfile, "CMD"))
    assert re.search(r'"athena",\s*"serve"', entry)


def test_env_settings_and_models_volume(dockerfile):
    env = " ".join(values(dockerfile, "ENV"))
    assert "ATHENA_HOST=0.0.0.0" in env and "ATHENA_PORT=8000" in env and "ATHENA_CACHE_DIR=" in env
    assert "/models" in " ".join(values(dockerfile, "VOLUME"))


def test_copies_exist_and_pass_the_dockerignore(dockerfile):
    sources = []
    for args in values(dockerfile, "COPY"):
        parts = shlex.split(args)
        sources += [p for p in parts[:-1] if not p.startswith("--")]
    assert {"pyproject.toml", "quantize", "athena_runtime", "server", "bench"} <= set(sources)
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for src in sources:
        assert (ROOT / src).exists(), src
        assert src in allowed, f"{src} is excluded from the build context"
    assert re.search(r"pip install [^&]*athena-src\[gpu\]", " ".join(values(dockerfile, "RUN")))


def _compose_text() -> str:
    return (DOCKER / "compose.yaml").read_text()


def test_compose_structure():
    try:
        import yaml
    except ImportError:  # PyYAML comes with transformers; keep a crude check for a bare environment
        text = _compose_text()
        for needle in (
            "driver: nvidia",
            "capabilities: [gpu]",
            '"127.0.0.1:',
            ":8000",
            "/health",
            "healthcheck:",
            ":/models",
        ):
            assert needle in text
        return
    doc = yaml.safe_load(_compose_text())
    ((_name, svc),) = doc["services"].items()
    assert (ROOT / "docker" / svc["build"]["context"]).resolve() == ROOT
    assert svc["build"]["dockerfile"] == "docker/Dockerfile"
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    assert any(re.fullmatch(r"127\.0\.0\.1:(\d+|\$\{ATHENA_HOST_PORT:-8000\}):8000", p) for p in svc["ports"])
    test = svc["healthcheck"]["test"]
    assert test[0] in ("CMD", "CMD-SHELL") and any(re.search(r"/health(?![\w-])", t) for t in test)
    assert svc["healthcheck"]["start_period"]
    env = svc["environment"]
    assert env["ATHENA_HOST"] == "0.0.0.0" and str(env["ATHENA_PORT"]) == "8000" and "ATHENA_MODEL" in env
    assert any(v.endswith(":/models:ro") for v in svc["volumes"])
    named = [v.split(":")[0] for v in svc["volumes"] if not v.startswith(("$", ".", "/"))]
    assert named and set(named) <= set(doc.get("volumes", {}))


def test_readme_says_not_built_in_ci():
    text = (DOCKER / "README.md").read_text()
    assert "Not built in CI" in text and "docker build -f docker/Dockerfile" in text
