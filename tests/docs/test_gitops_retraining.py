"""GitOps retraining, proven: examples/gitops on the real local control plane, the operator installed by its chart.

The test plays git and the GitOps tool: examples/gitops is copied into a git repository, every step is a commit
that edits dpojob.yaml, and every sync is `kubectl apply -k` of the checkout (what Argo CD and Flux render from
that directory). After each step the DPOJob read back from the cluster goes through the real Argo CD health
check (docs/gitops/argocd/dpo-operator.io/DPOJob/health.lua in a Lua interpreter). Trainer runs are simulated by
the node simulator (a scripted exit with the trainer's termination message) except in the last test, which trains
twice with the real trainer and finds two commits in the local Hub. Tests share one stack and run in file order.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from test_argocd_health import health

from dpo_dev import crd
from dpo_dev.nodesim import Outcome, Rule
from dpo_dev.stack import HUB_USER, LocalStack, kubectl, quickstart_for_cluster
from dpo_operator.manifests import LABEL_DPOJOB
from dpo_operator.reconciler import RETRY_ANNOTATION, validate_spec
from dpojob_api.spec import DPOJobSpec

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "gitops"
NS = "gitops-e2e"
NAME = "tiny-dpo"
REPO = f"{HUB_USER}/tiny-dpo-gitops"
pytestmark = pytest.mark.timeout(600)


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_example_manifests_are_valid() -> None:
    """The DPOJob passes the CRD schema and the operator's own validation; the Argo CD and Flux objects point at
    this directory and that namespace; the directory renders to the DPOJob alone."""
    assert {p.name for p in EXAMPLE.glob("*.yaml")} == {
        "dpojob.yaml",
        "kustomization.yaml",
        "argocd-application.yaml",
        "flux-kustomization.yaml",
    }
    [dpojob] = documents(EXAMPLE / "dpojob.yaml")
    schema = yaml.safe_load((ROOT / crd.CRD_FILE).read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    errors = [f"{list(e.path)}: {e.message}" for e in jsonschema.Draft4Validator(schema).iter_errors(dpojob)]
    assert not errors, errors
    DPOJobSpec.model_validate(dpojob["spec"])
    assert validate_spec(dpojob["spec"])[1] is None, "the model must leave the pod"
    # The cluster-ready quickstart, which the operator e2e tests train with the real trainer.
    repo = dpojob["spec"]["output"]["hub"]["repoId"]
    assert dpojob["spec"] == quickstart_for_cluster(NS, repo=repo)["spec"]
    namespace = dpojob["metadata"]["namespace"]

    [application] = documents(EXAMPLE / "argocd-application.yaml")
    assert (application["apiVersion"], application["kind"]) == ("argoproj.io/v1alpha1", "Application")
    assert application["spec"]["source"]["path"] == "examples/gitops"
    assert application["spec"]["destination"]["namespace"] == namespace
    assert application["spec"]["syncPolicy"]["automated"] == {"prune": True, "selfHeal": True}

    source, kustomization = documents(EXAMPLE / "flux-kustomization.yaml")
    assert (source["apiVersion"], source["kind"]) == ("source.toolkit.fluxcd.io/v1", "GitRepository")
    assert (kustomization["apiVersion"], kustomization["kind"]) == ("kustomize.toolkit.fluxcd.io/v1", "Kustomization")
    flux = kustomization["spec"]
    assert flux["sourceRef"] == {"kind": "GitRepository", "name": source["metadata"]["name"]}
    assert flux["path"] == "./examples/gitops" and flux["wait"] is True
    [expressions] = flux["healthCheckExprs"]
    assert (expressions["apiVersion"], expressions["kind"]) == (dpojob["apiVersion"], dpojob["kind"])

    rendered = subprocess.run(["kubectl", "kustomize", str(EXAMPLE)], capture_output=True, text=True, check=True)
    assert list(yaml.safe_load_all(rendered.stdout)) == [dpojob]


# --- the retraining loop against the cluster ---------------------------------------------------------------


class Checkout:
    """A git repository holding a copy of examples/gitops: the test's git remote and its GitOps tool in one."""

    def __init__(self, path: Path, admin_kubeconfig: Path) -> None:
        self.path, self.admin_kubeconfig = path, admin_kubeconfig
        shutil.copytree(EXAMPLE, path)
        self.git("init", "-q", "-b", "main")

    def git(self, *args: str) -> str:
        identity = ("-c", "user.name=gitops-test", "-c", "user.email=gitops-test@example.invalid")
        return subprocess.run(
            ["git", *identity, *args], cwd=self.path, capture_output=True, text=True, check=True
        ).stdout

    def commit(self, message: str, edit: Callable[[dict[str, Any]], None]) -> None:
        """Edit dpojob.yaml and commit it, as a user does in their repository."""
        path = self.path / "dpojob.yaml"
        [dpojob] = documents(path)
        edit(dpojob)
        path.write_text(yaml.safe_dump(dpojob, sort_keys=False))
        self.git("add", "-A")
        self.git("commit", "-q", "-m", message)

    def sync(self) -> None:
        """Apply what Argo CD and Flux render from the directory at the checked-out commit."""
        kubectl(self.admin_kubeconfig, "apply", "-k", str(self.path))


