"""Kubeflow flavours: `make k8s-render FLAVOR=pytorchjob` (Training Operator v1) and `FLAVOR=trainjob` (Trainer v2).

    pytest tests/test_k8s_kubeflow.py

No operator runs here. The rendered resources are validated against the upstream CRDs' OpenAPI schemas
(tests/k8s_schemas, strict: a field the CRD does not name fails, as `kubectl --validate=strict` would) and their
pod templates against the Kubernetes API schemas; the wiring is proven by running the pods' start script,
k8s/entrypoint.sh, with exactly the variables each operator sets (as upstream sets them) as two local machines
on loopback, 127.0.0.1 standing in for the operator's name of machine 0.
"""

from __future__ import annotations

import functools
import gzip
import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from conftest import ROOT, free_port
from test_k8s import (
    ENTRYPOINT,
    FAKE_SECRETS,
    IMAGE,
    KUBERNETES_VERSIONS,
    OUTPUT_URI,
    check_resources,
    entrypoint_env,
    env_of,
    finish,
    logs,
    needs_kubectl,
    render_env,
    write_stub,
)

SCHEMAS = Path(__file__).parent / "k8s_schemas"
#: What the plain Job sets for the start script; under an operator, the operator's own variables replace them.
JOB_ONLY_ENV = {"NNODES", "GPUS_PER_NODE", "MASTER_ADDR", "MASTER_PORT", "JOB_COMPLETION_INDEX"}
OPERATOR_ENV = {"RANK", "WORLD_SIZE", "PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR",
                "PET_MASTER_PORT"}


def pytorchjob_env(name: str, nodes: int, nproc: int, index: int, addr: str = "", port: int = 23456) -> dict:
    """What the Training Operator v1 (release-1.9, no elasticPolicy) sets in pod `index` (Master 0, Worker i-1)."""
    master = addr or f"{name}-master-0"
    return {"PYTHONUNBUFFERED": "0", "MASTER_PORT": str(port), "MASTER_ADDR": master, "PET_MASTER_PORT": str(port),
            "PET_MASTER_ADDR": master, "WORLD_SIZE": str(nodes * nproc), "RANK": str(index),
            "PET_NPROC_PER_NODE": str(nproc), "PET_NODE_RANK": str(index), "PET_NNODES": str(nodes)}


def trainjob_env(name: str, nodes: int, nproc: int, index: int, addr: str = "", port: int = 29500) -> dict:
    """What Trainer v2's torch plugin sets in node `index`: PET_* only (PET_NODE_RANK from the completion index)."""
    return {"PET_NNODES": str(nodes), "PET_NPROC_PER_NODE": str(nproc), "PET_NODE_RANK": str(index),
            "PET_MASTER_ADDR": addr or f"{name}-node-0-0.{name}", "PET_MASTER_PORT": str(port)}


OPERATOR_VARS = {"pytorchjob": pytorchjob_env, "trainjob": trainjob_env}


# --- schemas ---------------------------------------------------------------------------------------------------

def structural(schema):
    """A CRD's structural schema as jsonschema reads it: an object with `properties` takes no other field (the
    API server prunes them, strict validation rejects them); int-or-string is either."""
    if isinstance(schema, list):
        return [structural(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (structural(v) if k != "properties" else {p: structural(s) for p, s in v.items()})
           for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    if out.get("x-kubernetes-int-or-string"):
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    return out


@functools.cache
def crd(kind: str) -> tuple[dict, jsonschema.Draft7Validator]:
    doc = json.loads(gzip.decompress((SCHEMAS / f"{kind}.json.gz").read_bytes()))
    return doc, jsonschema.Draft7Validator(structural(doc["openAPIV3Schema"]))


def validate_custom(obj: dict) -> None:
    doc, validator = crd(obj["kind"])
    assert obj["apiVersion"] == f"{doc['group']}/{doc['version']}"
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]
    assert not errors, "\n".join(errors)
    assert doc["scope"] == "Namespaced" and set(obj["metadata"]) <= {"name", "namespace", "labels"}


def validate_builtin(obj: dict) -> None:
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)


def validate_pod_template(template: dict) -> None:
    validate_builtin({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template})


