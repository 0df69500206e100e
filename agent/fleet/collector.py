"""``agentctl collect``: store a fleet's MQTT traffic in SQLite or PostgreSQL.

Subscriptions (DESIGN.md §4 topics under ``edgelm/v1/{fleet}``):

- ``+/status`` — plain subscription: MQTT v5 does not deliver retained messages to shared
  subscriptions, and every collector needs the current device states. Status is small and
  idempotent on ``(device, seq)``, so several collectors storing it is harmless.
- ``$share/{group}/…`` for ``+/telemetry``, ``+/bench/result``, ``+/infer/response/+`` (replies
  to MQTT 3.1.1 clients), ``router/+/reply`` (device results to routers) and ``router/+/record``
  (the router's per-request accounting): collectors in the same group split this load.

Telemetry is downsampled for storage (one row per device per ``telemetry_every_s``) while the
``devices`` row always holds the latest reading (power, temperature, load, queue depth).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
import zlib
from typing import Any

from agent.fleet.store import FleetStore, dumps
from agent.mqtt import BrokerConfig, MqttLink
from agent.protocol import TOPIC_ROOT

logger = logging.getLogger(__name__)

RECORD_SCHEMA = "edgelm.route.record/1"


def telemetry_summary(payload: dict[str, Any]) -> dict[str, Any]:
    """The columns the fleet view needs from one telemetry payload.

    ``power_mw`` is the board-input reading if there is one, else the sum of the non-nested
    rails (CPU package + GPU + DRAM), else an estimate; ``temperature_c`` is the hottest sensor.
    """
    probes = payload.get("probes") or {}
    power = payload.get("power") or []
    by_cover: dict[str, float] = {}
    for p in power:
        mw = p.get("power_mw")
        if isinstance(mw, (int, float)) and p.get("valid", True) is not False:
            by_cover[p.get("covers", "estimate")] = by_cover.get(p.get("covers", "estimate"),
                                                                 0.0) + float(mw)
    power_mw: float | None
    if "board_input" in by_cover:
        power_mw = by_cover["board_input"]
    elif any(k in by_cover for k in ("cpu_package", "gpu", "dram")):
        power_mw = sum(by_cover.get(k, 0.0) for k in ("cpu_package", "gpu", "dram"))
    else:
        power_mw = by_cover.get("estimate")
    temps: list[float] = []

    def walk(obj: Any) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and (
                        k.endswith("_c") or k == "temp_c"):
                    temps.append(float(v))
                else:
                    walk(v)
        elif isinstance(obj, list):
            for v in obj:
                walk(v)

    walk(probes.get("thermal"))
    walk(probes.get("jetson"))
    walk(probes.get("rpi"))
    cpu = probes.get("cpu") or {}
    return {
        "power_mw": power_mw,
        "temperature_c": max(temps) if temps else None,
        "cpu_util_pct": cpu.get("util_pct"),
        "load_1m": cpu.get("load_1m"),
        "queue_depth": payload.get("queue_depth"),
        "inflight": payload.get("inflight"),
    }


class FleetCollector:
    """Subscribes to one fleet and writes what it hears into a :class:`FleetStore`.

    Args:
        store: Where to write.
        broker: Broker settings (MQTT v5 is needed for shared subscriptions).
        fleet: Fleet id.
        group: Shared-subscription group; collectors in one group split the load.
        telemetry_every_s: Keep at most one telemetry row per device per this many seconds.
        retention_s: Delete telemetry, results and records older than this (None: keep all).
        client_id: MQTT client id (default: a random one, which a persistent session cannot
            use: give a stable id with ``session_expiry_s``).
        session_expiry_s: Above 0, the broker keeps this collector's session (subscriptions
            and the QoS 1 results, bench and router records sent meanwhile) for this long
            while it is disconnected or restarting; see :class:`MqttLink`. QoS 0 telemetry is
            not queued (mosquitto's ``queue_qos0_messages`` is off by default).
    """

    def __init__(self, store: FleetStore, broker: BrokerConfig, fleet: str,
                 group: str | None = None, telemetry_every_s: float = 10.0,
                 retention_s: float | None = 30 * 86400.0, client_id: str | None = None,
                 session_expiry_s: int = 0) -> None:
        self.store = store
        self.fleet = fleet
        self.group = group or f"edgelm-collect-{fleet}"
        self.telemetry_every_s = telemetry_every_s
        self.retention_s = retention_s
        self.counts: dict[str, int] = {"stored": 0, "duplicates": 0, "downsampled": 0,
                                       "malformed": 0}
        self._last_telemetry: dict[str, float] = {}
        self._stop = threading.Event()
        base = f"{TOPIC_ROOT}/{fleet}"
        share = f"$share/{self.group}/" if broker.protocol == 5 else ""
        self.client_id = client_id or f"edgelm-collect-{fleet}-{uuid.uuid4().hex[:8]}"
        self._link = MqttLink(
            broker, client_id=self.client_id,
            will=(f"{base}/collector/{self.client_id}/status", b'{"state":"offline"}'),
            subscriptions=[
                (f"{base}/+/status", 1),
                (f"{share}{base}/+/telemetry", 0),
                (f"{share}{base}/+/bench/result", 1),
                (f"{share}{base}/+/infer/response/+", 1),
                (f"{share}{base}/router/+/reply", 1),
                (f"{share}{base}/router/+/record", 1),
            ],
            on_message=self._on_message,
            session_expiry_s=session_expiry_s,
        )

    # ------------------------------------------------------------------ handling

    def _on_message(self, msg: Any) -> None:
        try:
            body = json.loads(msg.payload.decode("utf-8"))
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except (UnicodeDecodeError, ValueError):
            self.counts["malformed"] += 1
            return
        try:
            self.handle(str(msg.topic), body, retained=bool(getattr(msg, "retain", False)))
        except Exception:  # a bad row must not stop collection
            self.counts["malformed"] += 1
            logger.exception("could not store a message from %s", msg.topic)

    def _lwt_time_ms(self, fleet: str, device: str, ts: int, retained: bool) -> int:
        """When a device whose last will fired went away, as well as the collector can tell.

        The will's payload (and its ``ts_unix_ms``) is fixed when the agent connects, so it
        dates the crash to the connect. The broker publishes the will when it notices the
        loss (at most 1.5 keepalives later), so a live will is dated on arrival. A retained
        one, replayed at subscribe time after the collector was away, can only be dated no
        earlier than the device's last stored telemetry.
        """
        if not retained:
            return int(time.time() * 1000)
        rows = self.store.query(
            "SELECT telemetry_ts_ms, status_ts_ms FROM devices WHERE fleet = ? AND device = ?",
            (fleet, device))
        known = [int(v) for v in (rows[0] if rows else ()) if v is not None]
        return max([ts, *known])

    def handle(self, topic: str, body: dict[str, Any], retained: bool = False) -> bool:
        """Store one decoded message; True if it was new. Public so tests can feed it.

        A device's current state follows live status messages in arrival order (the broker
        keeps per-topic order), not by ``seq``: the LWT's payload is fixed when the agent
        connects, so its ``seq`` is older than the online status it supersedes. A retained
        status (replayed at subscribe time) only applies if it is newer by ``seq``.
        """
        schema = str(body.get("schema", ""))
        parts = topic.split("/")
        device = str(body.get("device") or (parts[3] if len(parts) > 3 else ""))
        fleet = str(body.get("fleet") or self.fleet)
        ts = int(body.get("ts_unix_ms") or time.time() * 1000)
        seq = body.get("seq")
        if schema == "edgelm.status/1" and isinstance(seq, int):
            if body.get("reason") == "lwt":
                ts = self._lwt_time_ms(fleet, device, ts, retained)
            new = self.store.insert("status_events", {
                "device": device, "seq": seq, "fleet": fleet, "ts_ms": ts,
                "state": body.get("state"), "reason": body.get("reason"),
                "payload": dumps(body)})
            if new:
                rows = self.store.query(
                    "SELECT status_seq FROM devices WHERE fleet = ? AND device = ?",
                    (fleet, device))
                if not retained or not rows or rows[0][0] is None or int(rows[0][0]) < seq:
                    self.store.upsert_device(fleet, device, {
                        "state": body.get("state"), "reason": body.get("reason"),
                        "agent_version": body.get("agent_version"), "status_seq": seq,
                        "status_ts_ms": ts, "status_json": dumps(body)})
            return self._count(new)
        if schema == "edgelm.telemetry/1" and isinstance(seq, int):
            summary = telemetry_summary(body)
            self.store.upsert_device(fleet, device, {"telemetry_seq": seq,
                                                     "telemetry_ts_ms": ts, **summary})
            last = self._last_telemetry.get(device)
            if last is not None and ts / 1000.0 - last < self.telemetry_every_s:
                self.counts["downsampled"] += 1
                return False
            self._last_telemetry[device] = ts / 1000.0
            return self._count(self.store.insert("telemetry", {
                "device": device, "seq": seq, "fleet": fleet, "ts_ms": ts, **summary,
                "payload": dumps(body)}))
        if schema == "edgelm.infer.result/1" and isinstance(seq, int):
            usage = body.get("usage") or {}
            timings = body.get("timings") or {}
            err = body.get("error") or {}
            return self._count(self.store.insert("results", {
                "device": device, "seq": seq, "fleet": fleet, "ts_ms": ts,
                "request_id": body.get("id"), "status": body.get("status"),
                "error_code": err.get("code"), "prompt_tokens": usage.get("prompt_tokens"),
                "completion_tokens": usage.get("completion_tokens"),
                "ttft_ms": timings.get("ttft_ms"), "decode_tok_s": timings.get("decode_tok_s"),
                "e2e_ms": timings.get("e2e_ms"), "payload": dumps(body)}))
        if schema == "edgelm.bench/1":
            summary = body.get("summary") or {}

            def mean(k: str) -> float | None:
                s = summary.get(k)
                return float(s["mean"]) if isinstance(s, dict) and "mean" in s else None

            key = seq if isinstance(seq, int) else -int(zlib.crc32(dumps(body).encode()))
            model = body.get("model")
            return self._count(self.store.insert("bench", {
                "device": device, "seq": key, "fleet": fleet, "ts_ms": ts,
                "backend": body.get("backend"),
                "model": model.get("name") if isinstance(model, dict) else model,
                "decode_tok_s": mean("decode_tok_s"), "prefill_tok_s": mean("prefill_tok_s"),
                "ttft_ms": mean("ttft_ms"), "payload": dumps(body)}))
        if schema == RECORD_SCHEMA and isinstance(seq, int):
            return self._count(self.store.insert("requests", {
                "router": body.get("router"), "seq": seq, "fleet": fleet, "ts_ms": ts,
                "device": body.get("edge_device"),
                **{k: body.get(k) for k in (
                    "request_id", "source", "policy", "served_by", "status",
                    "error_code", "fallback_reason", "attempts", "prompt_tokens",
                    "completion_tokens", "ttft_ms", "e2e_ms", "energy_j", "cost_usd")},
                "payload": dumps(body)}))
        return False  # chunks and unknown schemas are not stored

    def _count(self, new: bool) -> bool:
        self.counts["stored" if new else "duplicates"] += 1
        return new

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Connect and start collecting in the background."""
        self._link.start()

    def wait_connected(self, timeout_s: float) -> bool:
        """Block until subscribed: every SUBACK received (or the timeout passes)."""
        return self._link.wait_subscribed(timeout_s)

    def run_forever(self, stop: threading.Event | None = None) -> None:
        """Collect until ``stop`` is set; apply retention hourly."""
        stop = stop or self._stop
        self.start()
        next_retention = 0.0
        while not stop.wait(1.0):
            now = time.monotonic()
            if self.retention_s is not None and now >= next_retention:
                removed = self.store.retain(self.retention_s)
                if removed:
                    logger.info("retention removed %d rows", removed)
                next_retention = now + 3600.0
        self.stop()

    def stop(self) -> None:
        """Disconnect."""
        self._stop.set()
        self._link.stop(timeout_s=1.0)


