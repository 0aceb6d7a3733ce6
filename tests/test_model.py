"""Our decoder vs transformers (eager, fp32) on tiny random models; config parsing; RoPE; the loader."""

import json

import pytest
import torch
from tiny_models import make_tiny_model, tiny_config
from transformers import AutoModelForCausalLM

from athena_runtime.batch import SequenceChunk, prepare_batch
from athena_runtime.format.config import ModelConfig, rope_inv_freq
from athena_runtime.kv_cache import KVCache
from athena_runtime.loader import load_model

pytestmark = pytest.mark.gpu  # on CUDA when there is one: `bash bench/gpu_suite.sh tests` runs `pytest -m gpu`

LLAMA3_ROPE = dict(
    rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32
)
CASES = {
    "llama-llama3-rope-tied": ("llama", dict(rope_scaling=LLAMA3_ROPE, rope_theta=500000.0, tie_word_embeddings=True)),
    "llama-linear-rope-mha": ("llama", dict(rope_scaling=dict(rope_type="linear", factor=2.0), num_key_value_heads=4)),
    "mistral-window": ("mistral", dict(sliding_window=7)),
    "qwen2-bias-window": ("qwen2", dict(use_sliding_window=True, sliding_window=6, max_window_layers=1)),
    "qwen3-qknorm-head_dim": ("qwen3", {}),
    "qwen3-window-untied-bias": (
        "qwen3",
        dict(use_sliding_window=True, sliding_window=6, max_window_layers=1, attention_bias=True),
    ),
    "llama3-gqa8-tied": (
        "llama",
        dict(
            rope_scaling=LLAMA3_ROPE,
            rope_theta=500000.0,
            num_attention_heads=8,
            num_key_value_heads=1,
            tie_word_embeddings=True,
        ),
    ),
    # local / global layers, their RoPE bases (global: linear scaling), q/k norms, (1 + w) norms, sandwich norms,
    # GELU-tanh, query_pre_attn_scalar, final soft-capping, tied embeddings
    "gemma3-local-global": ("gemma3", {}),
    "gemma3-gqa-mqa-no-softcap": ("gemma3", dict(num_key_value_heads=1, final_logit_softcapping=None)),
}


def _hf_logits(folder, tokens):
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0]  # [L, vocab]


