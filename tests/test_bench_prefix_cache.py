"""`athena bench prefix-cache` on the tiny model (CPU): it runs, and turn 2 starts on turn 1's blocks only
with the cache on."""

from __future__ import annotations

import json


def test_bench_prefix_cache_on_a_tiny_model(tmp_path, capsys):
    from tiny_models import make_tiny_model

    from bench.cli import BENCHMARKS
    from bench.prefix_cache import main

    assert BENCHMARKS["prefix-cache"][0] == "bench.prefix_cache"
    folder = make_tiny_model(tmp_path / "llama", "llama")
    assert (
        main(
            [
                "--model",
                str(folder),
                "--device",
                "cpu",
                "--context",
                "70",
                "--answer",
                "5",
                "--new",
                "3",
                "--repeats",
                "2",
                "--json",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    on, off = result["modes"]["on"]["runs"], result["modes"]["off"]["runs"]
    assert [r["turn2_cached_tokens"] for r in on] == [64, 64]  # turn 1's 66 computed tokens: 4 full blocks
    assert [r["turn2_cached_tokens"] for r in off] == [0, 0]
    assert all(r["turn2_prompt_tokens"] == 70 and r["turn2_ttft_s"] > 0 < r["turn2_ttft_cpu_s"] for r in on + off)
    assert result["speedup"] > 0
