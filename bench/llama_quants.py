"""llama.cpp's own quantizer as a peer of the quality table: `llama-imatrix` on our calibration text, then
`llama-quantize` at each type, from an F16 GGUF of the reference weights.

    python -m bench.quality_ablation llama [TYPE ...] --out out/abl [--model GGUF]   # quantize + evaluate

The steps, each logged with its command line:
1. `write_source_gguf`: the model's GGUF with every weight dequantized (2-D tensors F16, 1-D F32) and its
   metadata and tokenizer copied: the reference's weights exactly (the importer also dequantizes to fp16), in the
   form llama-quantize reads (it requantizes only from F32/F16/BF16).
2. `write_calibration_text`: the token windows our quantizer calibrates on (quantize.calibration, same
   CalibConfig, same seed), decoded to text; llama-imatrix re-tokenizes it in chunks of the window length.
   Never the held-out text.
3. `llama-imatrix` (imatrix command) -> imatrix.gguf; `llama-quantize --imatrix` per type (quantize command).
   By default the token embeddings (and an untied output matrix) stay F16, as in every other row of the table,
   so the rows differ only in the decoder's linear weights; `embeddings="llama"` leaves llama.cpp its own choice.
4. `gguf_bits`: bits per linear weight from the stored bytes of the decoder layers' q/k/v/o/gate/up/down
   tensors (the same tensors, and the same count, as the quantizer's `bits_per_weight.linear`), and the mix of
   ggml types among them: a k- or i-quant needs rows that are a multiple of 256, so llama.cpp stores narrower
   tensors (SmolLM2's 576 columns) in a fallback type.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# llama-quantize's type names measured by default: its 2- to 5-bit k- and i-quant mixes and the 4-bit legacy ones
DEFAULT_TYPES = (
    "IQ2_XS",
    "IQ2_M",
    "Q2_K",
    "IQ3_XXS",
    "IQ3_M",
    "Q3_K_S",
    "Q3_K_M",
    "Q3_K_L",
    "IQ4_XS",
    "IQ4_NL",
    "Q4_0",
    "Q4_K_S",
    "Q4_K_M",
    "Q5_K_M",
)
EMBEDDINGS = ("f16", "llama")


@dataclass(frozen=True)
class LlamaQuantSettings:
    """How the llama.cpp peer runs (the quality_ablation `llama` flags)."""

    bin_dir: Path  # holds llama-quantize and llama-imatrix
    threads: int = 2
    embeddings: str = "f16"  # "f16": token embeddings / output stay F16 like every other row; "llama": its choice
    niceness: int = 10

    def __post_init__(self) -> None:
        if self.embeddings not in EMBEDDINGS:
            raise ValueError(f"embeddings must be one of {', '.join(EMBEDDINGS)}, got {self.embeddings!r}")
        if self.threads < 1:
            raise ValueError("threads must be >= 1")


def linear_suffixes() -> tuple[str, ...]:
    """GGUF layer tensor names (after `blk.N.`) of the linear weights the quantizer counts: the importer's names
    of quantize.driver.LINEAR_GROUPS' modules, weights only."""
    from athena_runtime.format.gguf_import import LAYER_NAMES
    from quantize.driver import LINEAR_GROUPS

    modules = {m for group in LINEAR_GROUPS for m in group}
    return tuple(g for g, hf in LAYER_NAMES.items() if hf.endswith(".weight") and hf[: -len(".weight")] in modules)


def is_linear(name: str, suffixes: tuple[str, ...]) -> bool:
    parts = name.split(".", 2)
    return len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in suffixes


def gguf_bits(path: Path) -> dict:
    """Bits per linear weight of a GGUF from its tensors' stored bytes, the whole file's tensors likewise, and
    the ggml types of the linear weights as shares of their weight count."""
    import gguf

    suffixes = linear_suffixes()
    lin_bytes = lin_weights = all_bytes = all_weights = 0
    types: dict[str, int] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        nb, nw = int(t.n_bytes), int(t.n_elements)
        all_bytes += nb
        all_weights += nw
        if is_linear(t.name, suffixes):
            lin_bytes += nb
            lin_weights += nw
            types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + nw
    if not lin_weights:
        raise ValueError(f"{path}: no linear layer weights (blk.N.{{{','.join(suffixes)}}})")
    return {
        "bits": 8.0 * lin_bytes / lin_weights,
        "bytes_linear": lin_bytes,
        "weights_linear": lin_weights,
        "bits_file": 8.0 * all_bytes / all_weights,
        "types": {k: v / lin_weights for k, v in sorted(types.items(), key=lambda kv: -kv[1])},
    }


def type_mix(types: dict[str, float]) -> str:
    """'IQ4_NL 75%, IQ2_XS 25%, Q5_1 <1%' (shares of the linear weights)."""
    return ", ".join(f"{k} {v:.0%}" if v >= 0.005 else f"{k} <1%" for k, v in types.items())


