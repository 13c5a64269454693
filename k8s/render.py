"""Render the Kubernetes manifests of a training run: any number of machines and GPUs, any job file, three ways
to run it (FLAVOR): a plain Indexed Job, a Kubeflow Training Operator v1 PyTorchJob, or a Kubeflow Trainer v2
TrainJob with a TrainingRuntime of lfqa's own.

    python3 k8s/render.py --nodes 2 --gpus-per-node 8 --image registry.example.com/lfqa:0.1.0 \\
        --output-uri s3://my-bucket/lfqa/run1 [--flavor job|pytorchjob|trainjob] [--job jobs/led-base-lfqa.yaml] \\
        [--name lfqa] [--namespace ml] [--cpus-per-node 32] [--memory-per-node 256Gi] [--service-account lfqa] \\
        [-- train.epochs=2 ...]                       # what `make k8s-render` runs; prints the YAML
    python3 k8s/render.py ... --write-overlay DIR    # a folder for `kubectl apply -k DIR` instead

The Job is a kustomize overlay of k8s/base written into a temporary folder (the job file copied beside it, so
no load restrictor flag is needed) and rendered with `kubectl kustomize`; the Kubeflow flavours wrap that same
pod template into their own resources (which needs PyYAML, as in the venv). The Job flavour needs only the
standard library: it runs before any virtual environment exists. When lfqa is importable the job file and its
overrides are checked here, before anything reaches a cluster; the pods check them again (k8s/entrypoint.sh).

Pod resources, per machine (pod), derived from its GPUs unless set: CPU_PER_GPU CPUs and MEMORY_PER_GPU of
memory per GPU requested; memory limited to its request (a pod that stays within it is not evicted for memory
first); the CPU limit only with --qos guaranteed (a CPU limit throttles the data loader and NCCL threads).
/dev/shm is memory-backed, so what is written there counts against that limit: 1/8 of it by default.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "k8s" / "base"
MASTER_PORT = 29500
FLAVORS = ("job", "pytorchjob", "trainjob")
#: Kubernetes object names used here (Job, Service, pod hostnames <name>-<index>) are DNS labels.
DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
#: Defaults per GPU of a machine (see the module docstring and README, "Pod resources").
CPU_PER_GPU = 4
MEMORY_PER_GPU = 32 * 2**30
SHM_FRACTION = Fraction(1, 8)
#: The Secret's keys: all optional, so that a pod with a role (IRSA, Pod Identity, Workload Identity, an
#: instance profile) starts without any Secret and boto3 takes the role.
SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_REGION",
               "WANDB_API_KEY", "HF_TOKEN")
QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
SUFFIXES = {"m": Fraction(1, 1000), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
            "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


class RenderError(ValueError):
    """A value that cannot make a valid run; the message names the make variable."""


def parse_quantity(text: str, variable: str) -> Fraction:
    """A Kubernetes quantity (48, 500m, 256Gi, 300G) as a number of cores or bytes."""
    match = QUANTITY.match(text.strip())
    if not match or Fraction(match.group(1)) <= 0:
        raise RenderError(f"{variable}: expected a positive Kubernetes quantity such as 32, 7500m, 256Gi or "
                          f"300G, got {text!r}")
    return Fraction(match.group(1)) * SUFFIXES.get(match.group(2) or "", 1)


def format_cpu(cores: Fraction) -> str:
    return str(int(cores)) if cores.denominator == 1 else f"{int(cores * 1000)}m"


def format_bytes(size: Fraction) -> str:
    """Exact, in the largest unit that divides it (a fraction of a byte rounded down)."""
    size = Fraction(int(size))
    for suffix in ("Ti", "Gi", "Mi", "T", "G", "M", "Ki", "k"):
        if size % SUFFIXES[suffix] == 0:
            return f"{int(size // SUFFIXES[suffix])}{suffix}"
    return str(int(size))


@dataclass(frozen=True)
class PodResources:
    """What one machine's pod asks for; memory and /dev/shm in bytes."""

    gpus: int
    cpus: Fraction
    memory: Fraction
    shm: Fraction
    guaranteed: bool

    def container(self) -> dict:
        requests = {"cpu": format_cpu(self.cpus), "memory": format_bytes(self.memory), "nvidia.com/gpu": self.gpus}
        limits = {"memory": requests["memory"], "nvidia.com/gpu": self.gpus}
        if self.guaranteed:
            limits["cpu"] = requests["cpu"]
        return {"requests": requests, "limits": limits}


