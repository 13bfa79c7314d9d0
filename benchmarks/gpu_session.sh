#!/bin/bash
# How the GPU-budget rows of BENCHMARKS.md were made inside a short GPU lease (one H200, 2026-11-30):
#   BUDGET_S=540 TAR=path/to/cifar10-jpg.tar.gz bash benchmarks/gpu_session.sh
# 1. in the background, every image method for a few steps on CUDA (final kNN included), the CUDA
#    masking test, and a CUDA checkpoint + resume;
# 2. CIFAR-10 extracted and decoded once;
# 3. a PROBE_STEPS-step speed probe of the runs, all at once, sizing each run's epochs to what is left
#    of BUDGET_S seconds (at most MAX_EPOCHS);
# 4. the runs: `knn_table.py --budget gpu` per method, side by side; rows go to
#    benchmarks/results/knn_rows_gpu (the I-JEPA lr variant to knn_rows_gpu_ijepa_lr).
# Logs and rows are packed into $OUT (default /tmp/gpu_session). A run that overruns its share is cut
# off and writes no row (BEiT's did on 2026-11-30; it was rerun alone with --epochs 30).
# env: BUDGET_S, TAR, C10 (where to extract), SMOKE_STEPS, SMOKE_METHODS, PROBE_STEPS, MAX_EPOCHS, RUNS,
#      ROWS (rows directory), XTRA (overrides for every probe and run), N_TRAIN (training images, for the epoch sizing), PY
set -u
cd "$(dirname "$0")/.."  # the repo root: configs/, benchmarks/ and src/ are read from there
C10=${C10:-/tmp/c10}
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
BUDGET_S=${BUDGET_S:-500}; PROBE_STEPS=${PROBE_STEPS:-40}; MAX_EPOCHS=${MAX_EPOCHS:-200}
PY=${PY:-python3}
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 SELFSUP_CACHE_DIR=/tmp/sscache
OUT=${OUT:-/tmp/gpu_session}; L=$OUT/logs; mkdir -p $L
R=benchmarks/results
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; free -g | head -2
  $PY -c "import torch,timm,torchvision,sklearn;print(torch.__version__,timm.__version__,torchvision.__version__,sklearn.__version__,torch.cuda.is_available())"; } > $L/env.txt 2>&1
# 1. in the background: every image method for a few steps on the GPU (embedded data, final kNN on), then resume
rm -rf /tmp/probe /tmp/smoke /tmp/res
( for m in ${SMOKE_METHODS:-$(ls configs | grep -v '^_')}; do
    timeout 120 $PY -m selfsup pretrain --config configs/$m/cifar10.yaml --out /tmp/smoke trainer.run_name=$m \
      data.source=embedded trainer.max_steps=${SMOKE_STEPS:-3} trainer.progress=false data.batch_size=64 \
      trainer.ckpt_every=0 > $L/smoke_$m.log 2>&1
    echo "$m rc=$? t=$(el)" >> $L/smoke.txt
  done
  timeout 60 $PY -m pytest -q -p no:warnings tests/test_masking.py -k cuda > $L/pytest_cuda.log 2>&1; echo "pytest rc=$?" >> $L/smoke.txt
  ( timeout 90 $PY -m selfsup pretrain --config configs/mocov2/cifar10.yaml --out /tmp/res trainer.run_name=r \
      data.source=embedded data.limit=512 data.batch_size=64 trainer.epochs=4 trainer.ckpt_every=1 trainer.max_steps=12 \
      trainer.progress=false eval.final_knn=false &&
    timeout 90 $PY -m selfsup pretrain --resume /tmp/res/r trainer.max_steps=null trainer.progress=false ) > $L/resume.log 2>&1
  echo "resume rc=$? t=$(el)" >> $L/smoke.txt ) &
SMOKE=$!
# 2. data: extract and decode once (the runs below then read the decoded cache)
[ -d $C10/train ] || { mkdir -p $C10 && tar xzf ${TAR:-../shared/data/cifar10-jpg.tar.gz} -C $C10; }
$PY -c "from selfsup.data import load_dataset as l; print(l('$C10','train'), l('$C10','test'))" > $L/decode.log 2>&1
echo "data ready t=$(el)" >> $L/times.txt
# 3. probe: the runs below, all at once for PROBE_STEPS steps, to size each run's epochs to the time left
G="--data $C10 --batch-size 512 --budget gpu --jobs 4"
declare -A EXTRA=( [mae]="" [beit]="" [ijepa]="" [jigsaw]="" [ijepa_lr]="optim.lr=2.5e-4" )
declare -A NAME=( [mae]=mae [beit]=beit [ijepa]=ijepa [jigsaw]=jigsaw [ijepa_lr]=ijepa )
RUNS=${RUNS:-"mae beit ijepa jigsaw ijepa_lr"}
for r in $RUNS; do
  m=${NAME[$r]}
  OMP_NUM_THREADS=4 timeout 120 $PY -m selfsup pretrain --config configs/$m/cifar10.yaml --out /tmp/probe trainer.run_name=$r \
    data.source=$C10 data.batch_size=512 trainer.max_steps=$PROBE_STEPS trainer.progress=false trainer.ckpt_every=0 \
    eval.final_knn=false ${EXTRA[$r]} ${XTRA:-} > $L/probe_$r.log 2>&1 &
done
wait $(jobs -p | grep -v "^$SMOKE$") 2>/dev/null
echo "probe done t=$(el)" >> $L/times.txt
# 4. the runs, each with the epochs its probe speed fits into what is left (minus ~60 s for loading and the two kNNs)
LEFT=$(( BUDGET_S - $(el) - 20 ))
for r in $RUNS; do
  m=${NAME[$r]}
  E=$($PY - "$r" "$LEFT" "$MAX_EPOCHS" "${N_TRAIN:-50000}" <<'PYEOF'
import json, sys
r, left, cap = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
try:
    s = json.load(open(f"/tmp/probe/{r}/summary.json"))
    ips = s["timings"]["images_per_second"]
except Exception:
    print(0); raise SystemExit
print(max(0, min(cap, int((left - 60) * ips / int(sys.argv[4])))))
PYEOF
)
  echo "$r epochs=$E left=$LEFT" >> $L/times.txt
  [ "$E" -ge 2 ] || continue
  rows=${ROWS:-$R/knn_rows_gpu}; [ "$r" = ijepa_lr ] && rows=${rows}_ijepa_lr
  OMP_NUM_THREADS=4 timeout $LEFT $PY benchmarks/knn_table.py $G --epochs $E --methods $m --rows $rows \
    --out /tmp/table_$r.md ${EXTRA[$r]} ${XTRA:-} > $L/run_$r.log 2>&1 &
done
wait $(jobs -p | grep -v "^$SMOKE$") 2>/dev/null
echo "runs done t=$(el)" >> $L/times.txt
kill $SMOKE 2>/dev/null
for d in /tmp/probe/*/; do cp $d/summary.json $L/probe_$(basename $d).json 2>/dev/null; done
tar czf $OUT/rows.tgz ${ROWS:-$R/knn_rows_gpu}* 2>/dev/null
tar czf $OUT/logs.tgz -C $OUT logs && rm -rf $L
echo "end t=$(el)"
