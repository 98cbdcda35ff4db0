"""Serving guided samples: the library side of ``serve/app.py``, one concern per module.

The Serve deployments in ``serve/app.py`` only route; everything they do is here, as
plain Python that runs without a cluster:

* :mod:`.settings` — :class:`ServeSettings`, the sampler's ``user_config`` (allowed
  checkpoints, limits, batching, bulk output prefix): pydantic types, unknown keys refused.
* :mod:`.schemas` — :class:`GenerateRequest`, :class:`BulkRequest` (OpenAPI comes from
  them) and :class:`RequestError` (→ 4xx naming the field).
* :mod:`.checkpoint_cache` — the per-replica LRU of loaded checkpoints;
  :mod:`.row_padding` — :class:`RowPadded`, batch-invariant bytes.
* :mod:`.batching` — one dynamic batch of requests → one ``CheckpointSampler.sample`` call per
  solver; responses rendered.
* :mod:`.sampler` — :class:`SamplerCore`: what one replica holds and checks.
* :mod:`.bulk` — bulk destinations, :class:`BulkPlan`, :func:`run_shard` (a Ray task per
  Parquet shard); :mod:`.bulk_jobs` — :class:`ServeState`, the detached actor tracking jobs.

Sampling is always ``CheckpointSampler.sample`` on the EMA weights; nothing here repeats the math.
"""

from cfgd.serving.batching import SampleSpec, render, sample_specs, to_http_json
from cfgd.serving.bulk import (MANIFEST, BulkPlan, existing_shards, job_id_for, prepare_destination,
                               resolve_destination, run_shard)
from cfgd.serving.bulk_jobs import STATE_NAMESPACE, ServeState, state_actor, state_actor_name
from cfgd.serving.checkpoint_cache import ModelCache, load_sampler
from cfgd.serving.guard import Guard, configured_tokens, startup_message
from cfgd.serving.row_padding import RowPadded
from cfgd.serving.sampler import SamplerCore
from cfgd.serving.schemas import (MAX_SEED, BulkRequest, GenerateRequest, RequestError, refused, sampling_failure,
                                  validation_message)
from cfgd.serving.settings import ServeSettings, settings_from_args

__all__ = [
    "Guard", "configured_tokens", "startup_message", "sampling_failure", "SampleSpec", "render",
    "sample_specs", "to_http_json", "MANIFEST", "BulkPlan", "existing_shards", "job_id_for",
    "prepare_destination", "resolve_destination", "run_shard", "STATE_NAMESPACE", "ServeState", "state_actor",
    "state_actor_name", "ModelCache", "load_sampler", "RowPadded", "SamplerCore", "MAX_SEED", "BulkRequest",
    "GenerateRequest", "RequestError", "refused", "validation_message", "ServeSettings", "settings_from_args",
]
