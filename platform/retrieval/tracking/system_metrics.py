"""MLflow system metrics (CPU, memory, disk, network, GPU) logged to a training run while it trains.

The platform's runs are addressed by id from Ray workers (`TrainingRun`), not opened with
``mlflow.start_run``, so MLflow's own switch (``mlflow.enable_system_metrics_logging()`` /
``start_run(log_system_metrics=True)``) never sees them. This starts MLflow's
`SystemMetricsMonitor` on a run by id instead: a thread that samples every ``interval_s`` and
logs ``system/<metric>`` (``system/<node_id>/<metric>`` with a node id) to the run.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)


@contextmanager
def system_metrics_logging(*, tracking_uri: str, run_id: str, interval_s: float, node_id: str | None) -> Iterator[None]:
    """Log this machine's system metrics to ``run_id`` for the duration of the block.

    Steps continue after the run's last system metric (a restarted worker does not overwrite
    the earlier samples), and one last sample is logged when the block ends, so a run shorter
    than one interval still gets one.

    Args:
        tracking_uri: the run's tracking URI.
        run_id: the run to log to; the monitor stops by itself once the run is no longer RUNNING.
        interval_s: seconds between samples (``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` wins).
        node_id: a name for this machine in the metric keys, None on a single node.
    """
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(
        run_id,
        sampling_interval=interval_s,
        samples_before_logging=1,
        resume_logging=True,
        node_id=node_id,
        tracking_uri=tracking_uri,
    )
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()
        try:
            monitor.collect_metrics()
            monitor.publish_metrics(monitor.aggregate_metrics())
            monitor.mlflow_logger.flush()
        except Exception as error:  # a metrics hiccup must never fail the training it watched
            logger.warning("could not log the last system metrics sample to run %s: %s", run_id, error)