def pod_resources(args: argparse.Namespace) -> PodResources:
    """CPU, memory and /dev/shm of a machine from the make variables, or derived from its GPUs."""
    g = args.gpus_per_node
    cpus = parse_quantity(args.cpus_per_node, "CPUS_PER_NODE") if args.cpus_per_node else Fraction(CPU_PER_GPU * g)
    memory = (parse_quantity(args.memory_per_node, "MEMORY_PER_NODE") if args.memory_per_node
              else Fraction(MEMORY_PER_GPU * g))
    if memory < 2**30:
        raise RenderError(f"MEMORY_PER_NODE must be at least 1Gi, got {args.memory_per_node!r}")
    shm = parse_quantity(args.shm_size, "SHM_SIZE") if args.shm_size else memory * SHM_FRACTION
    if shm > memory / 2:
        raise RenderError(f"SHM_SIZE ({format_bytes(shm)}) must be at most half of MEMORY_PER_NODE "
                          f"({format_bytes(memory)}): /dev/shm is memory and counts against the pod's limit")
    if args.qos not in ("burstable", "guaranteed"):
        raise RenderError(f"QOS must be burstable or guaranteed, got {args.qos!r}")
    return PodResources(gpus=g, cpus=cpus, memory=memory, shm=Fraction(int(shm)), guaranteed=args.qos == "guaranteed")


def parse_image(image: str) -> dict:
    """`images:` entry of a kustomization for name[:tag][@digest]."""
    name, digest = (image.split("@", 1) + [""])[:2] if "@" in image else (image, "")
    tag = ""
    last = name.rsplit("/", 1)[-1]
    if ":" in last:  # a ':' before the last '/' is a registry port, not a tag
        name, tag = name.rsplit(":", 1)
    if not name or not re.fullmatch(r"[a-z0-9][a-z0-9._/:-]*", name) or name.endswith((":", "/")):
        raise RenderError(f"IMAGE: not an image reference: {image!r}")
    entry = {"name": "lfqa", "newName": name}
    if digest:
        entry["digest"] = digest
    elif tag:
        entry["newTag"] = tag
    return entry


def parse_node_selector(text: str) -> dict[str, str]:
    selector = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise RenderError(f"NODE_SELECTOR: expected key=value[,key=value], got {text!r}")
        selector[key] = value
    return selector


def check_job(job: Path, overrides: list[str]) -> None:
    """Validate the job with lfqa's own loader when lfqa is importable (the venv); otherwise the pods do."""
    try:
        sys.path.insert(0, str(ROOT))
        from lfqa.config import ConfigError, load_job
    except ImportError:
        print(f"k8s/render.py: lfqa is not importable here, {job} is checked by the pods", file=sys.stderr)
        return
    finally:
        sys.path.remove(str(ROOT))
    try:
        load_job(str(job), overrides)
    except ConfigError as err:
        raise RenderError(f"JOB: {err}") from None


