"""Kubernetes pods as a cluster sees them: resources and QoS class, /dev/shm, credentials from a Secret or the pod's
own role (IRSA, EKS Pod Identity, GKE Workload Identity), the service account; in every flavour.

    pytest tests/test_k8s_pod.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml
from conftest import ROOT
from test_k8s import (
    ENTRYPOINT,
    IMAGE,
    OUTPUT_URI,
    check_resources,
    entrypoint_env,
    needs_kubectl,
    qos_class,
    quantity,
    render_env,
    write_stub,
)

FLAVORS = ("job", "pytorchjob", "trainjob")


def render_pods(flavor: str, nodes: int, gpus: int, *make_vars: str) -> list[dict]:
    """`make k8s-render` with these variables; the pod templates of the run (one per replica type)."""
    cmd = ["make", "-s", "k8s-render", f"FLAVOR={flavor}", f"NODES={nodes}", f"GPUS_PER_NODE={gpus}",
           f"IMAGE={IMAGE}", f"OUTPUT_URI={OUTPUT_URI}", *make_vars]
    proc = subprocess.run(cmd, cwd=ROOT, env=render_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    objects = {d["kind"]: d for d in yaml.safe_load_all(proc.stdout) if d}
    if flavor == "job":
        return [objects["Job"]["spec"]["template"]["spec"]]
    if flavor == "pytorchjob":
        return [r["template"]["spec"] for r in objects["PyTorchJob"]["spec"]["pytorchReplicaSpecs"].values()]
    (node,) = objects["TrainingRuntime"]["spec"]["template"]["spec"]["replicatedJobs"]
    return [node["template"]["spec"]["template"]["spec"]]


def render_fails(*make_vars: str) -> str:
    proc = subprocess.run(["make", "-s", "k8s-render", f"IMAGE={IMAGE}", f"OUTPUT_URI={OUTPUT_URI}", *make_vars],
                          cwd=ROOT, env=render_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and not proc.stdout, (make_vars, proc.stdout[-500:])
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("k8s/render.py: error:")]
    return line


def shm_of(pod: dict) -> str:
    return {v["name"]: v for v in pod["volumes"]}["dshm"]["emptyDir"]["sizeLimit"]


# --- resources and QoS -------------------------------------------------------------------------------------------

def test_qos_class_follows_the_kubernetes_rules():
    """The QoS computation itself: the old GPU-only pod is BestEffort, the first a node evicts."""
    def pod(**resources):
        return {"containers": [{"name": "c", "resources": resources}]}
    assert qos_class(pod(requests={"nvidia.com/gpu": 8}, limits={"nvidia.com/gpu": 8})) == "BestEffort"
    assert qos_class(pod(requests={"cpu": "4", "memory": "32Gi"}, limits={"memory": "32Gi"})) == "Burstable"
    assert qos_class(pod(limits={"cpu": "4", "memory": "32Gi"})) == "Guaranteed"  # requests default to limits
    assert qos_class(pod(requests={"cpu": "4000m", "memory": "32Gi"}, limits={"cpu": 4, "memory": "32Gi"})) \
        == "Guaranteed"
    assert qos_class(pod(requests={"cpu": "2", "memory": "32Gi"}, limits={"cpu": 4, "memory": "32Gi"})) \
        == "Burstable"


@needs_kubectl
@pytest.mark.parametrize("flavor", FLAVORS)
def test_pods_are_burstable_by_default_guaranteed_on_request(flavor):
    for pod in render_pods(flavor, 2, 8):
        assert qos_class(pod) == "Burstable"
        check_resources(pod, 8)
        limits = pod["containers"][0]["resources"]["limits"]
        assert "cpu" not in limits  # no CFS throttling of the data loader and NCCL threads
    for pod in render_pods(flavor, 2, 8, "QOS=guaranteed"):
        assert qos_class(pod) == "Guaranteed"
        check_resources(pod, 8)


@needs_kubectl
@pytest.mark.parametrize(("gpus", "cpu", "memory", "shm"), [(1, "4", "32Gi", "4Gi"), (8, "32", "256Gi", "32Gi")])
def test_default_resources_per_gpu(gpus, cpu, memory, shm):
    """The documented defaults (README, "Pod resources"): 4 CPUs and 32Gi per GPU, /dev/shm 1/8 of the memory."""
    (pod,) = render_pods("job", 1, gpus)
    resources = pod["containers"][0]["resources"]
    assert resources["requests"] == {"cpu": cpu, "memory": memory, "nvidia.com/gpu": gpus}
    assert resources["limits"] == {"memory": memory, "nvidia.com/gpu": gpus}
    assert shm_of(pod) == shm


@needs_kubectl
@pytest.mark.parametrize("flavor", FLAVORS)
def test_resources_from_make_variables(flavor):
    pods = render_pods(flavor, 2, 8, "CPUS_PER_NODE=90500m", "MEMORY_PER_NODE=1000G", "SHM_SIZE=64Gi")
    for pod in pods:
        resources = check_resources(pod, 8)
        assert resources["requests"]["cpu"] == "90500m"
        assert quantity(resources["requests"]["memory"]) == quantity(resources["limits"]["memory"]) == 10**12
        assert shm_of(pod) == "64Gi"
    # Without SHM_SIZE, /dev/shm follows the memory asked for.
    (pod, *_) = render_pods(flavor, 2, 8, "MEMORY_PER_NODE=96Gi")
    assert shm_of(pod) == "12Gi"


def test_train_cluster_passes_the_variables_on():
    cmd = ["make", "-n", "train-cluster", f"OUTPUT_URI={OUTPUT_URI}", "FLAVOR=trainjob", "CPUS_PER_NODE=48",
           "MEMORY_PER_NODE=400Gi", "SHM_SIZE=20Gi", "QOS=guaranteed", "SERVICE_ACCOUNT=lfqa-trainer", "SECRET="]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60).stdout
    for flag in ("--flavor 'trainjob'", "--cpus-per-node '48'", "--memory-per-node '400Gi'", "--shm-size '20Gi'",
                 "--qos 'guaranteed'", "--service-account 'lfqa-trainer'", "--secret ''"):
        assert flag in out, (flag, out)
    assert "FLAVOR='trainjob' k8s/follow.sh 'lfqa'" in out


@needs_kubectl
def test_bad_resources_are_refused():
    assert "SHM_SIZE" in render_fails("MEMORY_PER_NODE=16Gi", "SHM_SIZE=9Gi")
    assert "MEMORY_PER_NODE" in render_fails("MEMORY_PER_NODE=lots")
    assert "MEMORY_PER_NODE" in render_fails("MEMORY_PER_NODE=512Mi")
    assert "CPUS_PER_NODE" in render_fails("CPUS_PER_NODE=-4")
    assert "QOS" in render_fails("QOS=besteffort")
    assert "FLAVOR" in render_fails("FLAVOR=mpijob")
    assert "SERVICE_ACCOUNT" in render_fails("SERVICE_ACCOUNT=Not_A_Name")


# --- identities --------------------------------------------------------------------------------------------------

@needs_kubectl
@pytest.mark.parametrize("flavor", FLAVORS)
def test_service_account(flavor):
    for pod in render_pods(flavor, 2, 8, "SERVICE_ACCOUNT=lfqa-trainer"):
        assert pod["serviceAccountName"] == "lfqa-trainer"
        # The ServiceAccount decides whether the API token is mounted (the identity webhooks add their own).
        assert "automountServiceAccountToken" not in pod
    for pod in render_pods(flavor, 2, 8):
        assert "serviceAccountName" not in pod and pod["automountServiceAccountToken"] is False


def resolve_env(container: dict, secrets: dict[str, dict[str, str]]) -> dict[str, str]:
    """The container's environment as the kubelet builds it: a secretKeyRef whose Secret or key is missing is
    skipped when optional, and otherwise keeps the container from starting (CreateContainerConfigError)."""
    env = {}
    for entry in container["env"]:
        if "value" in entry:
            env[entry["name"]] = entry["value"]
            continue
        ref = entry["valueFrom"]["secretKeyRef"]
        value = secrets.get(ref["name"], {}).get(ref["key"])
        if value is None and not ref.get("optional", False):
            raise AssertionError(f"CreateContainerConfigError: secret {ref['name']!r} key {ref['key']!r} not found")
        if value is not None:
            env[entry["name"]] = value
    return env


@needs_kubectl
@pytest.mark.parametrize("flavor", FLAVORS)
def test_pod_starts_without_any_secret(tmp_path, flavor):
    """No Secret at all (credentials from the pod's role): the container is created and the start script
    launches, with no AWS key in its environment; SECRET= renders no Secret reference at all."""
    for pod in render_pods(flavor, 1, 1):
        (container,) = pod["containers"]
        env = resolve_env(container, secrets={})
        assert not [k for k in env if k.startswith("AWS_")]
        stub = write_stub(tmp_path / "launcher", 'env > "$STUB_OUT"\n')
        local = {"LFQA_JOB": "jobs/tiny-cpu.yaml", "LFQA_OUTPUT_DIR": tmp_path / "run",
                 "LFQA_CACHE_DIR": tmp_path / "cache", "LFQA_LAUNCHER": stub, "STUB_OUT": tmp_path / "env"}
        proc = subprocess.run([str(ENTRYPOINT)], cwd=ROOT, env={**entrypoint_env(**{**env, **local})},
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert "AWS_ACCESS_KEY_ID=" not in (tmp_path / "env").read_text()
        # With the Secret, its keys arrive.
        env = resolve_env(container, {"lfqa-credentials": {"AWS_ACCESS_KEY_ID": "AKIA", "AWS_REGION": "eu-west-1"}})
        assert env["AWS_ACCESS_KEY_ID"] == "AKIA" and env["AWS_REGION"] == "eu-west-1"
    for pod in render_pods(flavor, 1, 1, "SECRET="):
        assert not [e for e in pod["containers"][0]["env"] if "valueFrom" in e]


class RoleEndpoint:
    """The container credentials endpoint EKS Pod Identity gives a pod (AWS_CONTAINER_CREDENTIALS_FULL_URI, with
    an authorization token): it hands out a role's temporary keys and records who asked."""

    def __init__(self, token: str) -> None:
        self.requests: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                outer.requests.append(self.headers.get("Authorization", ""))
                ok = self.headers.get("Authorization") == token
                body = json.dumps({"AccessKeyId": "ASIAPODROLE", "SecretAccessKey": "pod-role-secret",
                                   "Token": "pod-role-session", "Expiration": "2099-01-01T00:00:00Z"} if ok
                                  else {"message": "bad token"}).encode()
                self.send_response(200 if ok else 401)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1/credentials"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@needs_kubectl
def test_boto3_takes_the_pod_role(tmp_path, moto_server):
    """A pod with no Secret and a role: through the start script (as `docker run IMAGE lfqa ...` runs a command),
    lfqa reaches the bucket with the keys the role's endpoint hands out."""
    from s3_server import s3_env_vars

    bucket = moto_server.make_bucket()
    (pod,) = render_pods("job", 1, 1)
    env = resolve_env(pod["containers"][0], secrets={})
    token = "pod-identity-token-0123"
    role = RoleEndpoint(token)
    try:
        aws = {k: v for k, v in s3_env_vars().items() if not k.startswith("AWS_ACCESS_KEY_ID")
               and not k.startswith("AWS_SECRET_ACCESS_KEY")}
        aws.update(AWS_CONTAINER_CREDENTIALS_FULL_URI=role.url, AWS_CONTAINER_AUTHORIZATION_TOKEN=token)
        run_env = entrypoint_env(**{**env, **aws})
        assert "AWS_ACCESS_KEY_ID" not in run_env and "AWS_SECRET_ACCESS_KEY" not in run_env
        proc = subprocess.run([str(ENTRYPOINT), sys.executable, "-m", "lfqa.cli", "checkpoints", "list",
                               f"s3://{bucket}/run", "--s3-endpoint-url", moto_server.endpoint],
                              cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=120)
    finally:
        role.close()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"no checkpoints in s3://{bucket}/run" in proc.stdout
    assert role.requests and set(role.requests) == {token}
