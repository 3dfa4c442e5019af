"""SFT models shared between DPOJobs: trained once per SFT identity, reused by every run that would train the same.

A sweep over DPO settings (beta, loss type) trains the same SFT model again and again. Here the merged SFT model
is kept in a shared directory CACHE (`dpo-trainer run --sft-cache CACHE`; the operator passes
`<checkpointing.directory>/sft-cache` on the DPOJob's checkpointVolume), named by its identity:

    CACHE/<digest>/                  the merged SFT model and tokenizer, and origin.json (published complete)
    CACHE/<digest>.lock              the run training it: {"owner", "workDir", "host", "pid", "token", "since"}
    CACHE/<digest>.lock.takeover-*   marks a stale lock as taken over (one waiter wins it)
    CACHE/.tmp-<digest>-<token>/     a publication under way

`sft_identity` is the one definition of what decides the merged SFT model: the base model (name, revision
resolved to its commit SHA, dtype), the SFT data (source at its resolved commit or the local files' contents,
template, eval hold-out, maxSamples, the rows the steps need), the sft section's hyperparameters and LoRA
(stop rules and `reuse` left out), the quantization and the seed. Where a Hub revision could not be resolved the
run does not share (a moving branch must not match a model trained from another commit).

Before the sft stage the main process `claim`s the identity:
- published: reused. sft and sft_merge are skipped; DPO trains on CACHE/<digest>.
- no lock: it creates the lock (O_CREAT|O_EXCL: one creator wins) and trains; a thread touches the lock every
  HEARTBEAT_SECONDS. After sft_merge it `publish`es: DIR/sft_merge hard-linked (copied across file systems) into a
  temporary directory with origin.json, renamed to CACHE/<digest> (atomic: readers see all of it or nothing), then
  the lock is removed. A run that fails removes its lock, so a waiter takes over at once.
- locked by another run: it waits (an sft_model event, status.sftModel and the WaitingForSFT reason say for
  whom), polling every POLL_SECONDS, until the model is published (reused) or the lock is gone (it claims it) or
  stale: untouched for STALE_SECONDS, its owner died without removing it (it takes the lock over). A lock of its
  own work directory (an earlier pod of the same run) is taken over at once.
Other ranks of a multi-GPU launch read the main process's decisions from DIR/sft_model.json after a barrier.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpo_trainer.context import RunContext, is_main_process, wait_for_everyone
from dpo_trainer.data import sft_inputs
from dpo_trainer.specfile import looks_like_path
from dpojob_api.progress import SFTModel, SFTSource
from dpojob_api.spec import DatasetSource, DPOJobSpec, SpecModel, digest, without_rules

log = logging.getLogger(__name__)

FORMAT = 1
"""Part of every identity: raised when what a cache entry holds, or how SFT trains, changes incompatibly."""
ORIGIN_FILE = "origin.json"
DECISION_FILE = "sft_model.json"
HEARTBEAT_SECONDS = 10.0
"""How often the training run touches its lock."""
STALE_SECONDS = 120.0
"""A lock untouched for this long belongs to a run that died: a waiter takes it over."""
POLL_SECONDS = 2.0
"""How often a waiting run looks again."""
HASHED_FILE_LIMIT = 64 << 20
"""Local files up to this size count in the identity by their content; larger ones (weights) by size and mtime."""


def _local_stamp(paths: list[str]) -> list[Any]:
    """What local files hold, cheaply: each file under the paths (globs, directories) by name and content hash, or
    size and mtime for large ones."""
    files: list[Path] = []
    for pattern in paths:
        for match in sorted(glob.glob(os.path.expanduser(pattern))):
            root = Path(match)
            files += sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    stamp: list[list[Any]] = []
    for path in files:
        info = path.stat()
        if info.st_size <= HASHED_FILE_LIMIT:
            stamp.append([str(path), hashlib.sha256(path.read_bytes()).hexdigest()])
        else:
            stamp.append([str(path), info.st_size, info.st_mtime_ns])
    return stamp


def _resolved_sha(provenance: dict[str, Any], kind: str, name: str, revision: str | None) -> str | None:
    """The commit provenance.record resolved for a Hub model or dataset."""
    entries = [provenance.get("model") or {}] if kind == "model" else provenance.get("datasets") or []
    for entry in entries:
        if entry.get("name") == name and entry.get("revision") == (revision or "main"):
            return entry.get("sha")
    return None


def _source_content(source: DatasetSource, provenance: dict[str, Any]) -> Any:
    if source.files is not None:
        return _local_stamp(source.files.paths)
    assert source.hub is not None
    return _resolved_sha(provenance, "dataset", source.hub.name, source.hub.revision)


def sft_identity(spec: DPOJobSpec, provenance: dict[str, Any]) -> dict[str, Any] | None:
    """What decides the merged SFT model (see the module docstring), or None when it cannot be pinned down: a Hub
    model or dataset whose revision was not resolved to a commit, or SFT disabled."""
    if not spec.sft.enabled or spec.data.sft is None:
        return None
    model = spec.model
    model_content = (
        _local_stamp([model.name])
        if looks_like_path(model.name)
        else _resolved_sha(provenance, "model", model.name, model.revision)
    )
    data_content = _source_content(spec.data.sft.source, provenance)
    if not model_content or not data_content:
        return None

    def dumped(section: SpecModel) -> dict[str, Any]:
        return section.model_dump(by_alias=True, mode="json")

    return {
        "format": FORMAT,
        "model": dumped(model),
        "modelContent": model_content,
        "rows": dumped(spec.data.sft),
        "rowsContent": data_content,
        "maxSamples": spec.data.max_samples,
        "need": sft_inputs(spec),
        "training": without_rules(dumped(spec.sft)),
        "quantization": dumped(spec.quantization),
        "seed": spec.seed,
    }


def owner_name(ctx: RunContext) -> str:
    """The DPOJob running here (namespace/name), or the work directory of a run outside Kubernetes."""
    name, namespace = ctx.metadata.get("name"), ctx.metadata.get("namespace")
    return f"{namespace}/{name}" if name and namespace else str(ctx.layout.root)


@dataclass
class SharedSFT:
    """One run's view of the cache entry of its SFT identity."""

    cache: Path
    digest: str
    identity: dict[str, Any]
    owner: str
    work_dir: Path
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    source: SFTSource | None = None
    origin: str = ""
    _beating: threading.Event | None = None

    @property
    def entry(self) -> Path:
        """The published model: complete once it exists."""
        return self.cache / self.digest

    @property
    def lock(self) -> Path:
        return self.cache / f"{self.digest}.lock"

    @property
    def reused(self) -> bool:
        return self.source == "reused"

    # -- the lock ------------------------------------------------------------------------------------------------

    def read_lock(self) -> tuple[dict[str, Any], float] | None:
        """The lock's record and age in seconds, or None when there is no lock (a lock still being written reads
        as a record without an owner)."""
        try:
            age = time.time() - self.lock.stat().st_mtime
            text = self.lock.read_text()
        except FileNotFoundError:
            return None
        try:
            record = json.loads(text)
        except ValueError:
            record = {}
        return (record if isinstance(record, dict) else {}), age

    def try_lock(self) -> bool:
        """Create the lock; False when another run holds it (O_CREAT|O_EXCL: of two creators one wins)."""
        record = {
            "owner": self.owner,
            "workDir": str(self.work_dir),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "token": self.token,
            "since": time.time(),
        }
        try:
            fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        return True

    def take_over(self, record: dict[str, Any]) -> bool:
        """Replace a stale lock (or one of this run's earlier pods) with ours. Of several runs taking over the same
        lock one wins: the takeover marker for that lock's token is created exclusively."""
        stale = str(record.get("token") or "unknown")
        try:
            fd = os.open(self.cache / f"{self.lock.name}.takeover-{stale}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        os.close(fd)
        now = self.read_lock()
        if now is None or str(now[0].get("token") or "unknown") != stale:
            return False  # it changed hands meanwhile
        self.lock.unlink(missing_ok=True)
        return self.try_lock()

    def holds_lock(self) -> bool:
        found = self.read_lock()
        return found is not None and found[0].get("token") == self.token

    def _beat(self, stop: threading.Event) -> None:
        while not stop.wait(HEARTBEAT_SECONDS):
            try:
                os.utime(self.lock)
            except OSError as exc:
                log.warning("could not refresh the SFT lock %s: %s", self.lock, exc)

    def start_heartbeat(self) -> None:
        self._beating = threading.Event()
        threading.Thread(target=self._beat, args=(self._beating,), name="sft-lock-heartbeat", daemon=True).start()

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours (and the takeover markers of our lock)."""
        if self._beating is not None:
            self._beating.set()
            self._beating = None
        if self.holds_lock():
            self.lock.unlink(missing_ok=True)

    # -- claim, publish ------------------------------------------------------------------------------------------

    def published_origin(self) -> str | None:
        origin = self.entry / ORIGIN_FILE
        if not origin.is_file():
            return None
        try:
            return str(json.loads(origin.read_text()).get("trainedBy") or self.entry)
        except ValueError:
            return str(self.entry)

    def claim(self, on_wait: Callable[[str], None] | None = None) -> SFTSource:
        """Reuse the published model, or take the lock to train it, waiting while another run holds it.
        on_wait(owner) is called when this run starts waiting for `owner` (and when the owner changes)."""
        waiting_for: str | None = None
        while True:
            origin = self.published_origin()
            if origin is not None:
                self.source, self.origin = "reused", origin
                return self.source
            if self.try_lock():
                break
            found = self.read_lock()
            if found is None:
                continue  # released meanwhile: published, or free to take
            record, age = found
            mine = record.get("workDir") == str(self.work_dir)
            if (mine or age > STALE_SECONDS) and self.take_over(record):
                log.warning("took over the SFT lock of %s (%s)", record.get("owner"), "ours" if mine else "stale")
                break
            owner = str(record.get("owner") or "another run")
            if owner != waiting_for and on_wait is not None:
                on_wait(owner)
            waiting_for = owner
            time.sleep(POLL_SECONDS)
        self.start_heartbeat()
        self.source, self.origin = "trained", self.owner
        return self.source

    def publish(self, model_dir: Path) -> None:
        """Put the merged SFT model in the cache under its digest, complete or not at all, then drop the lock."""
        if self.entry.exists():
            self.release()
            return
        temporary = self.cache / f".tmp-{self.digest}-{self.token}"
        shutil.rmtree(temporary, ignore_errors=True)
        shutil.copytree(model_dir, temporary, copy_function=_link_or_copy)
        origin = {
            "digest": self.digest,
            "trainedBy": self.owner,
            "workDir": str(self.work_dir),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "identity": self.identity,
        }
        (temporary / ORIGIN_FILE).write_text(json.dumps(origin, indent=2, default=str))
        try:
            os.rename(temporary, self.entry)
        except OSError as exc:
            shutil.rmtree(temporary, ignore_errors=True)
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
        self.release()

    def status(self) -> dict[str, Any]:
        """summary.json "sftModel" and the model card's line: the identity, where it came from, where it lies."""
        return {"digest": self.digest, "source": self.source, "from": self.origin, "path": str(self.entry)}

    def event(self) -> SFTModel:
        """The sft_model progress line of the decision."""
        assert self.source is not None
        message = {
            "trained": f"training {self.digest} here, shared once merged",
            "reused": f"reused {self.digest} from {self.origin}",
            "waiting": f"waiting for {self.digest} trained by {self.origin}",
        }[self.source]
        return SFTModel(digest=self.digest, source=self.source, origin=self.origin, message=message)


def _link_or_copy(src: str, dst: str) -> None:
    """A hard link (no second copy of the weights on the volume), a copy where linking is not possible."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def open_shared(ctx: RunContext, cache: Path | None) -> SharedSFT | None:
    """The run's SharedSFT when it may share (a cache, SFT on, sft.reuse, an identity), else None. The main process
    decides (it alone has resolved the revisions); every rank gets the same answer."""
    if cache is None or not ctx.spec.sft.enabled or not ctx.spec.sft.reuse:
        return None
    decision = ctx.layout.root / DECISION_FILE
    if is_main_process():
        identity = sft_identity(ctx.spec, ctx.provenance)
        if identity is None:
            log.warning("the SFT model is not shared: a Hub revision of the base model or SFT data was not resolved")
        ctx.write_json(decision, {"digest": digest(identity), "identity": identity} if identity else {})
    wait_for_everyone()
    recorded = ctx.read_json(decision) or {}
    if not recorded.get("digest"):
        return None
    return SharedSFT(cache, recorded["digest"], recorded["identity"], owner_name(ctx), ctx.layout.root)


def claim(ctx: RunContext, shared: SharedSFT) -> None:
    """Before the sft stage, every rank: the main process decides (reports waiting and the outcome); the others read
    its decision after the barrier. A reused model becomes the run's SFT model (ctx.sft_model)."""
    decision = ctx.layout.root / DECISION_FILE
    if is_main_process():
        shared.cache.mkdir(parents=True, exist_ok=True)

        def waiting(owner: str) -> None:
            shared.source, shared.origin = "waiting", owner
            ctx.reporter.emit(shared.event())

        shared.claim(on_wait=waiting)
        ctx.reporter.emit(shared.event())
        ctx.write_json(decision, {**shared.status(), "identity": shared.identity})
    wait_for_everyone()
    recorded = ctx.read_json(decision) or {}
    shared.source, shared.origin = recorded.get("source"), recorded.get("from", "")
    ctx.sft_source = shared.status()
    if shared.reused:
        ctx.sft_model = shared.entry
