"""bench/llama_quants.py (llama.cpp's quantizer as a quality-table peer): which tensors count as linear, bits from a
GGUF's stored bytes, the F16 source GGUF, the calibration text, the command lines, the importer's reach over every
ggml type llama-quantize writes, the table; and the whole chain on a tiny GGUF where a CPU build of llama.cpp is
already cached (never built here)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import llama_build
from bench import llama_quants as lq
from bench import quality_ablation as qa
from bench.random_gguf import TINY, linear_weight_count, tensor_shapes, write_gguf

ROOT = Path(__file__).resolve().parent.parent
LINEAR = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
# the ggml types llama-quantize stores for the DEFAULT_TYPES mixes and their fallbacks
WRITTEN_TYPES = (
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
    "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS", "IQ1_S", "IQ1_M",
)  # fmt: skip


def test_linear_tensors_are_the_quantizers_seven():
    assert sorted(lq.linear_suffixes()) == sorted(f"{n}.weight" for n in LINEAR)
    suf = lq.linear_suffixes()
    assert lq.is_linear("blk.12.ffn_down.weight", suf)
    for name in (
        "token_embd.weight",
        "output.weight",
        "blk.0.attn_norm.weight",
        "blk.0.attn_q.bias",
        "blk.x.attn_q.weight",
    ):
        assert not lq.is_linear(name, suf)


def _small_gguf(path: Path, linear_type: str | None = None) -> dict:
    """A 1-layer llama GGUF (hidden 64): embeddings F32, norms F32, linears F16 or `linear_type` (python-quantizable:
    Q8_0 / Q4_0) for q/k/v only. Returns name -> float32 weights as written (dequantized)."""
    import gguf
    from gguf.quants import dequantize, quantize

    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_token_list(["a", "b", "c"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_array("tokenizer.ggml.scores", [0.0, -1.0, -2.0])
    written = {}
    shapes = {"token_embd.weight": (96, 64), "blk.0.attn_norm.weight": (64,)}
    shapes |= {f"blk.0.{n}.weight": ((128, 64) if n in ("ffn_gate", "ffn_up") else (64, 64)) for n in LINEAR}
    shapes["blk.0.ffn_down.weight"] = (64, 128)
    for name, shape in shapes.items():
        a = rng.standard_normal(shape).astype(np.float32)
        if len(shape) == 2 and name.startswith("blk."):
            qtype = (
                gguf.GGMLQuantizationType[linear_type]
                if linear_type and name.split(".")[2] in ("attn_q", "attn_k", "attn_v")
                else None
            )
            if qtype is not None:
                raw = quantize(a, qtype)
                w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qtype)
                written[name] = dequantize(raw, qtype).reshape(shape)
                continue
            a = a.astype(np.float16)
        w.add_tensor(name, a)
        written[name] = a.astype(np.float32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


def test_bits_count_linear_bytes_only(tmp_path):
    _small_gguf(tmp_path / "f16.gguf")
    b = lq.gguf_bits(tmp_path / "f16.gguf")
    n_lin = 4 * 64 * 64 + 3 * 64 * 128
    assert b["weights_linear"] == n_lin and b["bits"] == 16.0 and b["types"] == {"F16": 1.0}
    assert b["bits_file"] > 16  # the F32 embeddings and norms count in the file's figure only
    _small_gguf(tmp_path / "q8.gguf", "Q8_0")
    b = lq.gguf_bits(tmp_path / "q8.gguf")
    q8 = 3 * 64 * 64  # q, k, v in Q8_0: 34 bytes per 32 weights = 8.5 bits
    assert b["bits"] == pytest.approx((q8 * 8.5 + (n_lin - q8) * 16) / n_lin)
    assert b["types"] == {"F16": pytest.approx(1 - q8 / n_lin), "Q8_0": pytest.approx(q8 / n_lin)}
    assert lq.type_mix(b["types"]) == "F16 70%, Q8_0 30%"
    assert lq.type_mix({"Q5_0": 0.996, "Q5_1": 0.004}) == "Q5_0 100%, Q5_1 <1%"


def test_bits_of_a_file_without_linears_is_refused(tmp_path):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "e.gguf"), "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="no linear layer weights"):
        lq.gguf_bits(tmp_path / "e.gguf")


def test_source_gguf_holds_the_reference_weights_in_f16(tmp_path):
    import gguf

    written = _small_gguf(tmp_path / "q.gguf", "Q4_0")
    info = lq.write_source_gguf(tmp_path / "q.gguf", tmp_path / "src.gguf")
    assert info["tensors"] == len(written)
    r = gguf.GGUFReader(str(tmp_path / "src.gguf"))
    assert r.fields["general.architecture"].contents() == "llama"
    assert r.fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_F16)
    assert r.fields["tokenizer.ggml.tokens"].contents() == ["a", "b", "c"]
    assert r.fields["tokenizer.ggml.scores"].contents() == [0.0, -1.0, -2.0]
    for t in r.tensors:
        shape = tuple(int(s) for s in reversed(t.shape))
        want = written[t.name]
        assert t.tensor_type.name == ("F16" if len(shape) == 2 else "F32") and shape == want.shape
        expect = want.astype(np.float16) if len(shape) == 2 else want  # the importer's fp16 of the dequantized
        np.testing.assert_array_equal(np.asarray(t.data).reshape(shape), expect)
    assert lq.gguf_bits(tmp_path / "src.gguf")["bits"] == 16.0


@pytest.mark.parametrize("name", WRITTEN_TYPES)
def test_the_importer_dequantizes_every_type_llama_quantize_writes(name):
    """convert_gguf reads tensors with gguf.quants.dequantize: each type's blocks come back as floats of the
    block's weight count (all-zero blocks: scale 0 -> zeros; for the i-quants a zero code is a grid entry times 0)."""
    import gguf
    from gguf.quants import dequantize

    qtype = gguf.GGMLQuantizationType[name]
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = np.zeros((2, 2 * nbytes), dtype=np.uint8)  # 2 rows of 2 blocks
    out = dequantize(raw, qtype)
    assert out.shape == (2, 2 * block) and np.isfinite(out).all() and not out.any()


