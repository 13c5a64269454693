#!/usr/bin/env bash
# Follow rank 0 of a training Job until the Job completes or fails, also across preemptions: when pod 0 is
# replaced (exit 75, eviction), its successor is followed. Ctrl-C stops following, not the training.
#   k8s/follow.sh NAME [NAMESPACE]          (make k8s-logs NAME=... / the end of make train-cluster)
# Exit status: 0 when the run completed, 1 when it failed. KUBECTL (kubectl), FOLLOW_POLL_SECONDS (5),
# FLAVOR (job: the Indexed Job; pytorchjob: its Master pod; trainjob: index 0 of the TrainJob's JobSet).
set -euo pipefail

name=${1:?usage: k8s/follow.sh NAME [NAMESPACE]}
namespace=${2:-}
poll=${FOLLOW_POLL_SECONDS:-5}
read -ra kubectl <<< "${KUBECTL:-kubectl}"
[[ -n $namespace ]] && kubectl+=(--namespace "$namespace")
case ${FLAVOR:-job} in
    job)
        kind=job container=trainer done=Complete
        rank0="batch.kubernetes.io/job-name=$name,batch.kubernetes.io/job-completion-index=0" ;;
    pytorchjob)
        kind=pytorchjob container=pytorch done=Succeeded
        rank0="training.kubeflow.org/job-name=$name,training.kubeflow.org/replica-type=master" ;;
    trainjob)
        kind=trainjob container=node done=Complete
        rank0="jobset.sigs.k8s.io/jobset-name=$name,batch.kubernetes.io/job-completion-index=0" ;;
    *) echo "FLAVOR must be job, pytorchjob or trainjob, got '$FLAVOR'" >&2; exit 2 ;;
esac

echo "following rank 0 of $kind/$name (Ctrl-C stops following; the run goes on: make k8s-logs NAME=$name)"
followed=""
last_note=""
note() {  # print a status line once, not every poll
    [[ $1 == "$last_note" ]] || echo "$1"
    last_note=$1
}
while :; do
    conditions=$("${kubectl[@]}" get "$kind" "$name" \
        -o jsonpath='{range .status.conditions[?(@.status=="True")]}{.type}{" "}{end}') \
        || { echo "cannot read $kind/$name" >&2; exit 1; }
    case " $conditions " in
        *" $done "*)
            echo "$kind/$name completed"
            exit 0 ;;
        *" Failed "*)
            echo "$kind/$name failed:"
            "${kubectl[@]}" get "$kind" "$name" \
                -o jsonpath='{range .status.conditions[?(@.type=="Failed")]}{.reason}{": "}{.message}{"\n"}{end}'
            exit 1 ;;
    esac
    # The newest pod of index 0 (after a preemption the Job makes a new one).
    pod=$("${kubectl[@]}" get pods --selector "$rank0" --sort-by=.metadata.creationTimestamp \
        -o jsonpath='{range .items[*]}{.metadata.name}{" "}{.status.phase}{"\n"}{end}' | tail -n 1) || pod=""
    pod_name=${pod%% *}
    phase=${pod##* }
    if [[ -z $pod_name ]]; then
        note "waiting for pod 0 of $kind/$name"
    elif [[ $phase == Pending ]]; then
        note "pod/$pod_name is Pending (scheduling or pulling the image)"
    elif [[ " $followed " != *" $pod_name "* ]]; then
        echo "--- pod/$pod_name ($phase)"
        "${kubectl[@]}" logs --follow --container "$container" "pod/$pod_name" || true
        followed+=" $pod_name"
        continue
    fi
    sleep "$poll"
done
