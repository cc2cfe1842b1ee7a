"""Serving metrics, exported through `ray.serve.metrics` next to Ray's own `ray_serve_*` series.

Ray prefixes every name with `ray_` and adds application/deployment/replica tags, so on the metrics
export port `raylm_requests` appears as `ray_raylm_requests_total` and a histogram `raylm_x_seconds`
as `ray_raylm_x_seconds_bucket/_sum/_count`. The Grafana dashboard serving/dashboards/raylm-serving.json
plots them.
"""

from __future__ import annotations

from ray.serve import metrics

LATENCY_BOUNDARIES_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
BATCH_SIZE_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128]

# Every custom series, as it appears on the metrics port (tests and the dashboard use this list).
EXPORTED_NAMES = [
    "ray_raylm_requests_total",
    "ray_raylm_request_latency_seconds_bucket",
    "ray_raylm_prompt_tokens_total",
    "ray_raylm_generated_tokens_total",
    "ray_raylm_time_to_first_token_seconds_bucket",
    "ray_raylm_inter_token_latency_seconds_bucket",
    "ray_raylm_batch_size_bucket",
    "ray_raylm_queue_wait_seconds_bucket",
]


class ServingMetrics:
    """Created once per replica."""

    def __init__(self):
        self.requests = metrics.Counter(
            "raylm_requests", description="HTTP requests by route and status code.", tag_keys=("route", "status")
        )
        self.request_latency = metrics.Histogram(
            "raylm_request_latency_seconds",
            description="Time from request arrival to the last byte of the response.",
            boundaries=LATENCY_BOUNDARIES_S,
            tag_keys=("route",),
        )
        self.prompt_tokens = metrics.Counter(
            "raylm_prompt_tokens", description="Prompt (input) tokens processed.", tag_keys=("model",)
        )
        self.generated_tokens = metrics.Counter(
            "raylm_generated_tokens", description="Tokens generated.", tag_keys=("model",)
        )
        self.time_to_first_token = metrics.Histogram(
            "raylm_time_to_first_token_seconds",
            description="Time from request arrival to its first generated token.",
            boundaries=LATENCY_BOUNDARIES_S,
            tag_keys=("model",),
        )
        self.inter_token_latency = metrics.Histogram(
            "raylm_inter_token_latency_seconds",
            description="Time between consecutive generated tokens of one request.",
            boundaries=LATENCY_BOUNDARIES_S,
            tag_keys=("model",),
        )
        self.batch_size = metrics.Histogram(
            "raylm_batch_size",
            description="Requests per model batch.",
            boundaries=BATCH_SIZE_BOUNDARIES,
            tag_keys=("kind",),
        )
        self.queue_wait = metrics.Histogram(
            "raylm_queue_wait_seconds",
            description="Time a request waited in the replica before its batch started.",
            boundaries=LATENCY_BOUNDARIES_S,
            tag_keys=("kind",),
        )