def test_command_lines():
    s = lq.LlamaQuantSettings(Path("/b"), threads=3)
    assert lq.imatrix_command(s, Path("m.gguf"), Path("t.txt"), Path("i.gguf"), 512, 32) == [
        "/b/llama-imatrix", "-m", "m.gguf", "-f", "t.txt", "-o", "i.gguf", "-c", "512", "--chunks", "32", "-t", "3",
        "--no-ppl",
    ]  # fmt: skip
    assert lq.quantize_command(s, Path("s.gguf"), Path("o.gguf"), "IQ2_M", Path("i.gguf")) == [
        "/b/llama-quantize", "--imatrix", "i.gguf", "--token-embedding-type", "f16", "--output-tensor-type", "f16",
        "s.gguf", "o.gguf", "IQ2_M", "3",
    ]  # fmt: skip
    own = lq.LlamaQuantSettings(Path("/b"), embeddings="llama")
    cmd = lq.quantize_command(own, Path("s.gguf"), Path("o.gguf"), "Q4_K_M", Path("i.gguf"))
    assert "--token-embedding-type" not in cmd and cmd[-2:] == ["Q4_K_M", "2"]
    with pytest.raises(ValueError, match="embeddings must be one of"):
        lq.LlamaQuantSettings(Path("/b"), embeddings="q8_0")
    with pytest.raises(ValueError, match="threads"):
        lq.LlamaQuantSettings(Path("/b"), threads=0)


def test_calibration_text_is_the_quantizers_windows(tmp_path):
    """The windows quantize.calibration draws (same config, same seed), decoded: re-tokenized they give the same
    tokens back."""
    from tiny_models import make_tiny_model, write_text

    from athena_runtime.format.source import load_tokenizer
    from quantize.calibration import CalibConfig, calibration_batch

    model = make_tiny_model(tmp_path / "m", "llama")
    calib = CalibConfig(files=(str(write_text(tmp_path / "c.txt", (0, 20))),), nsamples=3, seqlen=16)
    meta = lq.write_calibration_text(model, calib, "cpu", tmp_path / "out.txt")
    assert meta == {"nsamples": 3, "seqlen": 16, "seed": 0, "files": [calib.files[0]]}
    tok = load_tokenizer(model)
    windows = calibration_batch(tok, calib)
    paragraphs = (tmp_path / "out.txt").read_text().split("\n\n")
    assert len(paragraphs) >= 3
    ids = tok((tmp_path / "out.txt").read_text(), add_special_tokens=False)["input_ids"]
    assert ids[:16] == windows[0].tolist()[: len(ids[:16])]


