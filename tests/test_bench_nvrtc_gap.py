"""bench/nvrtc_gap.py's CPU side: the variants it builds and the table it prints (the builds and the GPU part run on
the device; `python -m bench.nvrtc_gap --dry-run` builds the cubins on a CPU)."""

from __future__ import annotations

from pathlib import Path

from bench import nvrtc_gap


def test_variants_follow_the_toolkit_and_the_previous_sources():
    names = [v.name for v in nvrtc_gap.variants(None, None)]
    assert names[0] == "nvrtc" and all(n.startswith("nvrtc") for n in names)
    with_all = nvrtc_gap.variants(Path("/prev"), "/usr/bin/nvcc")
    by_name = {v.name: v for v in with_all}
    assert by_name["nvcc"].compiler == "nvcc" and by_name["prev nvcc"].source_dir == Path("/prev")
    assert by_name["prev nvrtc"].compiler == "nvrtc" and by_name["nvrtc xvec"].options == (
        "--extra-device-vectorization",
    )


def test_table_compares_with_nvcc_and_marks_same_code():
    res = {
        "device": "H100",
        "nvrtc": "NVRTC 13.0",
        "nvcc_version": "13.0",
        "variants": {
            "nvrtc": {
                "sass": 3744,
                "registers": 64,
                "spill_bytes": 0,
                "decode_tok_s": [330.0, 334.0, 332.0],
                "kernel_us": {"qkv": 9.5, "o": 4.1, "gate_up": 15.2, "down": 6.0},
            },
            "nvrtc xvec": {"same_as": "nvrtc"},
            "nvcc": {"sass": 3192, "registers": 64, "spill_bytes": 0, "decode_tok_s": [336.0, 332.0]},
            "prev nvrtc": {"error": "RuntimeError: boom"},
        },
    }
    text = nvrtc_gap.table(res)
    rows = {line.split("  ")[0].strip(): line for line in text.splitlines()[2:]}
    assert "0.994" in rows["nvrtc"]  # median 332 / median(336, 332) = 332 / 334
    assert "= nvrtc (same SASS)" in rows["nvrtc xvec"] and "332.0" in rows["nvrtc xvec"]
    assert "ERROR RuntimeError: boom" in rows["prev nvrtc"] and "15.20" in rows["nvrtc"]
