"""Starting or joining Ray: the one place that calls ``ray.init``.

Used by training, sweeps and the tests' shared Ray. Worker output still goes to the
driver (``log_to_driver``): a job run quietly sends it to its log file and keeps only
the ``[cfgd.`` lines on the console (:mod:`cfgd.console`).
"""

from __future__ import annotations

import os
from types import ModuleType

from cfgd import console


def init_ray(address: str = "", num_cpus: int = 0, dashboard: bool = False) -> ModuleType:
    """Join the cluster at ``address``, or start an embedded local Ray; returns ``ray``.

    ``address`` "" falls back to RAY_ADDRESS (set by ``ray job submit`` to the job's
    cluster), then to a new local Ray with ``num_cpus`` CPUs (0 = all of this
    machine's). ``dashboard``: start the dashboard, bound to 127.0.0.1 (Ray Train's
    placement-group cleaner queries actor state through it; without it, it logs a
    warning every second). Does nothing if Ray is already initialized here.
    """
    import ray

    if ray.is_initialized():
        return ray
    # Ray installs a console handler on its "ray" logger at import; a quiet job's log gets its
    # records (e.g. the token-authentication notice ray.init logs) instead of the console.
    console.capture_logger("ray")
    address = address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address, logging_level="warning")
    else:
        ray.init(num_cpus=num_cpus or None, include_dashboard=dashboard, dashboard_host="127.0.0.1",
                 logging_level="warning")
    console.before_close(ray.shutdown)
    return ray
