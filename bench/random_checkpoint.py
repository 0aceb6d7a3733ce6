"""7B-class Athena checkpoints with random contents, for speed benchmarks (speed does not depend on the values),
in the shapes of the families people self-host (FAMILIES: Llama-2-7B, Llama-3.1-8B, Qwen2.5-7B, Mistral-7B,
Gemma-3-12B's text model). Written in the real format (FORMAT.md), so the runtime loads it through its normal
path; also writes an fp16 Hugging Face folder of the same shape for the baselines. `random_tensors` gives the
same tensors lazily on a device instead (bench.decode builds its models that way, without a file).

    python -m bench.random_checkpoint --out /tmp/llama7b [--family llama2-7b] [--fp16-out /tmp/llama7b-fp16]
        [--layers 32]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from bench.tiny_shape import TINY

log = logging.getLogger("bench.random_checkpoint")

LLAMA2_7B = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    head_dim=128,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    torch_dtype="float16",
)
# The shapes people self-host (config.json fields as released; weights random): `bench.decode --family`.
FAMILIES = {
    "llama2-7b": LLAMA2_7B,
    "llama3-8b": dict(  # Llama-3.1-8B: GQA 8, 128k vocabulary, llama3 RoPE scaling
        LLAMA2_7B,
        vocab_size=128256,
        intermediate_size=14336,
        num_key_value_heads=8,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        max_position_embeddings=131072,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    "qwen2.5-7b": dict(  # Qwen2.5-7B: q/k/v biases, 28 heads over 4 KV heads
        architectures=["Qwen2ForCausalLM"],
        model_type="qwen2",
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        head_dim=128,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        max_position_embeddings=32768,
        tie_word_embeddings=False,
        bos_token_id=151643,
        eos_token_id=151645,
        torch_dtype="float16",
    ),
    "mistral-7b": dict(  # Mistral-7B v0.3: GQA 8, 32768 vocabulary, no sliding window
        LLAMA2_7B,
        architectures=["MistralForCausalLM"],
        model_type="mistral",
        vocab_size=32768,
        intermediate_size=14336,
        num_key_value_heads=8,
        rope_theta=1000000.0,
        max_position_embeddings=32768,
        sliding_window=None,
    ),
    "gemma3-12b": dict(  # Gemma-3-12B's text model: head_dim 256, 5 local : 1 global layers, tied 262k embeddings
        architectures=["Gemma3ForCausalLM"],
        model_type="gemma3_text",
        vocab_size=262208,
        hidden_size=3840,
        intermediate_size=15360,
        num_hidden_layers=48,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=256,
        rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh",
        query_pre_attn_scalar=256,
        sliding_window=1024,
        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(48)],
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        bos_token_id=2,
        eos_token_id=[1, 106],
        torch_dtype="float16",
    ),
    "tiny-llama": dict(LLAMA2_7B, **TINY, vocab_size=512, intermediate_size=128, head_dim=16),  # CPU tests
    "tiny-gemma3": dict(  # CPU tests: every Gemma feature at toy size
        architectures=["Gemma3ForCausalLM"],
        model_type="gemma3_text",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=256,
        rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh",
        query_pre_attn_scalar=256,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=2,
        eos_token_id=1,
        torch_dtype="float16",
    ),
}


def _tokenizer(out: Path, vocab: int) -> None:
    """A byte-level BPE trained offline on pydoc_data.topics (a stand-in for the real tokenizer)."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab, 8000),
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([topics[k] for k in sorted(topics)], trainer)
    tok = Tokenizer.from_str(json.dumps(_fill_vocab(json.loads(tok.to_str()), vocab)))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    fast.save_pretrained(out)


def _fill_vocab(spec: dict, vocab: int) -> dict:
    """A trained BPE tokenizer's JSON with its vocabulary filled up to `vocab` ids by word-like tokens
    no merge produces: encoding is unchanged, and every id the model can sample decodes to text, as in
    a real tokenizer of that size (ids without a token would stream nothing, so a server would send
    one chunk every few tokens and its inter-token latency would read several times the model's)."""
    table = spec["model"]["vocab"]
    letters = "abcdefghijklmnopqrstuvwxyz"
    n = 0
    while len(table) < vocab:
        word, k = "", n
        while True:
            word, k = letters[k % 26] + word, k // 26
            if k == 0:
                break
        n += 1
        token = "\u0120" + word  # "Ġ": the byte-level spelling of a leading space
        if token not in table:
            table[token] = len(table)
    return spec


class LazyTensors(Mapping):
    """name -> tensor, made by its factory at each access: the loader takes each tensor once, so a model is built
    on the device without a second copy in memory or a file on disk."""

    def __init__(self, factories: dict[str, Callable[[], torch.Tensor]]):
        self.factories = factories

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.factories[name]()

    def __iter__(self):
        return iter(self.factories)

    def __len__(self) -> int:
        return len(self.factories)