def check_values(args: argparse.Namespace) -> None:
    """Every make variable that is not a resource quantity, before anything is written."""
    if args.flavor not in FLAVORS:
        raise RenderError(f"FLAVOR must be one of {', '.join(FLAVORS)}, got {args.flavor!r}")
    if args.nodes < 1:
        raise RenderError(f"NODES must be >= 1, got {args.nodes}")
    if args.gpus_per_node < 1:
        raise RenderError(f"GPUS_PER_NODE must be >= 1, got {args.gpus_per_node}")
    # The longest pod hostname: <name>-<index> (Job), <name>-worker-<index> (PyTorchJob), <name>-node-0-<index>.
    longest = {"job": f"{args.name}-{args.nodes - 1}", "pytorchjob": f"{args.name}-worker-{args.nodes - 1}",
               "trainjob": f"{args.name}-node-0-{args.nodes - 1}"}.get(args.flavor, args.name)
    if not DNS_LABEL.match(args.name) or len(longest) > 63:
        raise RenderError(f"NAME must be a DNS label (a-z, 0-9, '-', starting with a letter) short enough for "
                          f"pod names such as {longest} (63 characters), got {args.name!r}")
    if args.namespace and (not DNS_LABEL.match(args.namespace) or len(args.namespace) > 63):
        raise RenderError(f"NAMESPACE must be a DNS label, got {args.namespace!r}")
    if not args.output_uri.startswith("s3://") or len(args.output_uri) <= len("s3://"):
        raise RenderError("OUTPUT_URI=s3://bucket/prefix is required: checkpoints and the final model go there "
                          f"(the pods' disks are deleted with them), got {args.output_uri!r}")
    if args.secret and not DNS_SUBDOMAIN.match(args.secret):
        raise RenderError(f"SECRET must name a Secret (or be empty: credentials from the pod's role only), "
                          f"got {args.secret!r}")
    if args.service_account and (not DNS_SUBDOMAIN.match(args.service_account) or len(args.service_account) > 253):
        raise RenderError(f"SERVICE_ACCOUNT must name a ServiceAccount, got {args.service_account!r}")
    if not Path(args.job).is_file():
        raise RenderError(f"JOB: {args.job} not found")
    config = Path(args.accelerate_config)
    if config.is_absolute() or not (ROOT / config).is_file():
        raise RenderError(f"ACCELERATE_CONFIG must be a file of this repository (the image has it in /app), "
                          f"got {args.accelerate_config!r}")
    for override in args.overrides:
        if "=" not in override:
            raise RenderError(f"ARGS: expected key=value, got {override!r}")


def container_env(args: argparse.Namespace) -> list[dict]:
    """The trainer's environment beyond the base's: the run's size, its bucket and the Secret's keys."""
    env = []
    if args.flavor == "job":  # the Kubeflow operators set these themselves (k8s/entrypoint.sh reads both)
        env += [{"name": "NNODES", "value": str(args.nodes)},
                {"name": "GPUS_PER_NODE", "value": str(args.gpus_per_node)},
                {"name": "MASTER_ADDR", "value": f"{args.name}-0.{args.name}"},
                {"name": "MASTER_PORT", "value": str(MASTER_PORT)}]
    env += [{"name": "LFQA_ACCELERATE_CONFIG", "value": Path(args.accelerate_config).as_posix()},
            {"name": "LFQA_OUTPUT_URI", "value": args.output_uri}]
    if args.flavor == "pytorchjob":
        # restartPolicy ExitCode restarts a pod that exits 128-255 without counting it: a preempted trainer's
        # 75 would be permanent (1-127) there.
        env.append({"name": "LFQA_PREEMPTED_EXIT_CODE", "value": str(PYTORCHJOB_PREEMPTED_EXIT_CODE)})
    if args.secret:
        env += [{"name": key, "valueFrom": {"secretKeyRef": {"name": args.secret, "key": key, "optional": True}}}
                for key in SECRET_KEYS]
    return env