def test_structural_schema_is_strict():
    """The validation can fail: a misspelt field, a wrong type and a missing required field are all caught."""
    _, validator = crd("PyTorchJob")
    good = {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": {"name": "x"},
            "spec": {"pytorchReplicaSpecs": {"Master": {"replicas": 1, "template": {"spec": {"containers": [
                {"name": "pytorch", "image": "i", "resources": {"limits": {"cpu": 2, "memory": "1Gi"}}}]}}}}}}
    assert not list(validator.iter_errors(good))
    bad_field = json.loads(json.dumps(good).replace('"replicas"', '"replica"'))
    bad_type = json.loads(json.dumps(good).replace('"replicas": 1', '"replicas": "one"'))
    missing = {**good, "spec": {"nprocPerNode": "1"}}
    for bad in (bad_field, bad_type, missing):
        assert list(validator.iter_errors(bad)), bad


# --- rendering ---------------------------------------------------------------------------------------------------

def render_flavor(flavor: str, nodes: int, gpus: int, *make_vars: str) -> dict[str, dict]:
    """`make k8s-render FLAVOR=...` as a user runs it; the resources by kind."""
    cmd = ["make", "-s", "k8s-render", f"FLAVOR={flavor}", f"NODES={nodes}", f"GPUS_PER_NODE={gpus}",
           f"IMAGE={IMAGE}", f"OUTPUT_URI={OUTPUT_URI}", *make_vars]
    proc = subprocess.run(cmd, cwd=ROOT, env=render_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert not [s for s in FAKE_SECRETS.values() if s in proc.stdout], "a secret value reached a manifest"
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    objects = {d["kind"]: d for d in docs}
    assert len(objects) == len(docs)
    return objects


def check_pod(template: dict, container_name: str, gpus: int, config_map: dict) -> dict[str, dict]:
    """What every flavour's pod carries over from the Job: the resources, the job file, the start script's
    settings, the security context; none of the plain Job's own rank variables. Returns its environment."""
    validate_pod_template(template)
    pod = template["spec"]
    (container,) = pod["containers"]
    assert container["name"] == container_name and container["image"] == IMAGE
    check_resources(pod, gpus)
    env = env_of(container)
    assert not set(env) & (JOB_ONLY_ENV | OPERATOR_ENV) and not [n for n in env if n.startswith("PET_")]
    assert env["LFQA_JOB"]["value"] == "/etc/lfqa/job.yaml" and env["LFQA_OUTPUT_URI"]["value"] == OUTPUT_URI
    assert all(env[var]["valueFrom"]["secretKeyRef"]["optional"] is True for var in FAKE_SECRETS)
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["job"]["configMap"]["name"] == config_map["metadata"]["name"]
    assert "subdomain" not in pod  # the operator names the pods and their Service itself
    assert pod["securityContext"]["runAsNonRoot"] is True and container["securityContext"]["capabilities"]
    assert int(env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]["value"]) + 10 <= pod["terminationGracePeriodSeconds"]
    return env


@needs_kubectl
@pytest.mark.parametrize(("nodes", "gpus"), [(1, 1), (2, 8), (4, 8)])
def test_pytorchjob_validates(nodes, gpus):
    objects = render_flavor("pytorchjob", nodes, gpus)
    assert sorted(objects) == ["ConfigMap", "PyTorchJob"]
    job, config_map = objects["PyTorchJob"], objects["ConfigMap"]
    validate_custom(job)
    validate_builtin(config_map)
    assert config_map["data"]["job.yaml"] == (ROOT / "jobs" / "led-base-lfqa.yaml").read_text()
    spec = job["spec"]
    replicas = spec["pytorchReplicaSpecs"]
    # Master is machine 0 (<job>-master-0, the operator's MASTER_ADDR); the Workers are machines 1..n-1.
    assert replicas["Master"]["replicas"] == 1
    assert replicas.get("Worker", {"replicas": 0})["replicas"] == nodes - 1
    assert spec["nprocPerNode"] == str(gpus) and "elasticPolicy" not in spec
    assert spec["runPolicy"]["cleanPodPolicy"] == "Running"
    for replica in replicas.values():
        # ExitCode: 1-127 fail the PyTorchJob at once (exit 2: a bad job file), 128-255 restart the pod, uncounted.
        assert replica["restartPolicy"] == "ExitCode"
        env = check_pod(replica["template"], "pytorch", gpus, config_map)
        assert 128 <= int(env["LFQA_PREEMPTED_EXIT_CODE"]["value"]) <= 255
        ports = replica["template"]["spec"]["containers"][0]["ports"]
        assert {"name": "pytorchjob-port", "containerPort": 23456} in ports


