"""Kubernetes: the rendered manifests, the pod start script and the make targets around them.

    pytest tests/test_k8s.py

No cluster runs here. The manifests are rendered the way `make k8s-render` renders them (`kubectl kustomize`)
and validated offline against the Kubernetes API schemas (kubernetes-validate, strict); the multi-machine
wiring is proven by running the pods' own start script, k8s/entrypoint.sh, for indexes 0 and 1 as two local
processes on loopback, with 127.0.0.1 standing in for the headless Service's name of pod 0.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from conftest import ROOT, free_port, lfqa_env

from lfqa.config import load_job

# 1.29: the oldest schema that takes these manifests (1.28's requires onPodConditions in every podFailurePolicy
# rule, also in the exit-code ones); 1.32: the kubectl here; 1.37: the newest kubernetes-validate has.
KUBERNETES_VERSIONS = ("1.29", "1.32", "1.37")
ENTRYPOINT = ROOT / "k8s" / "entrypoint.sh"
IMAGE = "registry.example.com/ml/lfqa:0.1.0"
OUTPUT_URI = "s3://lfqa-test-bucket/runs/k8s"
# Credentials in the environment of whoever renders: none of them may end up in a manifest.
FAKE_SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAFAKEKEYFORK8STEST",
    "AWS_SECRET_ACCESS_KEY": "fake-k8s-secret-access-key-0123456789",
    "WANDB_API_KEY": "fake0wandb0key0for0k8s0tests0000000000000",
    "HF_TOKEN": "hf_fakeTokenForK8sTests",
}
# Variables the start script reads; the tests set them explicitly.
ENTRYPOINT_VARS = ("NODE_RANK", "JOB_COMPLETION_INDEX", "NNODES", "GPUS_PER_NODE", "NPROC", "MASTER_ADDR",
                   "MASTER_PORT", "LFQA_ACCELERATE_CONFIG", "LFQA_JOB", "LFQA_OUTPUT_DIR", "LFQA_OUTPUT_URI",
                   "LFQA_CACHE_DIR", "LFQA_ARGS", "LFQA_LAUNCHER", "LFQA_PYTHON", "LFQA_MASTER_WAIT_SECONDS",
                   "LFQA_PREEMPTED_EXIT_CODE", "PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR",
                   "PET_MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")

needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl renders the manifests")


def render_env() -> dict:
    return dict(lfqa_env(), **FAKE_SECRETS)


def render(nodes: int, gpus: int, *overrides: str, name: str = "lfqa", namespace: str = "") -> str:
    """k8s/render.py as `make k8s-render` runs it (the venv's python: the job file is checked too)."""
    cmd = [sys.executable, "k8s/render.py", "--nodes", str(nodes), "--gpus-per-node", str(gpus), "--image", IMAGE,
           "--output-uri", OUTPUT_URI, "--name", name, "--namespace", namespace, "--", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=render_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def by_kind(text: str) -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all(text) if d]
    objects = {d["kind"]: d for d in docs}
    assert sorted(objects) == ["ConfigMap", "Job", "Service"] and len(docs) == 3, [d["kind"] for d in docs]
    return objects


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container["env"]}


QUANTITY_SUFFIXES = {"m": Fraction(1, 1000), "": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
                     "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(value) -> Fraction:
    number, suffix = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value)).groups()
    return Fraction(number) * QUANTITY_SUFFIXES[suffix]


def qos_class(pod: dict) -> str:
    """The pod's QoS class as the kubelet computes it (pkg/apis/core/helper/qos): only CPU and memory count;
    a request left out defaults to its limit; Guaranteed needs every container limited in both, requests = limits."""
    containers = pod.get("initContainers", []) + pod["containers"]
    best_effort, guaranteed = True, True
    for container in containers:
        limits = container.get("resources", {}).get("limits", {})
        requests = {**limits, **container.get("resources", {}).get("requests", {})}
        for resource in ("cpu", "memory"):
            if resource in requests or resource in limits:
                best_effort = False
            if resource not in limits or quantity(requests[resource]) != quantity(limits[resource]):
                guaranteed = False
    return "BestEffort" if best_effort else "Guaranteed" if guaranteed else "Burstable"