def build_overlay(args: argparse.Namespace, overlay_dir: Path) -> dict:
    """The kustomization (as a dict) of one run's Job, relative to overlay_dir; validates every value first."""
    check_values(args)
    resources = pod_resources(args)
    check_job(Path(args.job), args.overrides)

    # The job file is copied beside the kustomization (kustomize reads files below its folder only). Its
    # ConfigMap is named after the run, so deleting one run never removes what another run's pods mount.
    shutil.copyfile(args.job, overlay_dir / "job.yaml")
    name, n = args.name, args.nodes
    selector = parse_node_selector(args.node_selector)
    pod_patch = {
        "subdomain": name,
        # $patch: replace, so that NODE_SELECTOR replaces the base's selector instead of adding to it.
        "nodeSelector": {"$patch": "replace", **selector} if selector else None,
        "containers": [{
            "name": "trainer",
            "env": container_env(args),
            "args": list(args.overrides),
            "resources": resources.container(),
        }],
        "volumes": [{"name": "job", "configMap": {"name": f"{name}-job"}},
                    {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": format_bytes(resources.shm)}}],
    }
    if args.service_account:
        # The identity webhooks (IRSA, EKS Pod Identity) project their own token; whether the Kubernetes API
        # token is mounted as well is then the ServiceAccount's own setting.
        pod_patch.update(serviceAccountName=args.service_account, automountServiceAccountToken=None)
    job_patch = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {"completions": n, "parallelism": n, "backoffLimit": 2 * n, "template": {"spec": pod_patch}},
    }
    service_patch = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name}}
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(BASE, overlay_dir)],
        "configMapGenerator": [{"name": f"{name}-job", "files": ["job.yaml"]}],
        "images": [parse_image(args.image)],
        # includeSelectors: the Service selects this run's pods only.
        "labels": [{"pairs": {"app.kubernetes.io/name": "lfqa", "app.kubernetes.io/instance": name},
                    "includeSelectors": True}],
        "patches": [
            {"target": {"kind": "Job", "name": "lfqa"}, "options": {"allowNameChange": True},
             "patch": json.dumps(job_patch)},
            {"target": {"kind": "Service", "name": "lfqa"}, "options": {"allowNameChange": True},
             "patch": json.dumps(service_patch)},
        ],
    }
    if args.namespace:
        kustomization["namespace"] = args.namespace
    return kustomization


# --- Kubeflow ---------------------------------------------------------------------------------------------------

#: What a PyTorchJob's pod exits with when its trainer was preempted (retryable under restartPolicy ExitCode).
PYTORCHJOB_PREEMPTED_EXIT_CODE = 143
PYTORCHJOB_PORT = 23456
#: Set by the operators (k8s/entrypoint.sh maps theirs): not in a Kubeflow flavour's own environment.
JOB_ONLY_ENV = ("NNODES", "GPUS_PER_NODE", "MASTER_ADDR", "MASTER_PORT")


def pod_template_for(job: dict, container_name: str) -> dict:
    """The rendered Job's pod template, for an operator that makes the pods and their DNS names itself."""
    template = copy.deepcopy(job["spec"]["template"])
    pod = template["spec"]
    pod.pop("subdomain", None)
    (container,) = pod["containers"]
    container["name"] = container_name
    container["env"] = [e for e in container["env"] if e["name"] not in JOB_ONLY_ENV]
    return template


def failure_rules(job: dict, container_name: str) -> list[dict]:
    rules = copy.deepcopy(job["spec"]["podFailurePolicy"]["rules"])
    for rule in rules:
        if "onExitCodes" in rule:
            rule["onExitCodes"]["containerName"] = container_name
    return rules