@needs_kubectl
@pytest.mark.parametrize(("nodes", "gpus"), [(1, 1), (2, 8), (4, 8)])
def test_trainjob_validates(nodes, gpus):
    objects = render_flavor("trainjob", nodes, gpus, "NAMESPACE=ml-team")
    assert sorted(objects) == ["ConfigMap", "TrainJob", "TrainingRuntime"]
    train, runtime, config_map = objects["TrainJob"], objects["TrainingRuntime"], objects["ConfigMap"]
    for obj in (train, runtime):
        validate_custom(obj)
    validate_builtin(config_map)
    assert {o["metadata"]["namespace"] for o in objects.values()} == {"ml-team"}
    # lfqa's own namespaced runtime, not the stock torch-distributed ClusterTrainingRuntime.
    assert train["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime",
                                           "name": runtime["metadata"]["name"]}
    assert train["spec"]["trainer"] == {"numNodes": nodes, "numProcPerNode": gpus}  # no PET_* in trainer.env
    assert runtime["spec"]["mlPolicy"] == {"numNodes": nodes, "torch": {}}
    jobset = runtime["spec"]["template"]["spec"]
    (node,) = jobset["replicatedJobs"]
    assert node["name"] == "node" and node["replicas"] == 1
    assert node["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
    child = node["template"]["spec"]
    validate_builtin({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "node"}, "spec": child})
    assert child["completionMode"] == "Indexed" and child["completions"] == child["parallelism"] == nodes
    check_pod(child["template"], "node", gpus, config_map)
    assert child["template"]["spec"]["restartPolicy"] == "Never"

    # The preemption contract of the plain Job, on the JobSet's Job: 75 and disruptions replace the pod without
    # counting, a crash counts against backoffLimit, exit 2 fails the Job and with it, at once, the JobSet.
    rules = child["podFailurePolicy"]["rules"]
    assert {"action": "Ignore", "onExitCodes": {"containerName": "node", "operator": "In", "values": [75]}} in rules
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in rules
    assert {"action": "FailJob", "onExitCodes": {"containerName": "node", "operator": "In", "values": [2]}} in rules
    assert child["backoffLimit"] == 2 * nodes
    policy = jobset["failurePolicy"]
    assert policy["maxRestarts"] == 0
    assert {"name": "invalid-job-file", "action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"]} \
        in policy["rules"]