def check_resources(pod: dict, gpus: int) -> dict:
    """CPU and memory requested, memory limited, /dev/shm in memory and within the limit; returns the resources."""
    (container,) = pod["containers"]
    resources = container["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == gpus
    assert quantity(resources["requests"]["cpu"]) > 0 and quantity(resources["requests"]["memory"]) >= 2**30
    assert resources["limits"]["memory"] == resources["requests"]["memory"]
    assert qos_class(pod) in ("Burstable", "Guaranteed")
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    shm = volumes[mounts["/dev/shm"]]["emptyDir"]
    assert shm["medium"] == "Memory"
    assert 0 < quantity(shm["sizeLimit"]) <= quantity(resources["limits"]["memory"]) / 2
    return resources


def check_run(text: str, nodes: int, gpus: int, name: str = "lfqa") -> dict[str, dict]:
    """Everything a multi-machine run needs, on one rendered set of manifests."""
    assert not [s for s in FAKE_SECRETS.values() if s in text], "a secret value reached a manifest"
    objects = by_kind(text)
    for obj in objects.values():
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)
    job, service, config_map = objects["Job"], objects["Service"], objects["ConfigMap"]
    spec = job["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    env = env_of(container)

    # One pod per machine, all at once, each knowing its rank from the completion index.
    assert job["metadata"]["name"] == name
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == nodes
    assert env["NNODES"]["value"] == str(nodes) and env["GPUS_PER_NODE"]["value"] == str(gpus)
    check_resources(pod, gpus)
    # Pod 0 is <job>-0.<service>: the headless Service is the pods' subdomain and selects exactly them.
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert pod["subdomain"] == service["metadata"]["name"] == name
    assert env["MASTER_ADDR"]["value"] == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    assert service["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    assert service["spec"]["selector"]["app.kubernetes.io/instance"] == name

    # Preemptions (exit 75, disruptions) do not count against backoffLimit; other failures do; a bad job fails.
    assert pod["restartPolicy"] == "Never" and spec["backoffLimit"] >= 1
    rules = spec["podFailurePolicy"]["rules"]
    assert {"action": "Ignore", "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [75]}} in rules
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in rules
    assert {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [2]}} in rules
    assert container["name"] == "trainer"

    # Non-root, no privilege escalation, no capabilities, the runtime's seccomp profile.
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert pod["automountServiceAccountToken"] is False
    # GPU nodes: their taint tolerated, their label selected.
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}

    # /dev/shm in memory; the job file from the ConfigMap; the run folder on scratch.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert volumes[mounts["/etc/lfqa"]]["configMap"]["name"] == config_map["metadata"]["name"]
    assert env["LFQA_JOB"]["value"] == "/etc/lfqa/job.yaml" and "job.yaml" in config_map["data"]
    assert env["LFQA_OUTPUT_DIR"]["value"].startswith("/scratch/")
    assert env["LFQA_OUTPUT_URI"]["value"].startswith("s3://")

    # Credentials only by reference to the user's Secret, every key optional (a pod role needs none).
    for var in FAKE_SECRETS:
        ref = env[var]["valueFrom"]["secretKeyRef"]
        assert ref["key"] == var and "value" not in env[var] and ref["optional"] is True

    # SIGTERM: the trainer's grace < torch elastic's wait for the workers < Kubernetes' wait for the pod.
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "job.yaml").write_text(config_map["data"]["job.yaml"])
        job_config = load_job(str(Path(tmp) / "job.yaml"), [])
    elastic_wait = int(env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]["value"])
    assert job_config.checkpoint.preemption_grace_seconds + 30 <= elastic_wait
    assert elastic_wait + 10 <= pod["terminationGracePeriodSeconds"]
    return objects


