"""Render the Kubernetes manifests of a training run: any number of machines and GPUs, any job file.

    python3 k8s/render.py --nodes 2 --gpus-per-node 8 --image registry.example.com/lfqa:0.1.0 \\
        --output-uri s3://my-bucket/lfqa/run1 [--job jobs/led-base-lfqa.yaml] [--name lfqa] [--namespace ml] \\
        [-- train.epochs=2 ...]                       # what `make k8s-render` runs; prints the YAML
    python3 k8s/render.py ... --write-overlay DIR    # keep the generated overlay instead (kubectl apply -k DIR)

It writes a kustomize overlay of k8s/base into a temporary folder (the job file copied beside it, so no load
restrictor flag is needed) and prints `kubectl kustomize` of it. Standard library only: it runs before any
virtual environment exists. When lfqa is importable the job file and its overrides are checked here, before
anything reaches a cluster; the pods check them again (k8s/entrypoint.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "k8s" / "base"
MASTER_PORT = 29500
#: Kubernetes object names used here (Job, Service, pod hostnames <name>-<index>) are DNS labels.
DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


class RenderError(ValueError):
    """A value that cannot make a valid run; the message names the make variable."""


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


def build_overlay(args: argparse.Namespace, overlay_dir: Path) -> dict:
    """The kustomization (as a dict) of one run, relative to overlay_dir; validates every value first."""
    if args.nodes < 1:
        raise RenderError(f"NODES must be >= 1, got {args.nodes}")
    if args.gpus_per_node < 1:
        raise RenderError(f"GPUS_PER_NODE must be >= 1, got {args.gpus_per_node}")
    name = args.name
    if not DNS_LABEL.match(name) or len(f"{name}-{args.nodes - 1}") > 63:
        raise RenderError(f"NAME must be a DNS label (a-z, 0-9, '-', starting with a letter) short enough for "
                          f"pod names {name}-<index> (63 characters), got {name!r}")
    if args.namespace and (not DNS_LABEL.match(args.namespace) or len(args.namespace) > 63):
        raise RenderError(f"NAMESPACE must be a DNS label, got {args.namespace!r}")
    if not args.output_uri.startswith("s3://") or len(args.output_uri) <= len("s3://"):
        raise RenderError("OUTPUT_URI=s3://bucket/prefix is required: checkpoints and the final model go there "
                          f"(the pods' disks are deleted with them), got {args.output_uri!r}")
    if not args.secret or not DNS_LABEL.match(args.secret.replace(".", "-")):
        raise RenderError(f"SECRET must name a Secret, got {args.secret!r}")
    job = Path(args.job)
    if not job.is_file():
        raise RenderError(f"JOB: {job} not found")
    config = Path(args.accelerate_config)
    if config.is_absolute() or not (ROOT / config).is_file():
        raise RenderError(f"ACCELERATE_CONFIG must be a file of this repository (the image has it in /app), "
                          f"got {args.accelerate_config!r}")
    for override in args.overrides:
        if "=" not in override:
            raise RenderError(f"ARGS: expected key=value, got {override!r}")
    check_job(job, args.overrides)

    # The job file is copied beside the kustomization (kustomize reads files below its folder only). Its
    # ConfigMap is named after the run, so deleting one run never removes what another run's pods mount.
    shutil.copyfile(job, overlay_dir / "job.yaml")
    n, g = args.nodes, args.gpus_per_node
    env = [
        {"name": "NNODES", "value": str(n)},
        {"name": "GPUS_PER_NODE", "value": str(g)},
        {"name": "MASTER_ADDR", "value": f"{name}-0.{name}"},
        {"name": "MASTER_PORT", "value": str(MASTER_PORT)},
        {"name": "LFQA_ACCELERATE_CONFIG", "value": config.as_posix()},
        {"name": "LFQA_OUTPUT_URI", "value": args.output_uri},
    ]
    env += [{"name": var, "valueFrom": {"secretKeyRef": {"name": args.secret, "key": var}}}
            for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")]
    env += [{"name": var, "valueFrom": {"secretKeyRef": {"name": args.secret, "key": var, "optional": True}}}
            for var in ("AWS_ENDPOINT_URL", "AWS_REGION", "WANDB_API_KEY", "HF_TOKEN")]
    selector = parse_node_selector(args.node_selector)
    job_patch = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "completions": n,
            "parallelism": n,
            "backoffLimit": 2 * n,
            "template": {"spec": {
                "subdomain": name,
                # $patch: replace, so that NODE_SELECTOR replaces the base's selector instead of adding to it.
                "nodeSelector": {"$patch": "replace", **selector} if selector else None,
                "containers": [{
                    "name": "trainer",
                    "env": env,
                    "args": list(args.overrides),
                    "resources": {"requests": {"nvidia.com/gpu": g}, "limits": {"nvidia.com/gpu": g}},
                }],
                "volumes": [{"name": "job", "configMap": {"name": f"{name}-job"}}],
            }},
        },
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


def render(args: argparse.Namespace) -> str:
    """The manifests of one run, as `kubectl kustomize` prints them."""
    with tempfile.TemporaryDirectory(prefix="lfqa-k8s-") as tmp:
        overlay_dir = Path(tmp)
        write_overlay(args, overlay_dir)
        proc = subprocess.run([args.kubectl, "kustomize", str(overlay_dir)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RenderError(f"kubectl kustomize failed: {proc.stderr.strip()}")
        return proc.stdout


def write_overlay(args: argparse.Namespace, overlay_dir: Path) -> None:
    overlay_dir.mkdir(parents=True, exist_ok=True)
    kustomization = build_overlay(args, overlay_dir)
    # JSON is YAML, and needs no YAML library here.
    (overlay_dir / "kustomization.yaml").write_text(json.dumps(kustomization, indent=2) + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=1, help="machines (pods), NODES")
    parser.add_argument("--gpus-per-node", type=int, default=1, help="GPUs and processes per machine")
    parser.add_argument("--image", required=True, help="the training image, name[:tag][@digest]")
    parser.add_argument("--job", default="jobs/led-base-lfqa.yaml", help="job YAML, mounted at /etc/lfqa/job.yaml")
    parser.add_argument("--output-uri", default="", help="s3://bucket/prefix for checkpoints and the model")
    parser.add_argument("--name", default="lfqa", help="Job and Service name")
    parser.add_argument("--namespace", default="", help="namespace (default: kubectl's current one)")
    parser.add_argument("--accelerate-config", default="accelerate_configs/multi-node.yaml",
                        help="accelerate YAML, a path in this repository (and in the image's /app)")
    parser.add_argument("--secret", default="lfqa-credentials", help="Secret with the AWS, W&B and HF keys")
    parser.add_argument("--node-selector", default="nvidia.com/gpu.present=true",
                        help="key=value[,key=value] the nodes must carry; empty: none")
    parser.add_argument("--kubectl", default=os.environ.get("KUBECTL", "kubectl"))
    parser.add_argument("--write-overlay", metavar="DIR", help="write the overlay to DIR instead of rendering")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="job overrides (after --)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.write_overlay:
            write_overlay(args, Path(args.write_overlay))
            print(f"wrote {args.write_overlay}/kustomization.yaml and job.yaml", file=sys.stderr)
        else:
            if not shutil.which(args.kubectl):
                raise RenderError(f"{args.kubectl} not found: it renders the manifests (kubectl kustomize)")
            sys.stdout.write(render(args))
    except RenderError as err:
        print(f"k8s/render.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