@needs_kubectl
@pytest.mark.parametrize("flavor", ["pytorchjob", "trainjob"])
def test_kubeflow_overlay_takes_plain_kustomize(tmp_path, flavor):
    proc = subprocess.run(["make", "-s", "k8s-render", f"FLAVOR={flavor}", "NODES=2", "GPUS_PER_NODE=8",
                           f"IMAGE={IMAGE}", f"OUTPUT_URI={OUTPUT_URI}", f"OVERLAY={tmp_path / 'run'}"],
                          cwd=ROOT, env=render_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run(["kubectl", "kustomize", str(tmp_path / "run")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert {d["kind"]: d for d in yaml.safe_load_all(proc.stdout) if d} == render_flavor(flavor, 2, 8)


# --- the start script under each operator -----------------------------------------------------------------------

def pod_env(flavor: str, nodes: int, gpus: int, *make_vars: str) -> dict[str, str]:
    """The plain values of the rendered pod's environment (Secret references are the Secret's business)."""
    objects = render_flavor(flavor, nodes, gpus, *make_vars)
    if flavor == "pytorchjob":
        template = objects["PyTorchJob"]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    else:
        (node,) = objects["TrainingRuntime"]["spec"]["template"]["spec"]["replicatedJobs"]
        template = node["template"]["spec"]["template"]
    return {e["name"]: e["value"] for e in template["spec"]["containers"][0]["env"] if "value" in e}


def local_paths(tmp: Path, index: int) -> dict:
    """The pod's /etc/lfqa, /scratch run folder and caches, on this machine."""
    return {"LFQA_JOB": "jobs/tiny-cpu.yaml", "LFQA_OUTPUT_DIR": tmp / f"run{index}",
            "LFQA_CACHE_DIR": tmp / f"cache{index}", "HF_HOME": tmp / f"hf{index}", "WANDB_DIR": tmp}


@needs_kubectl
@pytest.mark.parametrize("flavor", ["pytorchjob", "trainjob"])
def test_operator_variables_become_launch_flags(tmp_path, flavor):
    """Each pod of a 3 x 8 run launches as its machine of the whole run, from the operator's variables alone."""
    base = pod_env(flavor, 3, 8, "NAME=led")
    stub = write_stub(tmp_path / "launcher", 'printf "%s\\n" "$@" > "$STUB_OUT"; env > "$STUB_OUT.env"\n')
    master = {"pytorchjob": ("led-master-0", "23456"), "trainjob": ("led-node-0-0.led", "29500")}[flavor]
    for index in range(3):
        out = tmp_path / f"args{index}"
        env = entrypoint_env(**{**base, **local_paths(tmp_path, index), "LFQA_LAUNCHER": stub, "STUB_OUT": out},
                             **OPERATOR_VARS[flavor]("led", 3, 8, index))
        proc = subprocess.run([str(ENTRYPOINT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        args = out.read_text().splitlines()
        flags = dict(zip(args[:args.index("-m")][::2], args[:args.index("-m")][1::2]))
        assert flags == {"--config_file": "accelerate_configs/multi-node.yaml", "--num_machines": "3",
                         "--num_processes": "24", "--machine_rank": str(index), "--main_process_ip": master[0],
                         "--main_process_port": master[1], "--deepspeed_multinode_launcher": "standard"}
        # Consumed: torch's launcher would read PET_* as its own defaults, accelerate WORLD_SIZE and RANK.
        launched = dict(line.split("=", 1) for line in (tmp_path / f"args{index}.env").read_text().splitlines()
                        if "=" in line)
        assert not set(launched) & OPERATOR_ENV


def test_operator_variables_that_disagree_fail_before_launching(tmp_path):
    stub = write_stub(tmp_path / "launcher", 'touch "$STUB_OUT"\n')
    common = dict(LFQA_LAUNCHER=stub, STUB_OUT=tmp_path / "launched", LFQA_JOB="jobs/tiny-cpu.yaml",
                  LFQA_OUTPUT_DIR=tmp_path / "run")
    cases = [
        {**pytorchjob_env("x", 2, 8, 0), "WORLD_SIZE": "8"},  # 2 machines x 8 is not 8 processes
        {**trainjob_env("x", 2, 8, 2)},                        # machine 2 of 2
        {**trainjob_env("x", 2, 8, 0), "PET_NPROC_PER_NODE": "eight"},
        {**trainjob_env("x", 2, 8, 0), "PET_MASTER_PORT": "http"},
    ]
    for variables in cases:
        proc = subprocess.run([str(ENTRYPOINT)], cwd=ROOT, env=entrypoint_env(**common, **variables),
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and "lfqa-entrypoint: error:" in proc.stderr, (variables, proc.stderr)
        assert not (tmp_path / "launched").exists()


@needs_kubectl
def test_pytorchjob_preemption_exits_retryable(tmp_path):
    """Under a PyTorchJob a preempted trainer's pod exits 128-255 (restarted, not counted); a crash stays 1-127."""
    env_values = pod_env("pytorchjob", 1, 1)
    run = tmp_path / "run"
    for body, expected in [('echo {} > "$RUN/preempted.json"; exit 1\n', int(env_values["LFQA_PREEMPTED_EXIT_CODE"])),
                           ("exit 1\n", 1)]:
        stub = write_stub(tmp_path / "launcher", body)
        env = entrypoint_env(**{**env_values, "LFQA_LAUNCHER": stub, "RUN": run, "LFQA_JOB": "jobs/tiny-cpu.yaml",
                                "LFQA_OUTPUT_DIR": run, "LFQA_CACHE_DIR": tmp_path / "cache"},
                             **pytorchjob_env("lfqa", 1, 1, 0, addr="127.0.0.1"))
        proc = subprocess.run([str(ENTRYPOINT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == expected, (body, proc.stderr)
    assert 128 <= int(env_values["LFQA_PREEMPTED_EXIT_CODE"]) <= 255


# --- two machines, for real --------------------------------------------------------------------------------------

@needs_kubectl
@pytest.mark.distributed
@pytest.mark.parametrize("flavor", ["pytorchjob", "trainjob"])
def test_two_machines_train_under_operator(tmp_path, flavor):
    """The rendered pod's environment plus exactly the operator's variables, for machines 0 and 1 on loopback:
    both ranks train the tiny job (accelerate's multi-node DeepSpeed config on CPU over gloo), as one run."""
    base = pod_env(flavor, 2, 1, "JOB=jobs/tiny-cpu.yaml")
    base.pop("LFQA_OUTPUT_URI")  # no bucket here
    port = free_port()
    procs = []
    for index in (0, 1):
        env = entrypoint_env(**{**base, **local_paths(tmp_path, index), "LFQA_MASTER_WAIT_SECONDS": 30},
                             **OPERATOR_VARS[flavor]("lfqa", 2, 1, index, addr="127.0.0.1", port=port))
        log = open(tmp_path / f"machine{index}.log", "w")
        procs.append(subprocess.Popen([str(ENTRYPOINT), "tracking.progress_bar=false", "train.max_steps=4",
                                       "eval.every_steps=0", "eval.at_start=false", "eval.max_generate_samples=4",
                                       "data.max_train_samples=64", "data.max_eval_samples=8"],
                                      cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
        log.close()
    codes = finish(procs)
    assert codes == [0, 0], logs(tmp_path)
    summary = json.loads((tmp_path / "run0" / "summary.json").read_text())
    assert summary["num_processes"] == 2
    rows = summary["ranks"]["rows_seen_per_rank_epoch0"]
    assert len(rows) == 2 and all(n > 0 for n in rows), rows
    launch = (tmp_path / "machine1.log").read_text()
    assert "--num_machines 2 --num_processes 2 --machine_rank 1 --main_process_ip 127.0.0.1" in launch
    assert "--deepspeed_multinode_launcher standard" in launch


@pytest.mark.parametrize(("flavor", "selector", "container", "done"), [
    ("pytorchjob", "training.kubeflow.org/job-name=lfqa,training.kubeflow.org/replica-type=master", "pytorch",
     "Succeeded"),
    ("trainjob", "jobset.sigs.k8s.io/jobset-name=lfqa,batch.kubernetes.io/job-completion-index=0", "node", "Complete"),
])
def test_follow_script_under_operator(tmp_path, flavor, selector, container, done):
    """`make k8s-logs FLAVOR=...` follows machine 0 of the operator's pods until its resource reports done."""
    state = tmp_path / "state"
    state.mkdir()
    fake = write_stub(tmp_path / "kubectl", f"""
args="$*"
case "$args" in
    "get {flavor} lfqa"*) if [[ -f {state}/followed ]]; then echo "Created Running {done} "; fi ;;
    "get pods --selector {selector} "*) echo "lfqa-0 Running" ;;
    "logs --follow --container {container} pod/lfqa-0") touch {state}/followed; echo "log of rank 0" ;;
    *) echo "unexpected: $args" >&2; exit 1 ;;
esac
""")
    env = {"PATH": "/usr/bin:/bin", "KUBECTL": fake, "FLAVOR": flavor, "FOLLOW_POLL_SECONDS": "0.1"}
    proc = subprocess.run([str(ROOT / "k8s" / "follow.sh"), "lfqa"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "log of rank 0" in proc.stdout and f"{flavor}/lfqa completed" in proc.stdout


@needs_kubectl
def test_kubeflow_flavour_without_pyyaml_says_so():
    """Outside the venv (python3 with no site packages here) the Job still renders; a Kubeflow flavour, which
    rewrites YAML, says in one line what it needs."""
    base = [sys.executable, "-S", "k8s/render.py", "--image", IMAGE, "--output-uri", OUTPUT_URI]
    job = subprocess.run(base, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert job.returncode == 0 and "kind: Job" in job.stdout, job.stderr
    proc = subprocess.run([*base, "--flavor", "trainjob"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and not proc.stdout
    assert "k8s/render.py: error: FLAVOR=trainjob needs PyYAML" in proc.stderr and "Traceback" not in proc.stderr