@needs_kubectl
@pytest.mark.parametrize(("nodes", "gpus"), [(1, 1), (2, 8), (4, 8)])
def test_rendered_sizes_validate(nodes, gpus):
    objects = check_run(render(nodes, gpus), nodes, gpus)
    # The job file travels unchanged; the base's defaults are the real job on DeepSpeed ZeRO-2.
    assert objects["ConfigMap"]["data"]["job.yaml"] == (ROOT / "jobs" / "led-base-lfqa.yaml").read_text()
    container = objects["Job"]["spec"]["template"]["spec"]["containers"][0]
    assert env_of(container)["LFQA_ACCELERATE_CONFIG"]["value"] == "accelerate_configs/multi-node.yaml"
    assert container["image"] == IMAGE


@needs_kubectl
def test_make_k8s_render_any_size():
    """The make target itself, with a size no overlay has, a name, a namespace and job overrides."""
    cmd = ["make", "-s", "k8s-render", "NODES=3", "GPUS_PER_NODE=2", f"IMAGE={IMAGE}", f"OUTPUT_URI={OUTPUT_URI}",
           "NAME=led-3x2", "NAMESPACE=ml-team", "JOB=jobs/tiny-cpu.yaml", "ARGS=train.epochs=2 eval.every_steps=50"]
    proc = subprocess.run(cmd, cwd=ROOT, env=render_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    objects = check_run(proc.stdout, 3, 2, name="led-3x2")
    assert {o["metadata"]["namespace"] for o in objects.values()} == {"ml-team"}
    assert objects["ConfigMap"]["metadata"]["name"].startswith("led-3x2-job-")
    container = objects["Job"]["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["train.epochs=2", "eval.every_steps=50"]
    assert objects["ConfigMap"]["data"]["job.yaml"] == (ROOT / "jobs" / "tiny-cpu.yaml").read_text()


@needs_kubectl
@pytest.mark.parametrize(("nodes", "gpus"), [(1, 1), (2, 8)])
def test_written_overlay_takes_plain_kustomize(tmp_path, nodes, gpus):
    """`make k8s-render OVERLAY=DIR`: a folder that plain `kubectl kustomize DIR` (what `kubectl apply -k DIR`
    reads) renders, no load restrictor flag, wherever it is, into what `make k8s-render` prints."""
    overlay = tmp_path / "deploy" / f"{nodes}x{gpus}"
    proc = subprocess.run(["make", "-s", "k8s-render", f"NODES={nodes}", f"GPUS_PER_NODE={gpus}", f"IMAGE={IMAGE}",
                           f"OUTPUT_URI={OUTPUT_URI}", f"OVERLAY={overlay}"],
                          cwd=ROOT, env=render_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stdout, proc.stderr
    proc = subprocess.run(["kubectl", "kustomize", str(overlay)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == render(nodes, gpus)
    check_run(proc.stdout, nodes, gpus)


def test_no_half_working_overlays():
    """The renderer is the one way to a run's manifests: no shipped overlay that kustomize cannot take."""
    assert not (ROOT / "k8s" / "overlays").exists()
    readme = (ROOT / "README.md").read_text()
    assert "LoadRestrictionsNone" not in readme and "k8s/overlays" not in readme


@needs_kubectl
def test_render_refuses_bad_values():
    base = [sys.executable, "k8s/render.py", "--image", IMAGE, "--output-uri", OUTPUT_URI]
    for extra, message in [([], None), (["--output-uri", ""], "OUTPUT_URI"), (["--name", "Bad_Name"], "NAME"),
                           (["--nodes", "0"], "NODES"), (["--", "train.learnig_rate=1"], "train.learning_rate"),
                           (["--accelerate-config", "nope.yaml"], "ACCELERATE_CONFIG")]:
        proc = subprocess.run(base + extra, cwd=ROOT, capture_output=True, text=True, timeout=60)
        if message is None:
            assert proc.returncode == 0, proc.stderr
        else:
            assert proc.returncode == 2 and message in proc.stderr and not proc.stdout, (extra, proc.stderr)


# --- the start script ------------------------------------------------------------------------------------------

def entrypoint_env(**values) -> dict:
    env = {k: v for k, v in lfqa_env().items() if k not in ENTRYPOINT_VARS}
    env.update(LFQA_PYTHON=sys.executable, LFQA_MASTER_WAIT_SECONDS="0")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update({k: str(v) for k, v in values.items()})
    return env


def write_stub(path: Path, body: str) -> str:
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)
    return str(path)


@needs_kubectl
def test_pod_launch_command(tmp_path):
    """What each pod of a rendered 2 x 8 run launches: its own environment through the start script."""
    objects = by_kind(render(2, 8, "train.epochs=2"))
    pod = objects["Job"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    pod_env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    job_file = tmp_path / "job.yaml"  # stands in for the ConfigMap mounted at /etc/lfqa
    job_file.write_text(objects["ConfigMap"]["data"]["job.yaml"])
    stub = write_stub(tmp_path / "launcher", 'printf "%s\\n" "$@" > "$STUB_OUT"\n')
    for index in (0, 1):
        out = tmp_path / f"args{index}"
        env = entrypoint_env(**{**pod_env, "JOB_COMPLETION_INDEX": index, "LFQA_LAUNCHER": stub, "STUB_OUT": out,
                                "LFQA_JOB": job_file, "LFQA_OUTPUT_DIR": tmp_path / f"run{index}",
                                "LFQA_CACHE_DIR": tmp_path / "cache"})
        proc = subprocess.run([str(ENTRYPOINT), *container["args"]], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        args = out.read_text().splitlines()
        flags = dict(zip(args[:args.index("-m")][::2], args[:args.index("-m")][1::2]))
        assert flags == {"--config_file": "accelerate_configs/multi-node.yaml", "--num_machines": "2",
                         "--num_processes": "16", "--machine_rank": str(index),
                         "--main_process_ip": "lfqa-0.lfqa", "--main_process_port": "29500",
                         "--deepspeed_multinode_launcher": "standard"}
        rest = args[args.index("-m"):]
        assert rest[:3] == ["-m", "lfqa.train", str(job_file)]
        assert f"output.uri={OUTPUT_URI}" in rest and "train.epochs=2" in rest
        assert rest[-1] == f"output.dir={tmp_path / f'run{index}'}"


def test_entrypoint_checks_before_launching(tmp_path):
    stub = write_stub(tmp_path / "launcher", 'touch "$STUB_OUT"\n')
    common = dict(LFQA_LAUNCHER=stub, STUB_OUT=tmp_path / "launched", LFQA_JOB="jobs/tiny-cpu.yaml",
                  LFQA_OUTPUT_DIR=tmp_path / "run")
    for env, args in [(dict(NNODES=2, NODE_RANK=2), []), (dict(GPUS_PER_NODE="eight"), []),
                      ({}, ["train.learnig_rate=1"]), (dict(LFQA_ACCELERATE_CONFIG="nope.yaml"), [])]:
        proc = subprocess.run([str(ENTRYPOINT), *args], cwd=ROOT, env=entrypoint_env(**common, **env),
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, (env, args, proc.stderr)
        assert not (tmp_path / "launched").exists()
    # A first argument that is not an override is a command to run instead.
    proc = subprocess.run([str(ENTRYPOINT), "echo", "hello"], cwd=ROOT, env=entrypoint_env(), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == "hello\n"


def test_entrypoint_reports_preemption_as_75(tmp_path):
    """torch elastic turns the trainer's 75 into 1: preempted.json newer than the launch turns it back."""
    run = tmp_path / "run"
    cases = [
        ('echo {} > "$RUN/preempted.json"; exit 1\n', 75),  # preempted: the trainer left its note
        ("exit 1\n", 1),                                       # a crash, with an old note from an earlier launch
        ("exit 0\n", 0),
        ("exit 3\n", 3),
    ]
    for body, expected in cases:
        stub = write_stub(tmp_path / "launcher", body)
        env = entrypoint_env(LFQA_LAUNCHER=stub, RUN=run, LFQA_JOB="jobs/tiny-cpu.yaml", LFQA_OUTPUT_DIR=run)
        proc = subprocess.run([str(ENTRYPOINT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == expected, (body, proc.stderr)
    assert (run / "preempted.json").exists()  # the stale note of case 2 did not count


def test_entrypoint_forwards_sigterm(tmp_path):
    """SIGTERM reaches the launcher's process group, and the script waits for the whole group.

    The stub behaves like accelerate's single-process launcher: it dies at once on SIGTERM, while its child (the
    "trainer") takes a moment to checkpoint, writes preempted.json and exits 75.
    """
    run = tmp_path / "run"
    stub = write_stub(tmp_path / "launcher", """
(
    trap 'sleep 1; echo "{}" > "$RUN/preempted.json"; exit 75' TERM
    touch "$RUN/started"
    while :; do sleep 0.1; done
) &
wait
""")
    env = entrypoint_env(LFQA_LAUNCHER=stub, RUN=run, LFQA_JOB="jobs/tiny-cpu.yaml", LFQA_OUTPUT_DIR=run)
    proc = subprocess.Popen([str(ENTRYPOINT)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 30
        while not (run / "started").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, stderr
    assert "SIGTERM: passing it to the launcher" in stderr and (run / "preempted.json").exists()


def test_follow_script(tmp_path):
    """k8s/follow.sh against a fake kubectl: pod 0 is preempted, its successor is followed, the Job completes."""
    state = tmp_path / "state"
    state.mkdir()
    fake = write_stub(tmp_path / "kubectl", f"""
state={state}
args="$*"
case "$args" in
    "get job lfqa"*)
        if [[ -f $state/lfqa-0-b ]]; then echo "Complete "; fi ;;
    "get pods"*)
        if [[ -f $state/lfqa-0-a ]]; then echo "lfqa-0-a Failed"; echo "lfqa-0-b Running";
        else echo "lfqa-0-a Running"; fi ;;
    "logs --follow --container trainer pod/"*)
        pod=${{args##*pod/}}; touch "$state/$pod"; echo "log of $pod" ;;
    *) echo "unexpected: $args" >&2; exit 1 ;;
esac
""")
    proc = subprocess.run([str(ROOT / "k8s" / "follow.sh"), "lfqa"], env=dict(os.environ, KUBECTL=fake,
                          FOLLOW_POLL_SECONDS="0.1"), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert re.findall(r"log of (\S+)", proc.stdout) == ["lfqa-0-a", "lfqa-0-b"]
    assert "job/lfqa completed" in proc.stdout


# --- make targets, image ---------------------------------------------------------------------------------------

def make_dry_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-n", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_make_targets():
    image = make_dry_run("image", "IMAGE=registry.example.com/lfqa:1.2")
    assert image.returncode == 0
    assert "docker build --platform linux/amd64 --file Dockerfile --tag registry.example.com/lfqa:1.2" in image.stdout
    push = make_dry_run("push", "IMAGE=registry.example.com/lfqa:1.2").stdout
    assert push.index("docker build") < push.index("docker push registry.example.com/lfqa:1.2")
    delete = make_dry_run("k8s-delete", "NAME=run7", "NAMESPACE=ml").stdout
    assert "kubectl --namespace 'ml' delete job,service,configmap" in delete
    assert "app.kubernetes.io/instance=run7" in delete
    cluster = make_dry_run("train-cluster", "NODES=2", "GPUS_PER_NODE=8", f"OUTPUT_URI={OUTPUT_URI}").stdout
    assert "--nodes '2' --gpus-per-node '8'" in cluster and "--job 'jobs/led-base-lfqa.yaml'" in cluster
    assert re.search(r"\| kubectl +apply -f -", cluster) and "k8s/follow.sh 'lfqa'" in cluster
    # Without a bucket nothing is applied.
    proc = subprocess.run(["make", "train-cluster"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "OUTPUT_URI" in proc.stderr
    # The local targets are as they were.
    train = make_dry_run("train").stdout
    assert "accelerate launch --config_file accelerate_configs/cpu.yaml -m lfqa.train jobs/tiny-cpu.yaml" in train
    help_text = subprocess.run(["make", "help"], cwd=ROOT, capture_output=True, text=True, timeout=60).stdout
    for target in ("train", "test", "image", "push", "k8s-render", "train-cluster", "k8s-delete"):
        assert f"make {target} " in help_text


def test_dockerfile_matches_the_project():
    dockerfile = (ROOT / "Dockerfile").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    torch_pin = re.search(r'"torch==([^"]+)"', pyproject).group(1)
    assert f"ARG TORCH_VERSION={torch_pin}\n" in dockerfile
    # The CUDA torch goes in before lfqa's dependencies, which then keep it.
    assert dockerfile.index('pip install "torch==${TORCH_VERSION}" --index-url') < dockerfile.index("--requirement")
    python = re.search(r"ARG PYTHON_IMAGE=python:(\d+\.\d+)", dockerfile).group(1)
    assert f'requires-python = ">={python},' in pyproject
    assert "USER 1000:1000" in dockerfile
    assert 'ENTRYPOINT ["/usr/bin/tini", "--", "/app/k8s/entrypoint.sh"]' in dockerfile
    allowed = [line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")]
    # Everything the pods read from /app is in the build context; nothing local is.
    for path in ("lfqa", "jobs", "accelerate_configs", "deepspeed_configs", "k8s/entrypoint.sh", "pyproject.toml",
                 "README.md"):
        assert path in allowed
    assert not [p for p in allowed if p.startswith((".venv", ".cache", "runs", "wandb", ".git"))]


# --- two machines, for real --------------------------------------------------------------------------------------

def start_machines(tmp: Path, *overrides: str, extra_env: dict | None = None) -> list[subprocess.Popen]:
    """The pods' start script for indexes 0 and 1 on loopback: 2 machines x 1 process, accelerate's multi-node
    DeepSpeed config (the pods' own) on CPU over gloo; each machine with its own run folder, model and data cache
    (each builds the tiny model on its own disk, as a pod would)."""
    port = free_port()
    procs = []
    for index in (0, 1):
        env = entrypoint_env(JOB_COMPLETION_INDEX=index, NNODES=2, GPUS_PER_NODE=1, MASTER_ADDR="127.0.0.1",
                             MASTER_PORT=port, LFQA_JOB="jobs/tiny-cpu.yaml", LFQA_OUTPUT_DIR=tmp / f"run{index}",
                             LFQA_CACHE_DIR=tmp / f"cache{index}", LFQA_MASTER_WAIT_SECONDS=30,
                             **(extra_env or {}))
        log = open(tmp / f"machine{index}.log", "w")
        procs.append(subprocess.Popen([str(ENTRYPOINT), "tracking.progress_bar=false",
                                       "eval.every_steps=0", "eval.max_generate_samples=4",
                                       "data.max_train_samples=64", "data.max_eval_samples=8", *overrides],
                                      cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
        log.close()
    return procs


def finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[int]:
    try:
        return [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def logs(tmp: Path) -> str:
    return "\n".join(f"--- machine {i}\n" + (tmp / f"machine{i}.log").read_text()[-4000:] for i in (0, 1))


@pytest.mark.distributed
def test_two_machines_train(tmp_path):
    codes = finish(start_machines(tmp_path, "train.max_steps=6"))
    assert codes == [0, 0], logs(tmp_path)
    summary = json.loads((tmp_path / "run0" / "summary.json").read_text())
    assert summary["num_processes"] == 2
    rows = summary["ranks"]["rows_seen_per_rank_epoch0"]
    assert len(rows) == 2 and all(n > 0 for n in rows), rows
    assert "--machine_rank 1 --main_process_ip 127.0.0.1" in (tmp_path / "machine1.log").read_text()


@pytest.mark.distributed
def test_two_machines_preempted(tmp_path):
    """SIGTERM to machine 0's pod: through the start script and torch elastic to the trainer, which stops every
    rank at the same step, checkpoints, and exits so that the Job restarts the pods (75) instead of failing."""
    procs = start_machines(tmp_path, "train.max_steps=5000", "tracking.log_every_steps=1",
                           "eval.at_start=false", extra_env={"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": 60})
    log0 = tmp_path / "machine0.log"
    try:
        deadline = time.monotonic() + 240
        while not re.search(r"^step 2:", log0.read_text(), re.MULTILINE):
            assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, logs(tmp_path)
            time.sleep(0.2)
        procs[0].send_signal(signal.SIGTERM)
    finally:
        codes = finish(procs)
    assert codes[0] == 75, logs(tmp_path)
    assert "SIGTERM: passing it to the launcher" in log0.read_text()
    note = json.loads((tmp_path / "run0" / "preempted.json").read_text())
    assert note["step"] >= 2 and (tmp_path / "run0" / "checkpoints").is_dir()
    # Machine 1's pod (its own disk) also knows it was preempted: the Job restarts it instead of failing.
    assert codes[1] == 75, logs(tmp_path)
    assert json.loads((tmp_path / "run1" / "preempted.json").read_text())["step"] == note["step"]


@pytest.mark.distributed
def test_two_machines_preempted_then_new_pods_resume_from_the_bucket(tmp_path, moto_server):
    """The whole cluster story on loopback: 2 machines with their own disks sync checkpoints to S3 (each uploads
    its ranks' ZeRO shards; COMPLETE only once both have); SIGTERM stops both with 75; two new pods with empty
    disks resume from the bucket at that step and finish."""
    from s3_server import s3_env_vars

    bucket = moto_server.make_bucket()
    uri = f"s3://{bucket}/run"
    s3 = {**s3_env_vars(moto_server.endpoint), "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": 60}
    args = ["train.max_steps=5000", "tracking.log_every_steps=1", "eval.at_start=false", f"output.uri={uri}",
            f"output.s3_endpoint_url={moto_server.endpoint}", "checkpoint.every_steps=3"]
    first = tmp_path / "first"
    first.mkdir()
    procs = start_machines(first, *args, extra_env=s3)
    try:
        deadline = time.monotonic() + 240
        while not (first / "run0" / "checkpoints" / "step-00000003" / "COMPLETE").exists():
            assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, logs(first)
            time.sleep(0.2)
        procs[0].send_signal(signal.SIGTERM)
    finally:
        codes = finish(procs)
    assert codes == [75, 75], logs(first)
    step = json.loads((first / "run0" / "preempted.json").read_text())["step"]
    name = f"step-{step:08d}"
    keys = {o["Key"] for o in moto_server.client().list_objects_v2(Bucket=bucket, Prefix=f"run/checkpoints/{name}/")
            .get("Contents", [])}
    assert {f"run/checkpoints/{name}/COMPLETE", f"run/checkpoints/{name}/.nodes/0",
            f"run/checkpoints/{name}/.nodes/1"} <= keys
    shards = [k for k in keys if k.endswith("optim_states.pt")]
    assert len(shards) == 2, sorted(keys)  # one ZeRO optimizer shard per rank, from two machines' disks

    second = tmp_path / "second"
    second.mkdir()
    codes = finish(start_machines(second, *[a for a in args if not a.startswith("train.max_steps")],
                                  f"train.max_steps={step + 3}", extra_env=s3))
    assert codes == [0, 0], logs(second)
    assert f"resuming from {uri}/checkpoints/{name}" in (second / "machine0.log").read_text()
    summary = json.loads((second / "run0" / "summary.json").read_text())
    assert summary["resumed_from"]["step"] == step and summary["train"]["steps"] == step + 3
