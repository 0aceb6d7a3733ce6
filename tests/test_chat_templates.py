"""Each family's chat format through the server on the real engine (tiny random models of each family, CPU): the
prompt the engine receives is the family's rendering of the conversation; a system prompt the template has no role
for (Mistral's first template) is folded into the first user turn, as Gemma's own template does."""

from __future__ import annotations

import jinja2
import openai
import pytest
from server_fixtures import serve_engine
from tiny_models import FAMILIES, family_chat_template, make_tiny_model, save_tokenizer

from athena_runtime.chat_prompt import fold_system_prompt, render_chat

SYSTEM, USER, ASSISTANT, USER2 = "Be brief.", "Hi there.", "Hello!", "Name a colour."
CONVERSATION = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": USER},
    {"role": "assistant", "content": ASSISTANT},
    {"role": "user", "content": USER2},
]


def expected_prompt(family: str, bos: str, eos: str) -> str:
    """The conversation as each family's released template renders it (with the tiny tokenizer's bos / eos)."""
    if family == "llama":
        turns = [("system", SYSTEM), ("user", USER), ("assistant", ASSISTANT), ("user", USER2)]
        return (
            bos
            + "".join(f"<|start_header_id|>{r}<|end_header_id|>\n\n{c}<|eot_id|>" for r, c in turns)
            + "<|start_header_id|>assistant<|end_header_id|>\n\n"
        )
    if family == "mistral":  # no system role: folded into the first user turn
        return f"{bos}[INST] {SYSTEM}\n\n{USER} [/INST]{ASSISTANT}{eos}[INST] {USER2} [/INST]"
    if family in ("qwen2", "qwen3"):
        turns = [("system", SYSTEM), ("user", USER), ("assistant", ASSISTANT), ("user", USER2)]
        return "".join(f"<|im_start|>{r}\n{c}<|im_end|>\n" for r, c in turns) + "<|im_start|>assistant\n"
    assert family == "gemma3"  # the system prompt opens the first user turn
    return (
        f"{bos}<start_of_turn>user\n{SYSTEM}\n\n{USER}<end_of_turn>\n<start_of_turn>model\n{ASSISTANT}"
        f"<end_of_turn>\n<start_of_turn>user\n{USER2}<end_of_turn>\n<start_of_turn>model\n"
    )


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat_families")
    out = {}
    for family in FAMILIES:
        folder = make_tiny_model(root / family, family)
        save_tokenizer(folder, family_chat_template(family))
        out[family] = folder
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_family_chat_template_through_the_server(folders, family):
    from athena_runtime.engine import AsyncEngine
    from athena_runtime.engine_settings import EngineSettings

    engine = AsyncEngine.from_path(
        folders[family],
        EngineSettings(device="cpu", use_cuda_graphs=False, max_model_len=256, num_blocks=64, max_num_seqs=2),
        model_name=family,
    )
    seen: list[list[int]] = []
    submit = engine.submit

    def spy(requests):  # the server admits a request's choices together through submit()
        seen.extend(list(prompt) for _, prompt, _ in requests)
        return submit(requests)

    engine.submit = spy
    server = serve_engine(engine)
    try:
        with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60) as client:
            r = client.chat.completions.create(model=family, messages=CONVERSATION, max_tokens=3, temperature=0)
            if family == "mistral":  # refused for another reason than the system message: a 400, nothing folded
                with pytest.raises(openai.BadRequestError, match="alternate"):
                    client.chat.completions.create(
                        model=family,
                        max_tokens=2,
                        messages=[
                            {"role": "system", "content": SYSTEM},
                            {"role": "user", "content": "a"},
                            {"role": "user", "content": "b"},
                        ],
                    )
    finally:
        server.stop()
    tok = engine.tokenizer
    want = tok.encode(expected_prompt(family, tok.bos_token, tok.eos_token), add_special_tokens=False)
    assert seen[0] == want and r.usage.prompt_tokens == len(want)


def test_fold_system_prompt():
    assert fold_system_prompt(CONVERSATION) == [{"role": "user", "content": f"{SYSTEM}\n\n{USER}"}, *CONVERSATION[2:]]
    assert fold_system_prompt([{"role": "system", "content": "s"}]) == [{"role": "user", "content": "s"}]
    assert fold_system_prompt(CONVERSATION[1:]) == CONVERSATION[1:]


def test_render_chat_without_a_template_and_other_refusals(folders):
    from athena_runtime.format.source import load_tokenizer

    tok = load_tokenizer(folders["mistral"])
    with pytest.raises(jinja2.TemplateError, match="alternate"):  # no system message to blame: re-raised
        render_chat(tok, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    tok.chat_template = None
    assert render_chat(tok, CONVERSATION[:2]) == f"{SYSTEM}\n{USER}\n"
