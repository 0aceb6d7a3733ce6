"""A Llama GGUF of random F16 weights (the llama.cpp side of the peers benchmark) and a random importance
matrix for it (llama-quantize's i-quants ask for one; speed does not depend on its values).

    python -m bench.random_gguf --out /tmp/w/llama7b-f16.gguf [--shape llama2-7b|tiny] [--imatrix FILE]

The shape is a config of bench.random_checkpoint.FAMILIES (llama2-7b: 6.7 G weights, 13.5 GB). Weights are drawn
with torch on `device` (the GPU when there is one: seconds for 7B; numpy would take minutes), one tensor at a
time, and streamed into the file. The vocabulary is a stand-in SentencePiece-style list (<unk>, <s>, </s>, the 256
byte tokens, then filler pieces): llama-bench feeds token ids and never tokenizes text.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.random_checkpoint import FAMILIES, LLAMA2_7B

# The CPU check's shape: every row a multiple of 256 (k-quant and i-quant blocks), 259+ tokens for the byte pieces.
TINY = dict(
    LLAMA2_7B,
    vocab_size=512,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    head_dim=64,
    max_position_embeddings=1024,
)

# GGUF token types (llama.cpp's llama_token_type)
_NORMAL, _UNKNOWN, _CONTROL, _BYTE = 1, 2, 3, 6


def tensor_shapes(cfg: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """GGUF tensor name -> (numpy shape, "f16" | "f32") of a Llama model of `cfg`, in file order."""
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    out = {"token_embd.weight": ((v, h), "f16")}
    for i in range(cfg["num_hidden_layers"]):
        b = f"blk.{i}."
        out.update(
            {
                b + "attn_norm.weight": ((h,), "f32"),
                b + "attn_q.weight": ((q, h), "f16"),
                b + "attn_k.weight": ((kv, h), "f16"),
                b + "attn_v.weight": ((kv, h), "f16"),
                b + "attn_output.weight": ((h, q), "f16"),
                b + "ffn_norm.weight": ((h,), "f32"),
                b + "ffn_gate.weight": ((f, h), "f16"),
                b + "ffn_up.weight": ((f, h), "f16"),
                b + "ffn_down.weight": ((h, f), "f16"),
            }
        )
    out["output_norm.weight"] = ((h,), "f32")
    out["output.weight"] = ((v, h), "f16")
    return out


def linear_weight_count(cfg: dict) -> int:
    """Weights of the decoder layers' linear layers (what the bits-per-weight of a quantized file is about)."""
    return sum(
        int(np.prod(s))
        for n, (s, _) in tensor_shapes(cfg).items()
        if n.startswith("blk.") and not n.endswith("norm.weight")
    )


def _vocab(n: int) -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [_UNKNOWN, _CONTROL, _CONTROL] + [_BYTE] * 256
    tokens += [f"\u2581t{i}" for i in range(n - len(tokens))]
    types += [_NORMAL] * (n - len(types))
    return tokens[:n], [-float(i) for i in range(n)], types[:n]


def write_gguf(path: Path, cfg: dict, device: torch.device, seed: int = 0, log=None) -> float:
    """Write the random F16 GGUF of `cfg` to `path`; returns seconds taken."""
    import gguf

    t0 = time.monotonic()
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("random llama (athena bench peers)")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    tokens, scores, types = _vocab(cfg["vocab_size"])
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    shapes = tensor_shapes(cfg)
    for name, (shape, kind) in shapes.items():
        dt = np.float16 if kind == "f16" else np.float32
        w.add_tensor_info(name, shape, np.dtype(dt), int(np.prod(shape)) * np.dtype(dt).itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    g = torch.Generator(device=device).manual_seed(seed)
    for shape, kind in shapes.values():
        if kind == "f32":  # RMSNorm weights: near 1
            arr = (1 + 0.02 * torch.randn(shape, generator=g, device=device)).float().cpu().numpy()
        else:
            t = torch.empty(shape, device=device, dtype=torch.float16)
            t.normal_(0, 0.02, generator=g)
            arr = t.cpu().numpy()
        w.write_tensor_data(arr)
    w.close()
    secs = time.monotonic() - t0
    if log:
        log(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in {secs:.1f} s")
    return secs


def write_imatrix(path: Path, cfg: dict, seed: int = 0, chunks: int = 100, chunk_size: int = 512) -> None:
    """A random importance matrix in llama-imatrix's GGUF format: per linear weight `<name>.in_sum2` (F32, one
    sum of squared activations per input column) and `<name>.counts` (F32, the number of rows summed)."""
    import gguf

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "imatrix")  # the architecture key is not read back
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", ["random activations (athena bench peers)"])
    w.add_uint32("imatrix.chunk_count", chunks)
    w.add_uint32("imatrix.chunk_size", chunk_size)
    n = chunks * chunk_size
    for name, (shape, _) in tensor_shapes(cfg).items():
        if not name.startswith("blk.") or name.endswith("norm.weight"):
            continue
        mean_sq = rng.chisquare(4, size=shape[1]).astype(np.float32) / 4
        w.add_tensor(name + ".in_sum2", mean_sq * n)
        w.add_tensor(name + ".counts", np.array([n], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def shape_config(shape: str) -> dict:
    """`tiny` (TINY) or a llama-type shape of bench.random_checkpoint.FAMILIES (llama2-7b, llama3-8b)."""
    if shape == "tiny":
        return dict(TINY)
    if shape not in FAMILIES or FAMILIES[shape]["model_type"] != "llama":
        raise SystemExit(f"--shape {shape}: tiny or a llama-type shape of bench.random_checkpoint.FAMILIES")
    return dict(FAMILIES[shape])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--shape", default="llama2-7b")
    ap.add_argument("--imatrix", default=None, help="also write a random importance matrix here")
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)
    cfg = shape_config(args.shape)
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    write_gguf(Path(args.out), cfg, dev, log=lambda m: print(m, file=sys.stderr))
    if args.imatrix:
        write_imatrix(Path(args.imatrix), cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
