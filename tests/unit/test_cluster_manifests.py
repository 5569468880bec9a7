"""cluster/: every file parses, and its fields are ones Ray and KubeRay accept.

- The Ray cluster launcher YAML is validated against the schema Ray ships
  (``ray/autoscaler/ray-schema.json``) and by Ray's own ``prepare_config`` /
  ``validate_config`` when Ray is installed.
- KubeRay manifests are validated against :data:`KUBERAY_SCHEMA`, written here from the
  KubeRay ``ray.io/v1`` CRDs (KubeRay v1.1 to v1.3): apiVersion, kind, the spec fields the
  CRDs define (unknown ones rejected, as ``kubectl apply --validate=strict`` would), and the
  required fields of the strictest of those versions (v1.0/1.1 required ``rayStartParams``
  on every group and ``minReplicas``/``maxReplicas`` on worker groups).
- Configs embedded in ConfigMaps load as kdcache configs; job entrypoints parse.
"""

from __future__ import annotations

import copy
import glob
import importlib.util
import json
import os
import re
import shlex
import subprocess

import jsonschema
import pytest
import yaml

from kdcache.cli.app import build_parser
from kdcache.jobs import config as cfg

CLUSTER = os.path.join(os.path.dirname(__file__), "..", "..", "cluster")
LAUNCHER = os.path.join(CLUSTER, "ray-cluster.yaml")
KUBERAY = sorted(glob.glob(os.path.join(CLUSTER, "kuberay", "*.yaml")))

_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_QUANTITY = {
    "anyOf": [{"type": "integer"}, {"type": "string", "pattern": r"^\d+(\.\d+)?[A-Za-z]*$"}]
}
_POD_TEMPLATE = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "required": ["containers"],
            "properties": {
                "containers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["name", "image"],
                        "properties": {
                            "name": {"type": "string"},
                            "image": {"type": "string"},
                            "ports": {
                                "type": "array",
                                "items": {"type": "object", "required": ["containerPort"]},
                            },
                            "resources": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {
                                    "requests": {"additionalProperties": _QUANTITY},
                                    "limits": {"additionalProperties": _QUANTITY},
                                },
                            },
                            "volumeMounts": {
                                "type": "array",
                                "items": {"type": "object", "required": ["name", "mountPath"]},
                            },
                        },
                    },
                },
                "volumes": {"type": "array", "items": {"type": "object", "required": ["name"]}},
            },
        },
    },
}
_HEAD = {
    "type": "object",
    "required": ["rayStartParams", "template"],
    "additionalProperties": False,
    "properties": {
        "rayStartParams": _STR_MAP,
        "template": _POD_TEMPLATE,
        "serviceType": {"type": "string"},
        "headService": {"type": "object"},
        "enableIngress": {"type": "boolean"},
    },
}
_WORKER = {
    "type": "object",
    "required": ["groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"],
    "additionalProperties": False,
    "properties": {
        "groupName": {"type": "string"},
        "replicas": {"type": "integer", "minimum": 0},
        "minReplicas": {"type": "integer", "minimum": 0},
        "maxReplicas": {"type": "integer", "minimum": 0},
        "numOfHosts": {"type": "integer", "minimum": 1},
        "idleTimeoutSeconds": {"type": "integer"},
        "suspend": {"type": "boolean"},
        "scaleStrategy": {"type": "object"},
        "rayStartParams": _STR_MAP,
        "template": _POD_TEMPLATE,
    },
}
_CLUSTER_SPEC = {
    "type": "object",
    "required": ["headGroupSpec"],
    "additionalProperties": False,
    "properties": {
        "rayVersion": {"type": "string"},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "autoscalerOptions": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
                "idleTimeoutSeconds": {"type": "integer"},
                "image": {"type": "string"},
                "imagePullPolicy": {"type": "string"},
                "resources": {"type": "object"},
                "env": {"type": "array"},
                "envFrom": {"type": "array"},
                "securityContext": {"type": "object"},
                "volumeMounts": {"type": "array"},
                "version": {"enum": ["v1", "v2"]},
            },
        },
        "headGroupSpec": _HEAD,
        "workerGroupSpecs": {"type": "array", "items": _WORKER},
        "headServiceAnnotations": _STR_MAP,
        "suspend": {"type": "boolean"},
        "managedBy": {"type": "string"},
        "gcsFaultToleranceOptions": {"type": "object"},
    },
}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"}},
}
#: RayCluster and RayJob as KubeRay's ray.io/v1 CRDs accept them (see the module docstring).
KUBERAY_SCHEMA = {
    "oneOf": [
        {
            "type": "object",
            "required": ["apiVersion", "kind", "metadata", "spec"],
            "properties": {
                "apiVersion": {"const": "ray.io/v1"},
                "kind": {"const": "RayCluster"},
                "metadata": _METADATA,
                "spec": _CLUSTER_SPEC,
            },
        },
        {
            "type": "object",
            "required": ["apiVersion", "kind", "metadata", "spec"],
            "properties": {
                "apiVersion": {"const": "ray.io/v1"},
                "kind": {"const": "RayJob"},
                "metadata": _METADATA,
                "spec": {
                    "type": "object",
                    "required": ["entrypoint"],
                    "anyOf": [{"required": ["rayClusterSpec"]}, {"required": ["clusterSelector"]}],
                    "additionalProperties": False,
                    "properties": {
                        "entrypoint": {"type": "string", "minLength": 1},
                        "runtimeEnvYAML": {"type": "string"},
                        "jobId": {"type": "string"},
                        "shutdownAfterJobFinishes": {"type": "boolean"},
                        "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                        "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
                        "backoffLimit": {"type": "integer", "minimum": 0},
                        "submissionMode": {
                            "enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]
                        },
                        "submitterPodTemplate": {"type": "object"},
                        "submitterConfig": {"type": "object"},
                        "entrypointNumCpus": {"type": "number"},
                        "entrypointNumGpus": {"type": "number"},
                        "entrypointResources": {"type": "string"},
                        "metadata": _STR_MAP,
                        "clusterSelector": _STR_MAP,
                        "suspend": {"type": "boolean"},
                        "managedBy": {"type": "string"},
                        "deletionStrategy": {"type": "object"},
                        "rayClusterSpec": _CLUSTER_SPEC,
                    },
                },
            },
        },
    ]
}
#: Keys of a Ray runtime_env (ray.runtime_env.RuntimeEnv) used in runtimeEnvYAML.
RUNTIME_ENV_KEYS = {
    "working_dir", "py_modules", "pip", "uv", "conda", "env_vars", "excludes", "container",
    "image_uri", "nsight", "config", "py_executable", "java_jars",
}  # fmt: skip