@pytest.fixture(scope="module")
def stack(admin_kubeconfig: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with LocalStack(admin_kubeconfig, tmp_path_factory.mktemp("stack"), resync_seconds=3) as stack:
        stack.create_token_secret(NS)
        stack.create_token_secret(NS, "hf-token-rotated")
        yield stack
        kubectl(admin_kubeconfig, "delete", "namespace", NS, "--wait=false")  # no DPOJob left for later operators


@pytest.fixture(scope="module")
def checkout(stack: LocalStack, tmp_path_factory: pytest.TempPathFactory) -> Checkout:
    repo = Checkout(tmp_path_factory.mktemp("git") / "gitops", stack.admin_kubeconfig)

    def for_this_cluster(dpojob: dict[str, Any]) -> None:
        dpojob["metadata"]["namespace"] = NS
        dpojob["spec"]["output"]["hub"]["repoId"] = REPO
        dpojob["spec"]["runtime"]["backoffLimit"] = 0  # a failed pod fails the run at once (no Job backoff)

    repo.commit("tiny-dpo for this cluster", for_this_cluster)
    return repo


def simulated_trainer(name: str, duration_s: float = 4.0, failure: tuple[str, str] | None = None) -> Rule:
    """Scripted rule: this DPOJob's trainer pods run for duration_s, then end as the trainer does. A success's
    termination message carries reward metrics and a Hub commit of its own; a failure's, a reason and message."""

    def rule(pod: dict, container: str, restarts: int) -> Outcome | None:
        if pod["metadata"].get("labels", {}).get(LABEL_DPOJOB) != name:
            return None
        if failure is not None:
            message = {"reason": failure[0], "message": failure[1]}
            return Outcome(exit_code=1, duration_s=duration_s, message=json.dumps(message))
        sha = hashlib.sha1(pod["metadata"]["name"].encode()).hexdigest()
        model = {"repoId": REPO, "revision": "main", "commitSha": sha, "commitUrl": f"http://hub/{REPO}/commit/{sha}"}
        metrics = {"rewards/margins": 0.4, "rewards/accuracies": 0.75, "loss": 0.5}
        message = {"reason": "Succeeded", "metrics": metrics, "model": model}
        return Outcome(duration_s=duration_s, message=json.dumps(message))

    return rule


def phase(obj: dict[str, Any]) -> str | None:
    return (obj.get("status") or {}).get("phase")


def run_of(obj: dict[str, Any]) -> dict[str, Any]:
    return (obj.get("status") or {}).get("run") or {}


def observed(obj: dict[str, Any]) -> bool:
    """The operator has seen the latest spec: status and every condition name the current generation."""
    status, generation = obj.get("status") or {}, obj["metadata"]["generation"]
    conditions = status.get("conditions") or []
    return (
        status.get("observedGeneration") == generation
        and bool(conditions)
        and all(c.get("observedGeneration") == generation for c in conditions)
    )


def follow(
    stack: LocalStack, until: Callable[[dict], bool], timeout: float, name: str = NAME
) -> tuple[dict, list[tuple]]:
    """Poll the DPOJob like Argo CD does until `until`; returns it and every (phase, run, health) seen."""
    deadline = time.monotonic() + timeout
    seen: list[tuple] = []
    while time.monotonic() < deadline:
        obj = stack.get_dpojob(NS, name)
        seen.append((phase(obj), run_of(obj).get("generation"), health(obj)[0]))
        if until(obj):
            return obj, seen
        time.sleep(0.3)
    raise TimeoutError(f"{NS}/{name} not there after {timeout}s: {obj.get('status')}")


def jobs(stack: LocalStack, name: str = NAME) -> list[dict[str, Any]]:
    listed = kubectl(stack.admin_kubeconfig, "-n", NS, "get", "jobs", "-l", f"{LABEL_DPOJOB}={name}", "-o", "json")
    return json.loads(listed)["items"]


def finished(obj: dict[str, Any]) -> bool:
    return observed(obj) and phase(obj) in ("Succeeded", "Failed")


def this_generation_finished(obj: dict[str, Any]) -> bool:
    return finished(obj) and run_of(obj)["generation"] == obj["metadata"]["generation"]


def set_beta(beta: float) -> Callable[[dict[str, Any]], None]:
    def edit(dpojob: dict[str, Any]) -> None:
        dpojob["spec"]["dpo"]["beta"] = beta

    return edit


def test_v1_trains_and_turns_healthy(stack: LocalStack, checkout: Checkout) -> None:
    with stack.simulator.scripted(simulated_trainer(NAME)):
        checkout.sync()
        obj, seen = follow(stack, finished, 60)
    assert ("Running", 1, "Progressing") in seen, seen
    assert phase(obj) == "Succeeded" and run_of(obj)["generation"] == 1
    status, message = health(obj)
    assert status == "Healthy" and message == f"Training finished: {obj['status']['model']['commitUrl']}"
    assert obj["status"]["rewards"] == {"margins": 0.4, "accuracies": 0.75}
    assert [j["metadata"]["name"] for j in jobs(stack)] == [f"{NAME}-g1"]


def test_a_training_spec_commit_starts_a_new_run(stack: LocalStack, checkout: Checkout) -> None:
    before = stack.get_dpojob(NS, NAME)
    checkout.commit("dpo.beta 0.1 -> 0.2", set_beta(0.2))
    with stack.simulator.scripted(simulated_trainer(NAME)):
        checkout.sync()
        obj, seen = follow(stack, this_generation_finished, 60)
    assert run_of(obj)["generation"] == 2 and ("Running", 2, "Progressing") in seen, seen
    assert phase(obj) == "Succeeded" and health(obj)[0] == "Healthy"
    [previous] = obj["status"]["runs"]
    assert previous["generation"] == 1 and previous["phase"] == "Succeeded"
    assert previous["model"] == before["status"]["model"] and previous["rewards"] == before["status"]["rewards"]
    assert obj["status"]["model"]["commitSha"] != previous["model"]["commitSha"], "each run pushes its own commit"
    assert [j["metadata"]["name"] for j in jobs(stack)] == [f"{NAME}-g2"], "the trainer ran again, as a new Job"


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda d: d["spec"]["runtime"].update(memory="6Gi"), id="runtime.memory"),
        pytest.param(lambda d: d["spec"]["hubTokenSecretRef"].update(name="hf-token-rotated"), id="token-secret"),
    ],
)
def test_a_commit_that_does_not_change_the_model_does_not_retrain(
    stack: LocalStack, checkout: Checkout, edit: Callable[[dict[str, Any]], None]
) -> None:
    before = stack.get_dpojob(NS, NAME)
    [job] = jobs(stack)
    checkout.commit("not about the model", edit)
    checkout.sync()
    obj, _ = follow(stack, lambda o: o["metadata"]["generation"] > before["metadata"]["generation"] and observed(o), 30)
    time.sleep(4)  # more than a resync: a retraining would have begun
    obj = stack.get_dpojob(NS, NAME)
    assert observed(obj), "observedGeneration follows metadata.generation: Argo CD and Flux see no stale status"
    assert run_of(obj) == run_of(before) and obj["status"]["runs"] == before["status"]["runs"]
    assert phase(obj) == "Succeeded" and obj["status"]["model"] == before["status"]["model"]
    assert [j["metadata"]["uid"] for j in jobs(stack)] == [job["metadata"]["uid"]], "no new trainer Job"
    assert health(obj)[0] == "Healthy"


