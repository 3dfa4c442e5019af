"""Every Prometheus metric the operator exports, in one place (served on /metrics by health.py).

Per-DPOJob series (PER_DPOJOB) carry only namespace and name, and are removed when the DPOJob goes, so
cardinality is bounded by the number of DPOJobs. Whoever can reach the port reads them, every tenant's DPOJob
names and rewards: a shared cluster turns them off (`per_dpojob_series(False)`, the chart's
metrics.perDPOJobSeries) and keeps the operator-wide counts and timings. Phase counts and active followers are
computed at scrape time from the reconciler's own state instead of being kept in step by hand.
"""

from __future__ import annotations

import contextlib
from collections import Counter as Tally
from collections.abc import Callable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from dpojob_api.vocabulary import Phase

from . import __version__

disable_created_metrics()  # no `_created` series beside every counter and histogram (process-wide)
REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)  # process_cpu_seconds_total, process_resident_memory_bytes, open fds, ...
PlatformCollector(registry=REGISTRY)  # python_info
BUILD_INFO = Gauge(
    "dpo_operator_build_info", "Always 1; the operator's version as a label.", ["version"], registry=REGISTRY
)
BUILD_INFO.labels(__version__).set(1)

RECONCILES = Counter("dpo_operator_reconcile", "Reconciles of a DPOJob.", registry=REGISTRY)
RECONCILE_ERRORS = Counter(
    "dpo_operator_reconcile_errors", "Reconciles that raised (retried by the next event or resync).", registry=REGISTRY
)
RECONCILE_SECONDS = Histogram(
    "dpo_operator_reconcile_duration_seconds",
    "Time one reconcile took.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
STATUS_PATCH_SECONDS = Histogram(
    "dpo_operator_status_patch_duration_seconds",
    "Time one DPOJob status patch took.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
    registry=REGISTRY,
)
JOBS_CREATED = Counter("dpo_operator_trainer_jobs_created", "Trainer Jobs created.", registry=REGISTRY)
JOB_CREATION_DELAY = Histogram(
    "dpo_operator_job_creation_delay_seconds",
    "From a DPOJob's creation to its first trainer Job's creation.",
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
    registry=REGISTRY,
)
RESYNC_ERRORS = Counter(
    "dpo_operator_resync_errors", "Periodic resyncs that could not list DPOJobs.", registry=REGISTRY
)
QUEUE_LATENCY = Histogram(
    "dpo_operator_workqueue_queue_duration_seconds",
    "From a DPOJob's key being added to the work queue to a worker taking it, by lane (workqueue.py).",
    ["lane"],
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300),
    registry=REGISTRY,
)
LEADER = Gauge("dpo_operator_leader", "1 while this replica holds the leader Lease (or runs alone).", registry=REGISTRY)
REWARD_ACCURACY = Gauge(
    "dpo_operator_dpojob_rewards_accuracies",
    "Latest rewards/accuracies the DPOJob's trainer reported.",
    ["namespace", "name"],
    registry=REGISTRY,
)
REWARD_MARGIN = Gauge(
    "dpo_operator_dpojob_rewards_margins",
    "Latest rewards/margins the DPOJob's trainer reported.",
    ["namespace", "name"],
    registry=REGISTRY,
)

PER_DPOJOB = (REWARD_ACCURACY, REWARD_MARGIN)
"""Every series labelled by a DPOJob's namespace and name."""
_per_dpojob = True


def per_dpojob_series(enabled: bool) -> None:
    """Export the PER_DPOJOB series or not (at start, from OperatorSettings.per_dpojob_series)."""
    global _per_dpojob
    if enabled != _per_dpojob:
        for gauge in PER_DPOJOB:
            gauge.clear()
            (REGISTRY.register if enabled else REGISTRY.unregister)(gauge)
        _per_dpojob = enabled


class StateCollector(Collector):
    """Gauges read off live state at scrape time: DPOJobs by phase, log followers active, the work queue's depth
    by lane."""

    def __init__(
        self,
        phases: Callable[[], list[str]],
        followers: Callable[[], int],
        queue_depths: Callable[[], dict[str, int]] = dict,
    ) -> None:
        self.phases, self.followers, self.queue_depths = phases, followers, queue_depths

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts = Tally(self.phases())
        by_phase = GaugeMetricFamily("dpo_operator_dpojobs", "DPOJobs by status.phase.", labels=["phase"])
        for phase in sorted(set(Phase) | counts.keys()):
            by_phase.add_metric([phase], counts.get(phase, 0))
        yield by_phase
        yield GaugeMetricFamily("dpo_operator_log_followers", "Trainer pod logs being followed.", self.followers())
        depth = GaugeMetricFamily(
            "dpo_operator_workqueue_depth", "DPOJob keys waiting in the work queue, by lane.", labels=["lane"]
        )
        for lane, waiting in sorted(self.queue_depths().items()):
            depth.add_metric([lane], waiting)
        yield depth


def record_rewards(namespace: str, name: str, rewards: dict[str, float]) -> None:
    """The per-DPOJob reward gauges (only the keys the trainer reported so far), when exported."""
    if not _per_dpojob:
        return
    for key, gauge in (("accuracies", REWARD_ACCURACY), ("margins", REWARD_MARGIN)):
        if key in rewards:
            gauge.labels(namespace, name).set(rewards[key])


def forget_dpojob(namespace: str, name: str) -> None:
    """Drop a deleted DPOJob's series."""
    for gauge in PER_DPOJOB:
        with contextlib.suppress(KeyError):  # never reported any rewards
            gauge.remove(namespace, name)