def pytorchjob(job: dict, args: argparse.Namespace) -> dict:
    """Training Operator v1: Master (rank 0) and Worker replicas, restartPolicy ExitCode (1-127 fail the
    PyTorchJob at once, 128-255 restart the pod without counting against runPolicy.backoffLimit)."""
    template = pod_template_for(job, "pytorch")
    template["spec"]["restartPolicy"] = "Never"  # what ExitCode needs; the operator sets it too
    template["spec"]["containers"][0]["ports"] = [{"name": "pytorchjob-port", "containerPort": PYTORCHJOB_PORT}]
    replicas = {"Master": {"replicas": 1, "restartPolicy": "ExitCode", "template": template}}
    if args.nodes > 1:
        replicas["Worker"] = {"replicas": args.nodes - 1, "restartPolicy": "ExitCode",
                              "template": copy.deepcopy(template)}
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": copy.deepcopy(job["metadata"]),
            "spec": {"nprocPerNode": str(args.gpus_per_node),
                     # Running: pods left running when the PyTorchJob ends are deleted (they hold GPUs); the
                     # finished ones stay for their logs.
                     # No backoffLimit: the operator counts only OnFailure/Always restarts against it.
                     "runPolicy": {"cleanPodPolicy": "Running"},
                     "pytorchReplicaSpecs": replicas}}


def trainjob(job: dict, args: argparse.Namespace) -> list[dict]:
    """Trainer v2: a namespaced TrainingRuntime (a JobSet of one Indexed Job, `node`, with the plain Job's
    podFailurePolicy) and the TrainJob that runs it."""
    metadata = copy.deepcopy(job["metadata"])
    child = {
        "completionMode": "Indexed", "completions": args.nodes, "parallelism": args.nodes,
        # Exit 75 and disruptions are ignored (pods replaced, not counted), crashes count, exit 2 fails.
        "backoffLimit": job["spec"]["backoffLimit"],
        "podFailurePolicy": {"rules": failure_rules(job, "node")},
        "template": pod_template_for(job, "node"),
    }
    runtime = {
        "apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainingRuntime",
        "metadata": {**metadata, "labels": {**metadata.get("labels", {}), "trainer.kubeflow.org/framework": "torch"}},
        "spec": {
            "mlPolicy": {"numNodes": args.nodes, "torch": {}},
            "template": {"spec": {
                # JobSet fails the set when its Job fails: at once for a bad job file (the Job's FailJob rule),
                # and after backoffLimit crashes; restarting the whole set would not add to either.
                "failurePolicy": {"maxRestarts": 0, "rules": [
                    {"name": "invalid-job-file", "action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"]},
                ]},
                "replicatedJobs": [{
                    "name": "node", "replicas": 1,
                    "template": {"metadata": {"labels": {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}},
                                 "spec": child},
                }],
            }},
        },
    }
    train = {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob", "metadata": metadata,
             "spec": {"runtimeRef": {"apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime",
                                     "name": metadata["name"]},
                      "trainer": {"numNodes": args.nodes, "numProcPerNode": args.gpus_per_node}}}
    return [runtime, train]


def kubeflow_manifests(text: str, args: argparse.Namespace) -> str:
    """The rendered Job and Service rewritten as the flavour's resources (the ConfigMap stays)."""
    try:
        import yaml
    except ImportError:
        raise RenderError(f"FLAVOR={args.flavor} needs PyYAML to rewrite the manifests: run it with the venv's "
                          "python (make setup), or pip install pyyaml") from None
    class Dumper(yaml.SafeDumper):
        """Multi-line strings (the job file in the ConfigMap) as blocks, as kubectl kustomize prints them."""

    Dumper.add_representer(str, lambda dumper, value: dumper.represent_scalar(
        "tag:yaml.org,2002:str", value, style="|" if "\n" in value else None))
    docs = [d for d in yaml.safe_load_all(text) if d]
    by_kind = {d["kind"]: d for d in docs}
    job = by_kind["Job"]
    out = [by_kind["ConfigMap"]]
    out += [pytorchjob(job, args)] if args.flavor == "pytorchjob" else trainjob(job, args)
    return yaml.dump_all(out, Dumper=Dumper, sort_keys=False, width=120)