def write_source_gguf(src: Path, out: Path) -> dict:
    """`src` with every tensor dequantized (2-D and larger F16, 1-D F32), metadata copied (file type F16).
    Returns {"tensors": n, "bytes": file size}."""
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    tmp = out.with_name(out.name + ".tmp")
    w = gguf.GGUFWriter(str(tmp), arch)
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue  # the writer's own
        if field.name == "general.file_type":
            w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    arrays = []
    for t in reader.tensors:
        shape = [int(s) for s in reversed(t.shape)]  # numpy order: the fastest GGUF dim last
        a = dequantize(t.data, t.tensor_type).reshape(shape)
        a = a.astype(np.float16 if len(shape) >= 2 else np.float32)
        w.add_tensor(t.name, a)
        arrays.append(a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(out)
    return {"tensors": len(arrays), "bytes": out.stat().st_size}


def write_calibration_text(model_folder: Path, calib, device_type: str, path: Path) -> dict:
    """The quantizer's calibration windows for `calib` (quantize.calibration.CalibConfig, resolved for
    `device_type`) decoded to text, one window per paragraph, into `path`. Returns what was written."""
    from athena_runtime.format.source import load_tokenizer
    from quantize.calibration import calibration_batch

    cfg = calib.resolved(device_type)
    tok = load_tokenizer(model_folder)
    windows = calibration_batch(tok, cfg)  # [nsamples, seqlen]
    text = "\n\n".join(tok.decode(w.tolist()) for w in windows)
    path.write_text(text, encoding="utf-8")
    return {"nsamples": cfg.nsamples, "seqlen": cfg.seqlen, "seed": cfg.seed, "files": list(cfg.files)}


def imatrix_command(s: LlamaQuantSettings, model: Path, text: Path, out: Path, seqlen: int, chunks: int) -> list[str]:
    """llama-imatrix over `chunks` chunks of `seqlen` tokens of `text` (no perplexity pass)."""
    return [
        str(s.bin_dir / "llama-imatrix"),
        "-m",
        str(model),
        "-f",
        str(text),
        "-o",
        str(out),
        "-c",
        str(seqlen),
        "--chunks",
        str(chunks),
        "-t",
        str(s.threads),
        "--no-ppl",
    ]


def quantize_command(s: LlamaQuantSettings, src: Path, out: Path, qtype: str, imatrix: Path) -> list[str]:
    keep = ["--token-embedding-type", "f16", "--output-tensor-type", "f16"] if s.embeddings == "f16" else []
    return [
        str(s.bin_dir / "llama-quantize"),
        "--imatrix",
        str(imatrix),
        *keep,
        str(src),
        str(out),
        qtype,
        str(s.threads),
    ]


def run_logged(cmd: list[str], log_path: Path, niceness: int, log) -> float:
    """Run cmd (niced), its output into log_path; seconds taken. Raises CalledProcessError on failure."""
    import shutil

    from bench.llama_build import run_group

    nice = ["nice", "-n", str(niceness)] if niceness > 0 and shutil.which("nice") else []
    log(f"running: {' '.join(cmd)}  (log {log_path})")
    t0 = time.monotonic()
    with open(log_path, "w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        run_group([*nice, *cmd], f, None)
    return time.monotonic() - t0


def quantize_types(
    types: list[str],
    source_gguf: Path,
    model_folder: Path,
    calib,
    device_type: str,
    work: Path,
    s: LlamaQuantSettings,
    log,
) -> list[dict]:
    """Steps 1-4 for `types` in `work` (files kept there and reused: the source GGUF, calibration text and
    imatrix once, one GGUF per type). Returns one dict per type: name, path, bits (gguf_bits), seconds."""
    work.mkdir(parents=True, exist_ok=True)
    src = work / "source-f16.gguf"
    if not src.is_file():
        t0 = time.monotonic()
        info = write_source_gguf(source_gguf, src)
        log(f"wrote {src} ({info['tensors']} tensors, {info['bytes'] / 1e6:.0f} MB) in {time.monotonic() - t0:.0f} s")
    imatrix, calib_meta_path = work / "imatrix.gguf", work / "calibration.json"
    if not imatrix.is_file():
        text = work / "calibration.txt"
        cal = write_calibration_text(model_folder, calib, device_type, text)
        secs = run_logged(
            imatrix_command(s, src, text, imatrix, cal["seqlen"], cal["nsamples"]),
            work / "imatrix.log",
            s.niceness,
            log,
        )
        calib_meta_path.write_text(json.dumps({**cal, "imatrix_seconds": secs}))
    cal = json.loads(calib_meta_path.read_text())
    rows = []
    for qtype in types:
        out = work / f"{qtype}.gguf"
        meta_path = work / f"{qtype}.json"
        if not (out.is_file() and meta_path.is_file()):
            secs = run_logged(
                quantize_command(s, src, out, qtype, imatrix), work / f"quantize-{qtype}.log", s.niceness, log
            )
            meta_path.write_text(json.dumps({"seconds": secs, "embeddings": s.embeddings}))
        meta = json.loads(meta_path.read_text())
        rows.append({"type": qtype, "path": str(out), **gguf_bits(out), **meta, "calibration": cal})
    return rows
