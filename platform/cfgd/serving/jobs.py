"""The bulk job table and replica reports: a detached actor per app (:func:`state_actor`)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from cfgd.serving.bulk import MANIFEST, BulkPlan, prepare_destination, run_shard
from cfgd.serving.schemas import RequestError
from cfgd.storage import StorageError, StorageOptions

STATE_NAMESPACE = "cfgd"


@dataclass
class _Job:
    plan: BulkPlan
    skipped: set
    done: dict = field(default_factory=dict)  # shard -> rows
    failed: dict = field(default_factory=dict)  # shard -> error
    started: float = field(default_factory=time.time)
    finished: float | None = None

    def status(self) -> dict:
        p = self.plan
        finished = len(self.done) + len(self.skipped) + len(self.failed)
        state = "running" if finished < p.total_shards else ("failed" if self.failed else "done")
        done_shards = sorted(set(self.done) | self.skipped)
        return {
            "job_id": p.job_id, "state": state, "destination": p.destination,
            "total_shards": p.total_shards, "done_shards": len(done_shards),
            "skipped_shards": len(self.skipped), "failed_shards": len(self.failed),
            "total_images": p.total_images,
            "done_images": sum(len(p.shard_rows(k)) for k in self.skipped) + sum(self.done.values()),
            "errors": [f"shard {k}: {e}" for k, e in sorted(self.failed.items())],
            "manifest": f"{p.destination}/{MANIFEST}",
            "outputs": [p.shard_uri(k) for k in done_shards],
            "elapsed_s": round((self.finished or time.time()) - self.started, 3),
        }


def _short_error(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc
    text = f"{type(cause).__name__}: {cause}"
    return text if len(text) <= 500 else text[:500] + "…"


class ServeState:
    """Runs and tracks bulk jobs and collects sampler replica reports, for one app.

    Used as a detached named actor (:func:`state_actor`): jobs keep running and stay
    visible whichever ingress replica took the POST, and survive that replica.
    """

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
        job = self.jobs.get(plan.job_id)
        if job is not None and job.status()["state"] == "running":
            if job.plan != plan:
                raise RequestError(409, "destination", f"{plan.destination} is in use by a running, different job")
            return job.status()
        try:
            skipped = await asyncio.to_thread(prepare_destination, plan, opts)
        except (StorageError, OSError) as err:
            raise RequestError(503, "destination", f"cannot use {plan.destination}: {err}") from None
        job = _Job(plan=plan, skipped=skipped)
        self.jobs[plan.job_id] = job
        task = bulk["task"]
        remote = ray.remote(run_shard).options(num_cpus=task["num_cpus"], max_retries=task["max_retries"],
                                               retry_exceptions=True)
        for k in range(plan.total_shards):
            if k not in skipped:
                ref = remote.remote(plan.to_dict(), k, opts, task["threads"])
                t = asyncio.get_running_loop().create_task(self._track(job, k, ref))
                self._tasks.add(t)
                t.add_done_callback(self._tasks.discard)
        if job.status()["state"] != "running":
            job.finished = time.time()
        return job.status()

    async def _track(self, job: _Job, shard: int, ref) -> None:
        try:
            result = await ref
            job.done[shard] = result["rows"]
        except Exception as exc:  # noqa: BLE001 - reported in the job status
            job.failed[shard] = _short_error(exc)
        if job.status()["state"] != "running":
            job.finished = time.time()

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
