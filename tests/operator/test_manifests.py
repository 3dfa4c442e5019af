"""Building the trainer Job and ConfigMap from a DPOJob."""

import copy
import hashlib

import pytest
import yaml
from kubernetes.client import V1Job
from pydantic import ValidationError

from dpo_operator import manifests
from dpo_operator.settings import TrainerDefaults
from dpojob_api.progress import SPEC_DIGEST_ENV
from dpojob_api.spec import DPOJob, DPOJobSpec, digest, spec_hash
from dpojob_api.vocabulary import EXIT_CODES, FAIL_AT_ONCE

DPOJOB = {
    "apiVersion": "dpo-operator.io/v1alpha1",
    "kind": "DPOJob",
    "metadata": {"name": "llama", "namespace": "ml", "uid": "u-1", "generation": 3},
    "spec": {
        "output": {"hub": {"repoId": "org/llama-dpo"}},
        "hubTokenSecretRef": {"name": "hf", "key": "token"},
        "runtime": {
            "gpus": 2,
            "nodeSelector": {"gpu": "a100"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "priorityClassName": "training",
            "serviceAccountName": "trainer",
            "imagePullSecrets": [{"name": "regcred"}],
            "checkpointVolume": {"claimName": "ckpt"},
            "backoffLimit": 4,
            "activeDeadlineSeconds": 3600,
        },
    },
}


TRAINER_ENV = [
    {"name": "HF_ENDPOINT", "value": "http://hub"},
    {"name": "HTTPS_PROXY", "valueFrom": {"secretKeyRef": {"name": "proxy", "key": "url"}}},
]


def build() -> dict:
    spec = DPOJobSpec.model_validate(DPOJOB["spec"])
    return manifests.build_job(DPOJOB, spec, 3, TRAINER_ENV)


def test_job_is_named_and_owned_deterministically() -> None:
    job = build()
    assert job["metadata"]["name"] == "llama-g3" == build()["metadata"]["name"]
    owner = job["metadata"]["ownerReferences"][0]
    assert owner["uid"] == "u-1" and owner["controller"] and owner["kind"] == "DPOJob"
    assert job["metadata"]["labels"][manifests.LABEL_RUN] == "3"
    assert job["spec"]["template"]["metadata"]["labels"][manifests.LABEL_DPOJOB] == "llama"


def test_long_names_are_shortened_uniquely() -> None:
    a, b = manifests.run_name("x" * 80, 12), manifests.run_name("x" * 79 + "y", 12)
    assert len(a) <= 52 and a != b and a.endswith("-g12")


def test_pod_placement_resources_and_security() -> None:
    job = build()
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "2"
    assert pod["nodeSelector"] == {"gpu": "a100"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["priorityClassName"] == "training" and pod["serviceAccountName"] == "trainer"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["automountServiceAccountToken"] is False, "trainer pods need no API rights"
    assert (
        pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    )
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert job["spec"]["backoffLimit"] == 4 and job["spec"]["activeDeadlineSeconds"] == 3600
    assert pod["restartPolicy"] == "Never"
    assert pod["terminationGracePeriodSeconds"] >= 90, "the trainer checkpoints on SIGTERM before exiting"


def test_token_comes_from_the_secret_never_inline() -> None:
    env = build()["spec"]["template"]["spec"]["containers"][0]["env"]
    token = next(e for e in env if e["name"] == "HF_TOKEN")
    assert token == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}
    assert all(var in env for var in TRAINER_ENV), "the operator's extra env, Secret references included"


def test_checkpoints_on_the_claim_and_run_specific_output() -> None:
    job = build()
    pod = job["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["checkpoints"]["persistentVolumeClaim"]["claimName"] == "ckpt"
    assert volumes["config"]["configMap"]["name"] == "llama-g3"
    assert "dshm" in volumes, "multi-GPU pods get a memory-backed /dev/shm"
    args = pod["containers"][0]["args"]
    spec = DPOJobSpec.model_validate(DPOJOB["spec"])
    shared = ["--sft-cache", "/checkpoints/sft-cache"]  # SFT models shared with the claim's other DPOJobs
    output = ["--output", manifests.work_directory(spec, "llama")]
    assert args == ["run", "/etc/dpo-operator/dpojob.yaml", *shared, *output]


def test_the_sft_model_is_shared_on_a_checkpoint_volume_unless_reuse_is_off() -> None:
    """Only a checkpointVolume outlives the pod and is seen by other DPOJobs; sft.reuse false or SFT off: no cache."""

    def args(**changes: dict) -> list[str]:
        document = {**DPOJOB, "spec": {**DPOJOB["spec"], **changes}}
        job = manifests.build_job(document, DPOJobSpec.model_validate(document["spec"]), 3)
        return job["spec"]["template"]["spec"]["containers"][0]["args"]

    assert "--sft-cache" in args()
    assert "--sft-cache" not in args(sft={"reuse": False})
    assert "--sft-cache" not in args(sft={"enabled": False})
    no_volume = {k: v for k, v in DPOJOB["spec"]["runtime"].items() if k != "checkpointVolume"}
    assert "--sft-cache" not in args(runtime=no_volume)


def test_runs_that_train_the_same_share_a_work_directory() -> None:
    """A retry, or a run that differs only in where the model goes (output) or in pod settings, works in the
    directory of the runs before it: the trainer skips what they finished. What changes training moves it."""
    spec = DPOJobSpec.model_validate(DPOJOB["spec"])

    def output_arg(job: dict) -> str:
        return job["spec"]["template"]["spec"]["containers"][0]["args"][-1]

    first = manifests.build_job(DPOJOB, spec, 3)
    retry = manifests.build_job(DPOJOB, spec, 3, attempt=2)
    assert retry["metadata"]["name"] == "llama-g3-r2"
    assert output_arg(first) == output_arg(retry) == manifests.work_directory(spec, "llama")
    assert output_arg(first).startswith("/checkpoints/llama-")
    moved_output = spec.model_copy(deep=True)
    moved_output.output.hub.commit_message = "another message"
    moved_output.runtime.memory = "64Gi"
    assert output_arg(manifests.build_job(DPOJOB, moved_output, 4)) == output_arg(first)
    more_steps = spec.model_copy(deep=True)
    more_steps.dpo.max_steps = 2000
    assert output_arg(manifests.build_job(DPOJOB, more_steps, 5)) != output_arg(first)


def test_config_map_holds_a_dpojob_the_trainer_reads() -> None:
    config_map = manifests.build_config_map(DPOJOB, 3)
    document = yaml.safe_load(config_map["data"][manifests.SPEC_FILE])
    assert DPOJob.model_validate(document).spec.output.hub.repo_id == "org/llama-dpo"


def test_spec_hash_ignores_suspend_and_runtime() -> None:
    base = DPOJOB["spec"]
    assert spec_hash(base) == spec_hash({**base, "suspend": True, "runtime": {"gpus": 8}})
    assert spec_hash(base) != spec_hash({**base, "dpo": {"beta": 0.2}})


def test_long_dpojob_names_give_valid_unique_labels_and_keep_the_full_name() -> None:
    long_a, long_b = "a" * 70 + ".team-x", "a" * 70 + ".team-y"
    values = {manifests.label_value(n) for n in (long_a, long_b)}
    assert len(values) == 2 and all(len(v) <= 63 and v[-1].isalnum() for v in values)
    document = {**DPOJOB, "metadata": {**DPOJOB["metadata"], "name": long_a}}
    job = manifests.build_job(document, DPOJobSpec.model_validate(DPOJOB["spec"]), 1)
    assert job["metadata"]["labels"][manifests.LABEL_DPOJOB] == manifests.label_value(long_a)
    assert job["metadata"]["annotations"][manifests.ANNOTATION_DPOJOB] == long_a
    assert job["spec"]["template"]["metadata"]["annotations"][manifests.ANNOTATION_DPOJOB] == long_a
    assert manifests.label_value("short") == "short"


def test_the_template_hash_and_spec_digest_say_what_the_operator_built() -> None:
    """The Job carries the digest of its spec as built (signed with it: ownership.py) and the trainer's env the
    SHA-256 of the spec file in the run's ConfigMap (the trainer refuses another file)."""
    spec = DPOJobSpec.model_validate(DPOJOB["spec"])
    job = manifests.build_job(DPOJOB, spec, 3, TRAINER_ENV)
    config_map = manifests.build_config_map(DPOJOB, 3)
    assert job["metadata"]["annotations"][manifests.TEMPLATE_ANNOTATION] == digest(job["spec"])
    env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    text = config_map["data"][manifests.SPEC_FILE]
    assert env[SPEC_DIGEST_ENV] == hashlib.sha256(text.encode()).hexdigest()
    assert config_map["immutable"] is True
    other = manifests.build_job(DPOJOB, spec, 3, TRAINER_ENV, default_cache_claim="cache")
    assert other["metadata"]["annotations"][manifests.TEMPLATE_ANNOTATION] != digest(job["spec"])


# --- the cluster's trainer defaults (the chart's trainerDefaults) -------------------------------------------

CLUSTER_DEFAULTS = TrainerDefaults.model_validate(
    {
        "image": {"repository": "mirror.example/dpo/trainer", "pullPolicy": "Always"},
        "imagePullSecrets": [{"name": "mirror-pull"}],
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
        "nodeSelector": {"pool": "training"},
        "affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}},
        "priorityClassName": "batch-low",
        "labels": {"team": "ml", "app.kubernetes.io/part-of": "training"},
        "annotations": {"cost-center": "42"},
    }
)


def pod_with_defaults(runtime: dict | None, defaults: TrainerDefaults | None = CLUSTER_DEFAULTS) -> dict:
    """The pod template of a DPOJob whose spec.runtime is `runtime` as written (None: no runtime at all)."""
    document = copy.deepcopy(DPOJOB)
    document["spec"] = {"output": {"hub": {"repoId": "org/m"}}}
    if runtime is not None:
        document["spec"]["runtime"] = runtime
    spec = DPOJobSpec.model_validate(document["spec"])
    return manifests.build_job(document, spec, 1, defaults=defaults)["spec"]["template"]


def test_cluster_defaults_apply_to_a_dpojob_that_sets_nothing() -> None:
    template = pod_with_defaults(None)
    pod, container = template["spec"], template["spec"]["containers"][0]
    assert container["image"] == "mirror.example/dpo/trainer:0.1.0", "the API's built-in image loses to the cluster's"
    assert container["imagePullPolicy"] == "Always"
    assert pod["imagePullSecrets"] == [{"name": "mirror-pull"}]
    assert pod["tolerations"] == [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}]
    assert pod["nodeSelector"] == {"pool": "training"} and pod["priorityClassName"] == "batch-low"
    assert pod["affinity"] == {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}}
    assert template["metadata"]["labels"]["team"] == "ml"
    assert template["metadata"]["annotations"]["cost-center"] == "42"
    empty = pod_with_defaults({})  # an empty runtime sets nothing either
    assert empty["spec"]["containers"][0]["image"] == container["image"]
    assert {k: v for k, v in empty["spec"].items() if k != "containers"} == {
        k: v for k, v in pod.items() if k != "containers"
    }