@pytest.mark.parametrize("case", list(CASES))
def test_decoder_matches_transformers_at_every_position(tmp_path, case):
    family, overrides = CASES[case]
    folder = make_tiny_model(tmp_path, family, **overrides)
    tokens = torch.randint(0, 384, (29,), generator=torch.Generator().manual_seed(3)).tolist()
    want = _hf_logits(folder, tokens)
    model, config = load_model(folder, "cpu", torch.float32)
    cache = KVCache.create("fp32", config.num_layers, 12, 4, config.num_kv_heads, config.head_dim, "cpu")
    table = [7, 2, 11, 0, 5, 9, 1, 3]  # 8 blocks of 4 cover 29 positions, out of order
    got = []
    with torch.no_grad():
        for start, end in ((0, 11), (11, 12), (12, 29)):  # prefill chunk, one decode token, second chunk
            batch = prepare_batch([SequenceChunk(tokens[start:end], start, table)], cache, "cpu")
            got.append(model.compute_logits(model(batch.input_ids, batch.positions, batch.attn)))
    torch.testing.assert_close(torch.cat(got), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_gemma3_older_config_layout_reads_the_same(tmp_path):
    """A Gemma 3 config.json in the transformers-4 layout (rope_theta, rope_local_base_freq, rope_scaling,
    sliding_window_pattern, no layer_types) gives the same ModelConfig as the transformers-5 one."""
    folder = make_tiny_model(tmp_path, "gemma3")
    new = json.loads((folder / "config.json").read_text())
    old = {k: v for k, v in new.items() if k not in ("rope_parameters", "layer_types")}
    old.update(
        rope_theta=50000.0,
        rope_local_base_freq=100.0,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
        sliding_window_pattern=2,
        num_hidden_layers=3,
    )
    a, b = ModelConfig.from_hf_config(new), ModelConfig.from_hf_config(old)
    assert a == b
    assert a.sliding_layers == (True, False, True) and a.window(0) == 5 and a.window(1) is None
    assert a.layer_rope(0).theta == 100.0 and a.layer_rope(1) == a.rope and a.rope.rope_type == "linear"
    assert a.attn_scale == 24**-0.5 and a.embed_scale == 8.0 and a.hidden_act == "gelu_tanh"
    with pytest.raises(ValueError, match="multimodal Gemma 3"):
        ModelConfig.from_hf_config({**new, "model_type": "gemma3"})
    with pytest.raises(ValueError, match="hidden activation 'gelu'"):
        ModelConfig.from_hf_config({**new, "hidden_activation": "gelu"})


def test_gemma_in_float16_keeps_its_residual_stream_in_float32(tmp_path):
    """Gemma's residual stream outgrows float16 (the real 270M reaches ~9e4): with norms that push it past 65504,
    the float16 model still gives the float32 model's logits (its stream is float32, its layers float16)."""
    folder = make_tiny_model(tmp_path, "gemma3")
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    for name in state:
        if name.endswith(("post_feedforward_layernorm.weight", "post_attention_layernorm.weight")):
            state[name] = torch.full_like(state[name], 3e4)  # (1 + w) ~ 3e4: outputs ~ 3e4 per layer, summed
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tokens = torch.randint(0, 384, (12,), generator=torch.Generator().manual_seed(4)).tolist()
    logits = {}
    for dtype in (torch.float32, torch.float16):
        model, config = load_model(folder, "cpu", dtype)
        cache = KVCache.create("fp32", config.num_layers, 4, 4, config.num_kv_heads, config.head_dim, "cpu")
        with torch.no_grad():
            batch = prepare_batch([SequenceChunk(tokens, 0, [0, 1, 2])], cache, "cpu")
            hidden = model(batch.input_ids, batch.positions, batch.attn)
            assert hidden.dtype == dtype
            logits[dtype] = model.compute_logits(hidden).float()
    assert torch.isfinite(logits[torch.float16]).all()
    torch.testing.assert_close(logits[torch.float16], logits[torch.float32], rtol=2e-2, atol=2e-2)


def test_sliding_window_is_really_exercised(tmp_path):
    """The windowed model's late logits differ from the same weights without the window."""
    tokens = list(range(5, 35))
    windowed = _hf_logits(make_tiny_model(tmp_path / "w", "mistral", sliding_window=7), tokens)
    full = _hf_logits(make_tiny_model(tmp_path / "f", "mistral", sliding_window=None), tokens)
    assert torch.allclose(windowed[:7], full[:7], atol=1e-5)
    assert not torch.allclose(windowed[-1], full[-1], atol=1e-3)


@pytest.mark.parametrize(
    "rope",
    [
        dict(rope_type="default"),
        dict(rope_type="linear", factor=4.0),
        dict(rope_type="dynamic", factor=2.0),
        dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
    ],
)
def test_rope_inverse_frequencies_match_transformers(rope):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_cfg = tiny_config("llama", rope_scaling=rope, rope_theta=50000.0, head_dim=32, max_position_embeddings=256)
    ours = ModelConfig.from_hf_config(hf_cfg.to_dict())
    got = rope_inv_freq(ours.rope, ours.head_dim, ours.max_position_embeddings)
    if rope["rope_type"] == "default":
        want = 1.0 / 50000.0 ** (torch.arange(0, 32, 2).float() / 32)
    else:
        want, _ = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf_cfg, "cpu")
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_config_fields_and_errors():
    qwen = ModelConfig.from_hf_config(
        tiny_config("qwen2", use_sliding_window=True, sliding_window=6, max_window_layers=1).to_dict()
    )
    assert qwen.architecture == "qwen2" and qwen.qkv_bias and not qwen.o_bias and qwen.tie_word_embeddings
    assert (qwen.window(0), qwen.window(1)) == (None, 6)
    llama = ModelConfig.from_hf_config(tiny_config("llama").to_dict())
    assert (llama.num_heads, llama.num_kv_heads, llama.head_dim, llama.window(0)) == (4, 2, 16, None)
    assert llama.bos_token_id == 1 and llama.eos_token_ids == (2,)
    legacy = {
        "model_type": "llama",
        "vocab_size": 10,
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "rope_theta": 1234.0,
        "rope_scaling": {"type": "linear", "factor": 2.0},
        "eos_token_id": [2, 3],
    }
    old = ModelConfig.from_hf_config(legacy)
    assert (old.rope.theta, old.rope.rope_type, old.rope.factor, old.num_kv_heads, old.eos_token_ids) == (
        1234.0,
        "linear",
        2.0,
        2,
        (2, 3),
    )
    qwen3 = ModelConfig.from_hf_config(tiny_config("qwen3").to_dict())
    assert (qwen3.head_dim, qwen3.qk_norm, qwen3.qkv_bias, qwen3.window(1), qwen3.attn_scale) == (
        32,
        True,
        False,
        None,
        32**-0.5,
    )
    with pytest.raises(ValueError, match=r"model_type='gpt2'.*GPT2LMHeadModel.*llama, mistral, qwen2, qwen3, gemma3"):
        ModelConfig.from_hf_config({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ValueError, match="rope type 'yarn'"):
        ModelConfig.from_hf_config({**legacy, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})


def test_loader_refuses_broken_folders(tmp_path):
    folder = make_tiny_model(tmp_path / "m", "llama")
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ValueError, match="model.safetensors"):
        load_model(folder, "cpu", torch.float32)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no weights"):
        load_model(folder, "cpu", torch.float32)
    (folder / "pytorch_model.bin").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="pytorch_model.bin"):
        load_model(folder, "cpu", torch.float32)
    (folder / "config.json").unlink()
    with pytest.raises(ValueError, match="config.json"):
        load_model(folder, "cpu", torch.float32)


def test_loader_reads_pytorch_bin_and_names_missing_tensors(tmp_path):
    from safetensors.torch import load_file

    folder = make_tiny_model(tmp_path / "m", "llama")
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    model, _ = load_model(folder, "cpu", torch.float32)
    torch.testing.assert_close(model.model.norm.weight, state["model.norm.weight"])
    del state["model.layers.1.mlp.up_proj.weight"]
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(folder, "cpu", torch.float32)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(
        json.dumps({**cfg, "model_type": "falcon", "architectures": ["FalconForCausalLM"]})
    )
    with pytest.raises(ValueError, match="falcon"):
        load_model(folder, "cpu", torch.float32)