def _docs(path: str) -> list[dict]:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def _ray_schema() -> dict:
    spec = importlib.util.find_spec("ray")  # locate the file without importing Ray
    if spec is None or spec.origin is None:
        pytest.skip("ray is not installed (its cluster-config schema ships inside it)")
    path = os.path.join(os.path.dirname(spec.origin), "autoscaler", "ray-schema.json")
    with open(path) as f:
        return json.load(f)


def test_every_yaml_under_cluster_parses_and_the_expected_files_exist():
    files = sorted(glob.glob(os.path.join(CLUSTER, "**", "*.yaml"), recursive=True))
    names = {os.path.relpath(f, CLUSTER) for f in files}
    assert {
        "ray-cluster.yaml",
        "kuberay/raycluster.yaml",
        "kuberay/rayjob-teacher.yaml",
        "kuberay/rayjob-student.yaml",
    } <= names
    for f in files:
        assert _docs(f), f"{f} is empty"


def test_launcher_config_matches_rays_schema():
    config = _docs(LAUNCHER)[0]
    jsonschema.validate(config, _ray_schema())
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert types["head"]["resources"] == {"CPU": 0}  # a CPU head that runs no teacher work
    assert types["teacher_gpu"]["min_workers"] == 0 < types["teacher_gpu"]["max_workers"]
    assert sum(t.get("max_workers", 0) for t in types.values()) <= config["max_workers"]
    assert any("--dashboard-port=8265" in c for c in config["head_start_ray_commands"])


def test_rays_schema_check_can_fail():
    schema = _ray_schema()
    bad = copy.deepcopy(_docs(LAUNCHER)[0])
    bad["available_node_types"]["teacher_gpu"]["max_worker"] = 4  # typo of max_workers
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        jsonschema.validate(bad, schema)


def test_launcher_config_passes_rays_own_validation():
    pytest.importorskip("ray")
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(_docs(LAUNCHER)[0]))