def test_what_the_dpojob_sets_wins_over_the_cluster_defaults() -> None:
    runtime = {
        "image": "ghcr.io/dpo-operator/trainer:0.1.0",  # the built-in default, but written out: the DPOJob's choice
        "imagePullPolicy": "IfNotPresent",
        "imagePullSecrets": [{"name": "own"}],
        "tolerations": [],  # an explicit empty list opts out of the default
        "nodeSelector": {"gpu": "h100"},
        "affinity": {},
        "priorityClassName": "urgent",
    }
    pod = pod_with_defaults(runtime)["spec"]
    container = pod["containers"][0]
    assert container["image"] == "ghcr.io/dpo-operator/trainer:0.1.0" and container["imagePullPolicy"] == "IfNotPresent"
    assert pod["imagePullSecrets"] == [{"name": "own"}] and "tolerations" not in pod
    assert pod["nodeSelector"] == {"gpu": "h100"} and pod["priorityClassName"] == "urgent"
    assert pod["affinity"] == {}
    partly = pod_with_defaults({"nodeSelector": {"gpu": "h100"}})["spec"]
    assert partly["nodeSelector"] == {"gpu": "h100"}, "each field on its own"
    assert partly["tolerations"] == [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}]


def test_without_cluster_defaults_the_api_defaults_apply() -> None:
    template = pod_with_defaults(None, defaults=None)
    assert template["spec"]["containers"][0]["image"] == "ghcr.io/dpo-operator/trainer:0.1.0"
    assert not {"tolerations", "nodeSelector", "priorityClassName", "imagePullSecrets"} & template["spec"].keys()
    assert pod_with_defaults(None, defaults=TrainerDefaults()) == template, "empty defaults change nothing"