def test_table_sorts_by_bits_and_gives_llama_types(tmp_path):
    ref = {"name": "reference", "path": "/c/Smol", "ppl": 10.0, "kl": 0.0, "top1": 1.0, "tokens": 100, "bits": 16.0}
    common = {"kl": 0.1, "top1": 0.9, "tokens": 100, "quantize_seconds": 5.0, "calibration": {"nsamples": 32}}
    rows = [
        ref,
        {"name": "gptq-4b-g128", "bits": 4.27, "ppl": 11.0, "quantize_device": "cpu", **common},
        {"name": "llama.cpp IQ2_M", "bits": 4.04, "ppl": 13.7, "types": {"IQ4_NL": 0.75, "IQ2_S": 0.25}, **common},
    ]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = qa.table(tmp_path)
    body = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    names = [line.split(" | ")[0] for line in body]
    assert names == ["| reference (the source's weights, fp16)", "| llama.cpp IQ2_M", "| gptq-4b-g128"]
    assert body[0].startswith("| reference (the source's weights, fp16) | 16 | 10.000 | 1.000x |")
    assert body[1].endswith("| IQ4_NL 75%, IQ2_S 25% |") and "1.370x" in body[1]
    assert body[2].endswith("|  |") and "model Smol" in text and "embeddings, norms, biases and lm_head" in text


def test_llama_refuses_a_model_that_is_not_a_gguf(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    with pytest.raises(SystemExit, match="not a GGUF file"):
        qa.main(["llama", "Q4_0", "--out", str(tmp_path / "o"), "--model", str(folder), "--device", "cpu"])


def test_without_cmake_the_tools_are_reported_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(llama_build.shutil, "which", lambda name: None)
    why = llama_build.cpu_tools(llama_build.QUANT_TOOLS, None, tmp_path, 2, print)
    assert isinstance(why, str) and why.startswith("cannot build llama-quantize, llama-imatrix") and "cmake" in why
    bins = tmp_path / "build-cpu" / "bin"
    bins.mkdir(parents=True)
    for t in llama_build.QUANT_TOOLS:
        (bins / t).write_text("")
    assert llama_build.cpu_tools(llama_build.QUANT_TOOLS, None, tmp_path, 2, print) == bins


def _cached_tools() -> Path | None:
    from athena_runtime.format.source import cache_dir

    for d in [cache_dir() / "peers" / "build-cpu" / "bin", *sorted((ROOT / ".peers").glob("build-cpu*/bin"))]:
        if all((d / t).is_file() for t in llama_build.QUANT_TOOLS):
            return d
    return None


@pytest.mark.slow
@pytest.mark.skipif(_cached_tools() is None, reason="no cached CPU build of llama-quantize + llama-imatrix")
@torch.no_grad()
def test_imatrix_quantize_and_import_on_a_tiny_gguf(tmp_path):
    """llama-imatrix on text, llama-quantize at a k-quant mix and an i-quant (every row a multiple of 256), bits
    from the files, embeddings and output left F16, and the importer's model of each quantized file close to the
    source's."""
    import gguf

    from athena_runtime.format.gguf_import import convert_gguf
    from athena_runtime.format.source import load_hf_model

    s = lq.LlamaQuantSettings(_cached_tools(), threads=2, niceness=0)
    src = tmp_path / "src.gguf"
    write_gguf(src, TINY, torch.device("cpu"))
    assert lq.gguf_bits(src)["weights_linear"] == linear_weight_count(TINY)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"word{i % 97} number {i}" for i in range(3000)))
    imatrix = tmp_path / "i.gguf"
    lq.run_logged(lq.imatrix_command(s, src, text, imatrix, 128, 4), tmp_path / "imatrix.log", 0, print)
    assert imatrix.is_file()
    ref = load_hf_model(convert_gguf(src, tmp_path / "src-hf", tokenizer=False))
    x = torch.randint(0, TINY["vocab_size"], (1, 32))
    ref_logits = ref(input_ids=x).logits
    for qtype, lo, hi in (("Q4_K_M", 4.4, 5.2), ("IQ3_XXS", 2.9, 3.6)):
        out = tmp_path / f"{qtype}.gguf"
        lq.run_logged(lq.quantize_command(s, src, out, qtype, imatrix), tmp_path / f"{qtype}.log", 0, print)
        b = lq.gguf_bits(out)
        assert lo < b["bits"] < hi, b
        assert "F16" not in b["types"] and sum(b["types"].values()) == pytest.approx(1.0)
        model = load_hf_model(convert_gguf(out, tmp_path / f"{qtype}-hf", tokenizer=False))
        assert not (tmp_path / f"{qtype}-hf" / "tokenizer.json").exists()
        logits = model(input_ids=x).logits
        rel = float((logits - ref_logits).norm() / ref_logits.norm())
        assert rel < 0.5, (qtype, rel)
        kept = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
        assert {n: kept[n] for n in tensor_shapes(TINY) if not n.startswith("blk.")} == {
            "token_embd.weight": "F16", "output_norm.weight": "F32", "output.weight": "F16"
        }  # fmt: skip


