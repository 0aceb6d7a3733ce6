"""bench/quality_ablation.py end to end on a tiny model (what `bash bench/gpu_suite.sh ablation` runs on a GPU),
and the files its `carry` step writes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny_model, write_text

from bench import quality_ablation as qa


@pytest.mark.slow
@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")],
        ),
    ],
)
def test_quantize_eval_table_on_a_tiny_model(tmp_path, device):
    """The GPU stage's steps with tiny settings: reference, two quantizations in parallel processes, eval, table."""
    model = make_tiny_model(tmp_path / "m", "llama", hidden_size=128, intermediate_size=256)
    held = write_text(tmp_path / "held.txt", (40, 60))
    calib = write_text(tmp_path / "calib.txt", (0, 30))
    out = tmp_path / "abl"
    common = ["--out", str(out), "--device", device, "--seqlen", "128"]
    assert qa.main(["reference", "--model", str(model), "--heldout", str(held), "--max-tokens", "512"] + common) == 0
    names = ["rtn-4b-g128", "athena-budget-4.0"]
    quant = ["--model", str(model), "--calib", str(calib), "--calib-windows", "4", "--calib-seqlen", "32"]
    quant += ["--jobs", "2"]
    assert qa.main(["quantize", *names, *quant, *common]) == 0
    for n in names:  # one process each, all finished
        meta = json.loads((out / n / "athena.json").read_text())
        assert meta["calibration"]["files"] == [str(calib)] and meta["calibration"]["nsamples"] == 4
        assert meta["device"].startswith(device)
    assert json.loads((out / "athena-budget-4.0" / "athena.json").read_text())["allocation"]["planned_bits"] <= 4.0
    # a second call finds them done (no new quantization)
    again = qa.quantize_configs(names[:1], out, argparse.Namespace(jobs=1, model=model))
    assert again[0].get("skipped") == "done already"
    assert qa.main(["eval", *(str(out / n) for n in names)] + common) == 0
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert [r["name"] for r in rows] == ["reference", *names]
    ref = rows[0]
    assert ref["kl"] == pytest.approx(0.0, abs=1e-6) and ref["top1"] == 1.0 and ref["tokens"] == 4 * 127
    for r in rows[1:]:
        assert r["kl"] > 0 and 0 < r["top1"] <= 1 and r["tokens"] == ref["tokens"] and r["device"].startswith(device)
    by = {r["name"]: r for r in rows}
    assert by["rtn-4b-g128"]["kl"] < 0.2 and by["rtn-4b-g128"]["bits"] == pytest.approx(4.25, abs=0.3)
    text = qa.main(["table"] + common[:2])
    assert text == 0
    table = (out / "table.md").read_text()
    assert all(f"| {n} |" in table for n in names) and "reference perplexity" in table
    assert f"| reference (the source's weights, fp16) | 16 | {ref['ppl']:.3f} | 1.000x |" in table


def test_unknown_configuration_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="unknown configuration"):
        qa.main(["quantize", "no-such-run", "--out", str(tmp_path)])


def test_carry_writes_parts_that_rebuild_the_gguf(tmp_path, monkeypatch):
    """The GGUF in parts of at most GGUF_PART_BYTES whose concatenation is the file; held-out and calibration
    text; the gguf wheel."""
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(torch.randint(0, 256, (qa.GGUF_PART_BYTES // 1024 + 7,), dtype=torch.uint8).numpy().tobytes())
    monkeypatch.setattr(qa, "GGUF_PART_BYTES", 1024)
    import quantize.embedded

    monkeypatch.setattr(quantize.embedded, "embedded_gguf_path", lambda: gguf)
    import bench.quantize_quality as qq

    docs = tmp_path / "docs"
    for d in qq.HELDOUT_DIRS:
        (docs / d).mkdir(parents=True)
        (docs / d / "a.rst.txt").write_text(f"held-out {d}\n")
    monkeypatch.setattr(qq, "DOC_ROOT", docs)
    carry = tmp_path / "carry"
    written = qa.write_carry(carry)
    parts = sorted(carry.glob("smol.part*"), key=lambda p: int(p.name[len("smol.part") :]))
    assert len(parts) == 1 + gguf.stat().st_size // 1024 and all(p.stat().st_size <= 1024 for p in parts)
    assert b"".join(p.read_bytes() for p in parts) == gguf.read_bytes()
    assert (carry / "abl" / "heldout.txt").read_text().startswith("held-out")
    assert len((carry / "abl" / "calib.txt").read_text()) > 100_000
    assert any(Path(p).name.startswith("gguf-") and Path(p).suffix == ".whl" for p in written)


def test_finetune_configurations_build_finetune_jobs(tmp_path):
    """The ablation's --finetune rows quantize at budget 3.0 with FinetuneConfig's defaults (recorded in the job's
    identity, so a resumed run of another configuration cannot continue them); the rows without it stay plain."""
    from bench.quantize_quality import CONFIGS, config_job
    from quantize.finetune import FinetuneConfig

    assert all(name in CONFIGS for name in qa.ABLATION)
    model = tmp_path / "model.gguf"
    ft = config_job("athena-budget-3.0-finetune", model, tmp_path / "a", "cpu")
    assert ft.finetune == FinetuneConfig() and ft.budget.target_bits == 3.0 and not ft.athena.row_scale
    assert ft.identity()["recipe"]["finetune"]["steps"] == FinetuneConfig().steps
    short = config_job("athena-budget-3.0-finetune-20steps", model, tmp_path / "s", "cpu")
    assert short.finetune == FinetuneConfig(steps=20) and short.budget.target_bits == 3.0
    short_both = config_job("athena-budget-3.0-rowscale-finetune-20steps", model, tmp_path / "sb", "cpu")
    assert short_both.finetune == FinetuneConfig(steps=20) and short_both.athena.row_scale
    both = config_job("athena-budget-3.0-rowscale-finetune", model, tmp_path / "b", "cpu")
    assert both.finetune == FinetuneConfig() and both.athena.row_scale and both.budget.target_bits == 3.0
    for name in ("athena-budget-3.0", "athena-budget-3.0-rowscale", "gptq-3b-g128"):
        job = config_job(name, model, tmp_path / name, "cpu")
        assert job.finetune is None and "finetune" not in job.identity()["recipe"]