def test_default_labels_never_replace_the_operators_own() -> None:
    # The settings refuse such keys (test_settings); a model built around them still loses to the operator's labels.
    defaults = TrainerDefaults.model_construct(
        **{
            **dict(CLUSTER_DEFAULTS),
            "labels": {manifests.LABEL_DPOJOB: "other", "app.kubernetes.io/managed-by": "me", "team": "ml"},
            "annotations": {manifests.ANNOTATION_DPOJOB: "other"},
        }
    )
    metadata = pod_with_defaults(None, defaults)["metadata"]
    assert metadata["labels"] == {**manifests.labels("llama", 1), "team": "ml"}
    assert metadata["annotations"] == {manifests.ANNOTATION_DPOJOB: "llama"}
    assert manifests.LABEL_DPOJOB in manifests.OWN_LABEL_KEYS and "job-name" in manifests.OWN_LABEL_KEYS


# --- where the trainer writes: the Hugging Face cache, scratch and work emptyDirs, ephemeral storage ---------


def pod_of(runtime: dict, default_cache_claim: str | None = None) -> dict:
    spec = DPOJobSpec.model_validate({"output": {"hub": {"repoId": "org/m"}}, "runtime": runtime})
    job = manifests.build_job(DPOJOB, spec, 1, default_cache_claim=default_cache_claim)
    return job["spec"]["template"]["spec"]


