"""The files Athena reads and writes, shared by the quantizer and the runtime (which never import each other).

- `checkpoint`, `layers`, `bits`: the compressed checkpoint (FORMAT.md): folder, athena.json, quantized layers,
  bit-packed integers;
- `config`, `generation_defaults`: a model folder's config.json (the decoder architecture, RoPE) and
  generation_config.json (sampling defaults);
- `source`, `gguf_import`, `chat_templates`: source models (Hugging Face folders, GGUF files converted once);
- `text`: calibration and evaluation text (.txt / .jsonl, token windows);
- `native_build`: C sources compiled once into cached shared libraries (CPU kernels, compiled k-means);
- `environment`: every `ATHENA_*` override of the quantizer, the runtime and the benchmarks, read in one place.

Nothing here imports the rest of `athena_runtime` or `quantize` (tests/test_import_graph.py checks it).
"""
