"""The toy decoder shape of the CPU tests and smoke runs: one source for `bench.random_checkpoint`'s tiny-llama
and `tests/tiny_models.py`'s Hugging Face configs, each adding the fields its models differ in."""

TINY = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)
