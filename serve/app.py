"""The Serve application: a thin FastAPI ingress bound to the sampler deployment.

    serve run serve/config.yaml       # local Ray, http://127.0.0.1:8000 (docs at /docs)
    serve deploy serve/config.yaml    # a running cluster (see the comments in config.yaml)

Request checks, batching, model caching and bulk jobs live in :mod:`cfgd.serving`; this
file only binds them to Serve. Import path for configs: ``serve.app:app`` (settings come
from the Sampler's ``user_config``) or ``serve.app:build_app`` (settings as ``args``).
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from cfgd import serving

logger = logging.getLogger("ray.serve")
HEALTH_FRESH_S = 30.0  # a batch served this recently makes a health probe unnecessary

api = FastAPI(
    title="cfgd guided sampling",
    version="1",
    description="Class-conditional diffusion samples with classifier-free guidance. "
                "POST /generate for images now, POST /bulk for Parquet datasets written in the background.",
)


# Token and body-size limit in front of every route (cfgd.serving.guard).
api.add_middleware(serving.Guard)


@api.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    # Only loc/msg/type: the rejected input may hold NaN, which JSON cannot carry.
    field, message = serving.validation_message(exc.errors())
    errors = [{"loc": [str(p) for p in e.get("loc", ())], "msg": e.get("msg", ""), "type": e.get("type", "")}
              for e in exc.errors()]
    return JSONResponse(status_code=422, content={"detail": message, "field": field, "errors": errors})


# Capacity and replica loss are the server's state, not the request's: 503 with Retry-After,
# so clients and load balancers back off and retry (a replica killed mid-request, a full
# queue: max_queued_requests) instead of seeing a 500.
_UNAVAILABLE = (BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError, RayActorError,
                ActorUnavailableError)


async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
    busy = isinstance(exc, BackPressureError)
    detail = "the server is at capacity, retry shortly" if busy else "a replica went away, retry shortly"
    return JSONResponse(status_code=503, headers={"Retry-After": "1" if busy else "2"},
                        content={"detail": detail, "field": "body"})


for _exc in _UNAVAILABLE:
    api.add_exception_handler(_exc, _unavailable)


def _unknown_job(job_id: str) -> JSONResponse:
    return JSONResponse(status_code=404, content={"detail": f"unknown bulk job {job_id[:64]!r}", "field": "job_id"})


def _condition_headers(result: dict) -> dict:
    """X-Label for a label model's grid (a prompt may not fit a header's Latin-1: it is in the JSON form)."""
    return {"X-Label": str(result["label"])} if "label" in result else {}


def _refusal(result: Any) -> JSONResponse | None:
    """A refusal returned by the sampler or the state actor, as its HTTP response."""
    r = serving.refused(result)
    if r is None:
        return None
    return JSONResponse(status_code=r["status"], content={"detail": r["detail"], "field": r["field"]})


# Defaults for build_app; serve/config.yaml sets the same per deployment. A full queue
# answers 503 (above); graceful shutdown outlasts the longest legal batch (README: limits).
@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=16, max_queued_requests=64,
                  graceful_shutdown_timeout_s=300,
                  health_check_period_s=10, health_check_timeout_s=30)
class Sampler:
    """Holds the checkpoints; merges concurrent requests into batches."""

    def __init__(self):
        ctx = serve.get_replica_context()
        self.replica = ctx.replica_id.unique_id
        self.app_name = ctx.app_name
        self.core = serving.SamplerCore()
        self._state = None
        self._health_pool = ThreadPoolExecutor(1, thread_name_prefix="health")

    async def reconfigure(self, user_config: dict) -> None:
        # A bad first config raises (the replica fails to start, serve status says why);
        # a bad later one is refused and the replica keeps its settings (see
        # SamplerCore.reconfigure), with the reason in the log, /ready and /stats.
        settings = await asyncio.to_thread(self.core.reconfigure, user_config)
        if settings is None:
            logger.error("Sampler %s: %s", self.replica, self.core.config_error)
        else:
            self._batched.set_max_batch_size(settings.max_batch_size)
            self._batched.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        self._report()

    async def generate(self, body: dict) -> dict:
        """A rendered result, or a refusal naming the bad field."""
        try:
            # Validation may load a checkpoint: off the event loop, like the sampling.
            spec = await asyncio.to_thread(self.core.prepare, body)
        except serving.RequestError as err:
            return err.as_result()
        images = await self._batched(spec)
        if isinstance(images, Exception):  # this request failed alone; its batch-mates did not
            return serving.sampling_failure(images).as_result()
        return await asyncio.to_thread(serving.render, spec, images)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _batched(self, specs: list[serving.SampleSpec]) -> list[Any]:
        images = await asyncio.to_thread(self.core.sample, specs)
        self._report()
        return images

    async def locate_job(self, job_id: str) -> dict | None:
        return await asyncio.to_thread(self.core.locate_job, job_id)

    async def plan_bulk(self, body: dict) -> dict:
        try:
            return await asyncio.to_thread(self.core.plan_bulk, body)
        except serving.RequestError as err:
            return err.as_result()

    def stats(self) -> dict:
        return {"replica": self.replica, **self.core.stats()}

    def ready(self) -> dict:
        return {"replica": self.replica, **self.core.describe()}

    async def check_health(self) -> None:
        # Its own thread: a probe never queues behind long batches in the default pool,
        # and a replica that served a batch within the period is healthy without one.
        await asyncio.get_running_loop().run_in_executor(self._health_pool, self.core.health_sample,
                                                         HEALTH_FRESH_S)
        self._report()

    def _report(self) -> None:
        """Tell the app's state actor what this replica holds (for /ready and /stats)."""
        try:
            if self._state is None:
                self._state = serving.state_actor(self.app_name)
            self._state.report.remote(self.replica, {**self.core.stats(), "loaded": self.core.loaded()})
        except Exception:  # noqa: BLE001 - reports are best effort, serving is not
            pass

    def __del__(self):
        try:
            if self._state is not None:
                self._state.forget.remote(self.replica)
        except Exception:  # noqa: BLE001 - the cluster may already be gone
            pass


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=100)
@serve.ingress(api)
class Ingress:
    """HTTP front end: parses requests, forwards them, turns refusals into 4xx."""

    def __init__(self, sampler: DeploymentHandle):
        self.sampler = sampler
        self.app_name = serve.get_replica_context().app_name
        self._state = None
        logger.warning("cfgd ingress: %s", serving.startup_message(serving.configured_tokens()))

    def state(self):
        if self._state is None:
            self._state = serving.state_actor(self.app_name)
        return self._state

    @api.post("/generate", responses={200: {"description": "png_list: JSON with base64 PNGs; grid: one PNG",
                                            "content": {"application/json": {}, "image/png": {}}}})
    async def generate(self, req: serving.GenerateRequest):
        result = await self.sampler.generate.remote(req.model_dump())
        if serving.refused(result):
            return _refusal(result)
        if result["format"] == "grid":
            headers = {"X-Checkpoint": result["checkpoint"], **_condition_headers(result),
                       "X-W": repr(result["w"]), "X-Seeds": ",".join(map(str, result["seeds"]))}
            return Response(content=result["grid"], media_type="image/png", headers=headers)
        return serving.to_http_json(result)

    @api.post("/bulk", status_code=202)
    async def bulk(self, req: serving.BulkRequest):
        plan = await self.sampler.plan_bulk.remote(req.model_dump())
        if serving.refused(plan):
            return _refusal(plan)
        status = await self.state().submit.remote(plan)
        return _refusal(status) or status

    @api.get("/bulk/{job_id}")
    async def bulk_status(self, job_id: str):
        status = await self.state().status.remote(job_id)
        if status is None:  # not in the table: a restarted state actor finds it in storage
            found = await self.sampler.locate_job.remote(job_id)
            if found is not None:
                status = await self.state().recover.remote(found["plan"], found["done"])
        return status if status is not None else _unknown_job(job_id)

    @api.delete("/bulk/{job_id}")
    async def bulk_cancel(self, job_id: str):
        """Cancel a running job: pending and running shards stop; finished shards stay."""
        status = await self.state().cancel.remote(job_id)
        return status if status is not None else _unknown_job(job_id)

    @api.get("/healthz")
    async def healthz(self):
        """Liveness, open to every caller: says nothing about the server."""
        return {"ok": True}

    @api.get("/stats")
    async def stats(self):
        """Counters of the replica that answered, plus the last report of every replica."""
        mine = await self.sampler.stats.remote()
        return {**mine, "replicas": await self.state().replica_reports.remote()}

    @api.get("/ready")
    async def ready(self):
        mine = await self.sampler.ready.remote()
        return {"ready": mine.get("default_checkpoint") in mine.get("loaded", {}), **mine,
                "replicas": await self.state().replica_reports.remote()}


def build_app(args: dict) -> serve.Application:
    """``serve run serve.app:build_app checkpoint=URI`` or ``args`` = sampler settings.

    ``checkpoint=URI`` is short for one allowed checkpoint named "default". Any other key
    is a :class:`cfgd.serving.ServeSettings` field (strings from the command line are
    converted to the field's type), validated now so a typo fails before deploying.
    """
    settings = serving.settings_from_args(args)
    return Ingress.bind(Sampler.options(user_config=settings).bind())


# For configs whose Sampler entry carries the settings as user_config (serve/config.yaml).
app = Ingress.bind(Sampler.bind())
