"""The reconciler's view of the cluster: newer wins, ghosts go on relist, copies are private."""

from __future__ import annotations

from dpo_operator.cache import ObjectCache, slim
from dpo_operator.manifests import LABEL_DPOJOB, LABEL_RUN

NS = "team-a"


def dpojob(name: str, revision: str, phase: str = "Pending") -> dict:
    return {
        "kind": "DPOJob",
        "metadata": {
            "name": name,
            "namespace": NS,
            "resourceVersion": revision,
            "managedFields": [{"manager": "kubectl"}],
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{...}", "keep": "me"},
        },
        "status": {"phase": phase},
    }


def child(kind: str, name: str, owner: str, revision: str, run: int = 1) -> dict:
    labels = {LABEL_DPOJOB: owner, LABEL_RUN: str(run)}
    return {"kind": kind, "metadata": {"name": name, "namespace": NS, "resourceVersion": revision, "labels": labels}}


def test_an_older_event_never_replaces_what_the_operator_wrote() -> None:
    cache = ObjectCache()
    cache.put(dpojob("a", "10", "Running"))  # the status patch's response (write-through)
    cache.put(dpojob("a", "9", "Pending"))  # the watch event of the change before it, arriving late
    assert cache.dpojob(NS, "a")["status"]["phase"] == "Running"
    cache.put(dpojob("a", "11", "Succeeded"))
    assert cache.dpojob(NS, "a")["status"]["phase"] == "Succeeded"


def test_held_objects_are_slim_private_copies() -> None:
    cache = ObjectCache()
    cache.put(dpojob("a", "1"))
    held = cache.dpojob(NS, "a")
    assert "managedFields" not in held["metadata"]
    assert held["metadata"]["annotations"] == {"keep": "me"}
    held["status"]["phase"] = "mutated by a caller"
    assert cache.dpojob(NS, "a")["status"]["phase"] == "Pending"


def test_children_are_found_by_their_dpojob_label_and_run() -> None:
    cache = ObjectCache()
    template = {"spec": {"containers": [{"name": "trainer", "image": "trainer:1"}]}}
    job = {**child("Job", "a-g1", "a", "5"), "spec": {"suspend": True, "template": template}}
    cache.put(job)
    cache.put({**child("Pod", "a-g1-x", "a", "6", run=1), "spec": {"containers": []}})
    (held,) = cache.jobs(NS, "a")
    assert held["spec"] == {"suspend": True, "parallelism": None}, "not the template"
    assert "spec" not in cache.pods(NS, "a", 1)[0], "a pod's spec is not kept"
    cache.replace_all("Job", [held], None)
    assert cache.jobs(NS, "a") == [held], "a held object put again stays as it is"
    cache.put(child("Pod", "a-g1-x", "a", "6", run=1))
    cache.put(child("Pod", "a-g2-y", "a", "7", run=2))
    cache.put(child("Pod", "b-g1-z", "b", "8"))
    assert [j["metadata"]["name"] for j in cache.jobs(NS, "a")] == ["a-g1"]
    assert [p["metadata"]["name"] for p in cache.pods(NS, "a", 2)] == ["a-g2-y"]
    cache.remove("Pod", NS, "a-g2-y", {LABEL_DPOJOB: "a"})
    assert cache.pods(NS, "a", 2) == [] and cache.counts() == {"DPOJob": 0, "Job": 1, "Pod": 2}


def test_relist_drops_ghosts_but_not_what_was_written_after_the_list() -> None:
    cache = ObjectCache()
    cache.put(dpojob("ghost", "3"))  # deleted while the watch was down: no DELETED event ever came
    cache.put(dpojob("fresh", "30"))  # created after the list was taken
    cache.put(dpojob("kept", "4"))
    dropped = cache.replace_all("DPOJob", [dpojob("kept", "5", "Running")], "20")
    assert dropped == [(NS, "ghost")]
    assert sorted(cache.dpojob_keys()) == [(NS, "fresh"), (NS, "kept")]
    assert cache.dpojob(NS, "kept")["status"]["phase"] == "Running"


def test_a_relist_read_page_by_page_copies_only_what_changed() -> None:
    cache = ObjectCache()
    cache.put(dpojob("same", "4"))
    cache.put(dpojob("gone-since", "6"))  # the watch deleted it after the list was taken: not brought back
    listed = [cache.listed("DPOJob", d) for d in (dpojob("same", "4"), dpojob("gone-since", "6"), dpojob("new", "7"))]
    assert [entry.held is None for entry in listed] == [True, True, False], "held at that resourceVersion already"
    cache.remove("DPOJob", NS, "gone-since")
    assert cache.replace_all("DPOJob", listed, "20") == []
    assert sorted(cache.dpojob_keys()) == [(NS, "new"), (NS, "same")]
    assert cache.dpojob(NS, "same") == slim(dpojob("same", "4"))
