#!/usr/bin/env bash
# lfqa's start script: one `accelerate launch` per machine, configured from the environment, so that the same
# script is the image's entrypoint in every pod of the Kubernetes Job and runs on a laptop too. It runs
#
#   accelerate launch --config_file $LFQA_ACCELERATE_CONFIG --num_machines $NNODES \
#       --num_processes $((NNODES * GPUS_PER_NODE)) --machine_rank $NODE_RANK \
#       --main_process_ip $MASTER_ADDR --main_process_port $MASTER_PORT \
#       [--deepspeed_multinode_launcher standard] \
#       -m lfqa.train $LFQA_JOB [cache dirs] [output.uri=$LFQA_OUTPUT_URI] [$LFQA_ARGS] [ARGS] output.dir=...
#
# Two "machines" on one host, as tests/test_k8s.py runs them:
#   NNODES=2 GPUS_PER_NODE=1 NODE_RANK=0 MASTER_ADDR=127.0.0.1 LFQA_JOB=jobs/tiny-cpu.yaml \
#       LFQA_OUTPUT_DIR=runs/node0 k8s/entrypoint.sh train.max_steps=20 &
#   NNODES=2 GPUS_PER_NODE=1 NODE_RANK=1 MASTER_ADDR=127.0.0.1 LFQA_JOB=jobs/tiny-cpu.yaml \
#       LFQA_OUTPUT_DIR=runs/node1 k8s/entrypoint.sh train.max_steps=20
#
# Environment (default). Each of the first four is read from the Kubeflow operators' variable first (Trainer v2
# sets only those; the Training Operator v1 sets them and MASTER_*, RANK, WORLD_SIZE), then the plain Job's:
#   PET_NODE_RANK, NODE_RANK, RANK (PyTorchJob), JOB_COMPLETION_INDEX (the Indexed Job), else 0: machine rank
#   PET_NNODES, NNODES, WORLD_SIZE / processes per machine, else 1: machines
#   PET_NPROC_PER_NODE, GPUS_PER_NODE, NPROC, else (or "auto", "gpu") the GPUs nvidia-smi lists, else 1:
#                                            processes per machine
#   PET_MASTER_ADDR, MASTER_ADDR (127.0.0.1); PET_MASTER_PORT, MASTER_PORT (29500): machine 0. In the Job:
#                                            <job>-0.<headless service>; PyTorchJob: <job>-master-0 (23456);
#                                            TrainJob: <trainjob>-node-0-0.<trainjob> (29500)
#   WORLD_SIZE, when set, must equal machines x processes (a mismatch would train at another world size)
#   LFQA_ACCELERATE_CONFIG (accelerate_configs/multi-node.yaml), LFQA_JOB (/etc/lfqa/job.yaml)
#   LFQA_OUTPUT_DIR (the job's output.dir)   local run folder (an emptyDir in the pod)
#   LFQA_OUTPUT_URI (none)                   s3://bucket/prefix for checkpoints and the final model
#   LFQA_CACHE_DIR (none: the job's)         model.cache_dir and data.cache_dir go below it
#   LFQA_ARGS (none)                         more key=value overrides, split on spaces; the script's own
#                                            arguments come after them (and win)
#   LFQA_MASTER_WAIT_SECONDS (600)           how long to wait for MASTER_ADDR to resolve (a pod's DNS name
#                                            appears a little after the pod); 0: do not wait
#   LFQA_PREEMPTED_EXIT_CODE (75)            what a preempted trainer exits with (below); PyTorchJob: 143
#   LFQA_LAUNCHER ("accelerate launch"), LFQA_PYTHON (python)
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT (torch's default, 30)
# A first argument that is not a key=value override is run as a command instead (`docker run IMAGE bash`,
# `docker run IMAGE lfqa eval --model ...`).
#
# Exit status: the launcher's, except
#   2   the job file, its overrides or this environment are wrong (checked before anything starts; also
#       accelerate's own usage errors): the Job's podFailurePolicy fails the Job at once, a retry cannot help;
#   75  EX_TEMPFAIL (LFQA_PREEMPTED_EXIT_CODE): the trainer was stopped by SIGTERM, checkpointed and asks to be
#       restarted; the Job's (and the TrainingRuntime's) podFailurePolicy ignores it (a preemption does not count
#       against backoffLimit); a PyTorchJob's restartPolicy ExitCode retries 128-255 only, hence 143 there.
#       `accelerate launch` with several processes runs torch elastic, which reports a worker's 75 as 1, so 75
#       is recovered from the preempted.json that the trainer writes into output.dir: one newer than this
#       launch means preempted.
#
# Signals: SIGTERM and SIGINT go to the launcher's process group (it runs in its own session). torch
# elastic's agent catches them and forwards them to the workers (each in a session of its own, so only the
# agent's copy reaches them), waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds, then SIGKILLs the workers still
# alive. That timeout must cover the trainer's last step, checkpoint and upload; the pod's
# terminationGracePeriodSeconds must cover the timeout. Without torch elastic (one process), accelerate dies
# at once and the trainer, in the same group, gets the signal directly: the script waits for the whole group.
set -euo pipefail

log() { echo "lfqa-entrypoint: $*" >&2; }
usage_error() { log "error: $*"; exit 2; }

# Until the launcher runs, a signal simply ends the script (as PID 1 without a handler it would be ignored).
trap 'exit 143' TERM
trap 'exit 130' INT

if [[ $# -gt 0 && $1 != *=* ]]; then
    exec "$@"
fi

python=${LFQA_PYTHON:-python}
read -ra launcher <<< "${LFQA_LAUNCHER:-accelerate launch}"
config=${LFQA_ACCELERATE_CONFIG:-accelerate_configs/multi-node.yaml}
job=${LFQA_JOB:-/etc/lfqa/job.yaml}
# The Kubeflow operators describe the pod with their own variables: Trainer v2 with PET_* only, the Training
# Operator v1 with PET_* as well as MASTER_ADDR, MASTER_PORT, RANK (the pod's node index) and WORLD_SIZE
# (replicas x nprocPerNode). `accelerate launch` reads none of them: they become its flags here. PET_* first,
# then the plain Job's own variables.
nnodes=${PET_NNODES:-${NNODES:-}}
node_rank=${PET_NODE_RANK:-${NODE_RANK:-${RANK:-${JOB_COMPLETION_INDEX:-0}}}}
master_addr=${PET_MASTER_ADDR:-${MASTER_ADDR:-127.0.0.1}}
master_port=${PET_MASTER_PORT:-${MASTER_PORT:-29500}}
master_wait=${LFQA_MASTER_WAIT_SECONDS:-600}
preempted_code=${LFQA_PREEMPTED_EXIT_CODE:-75}
nproc=${PET_NPROC_PER_NODE:-${GPUS_PER_NODE:-${NPROC:-}}}
nproc_counted=0
if [[ -z $nproc || $nproc == auto || $nproc == gpu ]]; then
    nproc_counted=1  # then an operator's WORLD_SIZE counted 1 process per machine: it says nothing here
    nproc=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    [[ $nproc =~ ^[1-9][0-9]*$ ]] || nproc=1
fi

positive='^[1-9][0-9]*$'
[[ $nproc =~ $positive ]] \
    || usage_error "PET_NPROC_PER_NODE / GPUS_PER_NODE (or NPROC) must be a positive integer, got '$nproc'"
world_size=${WORLD_SIZE:-}
(( nproc_counted )) && world_size=
[[ -z $world_size || $world_size =~ $positive ]] \
    || usage_error "WORLD_SIZE must be a positive integer, got '$world_size'"
if [[ -z $nnodes && -n $world_size ]]; then
    (( world_size % nproc == 0 )) \
        || usage_error "WORLD_SIZE ($world_size) is not a multiple of the $nproc process(es) per machine"
    nnodes=$((world_size / nproc))
fi
nnodes=${nnodes:-1}
[[ $nnodes =~ $positive ]] || usage_error "PET_NNODES / NNODES must be a positive integer, got '$nnodes'"
if [[ -n $world_size ]] && (( world_size != nnodes * nproc )); then
    usage_error "WORLD_SIZE=$world_size but $nnodes machine(s) x $nproc process(es): the pod's settings disagree"
fi
if [[ ! $node_rank =~ ^[0-9]+$ ]] || (( node_rank >= nnodes )); then
    usage_error "PET_NODE_RANK / NODE_RANK (or RANK, JOB_COMPLETION_INDEX) must be in 0..$((nnodes - 1)),"\
        "got '$node_rank'"
fi
[[ $master_port =~ $positive ]] \
    || usage_error "PET_MASTER_PORT / MASTER_PORT must be a port number, got '$master_port'"
[[ $master_wait =~ ^[0-9]+$ ]] || usage_error "LFQA_MASTER_WAIT_SECONDS must be >= 0, got '$master_wait'"
if [[ ! $preempted_code =~ $positive ]] || (( preempted_code > 255 )); then
    usage_error "LFQA_PREEMPTED_EXIT_CODE must be in 1..255, got '$preempted_code'"
fi
# Consumed: the launcher gets them as flags, and torch's launcher would take PET_* as its own defaults.
unset PET_NNODES PET_NPROC_PER_NODE PET_NODE_RANK PET_MASTER_ADDR PET_MASTER_PORT RANK WORLD_SIZE
[[ -f $config ]] || usage_error "accelerate config $config not found (relative paths start at $PWD)"

overrides=()
if [[ -n ${LFQA_CACHE_DIR:-} ]]; then
    overrides+=("model.cache_dir=$LFQA_CACHE_DIR/models" "data.cache_dir=$LFQA_CACHE_DIR/datasets")
fi
[[ -n ${LFQA_OUTPUT_DIR:-} ]] && overrides+=("output.dir=$LFQA_OUTPUT_DIR")
[[ -n ${LFQA_OUTPUT_URI:-} ]] && overrides+=("output.uri=$LFQA_OUTPUT_URI")
if [[ -n ${LFQA_ARGS:-} ]]; then
    read -ra extra <<< "$LFQA_ARGS"
    overrides+=("${extra[@]}")
fi
overrides+=("$@")

# Check the job before any process group exists (a typo fails here, in a second, with exit 2), and learn the
# run folder the trainer will write preempted.json into, whichever override set it.
output_dir=$("$python" - "$job" "${overrides[@]}" <<'PY'
import sys

from lfqa.config import ConfigError, load_job

try:
    job = load_job(sys.argv[1], sys.argv[2:])
except ConfigError as err:
    print(f"lfqa: error: {err}", file=sys.stderr)
    sys.exit(2)
print(job.output.dir)
PY
) || { status=$?; (( status == 2 )) && exit 2; log "could not check $job (exit $status)"; exit "$status"; }
if [[ -n ${JOB_COMPLETION_INDEX:-} && -z ${LFQA_OUTPUT_URI:-} ]]; then
    log "warning: no LFQA_OUTPUT_URI: checkpoints and the final model stay on this pod's disk and go with it"
fi

if (( master_wait > 0 )); then
    deadline=$((SECONDS + master_wait))
    until "$python" -c 'import socket, sys; socket.getaddrinfo(sys.argv[1], None)' "$master_addr" 2>/dev/null; do
        if (( SECONDS >= deadline )); then
            log "error: $master_addr does not resolve after ${master_wait}s (is the headless Service there?)"
            exit 1
        fi
        sleep 2
    done
fi

cmd=("${launcher[@]}" --config_file "$config" --num_machines "$nnodes" --num_processes "$((nnodes * nproc))"
     --machine_rank "$node_rank" --main_process_ip "$master_addr" --main_process_port "$master_port")
# DeepSpeed's own multi-machine launcher (pdsh, the default) needs SSH between pods; `standard` runs torch's
# launcher on each machine, as every other distributed type does.
if (( nnodes > 1 )) && grep -Eq '^distributed_type: *DEEPSPEED' "$config"; then
    cmd+=(--deepspeed_multinode_launcher standard)
fi
cmd+=(-m lfqa.train "$job" "${overrides[@]}" "output.dir=$output_dir")
log "machine $node_rank of $nnodes, $nproc process(es) each: ${cmd[*]}"

mkdir -p "$output_dir"
marker=$(mktemp "${TMPDIR:-/tmp}/lfqa-launch.XXXXXX")
trap 'rm -f "$marker"' EXIT

child=
signalled=0
forwarded=0
# shellcheck disable=SC2329  # called by the traps below
forward() {
    signalled=1
    forwarded=1
    log "SIG$1: passing it to the launcher (pid $child)"
    kill -s "$1" -- "-$child" 2>/dev/null || kill -s "$1" "$child" 2>/dev/null || true
}
trap 'forward TERM' TERM
trap 'forward INT' INT

if command -v setsid > /dev/null; then
    setsid "${cmd[@]}" &
else
    "${cmd[@]}" &
fi
child=$!

# `wait` returns early when a trapped signal arrives: wait again until the launcher itself has ended.
status=
while :; do
    signalled=0
    wait "$child" && s=0 || s=$?
    if (( s == 127 )) && [[ -n $status ]]; then
        break  # already collected: keep the status from before
    fi
    status=$s
    (( signalled && s > 128 )) || break
done

if (( forwarded )); then
    # One process without torch elastic: the trainer may outlive accelerate; wait for the whole group.
    drain_deadline=$((SECONDS + ${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-30} + 30))
    while kill -0 -- "-$child" 2>/dev/null && (( SECONDS < drain_deadline )); do
        sleep 1
    done
fi

preempted=$output_dir/preempted.json
if (( status != 0 )) && [[ -f $preempted && $preempted -nt $marker ]]; then
    log "the trainer was preempted and checkpointed ($preempted): exit $preempted_code, restart me"
    exit "$preempted_code"
fi
exit "$status"