def model_shapes(cfg: dict) -> tuple[dict[str, tuple[int, int, bool]], dict[str, tuple[int, ...]]]:
    """(decoder linears: name -> (N, M, bias); every other parameter: name -> shape) of our model for `cfg`;
    lm_head counts as a dense parameter (checkpoints keep it fp16)."""
    from torch import nn

    from athena_runtime.format.config import ModelConfig
    from athena_runtime.model import CausalLM

    with torch.device("meta"):
        model = CausalLM(ModelConfig.from_hf_config(cfg))
    linears = {
        name: (m.out_features, m.in_features, m.bias is not None)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name != "lm_head"
    }
    dense = {name: tuple(p.shape) for name, p in model.named_parameters() if name.rsplit(".", 1)[0] not in linears}
    return linears, dense


def _dense_factory(name: str, shape: tuple[int, ...], unit_offset: bool, gen: torch.Generator, device):
    if name.endswith("norm.weight"):  # Gemma's norms act as (1 + w): zeros there, ones elsewhere
        return lambda: torch.full(shape, 0.0 if unit_offset else 1.0, dtype=torch.float16, device=device)
    if name.endswith(".bias"):
        return lambda: torch.zeros(shape, dtype=torch.float16, device=device)
    return lambda: (torch.randn(shape, generator=gen, device=device) * 0.02).half()


