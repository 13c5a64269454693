# lfqa: every command a person runs. `make train` and `make test` set everything up first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
JOB ?= jobs/tiny-cpu.yaml
ACCELERATE_CONFIG ?= accelerate_configs/cpu.yaml
ARGS ?=
PYTEST_ARGS ?=
BENCH_ARGS ?=
# The stamp is refreshed whenever pyproject.toml changes, so set-up is a no-op when nothing changed.
STAMP := $(VENV)/.lfqa-installed

# Container image and Kubernetes (k8s/): `make train-cluster NODES=2 GPUS_PER_NODE=8 IMAGE=... OUTPUT_URI=...`
IMAGE ?= lfqa:latest
PLATFORM ?= linux/amd64
DOCKER ?= docker
DOCKER_BUILD_ARGS ?=
KUBECTL ?= kubectl
NODES ?= 1
GPUS_PER_NODE ?= 1
NAME ?= lfqa
NAMESPACE ?=
OUTPUT_URI ?=
SECRET ?= lfqa-credentials
SERVICE_ACCOUNT ?=
NODE_SELECTOR ?= nvidia.com/gpu.present=true
# job (Indexed Job), pytorchjob (Kubeflow Training Operator v1) or trainjob (Kubeflow Trainer v2)
FLAVOR ?= job
# Per machine; empty: derived from GPUS_PER_NODE (4 CPUs, 32Gi per GPU; /dev/shm 1/8 of the memory)
CPUS_PER_NODE ?=
MEMORY_PER_NODE ?=
SHM_SIZE ?=
QOS ?= burstable
# A folder for `kubectl apply -k` instead of printing (make k8s-render OVERLAY=deploy/led-run1)
OVERLAY ?=
# On a cluster, JOB and ACCELERATE_CONFIG default to the real job on DeepSpeed ZeRO-2 across machines
# (a command-line JOB=... or ACCELERATE_CONFIG=... still wins).
K8S_TARGETS := k8s-render train-cluster
$(K8S_TARGETS): JOB = jobs/led-base-lfqa.yaml
$(K8S_TARGETS): ACCELERATE_CONFIG = accelerate_configs/multi-node.yaml
# The venv's python also checks the job file before anything reaches the cluster; python3 is enough to render.
K8S_PYTHON = $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))
K8S_RENDER = $(K8S_PYTHON) k8s/render.py --flavor '$(FLAVOR)' --nodes '$(NODES)' --gpus-per-node '$(GPUS_PER_NODE)' \
	--cpus-per-node '$(CPUS_PER_NODE)' --memory-per-node '$(MEMORY_PER_NODE)' --shm-size '$(SHM_SIZE)' --qos '$(QOS)' \
	--image '$(IMAGE)' --job '$(JOB)' --output-uri '$(OUTPUT_URI)' --name '$(NAME)' --namespace '$(NAMESPACE)' \
	--accelerate-config '$(ACCELERATE_CONFIG)' --secret '$(SECRET)' --service-account '$(SERVICE_ACCOUNT)' \
	--node-selector '$(NODE_SELECTOR)' --kubectl '$(KUBECTL)'
K8S_NS = $(if $(NAMESPACE),--namespace '$(NAMESPACE)')
# What a run is made of, per flavour (k8s-delete); the Kubeflow kinds exist only where their operator runs.
K8S_KINDS_job = job,service,configmap
K8S_KINDS_pytorchjob = pytorchjob,configmap
K8S_KINDS_trainjob = trainjob,trainingruntime,configmap

.PHONY: setup train test bench lint clean help image push k8s-render train-cluster k8s-logs k8s-delete

help:
	@echo "make train    set up, then train $(JOB) with accelerate ($(ACCELERATE_CONFIG)); ARGS='key=value ...'"
	@echo "make test     set up, then run the whole test suite"
	@echo "make bench    set up, then run the throughput benchmark (benchmarks/run.py); BENCH_ARGS='...'"
	@echo "make lint     ruff"
	@echo "make clean    remove the virtual environment, caches and runs"
	@echo "make image    docker build the training image IMAGE=$(IMAGE) (CUDA torch, lfqa, uid 1000)"
	@echo "make push     build, then docker push IMAGE"
	@echo "make k8s-render     print the Kubernetes manifests of a run (no cluster needed): NODES=$(NODES)"
	@echo "                    GPUS_PER_NODE=$(GPUS_PER_NODE) IMAGE JOB OUTPUT_URI NAME=$(NAME) NAMESPACE"
	@echo "                    ACCELERATE_CONFIG SECRET=$(SECRET) SERVICE_ACCOUNT NODE_SELECTOR ARGS='key=value ...'"
	@echo "                    FLAVOR=$(FLAVOR) (job|pytorchjob|trainjob) CPUS_PER_NODE MEMORY_PER_NODE SHM_SIZE"
	@echo "                    QOS=$(QOS) (burstable|guaranteed) OVERLAY=DIR (a folder for kubectl apply -k)"
	@echo "make train-cluster  render, kubectl apply, then follow rank 0's log until the Job ends (same variables)"
	@echo "make k8s-logs       follow rank 0 of run NAME again (across pod restarts)"
	@echo "make k8s-delete     delete run NAME: its Job, pods, Service and ConfigMap (not the bucket)"

setup: $(STAMP) $(BUNDLED_TRAIN)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

# The bundled training rows are generated (deterministically), not shipped: see lfqa/bundled_data.py.
BUNDLED_TRAIN := lfqa/data/tiny_train.jsonl
$(BUNDLED_TRAIN): | $(STAMP)
	$(BIN)/python -m lfqa.bundled_data --if-missing

train: setup
	$(BIN)/accelerate launch --config_file $(ACCELERATE_CONFIG) -m lfqa.train $(JOB) $(ARGS)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py $(BENCH_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check lfqa tests

clean:
	rm -rf $(VENV) .cache runs .pytest_cache build *.egg-info

image:
	$(DOCKER) build --platform $(PLATFORM) --file Dockerfile --tag $(IMAGE) $(DOCKER_BUILD_ARGS) .

push: image
	$(DOCKER) push $(IMAGE)

k8s-render:
	@$(K8S_RENDER) $(if $(OVERLAY),--write-overlay '$(OVERLAY)') -- $(ARGS)

# Rendered into a shell variable first, so that a render error stops here and nothing half-made is applied.
train-cluster:
	@test -n "$(OUTPUT_URI)" || { echo "make train-cluster: set OUTPUT_URI=s3://bucket/prefix (checkpoints and the final model)" >&2; exit 2; }
	manifests="$$($(K8S_RENDER) -- $(ARGS))" && printf '%s\n' "$$manifests" | $(KUBECTL) $(K8S_NS) apply -f -
	KUBECTL='$(KUBECTL)' FLAVOR='$(FLAVOR)' k8s/follow.sh '$(NAME)' '$(NAMESPACE)'

k8s-logs:
	KUBECTL='$(KUBECTL)' FLAVOR='$(FLAVOR)' k8s/follow.sh '$(NAME)' '$(NAMESPACE)'

k8s-delete:
	$(KUBECTL) $(K8S_NS) delete $(or $(K8S_KINDS_$(FLAVOR)),$(K8S_KINDS_job)) --cascade=foreground --ignore-not-found \
		--selector 'app.kubernetes.io/name=lfqa,app.kubernetes.io/instance=$(NAME)'
