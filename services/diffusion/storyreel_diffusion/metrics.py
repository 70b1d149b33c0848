"""Prometheus metrics of the diffusion service.

Each :class:`RenderMetrics` owns its registry, so several renderers can live in
one process (as in tests) without clashing; the service exposes the registry
over HTTP (see ``metrics_port``).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Seconds of drawing per image: from a tiny model on a GPU to a large one on a CPU.
_IMAGE_SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)


class RenderMetrics:
    """Counters and gauges the renderer updates; read them with :meth:`value`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.queue_depth = Gauge(
            "storyreel_render_queue_depth",
            "Render requests admitted that need the model (drawing or waiting their turn).",
            registry=self.registry,
        )
        self.images = Counter(
            "storyreel_render_images",
            "Images drawn by the model, by kind (scene, reference portrait, identity image, "
            "start-up warm-up).",
            ["kind"],
            registry=self.registry,
        )
        self.image_seconds = Histogram(
            "storyreel_render_image_seconds",
            "Seconds of model time per drawn image (a batch's time shared by its images).",
            buckets=_IMAGE_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.cache_hits = Counter(
            "storyreel_render_cache_hits",
            "Images served from the content-addressed cache without the model.",
            registry=self.registry,
        )
        self.cache_misses = Counter(
            "storyreel_render_cache_misses",
            "Images looked up in the cache and not found.",
            registry=self.registry,
        )
        self.steps = Counter(
            "storyreel_render_denoising_steps",
            "Denoising steps run (one per pipeline call and step, whatever the batch size).",
            registry=self.registry,
        )
        self.rejected = Counter(
            "storyreel_render_rejected",
            "Requests refused for lack of capacity, by reason (queue_full, out_of_memory).",
            ["reason"],
            registry=self.registry,
        )
        self.cancelled = Counter(
            "storyreel_render_cancelled",
            "Pipeline calls stopped early because their caller went away.",
            registry=self.registry,
        )
        self.safety_flagged = Counter(
            "storyreel_render_safety_flagged",
            "Images the safety checker flagged (each attempt counts).",
            registry=self.registry,
        )
        for kind in ("scene", "reference", "identity", "warmup"):
            self.images.labels(kind=kind)
        for reason in ("queue_full", "out_of_memory"):
            self.rejected.labels(reason=reason)

    def value(self, name: str, **labels: str) -> float:
        """Current value of sample ``name`` (e.g. ``storyreel_render_images_total``)."""
        found = self.registry.get_sample_value(name, labels or None)
        return 0.0 if found is None else found