def test_bench_quality_llama_types_and_the_skip_without_tools(tmp_path, monkeypatch, capsys):
    import argparse

    from bench import quantize_quality as qq

    assert qq.llama_types("none") == [] and qq.llama_types("default") == list(lq.DEFAULT_TYPES)
    assert qq.llama_types("Q4_K_M,IQ2_M") == ["Q4_K_M", "IQ2_M"]
    monkeypatch.setenv("ATHENA_CACHE_DIR", str(tmp_path / "cache"))  # no cached build there
    monkeypatch.setattr(llama_build.shutil, "which", lambda name: None)
    args = argparse.Namespace(llama_bin=None, llama_types=["Q4_0"], device="cpu", seqlen=16, max_tokens=64)
    assert qq.llama_rows("m", tmp_path / "m.gguf", tmp_path / "ref", tmp_path / "held.txt", tmp_path, args) == []
    out = capsys.readouterr().out
    assert "m: llama.cpp rows skipped: cannot build llama-quantize, llama-imatrix (missing cmake" in out


@pytest.mark.slow
@pytest.mark.skipif(_cached_tools() is None, reason="no cached CPU build of llama-quantize + llama-imatrix")
def test_quality_ablation_llama_rows_on_a_tiny_gguf(tmp_path, monkeypatch):
    """`quality_ablation reference` then `llama` on a tiny random GGUF: one row per type, scored against the cached
    reference, its imatrix from the calibration windows asked for; the table lists the rows with their types."""
    from tiny_models import write_text

    tools = _cached_tools()  # before the cache moves
    monkeypatch.setenv("ATHENA_CACHE_DIR", str(tmp_path / "cache"))
    model = tmp_path / "tiny.gguf"
    write_gguf(model, TINY, torch.device("cpu"))
    held = write_text(tmp_path / "held.txt", (40, 60))
    calib = write_text(tmp_path / "calib.txt", (0, 30))
    out = tmp_path / "abl"
    common = ["--out", str(out), "--device", "cpu", "--seqlen", "64", "--model", str(model)]
    assert qa.main(["reference", "--heldout", str(held), "--max-tokens", "256", *common]) == 0
    flags = ["--calib", str(calib), "--calib-windows", "4", "--calib-seqlen", "64", "--llama-bin", str(tools)]
    assert qa.main(["llama", "Q4_K_M", "IQ3_XXS", *flags, *common]) == 0
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert [r["name"] for r in rows] == ["reference", "llama.cpp Q4_K_M", "llama.cpp IQ3_XXS"]
    for r in rows[1:]:
        assert r["tokens"] == rows[0]["tokens"] and r["kl"] > 0 and 0 < r["top1"] <= 1
        assert r["calibration"] == {"files": [str(calib)], "nsamples": 4, "seqlen": 64, "seed": 0}
        assert sum(r["types"].values()) == pytest.approx(1.0) and r["recipe"]["embeddings"] == "f16"
    assert rows[2]["bits"] < rows[1]["bits"]
    assert "-c 64 --chunks 4" in " ".join((out / "llama.cpp" / "imatrix.log").read_text().splitlines()[:1])
    assert not list((out / "llama.cpp").glob("*-hf"))  # the converted folders are removed after scoring
    assert qa.main(["table", "--out", str(out)]) == 0
    assert "| llama.cpp IQ3_XXS |" in (out / "table.md").read_text()