def render(args: argparse.Namespace) -> str:
    """The manifests of one run, as `kubectl kustomize` prints them."""
    with tempfile.TemporaryDirectory(prefix="lfqa-k8s-") as tmp:
        overlay_dir = Path(tmp)
        overlay_dir.mkdir(parents=True, exist_ok=True)
        (overlay_dir / "kustomization.yaml").write_text(json.dumps(build_overlay(args, overlay_dir), indent=2) + "\n")
        proc = subprocess.run([args.kubectl, "kustomize", str(overlay_dir)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RenderError(f"kubectl kustomize failed: {proc.stderr.strip()}")
    return proc.stdout if args.flavor == "job" else kubeflow_manifests(proc.stdout, args)


def write_overlay(args: argparse.Namespace, overlay_dir: Path) -> None:
    """A folder that plain `kubectl kustomize DIR` / `kubectl apply -k DIR` takes: the Job flavour as an overlay
    of k8s/base (JSON is YAML, and needs no YAML library here), a Kubeflow flavour as its rendered manifests."""
    overlay_dir.mkdir(parents=True, exist_ok=True)
    if args.flavor == "job":
        kustomization = build_overlay(args, overlay_dir)
    else:
        (overlay_dir / "manifests.yaml").write_text(render(args))
        kustomization = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                         "resources": ["manifests.yaml"]}
    (overlay_dir / "kustomization.yaml").write_text(json.dumps(kustomization, indent=2) + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flavor", default="job", help=f"what runs the pods: {' | '.join(FLAVORS)}")
    parser.add_argument("--nodes", type=int, default=1, help="machines (pods), NODES")
    parser.add_argument("--gpus-per-node", type=int, default=1, help="GPUs and processes per machine")
    parser.add_argument("--cpus-per-node", default="",
                        help=f"CPUs requested per machine (default {CPU_PER_GPU} per GPU)")
    parser.add_argument("--memory-per-node", default="",
                        help=f"memory requested and limit per machine (default {MEMORY_PER_GPU // 2**30}Gi per GPU)")
    parser.add_argument("--shm-size", default="", help="/dev/shm size (default 1/8 of the memory, at most 1/2)")
    parser.add_argument("--qos", default="burstable",
                        help="burstable (no CPU limit) or guaranteed (CPU limit = request)")
    parser.add_argument("--image", required=True, help="the training image, name[:tag][@digest]")
    parser.add_argument("--job", default="jobs/led-base-lfqa.yaml", help="job YAML, mounted at /etc/lfqa/job.yaml")
    parser.add_argument("--output-uri", default="", help="s3://bucket/prefix for checkpoints and the model")
    parser.add_argument("--name", default="lfqa", help="Job and Service name")
    parser.add_argument("--namespace", default="", help="namespace (default: kubectl's current one)")
    parser.add_argument("--accelerate-config", default="accelerate_configs/multi-node.yaml",
                        help="accelerate YAML, a path in this repository (and in the image's /app)")
    parser.add_argument("--secret", default="lfqa-credentials",
                        help="Secret with the AWS, W&B and HF keys, each optional; empty: no Secret")
    parser.add_argument("--service-account", default="", help="the pods' ServiceAccount (IRSA, Workload Identity)")
    parser.add_argument("--node-selector", default="nvidia.com/gpu.present=true",
                        help="key=value[,key=value] the nodes must carry; empty: none")
    parser.add_argument("--kubectl", default=os.environ.get("KUBECTL", "kubectl"))
    parser.add_argument("--write-overlay", metavar="DIR", help="write a kustomize folder to DIR instead of printing")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="job overrides (after --)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if not shutil.which(args.kubectl) and not (args.write_overlay and args.flavor == "job"):
            raise RenderError(f"{args.kubectl} not found: it renders the manifests (kubectl kustomize)")
        if args.write_overlay:
            write_overlay(args, Path(args.write_overlay))
            print(f"wrote {args.write_overlay}/kustomization.yaml: kubectl apply -k {args.write_overlay}",
                  file=sys.stderr)
        else:
            sys.stdout.write(render(args))
    except RenderError as err:
        print(f"k8s/render.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
