#!/usr/bin/env bash
# Issue 18 on the lent GPU, one call (~9 min): the CUDA PQ kernels with NO CUDA toolkit visible (CUDA_HOME unset,
# nvcc and the toolkit's libraries off PATH / LD_LIBRARY_PATH, an empty kernel cache) against the toolkit build of
# the code before the change (.baseline/: `git archive 0dc087f`, its load_inline extensions built by nvcc).
#   bash bench/nvrtc_check.sh        -> $OUT/*.txt and a short table last
set -uo pipefail
OUT=${OUT:-out/nvrtc}; mkdir -p "$OUT" /tmp/w
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD
PY=$(command -v python3)  # resolved before PATH is stripped
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
# the toolkit hidden: every PATH / LD_LIBRARY_PATH entry that holds nvcc or the toolkit's NVRTC goes (the driver stays)
strip() { echo "$1" | tr ':' '\n' | while read -r d; do [ -n "$d" ] && [ ! -x "$d/nvcc" ] && ! ls "$d"/libnvrtc.so* >/dev/null 2>&1 && echo "$d"; done | paste -sd:; }
HIDE=(env -u CUDA_HOME -u CUDA_PATH PATH="$(strip "$PATH")" LD_LIBRARY_PATH="$(strip "${LD_LIBRARY_PATH:-}")"
      ATHENA_KERNEL_CACHE=/tmp/athena-kernels-empty PYTHONPATH=/tmp/site:$PWD)
rm -rf /tmp/athena-kernels-empty
"${HIDE[@]}" "$PY" -c "import os, shutil; print('hidden runs: nvcc on PATH:', shutil.which('nvcc'), '| CUDA_HOME:', os.environ.get('CUDA_HOME'))" 2>&1 | tee $OUT/hidden_env.txt

# baseline builds (toolkit visible, old code) in the background while the hidden runs use the GPU for tests
if [ -d .baseline ]; then
  (cd .baseline && for m in pq_cuda pq_cuda_frag pq_cuda_dequant pq_cuda_fold; do
     MAX_JOBS=3 ATHENA_CUDA_CACHE=/tmp/oldcache PYTHONPATH=/tmp/site:$PWD timeout 300 python3 -c \
       "import time; t=time.time(); from athena_runtime.kernels import $m; $m.EXTENSION.load(); print('$m built', round(time.time()-t, 1), 's')" &
   done; wait) > $OUT/baseline_build.txt 2>&1 &
  BUILD=$!
fi

el "first use, toolkit hidden, empty cache"
"${HIDE[@]}" timeout 120 "$PY" -m bench.nvrtc_first_use --json > $OUT/first_use.txt 2>&1; grep -v "^{" $OUT/first_use.txt | grep -v " INFO " | tail -8
el "GPU tests, toolkit hidden"
"${HIDE[@]}" timeout ${TESTS_S:-250} "$PY" -m pytest -q -p no:cacheprovider -m gpu tests -rfE > $OUT/gpu_tests.txt 2>&1
tail -3 $OUT/gpu_tests.txt
el "7B decode, toolkit hidden"
"${HIDE[@]}" timeout 150 "$PY" -m bench.decode --workdir /tmp/w --skip-hf --json > $OUT/decode_nvrtc.txt 2>$OUT/decode_nvrtc.err
grep -E "path|PQ|fp16" $OUT/decode_nvrtc.txt | head -4; grep -c "WARNING" $OUT/decode_nvrtc.err | sed 's/^/decode WARNING lines: /'
grep -E "PQLinear \[" $OUT/decode_nvrtc.err | sort -u | head -12
if [ "${TABLES:-1}" = 1 ]; then  # TABLES=0: tests and decode only (a short call)
el "kernel table, toolkit hidden"
"${HIDE[@]}" timeout 140 "$PY" bench/kernels.py --out $OUT/k_nvrtc --plan summary --no-checks --budget 125 \
   --commit "${COMMIT:-unknown}" > $OUT/kernels_nvrtc.txt 2>&1; tail -3 $OUT/kernels_nvrtc.txt
fi
if [ -d .baseline ]; then
  el "baseline (toolkit build of 0dc087f): waiting for its nvcc builds"; wait $BUILD; cat $OUT/baseline_build.txt | grep built
  (cd .baseline && ATHENA_CUDA_CACHE=/tmp/oldcache PYTHONPATH=/tmp/site:$PWD timeout 150 python3 -m bench.decode \
     --workdir /tmp/w --skip-hf --json > $OUT/decode_toolkit.txt 2>$OUT/decode_toolkit.err)
  if [ "${TABLES:-1}" = 1 ]; then el "baseline kernel table"
  (cd .baseline && ATHENA_CUDA_CACHE=/tmp/oldcache PYTHONPATH=/tmp/site:$PWD timeout 140 python3 bench/kernels.py \
     --out $OUT/k_toolkit --plan summary --no-checks --budget 125 > $OUT/kernels_toolkit.txt 2>&1); fi
fi
el "done"
python3 - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
def load(p):
    try: return json.loads(p.read_text())
    except Exception: return None
def tok(p):
    for line in (p.read_text().splitlines() if p.exists() else []):
        if line.startswith("{"):
            r = json.loads(line); return {x["path"]: x["tok_s"] for x in r.get("rows", [])}
    return {}
fu = [l for l in (out / "first_use.txt").read_text().splitlines() if l.startswith("{")] if (out / "first_use.txt").exists() else []
fu = json.loads(fu[-1]) if fu else {}
print("\n==== CUDA kernels without the toolkit (NVRTC) vs the toolkit build of 0dc087f ====")
print(open(out / "hidden_env.txt").read().strip())
print(f"first use (NVRTC, empty cache): {fu.get('first_use_s')} s for 4 7B shapes; {fu.get('compiled')} cubins; again {fu.get('again_s')} s")
t = (out / "gpu_tests.txt").read_text().splitlines() if (out / "gpu_tests.txt").exists() else []
print("GPU tests (toolkit hidden):", t[-1] if t else "not run")
a, b = tok(out / "decode_nvrtc.txt"), tok(out / "decode_toolkit.txt")
for k in sorted(set(a) | set(b)):
    r = f"{a[k] / b[k]:.3f}" if k in a and k in b else "-"
    print(f"decode {k:32s} hidden {a.get(k, float('nan')):7.1f} tok/s | toolkit {b.get(k, float('nan')):7.1f} | ratio {r}")
ka, kb = load(out / "k_nvrtc" / "kernels.json"), load(out / "k_toolkit" / "kernels.json")
rows = {}
for tag, k in (("h", ka), ("t", kb)):
    for r in (k or {}).get("timings", []):
        if "us" in r and r["variant"] in ("PQLinear", "cublas"):
            rows.setdefault((r["T"], tuple(r["shape"]), r["variant"], r.get("lowrank")), {})[tag] = r.get("graph_us", r["us"])
print("kernel table, µs (graph replay where measured): T shape variant lowrank | hidden | toolkit | hidden/toolkit")
for key in sorted(rows):
    v = rows[key]; h, tk = v.get("h"), v.get("t")
    print(f"  {key[0]:5d} {key[1][0]:5d}x{key[1][1]:<5d} {key[2]:9s} {str(key[3])[0]} | {h if h is None else round(h, 1)} | "
          f"{tk if tk is None else round(tk, 1)} | {'-' if not (h and tk) else round(h / tk, 3)}")
PY
