"""Diagnostic (GPU): int4 logits error vs HF fp32 on the tiny Mistral model of the runner tests, with the
KV write through the Triton kernel or the PyTorch reference, and attention through the Triton decode kernel
or the reference. Eager (no CUDA graphs). Usage: python -m bench.diag.int4_gpu_check"""
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
import test_model_runner as T  # noqa: E402

from athena_runtime import kv_cache as KC  # noqa: E402
from athena_runtime.batch import SequenceChunk  # noqa: E402
from athena_runtime.kernels import paged_attention as PA  # noqa: E402
from athena_runtime.model_runner import ModelRunner  # noqa: E402


def main():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    folder = T.make_tiny_model(Path(tempfile.mkdtemp()) / "mistral", "mistral", **T.FAMILIES["mistral"])
    prompts = [T._tokens(n, seed=n) for n in (5, 9, 14)]
    want = [T._hf_logits(folder, p) for p in prompts]
    scale = max(w.abs().max().item() for w in want)
    orig_write, orig_dec = KC.KVCache.write, PA.paged_attention_decode
    for fmt in ("fp16", "int8", "int4"):
        for kern_write in (False, True):
            for kern_attn in (False, True):
                KC.KVCache.write = lambda self, *a, _m=kern_write: orig_write(self, *a, use_triton=_m if dev == "cuda" else False)
                PA.paged_attention_decode = orig_dec if kern_attn else PA.paged_attention_reference
                r = ModelRunner.from_path(folder, kv_format=fmt, kv_group_size=16, block_size=4, num_blocks=64,
                                          device=dev, use_cuda_graphs=False)
                tables = [list(range(i * 16, i * 16 + 16)) for i in range(3)]
                r.execute([SequenceChunk(p[:-4], 0, t) for p, t in zip(prompts, tables)])
                errs = []
                for step in range(4):
                    chunks = [SequenceChunk([p[len(p) - 4 + step]], len(p) - 4 + step, t) for p, t in zip(prompts, tables)]
                    a = r.execute(chunks).float().cpu()
                    errs += [(a[i] - want[i][len(p) - 4 + step]).abs().max().item() / scale for i, p in enumerate(prompts)]
                print(f"{fmt:5s} write={'kernel' if kern_write else 'ref   '} attn={'kernel' if kern_attn else 'ref   '} "
                      f"max err {max(errs):.3f} mean {sum(errs) / len(errs):.3f}", flush=True)


if __name__ == "__main__":
    main()
