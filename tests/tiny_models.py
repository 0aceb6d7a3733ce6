"""Tiny random-weight Hugging Face models (Llama, Mistral, Qwen2, Qwen3, Gemma 3) with a small offline tokenizer."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from bench.tiny_shape import TINY

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    """A byte-level BPE (vocab 384) trained on a slice of pydoc_data.topics — offline, ~1 s."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = [topics[k] for k in sorted(topics)[:60]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text, trainer)
    return tok.to_str()


# Each family's chat format (written here after the released templates' output), for the server tests. Mistral's
# first template has no system role (it raises), Qwen2's adds a default system prompt, Gemma's is quantize's own.
FAMILY_CHAT_TEMPLATES = {
    "llama": (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for m in messages %}"
        "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
        "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}"
        "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
        "{% endfor %}"
    ),
    "qwen2": (
        "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "{% endif %}" + CHAT_TEMPLATE
    ),
    "qwen3": CHAT_TEMPLATE,
}


def family_chat_template(family: str) -> str:
    if family == "gemma3":
        from athena_runtime.format.chat_templates import GEMMA_TEMPLATE

        return GEMMA_TEMPLATE
    return FAMILY_CHAT_TEMPLATES[family]


def save_tokenizer(folder: Path, chat_template: str = CHAT_TEMPLATE):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tok.chat_template = chat_template
    tok.save_pretrained(folder)
    return tok


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3")


def tiny_config(family: str, **overrides):
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(TINY, vocab_size=384, intermediate_size=96, max_position_embeddings=256)  # the tokenizer's 384
    if family == "llama":
        cfg = LlamaConfig(**{**common, "rope_theta": 10000.0, **overrides})
    elif family == "mistral":
        cfg = MistralConfig(**{**common, "sliding_window": 16, **overrides})
    elif family == "qwen2":
        cfg = Qwen2Config(**{**common, "tie_word_embeddings": True, **overrides})
    elif family == "qwen3":  # head_dim 32 != hidden / heads: read from the config, not derived
        cfg = Qwen3Config(**{**common, "head_dim": 32, **overrides})
    elif family == "gemma3":  # sliding, global, sliding; local and global RoPE bases differ; head_dim 32
        gemma = dict(
            common,
            head_dim=32,
            tie_word_embeddings=True,
            sliding_window=5,
            query_pre_attn_scalar=24,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            num_hidden_layers=3,
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 50000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
            },
            final_logit_softcapping=3.0,
            rms_norm_eps=1e-6,
            pad_token_id=0,
        )
        cfg = Gemma3TextConfig(**{**gemma, **overrides})
    else:
        raise ValueError(family)
    return cfg


def make_tiny_model(folder: Path, family: str = "llama", seed: int = 0, **overrides) -> Path:
    """Save a random tiny model of `family` (+ tokenizer) into `folder`; return it."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides))
    # Larger-than-init weights so quantization error and attention patterns are not negligible.
    # Norm weights moved off their init (ones, or Gemma's zeros for 1 + w) so a wrong norm formula shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
            elif name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(folder)
    save_tokenizer(folder)
    return folder


def write_text(path: Path, n_topics: tuple[int, int] = (60, 90)) -> Path:
    from pydoc_data.topics import topics

    keys = sorted(topics)[n_topics[0] : n_topics[1]]
    path.write_text("\n\n".join(topics[k] for k in keys))
    return path