def fleet_view(store: FleetStore, fleet: str | None = None, recent: int = 20
               ) -> list[dict[str, Any]]:
    """Per device: state, latest power/temperature/load/queue, recent TTFT and decode tok/s.

    "Recent" is the mean over the device's last ``recent`` successful results.
    """
    sql = ("SELECT fleet, device, state, reason, agent_version, status_ts_ms, telemetry_ts_ms, "
           "power_mw, temperature_c, cpu_util_pct, load_1m, queue_depth, inflight "
           "FROM devices")
    params: tuple[Any, ...] = ()
    if fleet:
        sql += " WHERE fleet = ?"
        params = (fleet,)
    out = []
    for row in store.query(sql + " ORDER BY fleet, device", params):
        (fl, dev, state, reason, version, st_ts, tel_ts, power, temp, util, load, qd,
         infl) = row
        recent_rows = store.query(
            "SELECT ttft_ms, decode_tok_s FROM results WHERE device = ? AND status = 'ok' "
            "ORDER BY ts_ms DESC LIMIT ?", (dev, recent))
        ttfts = [float(r[0]) for r in recent_rows if r[0] is not None]
        tgs = [float(r[1]) for r in recent_rows if r[1] is not None]
        out.append({
            "fleet": fl, "device": dev, "state": state or "unknown", "reason": reason,
            "agent_version": version, "status_ts_ms": st_ts, "telemetry_ts_ms": tel_ts,
            "power_mw": power, "temperature_c": temp, "cpu_util_pct": util, "load_1m": load,
            "queue_depth": qd, "inflight": infl,
            "recent_ttft_ms": sum(ttfts) / len(ttfts) if ttfts else None,
            "recent_decode_tok_s": sum(tgs) / len(tgs) if tgs else None,
            "recent_results": len(recent_rows),
        })
    return out