def test_a_failed_run_is_degraded_and_a_retry_commit_heals_it(stack: LocalStack, checkout: Checkout) -> None:
    checkout.commit("dpo.beta 0.2 -> 0.3", set_beta(0.3))
    failure = ("TrainingError", "loss became NaN at step 12: lower dpo.learningRate")
    with stack.simulator.scripted(simulated_trainer(NAME, duration_s=1.0, failure=failure)):
        checkout.sync()
        failed, _ = follow(stack, finished, 60)
    generation = failed["metadata"]["generation"]
    assert phase(failed) == "Failed" and run_of(failed)["generation"] == generation
    assert health(failed) == ("Degraded", f"{failure[0]}: {failure[1]}")

    def retry(dpojob: dict[str, Any]) -> None:
        dpojob["metadata"]["annotations"] = {RETRY_ANNOTATION: "1"}

    checkout.commit("retry the failed run", retry)
    with stack.simulator.scripted(simulated_trainer(NAME)):
        checkout.sync()
        obj, seen = follow(stack, lambda o: finished(o) and run_of(o).get("attempt") == 1, 60)
    assert obj["metadata"]["generation"] == generation, "an annotation is no spec change"
    assert ("Running", generation, "Progressing") in seen
    assert phase(obj) == "Succeeded" and health(obj)[0] == "Healthy"
    assert run_of(obj) == {**run_of(failed), "attempt": 1} and obj["status"]["internal"]["retryToken"] == "1"
    assert obj["status"]["runs"][-1]["reason"] == "TrainingError", "the failed attempt is kept in the history"
    assert [r["generation"] for r in obj["status"]["runs"]] == [1, 2, generation]
    assert [j["metadata"]["name"] for j in jobs(stack)] == [f"{NAME}-g{generation}-r1"]