def storage(pod: dict) -> tuple[dict, dict, dict, dict]:
    """(volumes, mounts by name, env, resources) of the trainer container."""
    container = pod["containers"][0]
    return (
        {v["name"]: v for v in pod["volumes"]},
        {m["name"]: m for m in container["volumeMounts"]},
        {e["name"]: e.get("value") for e in container["env"]},
        container["resources"],
    )


def test_without_a_cache_volume_hf_home_is_on_scratch_sized_for_the_model_and_every_emptydir_is_requested() -> None:
    volumes, mounts, env, resources = storage(pod_of({}))
    assert env["HF_HOME"] == "/tmp/hf-home" and "cache" not in volumes and "cache" not in mounts
    assert volumes["tmp"] == {"name": "tmp", "emptyDir": {"sizeLimit": "50Gi"}}
    assert volumes["checkpoints"] == {"name": "checkpoints", "emptyDir": {"sizeLimit": "40Gi"}}
    # 50Gi scratch + 40Gi work directory + 1Gi of logs, requested and enforced alike.
    assert resources["requests"]["ephemeral-storage"] == resources["limits"]["ephemeral-storage"] == "91Gi"


def test_a_cache_volume_holds_hf_home_and_leaves_scratch_small() -> None:
    pod = pod_of({"cacheVolume": {"claimName": "hf-cache"}, "checkpointVolume": {"claimName": "ckpt"}})
    volumes, mounts, env, resources = storage(pod)
    assert volumes["cache"] == {"name": "cache", "persistentVolumeClaim": {"claimName": "hf-cache", "readOnly": False}}
    assert mounts["cache"] == {"name": "cache", "mountPath": "/cache", "readOnly": False}
    assert env["HF_HOME"] == "/cache/huggingface" and "HF_DATASETS_CACHE" not in env
    assert volumes["tmp"]["emptyDir"] == {"sizeLimit": "10Gi"}
    assert resources["requests"]["ephemeral-storage"] == "11Gi", "scratch and logs only: checkpoints are on a PVC"


