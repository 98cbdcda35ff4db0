"""The bulk job table and replica reports: a detached actor per app (:func:`state_actor`)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from cfgd.io.retry import StorageError
from cfgd.io.storage import StorageOptions
from cfgd.serving.bulk import MANIFEST, BulkPlan, prepare_destination, run_shard
from cfgd.serving.schemas import RequestError, short_error

STATE_NAMESPACE = "cfgd"


@dataclass
class _Job:
    """One job's progress. Counters are kept as shards finish, so a status is O(1) in
    the job's size (plus the list of outputs)."""

    plan: BulkPlan
    skipped: set
    done: dict = field(default_factory=dict)  # shard -> rows
    failed: dict = field(default_factory=dict)  # shard -> error
    refs: dict = field(default_factory=dict, repr=False)  # shard -> ObjectRef while running
    started: float = field(default_factory=time.time)
    finished: float | None = None
    cancelled: bool = False
    interrupted: bool = False  # recovered from storage: no shard tasks are running for it
    done_images: int = 0

    def __post_init__(self):
        self.done_images = sum(self.plan.shard_len(k) for k in self.skipped)

    @property
    def state(self) -> str:
        if self.cancelled:
            return "cancelled"
        finished = len(self.done) + len(self.skipped) + len(self.failed)
        if finished < self.plan.total_shards:
            return "interrupted" if self.interrupted else "running"
        return "failed" if self.failed else "done"

    def finish(self, shard: int, rows: int | None = None, error: str | None = None) -> None:
        self.refs.pop(shard, None)
        if error is None:
            self.done[shard] = rows
            self.done_images += rows
        else:
            self.failed[shard] = error
        if self.state != "running" and self.finished is None:
            self.finished = time.time()

    def status(self) -> dict:
        p = self.plan
        done_shards = sorted(set(self.done) | self.skipped)
        return {
            "job_id": p.job_id, "state": self.state, "destination": p.destination,
            "total_shards": p.total_shards, "done_shards": len(done_shards),
            "skipped_shards": len(self.skipped), "failed_shards": len(self.failed),
            "total_images": p.total_images, "done_images": self.done_images,
            "errors": [f"shard {k}: {e}" for k, e in sorted(self.failed.items())[:20]],
            "manifest": f"{p.destination}/{MANIFEST}",
            "outputs": [p.shard_uri(k) for k in done_shards],
            "elapsed_s": round((self.finished or time.time()) - self.started, 3),
        }


def _overlaps(a: str, b: str) -> bool:
    """One destination inside (or equal to) the other, by whole path segments."""
    a, b = a.rstrip("/") + "/", b.rstrip("/") + "/"
    return a.startswith(b) or b.startswith(a)