def test_the_cluster_holds_what_git_holds(stack: LocalStack, checkout: Checkout) -> None:
    """Nothing for Argo CD's self-heal or Flux's drift detection to undo: the operator wrote only the status (no
    finalizers, annotations or spec edits), and the trainer Job is owned by the DPOJob (shown, never pruned)."""
    rendered = kubectl(stack.admin_kubeconfig, "kustomize", str(checkout.path))
    [desired] = list(yaml.safe_load_all(rendered))
    live = stack.get_dpojob(NS, NAME)
    assert live["spec"] == desired["spec"]
    assert not live["metadata"].get("finalizers")
    annotations = dict(live["metadata"]["annotations"])
    annotations.pop("kubectl.kubernetes.io/last-applied-configuration")  # kubectl apply's, as Argo CD's
    assert annotations == desired["metadata"]["annotations"]
    [job] = jobs(stack)
    assert [o["uid"] for o in job["metadata"]["ownerReferences"]] == [live["metadata"]["uid"]]


def test_the_real_trainer_pushes_a_hub_commit_per_run(stack: LocalStack, hub_api: Any) -> None:
    """v1, then the dpo.beta edit, trained by the real dpo-trainer: the Hub has a new commit for the new run,
    and the DPOJob's status says which run pushed which commit."""
    name, repo = "tiny-dpo-real", f"{HUB_USER}/tiny-dpo-real"
    [dpojob] = documents(EXAMPLE / "dpojob.yaml")
    dpojob["metadata"] = {"name": name, "namespace": NS}
    dpojob["spec"]["output"]["hub"]["repoId"] = repo
    for beta in (0.1, 0.2):
        set_beta(beta)(dpojob)
        kubectl(stack.admin_kubeconfig, "apply", "-f", "-", stdin=yaml.safe_dump(dpojob))
        obj, _ = follow(stack, this_generation_finished, 240, name)
        assert phase(obj) == "Succeeded", obj["status"]
    [v1] = obj["status"]["runs"]
    v2 = obj["status"]["model"]
    commits = [c.commit_id for c in hub_api.list_repo_commits(repo)]
    assert v1["model"]["commitSha"] != v2["commitSha"] and commits[0] == v2["commitSha"]
    assert v1["model"]["commitSha"] in commits
    assert health(obj) == ("Healthy", f"Training finished: {v2['commitUrl']}")