def test_the_operator_default_cache_claim_applies_unless_the_dpojob_names_its_own() -> None:
    volumes, _, env, _ = storage(pod_of({}, default_cache_claim="team-cache"))
    assert volumes["cache"]["persistentVolumeClaim"]["claimName"] == "team-cache"
    assert env["HF_HOME"] == "/cache/huggingface" and volumes["tmp"]["emptyDir"] == {"sizeLimit": "10Gi"}
    volumes, _, _, _ = storage(pod_of({"cacheVolume": {"claimName": "mine"}}, default_cache_claim="team-cache"))
    assert volumes["cache"]["persistentVolumeClaim"]["claimName"] == "mine"


def test_explicit_sizes_and_a_read_only_cache() -> None:
    runtime = {"scratchSize": "2Gi", "workDirSize": "500Mi", "cacheVolume": {"claimName": "c", "readOnly": True}}
    volumes, mounts, env, resources = storage(pod_of(runtime))
    assert volumes["tmp"]["emptyDir"] == {"sizeLimit": "2Gi"}
    assert volumes["checkpoints"]["emptyDir"] == {"sizeLimit": "500Mi"}
    assert resources["limits"]["ephemeral-storage"] == "3572Mi"  # 2048 + 500 + 1024
    assert mounts["cache"]["readOnly"] and env["HF_HOME"] == "/cache/huggingface"
    # datasets writes its Arrow cache under HF_HOME even when every file is cached: it goes to scratch.
    assert env["HF_DATASETS_CACHE"].startswith("/tmp/")


def test_on_current_servers_the_job_fails_at_once_on_a_deterministic_trainer_exit() -> None:
    """podFailurePolicy (Kubernetes >= 1.26): disruptions cost no retry, the FAIL_AT_ONCE exit codes fail the Job.
    Validated against the current batch/v1 schema of the kubernetes client's models (unknown fields refused)."""
    spec = DPOJobSpec.model_validate(DPOJOB["spec"])
    job = manifests.build_job(DPOJOB, spec, 1, features=manifests.ServerFeatures(pod_failure_policy=True))
    ignore, fail = job["spec"]["podFailurePolicy"]["rules"]
    assert ignore["action"] == "Ignore" and fail["action"] == "FailJob"
    assert fail["onExitCodes"] == {
        "containerName": "trainer",
        "operator": "In",
        "values": [2, 3, 4, 5, 7, 9, 11, 12, 13, 14, 15, 16, 17, 18],
    }
    assert set(fail["onExitCodes"]["values"]) == {EXIT_CODES[r] for r in FAIL_AT_ONCE}
    V1Job.model_validate(job)
    misspelt = copy.deepcopy(job)
    misspelt["spec"]["podFailurePolicy"]["rules"][1]["onExitCode"] = misspelt["spec"]["podFailurePolicy"]["rules"][
        1
    ].pop("onExitCodes")
    with pytest.raises(ValidationError):
        V1Job.model_validate(misspelt)
    assert "podFailurePolicy" not in manifests.build_job(DPOJOB, spec, 1)["spec"], "1.20 drops the field: not sent"