class ServeState:
    """Runs and tracks bulk jobs and collects sampler replica reports, for one app.

    Used as a detached named actor (:func:`state_actor`): jobs keep running and stay
    visible whichever ingress replica took the POST, and survive that replica.
    """

    MAX_FINISHED = 256  # finished jobs kept in memory (their state is in storage anyway)

    def __init__(self):
        self.jobs: dict[str, _Job] = {}
        self.replicas: dict[str, dict] = {}
        self._tasks: set = set()  # strong references: asyncio keeps only weak ones
        self._locks: dict[str, asyncio.Lock] = {}

    async def submit(self, bulk: dict) -> dict:
        """Start (or resume, skipping finished shards) the job of a plan_bulk result.
        Returns the job status, or a refusal (:meth:`RequestError.as_result`)."""
        job_id = BulkPlan.from_dict(bulk["plan"]).job_id
        # One submission per job at a time: two racing POSTs must not both launch shards.
        async with self._locks.setdefault(job_id, asyncio.Lock()):
            try:
                return await self._submit(bulk)
            except RequestError as err:
                return err.as_result()

    async def _submit(self, bulk: dict) -> dict:
        import ray

        plan = BulkPlan.from_dict(bulk["plan"])
        opts = StorageOptions(**bulk["storage"])
        task = bulk["task"]
        job = self.jobs.get(plan.job_id)
        if job is not None and job.state == "running":
            if job.plan != plan:
                raise RequestError(409, "destination", f"{plan.destination} is in use by a running, different job")
            return job.status()
        running = [j for j in self.jobs.values() if j.state == "running"]
        for other in running:
            if _overlaps(other.plan.destination, plan.destination):
                raise RequestError(409, "destination", f"{plan.destination} overlaps the destination of running "
                                                       f"job {other.plan.job_id}; choose a separate directory")
        if len(running) >= task["max_running_jobs"]:
            raise RequestError(429, "destination", f"{len(running)} bulk jobs are running, the limit is "
                                                   f"{task['max_running_jobs']}; retry when one finishes")
        try:
            skipped = await asyncio.to_thread(prepare_destination, plan, bulk["output_prefix"], opts)
        except (StorageError, OSError) as err:
            raise RequestError(503, "destination", f"cannot use {plan.destination}: "
                                                   f"{type(err).__name__}") from None
        job = _Job(plan=plan, skipped=skipped)
        self.jobs[plan.job_id] = job
        self._prune()
        remote = ray.remote(run_shard).options(num_cpus=task["num_cpus"], max_retries=task["max_retries"],
                                               retry_exceptions=True)
        for k in range(plan.total_shards):
            if k not in skipped:
                job.refs[k] = remote.remote(plan.to_dict(), k, opts, task["threads"])
                t = asyncio.get_running_loop().create_task(self._track(job, k, job.refs[k]))
                self._tasks.add(t)
                t.add_done_callback(self._tasks.discard)
        if job.state != "running":
            job.finished = time.time()
        return job.status()

    async def _track(self, job: _Job, shard: int, ref) -> None:
        try:
            result = await ref
            job.finish(shard, rows=result["rows"])
        except Exception as exc:  # noqa: BLE001 - reported in the job status
            if not job.cancelled:
                job.finish(shard, error=short_error(exc, limit=500))

    def _prune(self) -> None:
        finished = sorted((j.finished, jid) for jid, j in self.jobs.items()
                          if j.state != "running" and j.finished is not None)
        for _, jid in finished[:max(0, len(finished) - self.MAX_FINISHED)]:
            del self.jobs[jid]

    def cancel(self, job_id: str) -> dict | None:
        """Stop a running job's pending and running shards; finished shards stay."""
        import ray

        job = self.jobs.get(job_id)
        if job is None:
            return None
        if job.state == "running":
            job.cancelled = True
            for ref in list(job.refs.values()):
                ray.cancel(ref, force=True)
            job.refs.clear()
            job.finished = time.time()
        return job.status()

    def recover(self, plan_dict: dict, done: list[int]) -> dict:
        """A job known from storage but not in memory (this actor restarted): its status
        from the shards on disk; re-POST the same request to finish it."""
        plan = BulkPlan.from_dict(plan_dict)
        job = self.jobs.get(plan.job_id)
        if job is None:
            job = _Job(plan=plan, skipped=set(done), interrupted=True)
            if job.state != "interrupted":
                job.finished = time.time()
            self.jobs[plan.job_id] = job
            self._prune()
        return job.status()

    def status(self, job_id: str) -> dict | None:
        job = self.jobs.get(job_id)
        return None if job is None else job.status()

    def report(self, replica: str, info: dict) -> None:
        self.replicas[replica] = {**info, "reported_at": time.time()}

    def forget(self, replica: str) -> None:
        self.replicas.pop(replica, None)

    def replica_reports(self, max_age_s: float = 60.0) -> dict:
        now = time.time()
        return {r: {**{k: v for k, v in i.items() if k != "reported_at"}, "age_s": round(now - i["reported_at"], 1)}
                for r, i in self.replicas.items() if now - i["reported_at"] <= max_age_s}


def state_actor_name(app_name: str) -> str:
    return f"cfgd-serve-state-{app_name}"


def state_actor(app_name: str):
    """The detached ServeState actor of ``app_name``, created on first use."""
    import ray

    return ray.remote(ServeState).options(
        name=state_actor_name(app_name), namespace=STATE_NAMESPACE, lifetime="detached", get_if_exists=True,
        num_cpus=0, max_restarts=3).remote()
