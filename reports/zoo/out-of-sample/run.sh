R=$HOME/.cache/lora-audit/demo/smollm2/released-93ad94375064
T="/tmp/oos/abl-window2-0.6 /tmp/oos/abl-all-0.4-full /tmp/oos/random-equal-norm /tmp/oos/lora-r16-lr5e-4"
N="--name abl-window2-0.6 --name abl-all-0.4-full --name random-equal-norm --name lora-r16-lr5e-4"
export PYTHONPATH=/work/wt/zoorun
PY=/work/main/.venv/bin/python
$PY -m lora_audit.cli safety-scan $R $T --weights-only --json /tmp/oos/scan-w.json --device cpu -q > /tmp/oos/scan-w.log 2>&1; echo scan-w $?
$PY -m lora_audit.cli safety-scan $R $T --json /tmp/oos/scan.json --device cpu -q > /tmp/oos/scan.log 2>&1; echo scan $?
$PY -m lora_audit.cli safety-eval $R $T --tasks none --benign none --max-new-tokens 32 --json /tmp/oos/eval.json --device cpu -q > /tmp/oos/eval.log 2>&1; echo eval $?
