"""A Prometheus text-format endpoint (exposition format 0.0.4), stdlib only.

Off by default and bound to loopback by default: the agent's primary channel is MQTT; this is
for a node exporter-style local scrape. Rules embodied here (prometheus.io/docs/instrumenting/
exposition_formats): one ``# HELP``/``# TYPE`` pair per metric family, label values escaped,
histograms as cumulative ``_bucket{le=…}`` series ending in ``+Inf`` plus ``_sum`` and
``_count``; units in metric names (``_ms``, ``_bytes``, ``_mw``) as in the telemetry payload.

Telemetry readings become gauges ``edgelm_<probe>_<reading>`` (numeric leaves only; nested
keys joined by ``_``, list/dict keys that are ids become a ``key`` label). The HTTP server runs
on one daemon thread (``ThreadingHTTPServer`` would spawn one per scrape; scrapes are rare).
"""

from __future__ import annotations

import bisect
import logging
import math
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

from agent.errors import ConfigError

logger = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS_MS = (1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000,
                      60000)
_NAME_BAD = re.compile(r"[^a-zA-Z0-9_]")


def metric_name(*parts: str) -> str:
    """Join parts into a valid metric name (``[a-zA-Z_][a-zA-Z0-9_]*``)."""
    name = "_".join(_NAME_BAD.sub("_", p) for p in parts if p)
    return name if name and not name[0].isdigit() else f"_{name}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in sorted(labels.items())) + "}"


def _num(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class Histogram:
    """A cumulative histogram (thread-safe).

    Args:
        name: Metric name (``edgelm_ttft_ms``).
        help_text: One line for ``# HELP``.
        buckets: Upper bounds, ascending (``+Inf`` is implicit).
    """

    def __init__(self, name: str, help_text: str,
                 buckets: Sequence[float] = LATENCY_BUCKETS_MS) -> None:
        self.name = name
        self.help_text = help_text
        self.buckets = tuple(sorted(buckets))
        self._counts = [0] * (len(self.buckets) + 1)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float | None) -> None:
        """Add one observation (None is ignored: the metric was undefined for the request)."""
        if value is None or not math.isfinite(value):
            return
        with self._lock:
            self._counts[bisect.bisect_left(self.buckets, value)] += 1
            self._sum += value

    def render(self) -> list[str]:
        """Exposition lines."""
        with self._lock:
            counts, total = list(self._counts), self._sum
        lines = [f"# HELP {self.name} {self.help_text}", f"# TYPE {self.name} histogram"]
        acc = 0
        for bound, n in zip((*self.buckets, math.inf), counts, strict=True):
            acc += n
            lines.append(f'{self.name}_bucket{{le="{_num(bound)}"}} {acc}')
        lines += [f"{self.name}_sum {_num(total)}", f"{self.name}_count {acc}"]
        return lines


def flatten_numeric(prefix: str, value: Any, labels: Mapping[str, str] | None = None
                    ) -> Iterable[tuple[str, dict[str, str], float]]:
    """Numeric leaves of a nested JSON-like value as ``(name, labels, value)``.

    Booleans become 0/1; None and strings are skipped (Prometheus has no "unknown" value, and
    0 would be a lie). Dict keys that are not identifiers (``cpu0``, pids, source ids) are kept
    as a ``key`` label rather than minting a metric per id.
    """
    labels = dict(labels or {})
    if isinstance(value, bool):
        yield prefix, labels, 1.0 if value else 0.0
    elif isinstance(value, (int, float)):
        if math.isfinite(float(value)):
            yield prefix, labels, float(value)
    elif isinstance(value, Mapping):
        for k, v in value.items():
            k = str(k)
            if re.fullmatch(r"[a-z][a-z_]*[a-z_]", k):
                yield from flatten_numeric(metric_name(prefix, k), v, labels)
            else:
                yield from flatten_numeric(prefix, v, {**labels, "key": k})
    elif isinstance(value, list):
        for i, v in enumerate(value):
            tag = v.get("source") if isinstance(v, Mapping) else None
            yield from flatten_numeric(prefix, v, {**labels, "key": str(tag or i)})


def render_gauges(samples: Iterable[tuple[str, dict[str, str], float]]) -> list[str]:
    """Group samples by name and render them as gauges."""
    by_name: dict[str, list[tuple[dict[str, str], float]]] = {}
    for name, labels, value in samples:
        by_name.setdefault(name, []).append((labels, value))
    lines: list[str] = []
    for name in sorted(by_name):
        lines += [f"# HELP {name} edgelm telemetry reading", f"# TYPE {name} gauge"]
        seen: set[str] = set()
        for labels, value in by_name[name]:
            lab = _labels(labels)
            if lab in seen:
                continue
            seen.add(lab)
            lines.append(f"{name}{lab} {_num(value)}")
    return lines


def parse_listen(listen: str) -> tuple[str, int]:
    """``host:port`` (IPv6 as ``[::1]:port``).

    Raises:
        ConfigError: Not ``host:port``.
    """
    host, sep, port = listen.rpartition(":")
    # isascii: str.isdigit() is true for '²', which int() refuses
    if not sep or not host or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ConfigError(f"prometheus.listen {listen!r} must be host:port (port 0-65535)")
    return host.strip("[]"), int(port)


class PrometheusServer:
    """Serves ``GET /metrics`` with the text produced by ``render`` on one daemon thread."""

    def __init__(self, listen: str, render: Callable[[], str]) -> None:
        host, port = parse_listen(listen)
        render_fn = render

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] not in ("/metrics", "/"):
                    self.send_error(404)
                    return
                try:
                    body = render_fn().encode("utf-8")
                except Exception:
                    logger.exception("rendering metrics failed")
                    self.send_error(500)
                    return
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                logger.debug("prometheus: " + format, *args)  # noqa: G003

        try:
            self._server = HTTPServer((host, port), Handler)
        except OSError as exc:
            raise ConfigError(f"prometheus.listen {listen}: {exc}") from exc
        self._server.timeout = 1.0
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.5},
                                        name="edgelm-prometheus", daemon=True)

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Start serving."""
        self._thread.start()

    def stop(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()