@pytest.mark.parametrize("path", KUBERAY, ids=os.path.basename)
def test_kuberay_manifests_match_the_crd_schema(path):
    kinds = []
    for doc in _docs(path):
        kinds.append(doc["kind"])
        if doc["kind"] == "ConfigMap":
            assert doc["apiVersion"] == "v1" and doc["data"]
            continue
        jsonschema.validate(doc, KUBERAY_SCHEMA)
        spec = doc["spec"]
        cluster = spec.get("rayClusterSpec", spec)
        for group in cluster.get("workerGroupSpecs", []):
            assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
        if doc["kind"] == "RayJob":
            runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML", "{}"))
            assert isinstance(runtime_env, dict) and set(runtime_env) <= RUNTIME_ENV_KEYS
    assert {"RayCluster", "RayJob"} & set(kinds)


def _old_api_version(d):
    d["apiVersion"] = "ray.io/v1alpha1"


def _worker_without_group_name(d):
    del d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["groupName"]


def _int_ray_start_param(d):  # the CRD types rayStartParams as a map of strings
    d["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0


def _typo_in_spec(d):
    d["spec"]["entrypont"] = "kdcache build /config/build.yaml"


@pytest.mark.parametrize(
    "mutate",
    [_old_api_version, _worker_without_group_name, _int_ray_start_param, _typo_in_spec],
    ids=lambda f: f.__name__.strip("_"),
)
def test_kuberay_schema_check_can_fail(mutate):
    job = copy.deepcopy(_docs(os.path.join(CLUSTER, "kuberay", "rayjob-teacher.yaml"))[1])
    jsonschema.validate(job, KUBERAY_SCHEMA)
    mutate(job)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(job, KUBERAY_SCHEMA)


def _configmap(path: str, key: str) -> dict:
    (cm,) = [d for d in _docs(path) if d["kind"] == "ConfigMap"]
    return yaml.safe_load(cm["data"][key])


def _mounted(job: dict) -> set[str]:
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    return {m["mountPath"] for c in head["containers"] for m in c.get("volumeMounts", [])}


def _entrypoint(job: dict):
    """The RayJob's entrypoint, parsed by kdcache's own command line: the visible
    ``kdcache STAGE FILE`` that ``ray job list`` shows (no options left unparsed)."""
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "kdcache", argv
    args, rest = build_parser().parse_known_args(argv[1:])
    assert not rest, rest
    return args


def test_teacher_rayjob_ships_a_valid_build_config_to_its_entrypoint():
    path = os.path.join(CLUSTER, "kuberay", "rayjob-teacher.yaml")
    build = cfg.from_dict(cfg.BuildConfig, _configmap(path, "build.yaml"))
    assert build.root.startswith("s3://")
    job = _docs(path)[1]
    args = _entrypoint(job)
    assert args.command == "build"
    assert os.path.dirname(args.config) in _mounted(job)
    for group in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]:  # an actor fits a pod
        (container,) = group["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        assert build.executor.gpus_per_actor <= int(limits["nvidia.com/gpu"])
        assert build.executor.cpus_per_actor <= int(limits["cpu"])


def test_student_rayjob_runs_ray_train_with_one_rank_per_gpu():
    path = os.path.join(CLUSTER, "kuberay", "rayjob-student.yaml")
    job = _docs(path)[1]
    args = _entrypoint(job)
    assert args.command == "train"
    assert os.path.dirname(args.config) in _mounted(job)
    train = cfg.from_dict(cfg.TrainConfig, _configmap(path, "train.yaml"))
    assert train.ray.enabled and train.ray.use_gpu
    assert train.cache.root is not None and train.cache.root.startswith("s3://")
    assert train.stream.global_batch_size % train.ray.num_workers == 0
    pods = []
    for group in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        pods += [(int(limits.get("nvidia.com/gpu", 0)), int(limits["cpu"]))] * group["replicas"]
        mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
        assert os.path.dirname(os.path.dirname(train.output_dir)) in mounts  # shared storage
    assert train.ray.num_workers == sum(gpus for gpus, _ in pods)  # one rank per GPU
    assert all(gpus * train.ray.cpus_per_worker <= cpus for gpus, cpus in pods)


def test_deepspeed_hostfile_and_scripts():
    with open(os.path.join(CLUSTER, "deepspeed", "hostfile")) as f:
        hosts = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    assert hosts and all(re.fullmatch(r"\S+ slots=\d+", h) for h in hosts)
    for script in ("deepspeed/run_student.sh", "local_ray.sh"):
        subprocess.run(["bash", "-n", os.path.join(CLUSTER, script)], check=True)
    with open(os.path.join(CLUSTER, "deepspeed", "run_student.sh")) as f:
        text = f.read()
    # --no_local_rank: kdcache's CLI takes LOCAL_RANK from the environment, not argv.
    assert "--no_local_rank --module kdcache.cli train" in text