def _pq_factories(prefix: str, N: int, M: int, bias: bool, recipe, gen: torch.Generator, device) -> tuple[dict, dict]:
    """Random packed tensors of one athena layer (FORMAT.md) and its athena.json entry."""
    from athena_runtime.format.bits import packed_width

    d, n, k = recipe.d, recipe.n, recipe.k
    G, Nb, r, b = -(-M // d), -(-N // k), recipe.rank(N, M), recipe.index_bits

    def indices():
        # Random packed bytes are valid indices (every b-bit pattern is < n = 2^b); clear the padding bits of the
        # last byte as FORMAT.md requires.
        idx = torch.randint(0, 256, (N, packed_width(G, b)), generator=gen, dtype=torch.uint8, device=device)
        if (G * b) % 8:
            idx[:, -1] &= (1 << ((G * b) % 8)) - 1
        return idx

    f = {
        f"{prefix}.indices": indices,
        f"{prefix}.codebook": lambda: torch.randint(
            0, 256, (Nb, G, n, d), generator=gen, dtype=torch.uint8, device=device
        ),
        f"{prefix}.codebook_scale": lambda: torch.full((Nb, G, d), 0.04 / 255, dtype=torch.float16, device=device),
        f"{prefix}.codebook_min": lambda: torch.full((Nb, G, d), -0.02, dtype=torch.float16, device=device),
    }
    if r:
        f[f"{prefix}.lowrank_a"] = lambda: (torch.randn(N, r, generator=gen, device=device) * 0.01).half()
        f[f"{prefix}.lowrank_b"] = lambda: (torch.randn(r, M, generator=gen, device=device) * 0.01).half()
    if bias:
        f[f"{prefix}.bias"] = lambda: torch.zeros(N, dtype=torch.float16, device=device)
    meta = {"method": "athena", "shape": [N, M], "d": d, "n": n, "k": k, "codebook_bits": 8, "rank": r}
    return f, meta


def random_tensors(
    cfg: dict, recipe=None, device="cpu", seed: int = 0, dense_linears: bool = False
) -> tuple[LazyTensors, dict[str, dict]]:
    """(tensors, athena.json "layers") of a random model of `cfg`, made on `device` as the loader asks for them:
    athena layers with `recipe` (default: AthenaRecipe's), or with `dense_linears` fp16 weights (no layers)."""
    from quantize.recipe import AthenaRecipe

    recipe = recipe or AthenaRecipe()
    gen = torch.Generator(device=device).manual_seed(seed)
    linears, dense = model_shapes(cfg)
    unit_offset = cfg.get("model_type") == "gemma3_text"
    factories = {name: _dense_factory(name, shape, unit_offset, gen, device) for name, shape in dense.items()}
    layers: dict[str, dict] = {}
    for prefix, (N, M, bias) in linears.items():
        if dense_linears:
            factories[f"{prefix}.weight"] = _dense_factory(f"{prefix}.weight", (N, M), unit_offset, gen, device)
            if bias:
                factories[f"{prefix}.bias"] = _dense_factory(f"{prefix}.bias", (N,), unit_offset, gen, device)
        else:
            f, layers[prefix] = _pq_factories(prefix, N, M, bias, recipe, gen, device)
            factories.update(f)
    return LazyTensors(factories), layers


def build(
    out: Path,
    d: int = 2,
    n: int = 64,
    k: int = 4096,
    rank_frac: float = 0.01,
    layers: int | None = None,
    fp16_out: Path | None = None,
    seed: int = 0,
    family: str = "llama2-7b",
) -> dict:
    """Write the random athena checkpoint of `family` (and, with `fp16_out`, an fp16 Hugging Face folder of the
    same shape) to disk."""
    from safetensors.torch import save_file

    from quantize.recipe import AthenaRecipe

    base = FAMILIES[family]
    cfg = dict(base, num_hidden_layers=layers or base["num_hidden_layers"])
    if "layer_types" in cfg:
        cfg["layer_types"] = cfg["layer_types"][: cfg["num_hidden_layers"]]
    recipe = AthenaRecipe(d=d, n=n, k=k, lowrank=rank_frac)
    tensors, stats = random_tensors(cfg, recipe, "cpu", seed)
    packed = {name: tensors[name] for name in tensors}
    for prefix, meta in stats.items():
        N, M = meta["shape"]
        nbytes = sum(
            t.numel() * t.element_size()
            for name, t in packed.items()
            if name.startswith(prefix + ".") and not name.endswith(".bias")
        )
        stats[prefix] = dict(meta, bits_per_weight=8 * nbytes / (N * M), proxy_loss=None, seconds=0.0)
    out.mkdir(parents=True, exist_ok=True)
    save_file(packed, str(out / "model.safetensors"), metadata={"format": "athena", "format_version": "1"})
    linears, dense = model_shapes(cfg)
    nparams = sum(N * M for N, M, _ in linears.values()) + sum(math.prod(s) for s in dense.values())
    linear_bytes = sum(
        t.numel() * t.element_size()
        for name, t in packed.items()
        if name.rsplit(".", 1)[0] in stats and not name.endswith(".bias")
    )
    linear_params = sum(s["shape"][0] * s["shape"][1] for s in stats.values())
    meta = {
        "format": "athena",
        "format_version": 1,
        "architecture": cfg["model_type"],
        "source": {"path": f"random {family} (bench.random_checkpoint)", "kind": "random"},
        "method": "athena",
        "recipe": {"d": d, "n": n, "k": k, "codebook_bits": 8, "lowrank": rank_frac},
        "layers": stats,
        "num_layers": cfg["num_hidden_layers"],
        "source_parameters": nparams,
        "bytes": {"linear": linear_bytes, "file": (out / "model.safetensors").stat().st_size},
        "bits_per_weight": {
            "linear": 8 * linear_bytes / linear_params,
            "file": 8 * (out / "model.safetensors").stat().st_size / nparams,
        },
        "complete": True,
    }
    (out / "athena.json").write_text(json.dumps(meta, indent=1))
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    _tokenizer(out, cfg["vocab_size"])
    if fp16_out is not None:
        fp16, _ = random_tensors(cfg, recipe, "cpu", seed + 1, dense_linears=True)
        fp16_out.mkdir(parents=True, exist_ok=True)
        save_file({name: fp16[name] for name in fp16}, str(fp16_out / "model.safetensors"), metadata={"format": "pt"})
        (fp16_out / "config.json").write_text(json.dumps(cfg, indent=1))
        _tokenizer(fp16_out, cfg["vocab_size"])
    return meta


def checkpoint(workdir, family: str = "llama2-7b", layers: int | None = None) -> Path:
    """The random checkpoint of `family` in `workdir` (`llama7b-athena` for Llama-2-7B, else `<family>-athena`),
    written first when it is missing."""
    folder = Path(workdir) / ("llama7b-athena" if family == "llama2-7b" else f"{family}-athena")
    if not (folder / "athena.json").exists():
        build(folder, layers=layers, family=family)
    return folder


def open_checkpoint(workdir, family: str = "llama2-7b"):
    """(folder, tokenizer, vocabulary size) of `checkpoint`. A stand-in tokenizer with fewer ids than the model's
    vocabulary (written before it covered the vocabulary: ids without text stream no chunk) is rewritten, loudly."""
    from transformers import AutoTokenizer

    folder = checkpoint(workdir, family)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    if len(tokenizer) < vocab:
        log.warning(
            "%s: the tokenizer has %d of the model's %d ids (ids without text stream no chunk): rewriting it",
            folder,
            len(tokenizer),
            vocab,
        )
        _tokenizer(folder, vocab)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    return folder, tokenizer, vocab


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--fp16-out", type=Path, default=None)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--codebook", default="2,64,4096")
    ap.add_argument("--lowrank", type=float, default=0.01)
    ap.add_argument("--family", choices=sorted(FAMILIES), default="llama2-7b")
    args = ap.parse_args(argv)
    d, n, k = (int(v) for v in args.codebook.split(","))
    meta = build(args.out, d, n, k, args.lowrank, args.layers, args.fp16_out, family=args.family)
    print(f"wrote {args.out}: {meta['bits_per_weight']['linear']:.3f} bits/weight (linear)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