def measured_speeds(store: FleetStore, fleet: str | None = None, recent: int = 20
                    ) -> dict[str, list[dict[str, Any]]]:
    """Each device's measured speeds as stored: what a restarted router starts from.

    Per device, newest first: the most recent bench record per ``(backend, model)`` with a
    measured decode speed (``source: "bench"``); a device with no such record gets one entry
    from its last ``recent`` successful results instead (``source: "results"``: the median
    decode and prefill tok/s, which a few slow requests on a busy device do not drag down the
    way a mean would).
    """
    where = " AND fleet = ?" if fleet else ""
    params: tuple[Any, ...] = (fleet,) if fleet else ()
    out: dict[str, list[dict[str, Any]]] = {}
    seen: set[tuple[str, Any, Any]] = set()
    for dev, backend, model, decode, prefill, ts in store.query(
            "SELECT device, backend, model, decode_tok_s, prefill_tok_s, ts_ms FROM bench "
            f"WHERE decode_tok_s > 0{where} ORDER BY ts_ms DESC", params):
        if (dev, backend, model) in seen:
            continue
        seen.add((dev, backend, model))
        out.setdefault(dev, []).append({
            "source": "bench", "backend": backend, "model": model,
            "decode_tok_s": float(decode),
            "prefill_tok_s": float(prefill) if prefill else None, "ts_ms": ts})
    devices = [r[0] for r in store.query(
        f"SELECT DISTINCT device FROM results WHERE decode_tok_s > 0{where}", params)]
    for dev in devices:
        if dev in out:
            continue
        rows = store.query(
            "SELECT decode_tok_s, payload, ts_ms FROM results WHERE device = ? AND status = 'ok' "
            "AND decode_tok_s > 0 ORDER BY ts_ms DESC LIMIT ?", (dev, recent))
        if not rows:
            continue
        prefills: list[float] = []
        served: dict[str, Any] = {}
        for _, payload, _ in rows:
            try:
                body = json.loads(payload)
            except (TypeError, ValueError):
                continue
            v = (body.get("timings") or {}).get("prefill_tok_s")
            if isinstance(v, (int, float)) and v > 0:
                prefills.append(float(v))
            served = served or (body.get("served_by") or {})
        out[dev] = [{
            "source": "results", "backend": served.get("backend"), "model": served.get("model"),
            "decode_tok_s": _median([float(r[0]) for r in rows]),
            "prefill_tok_s": _median(prefills) if prefills else None, "ts_ms": rows[0][2],
            "results": len(rows)}]
    return out


def _median(values: list[float]) -> float:
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2.0
