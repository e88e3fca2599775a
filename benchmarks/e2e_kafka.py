"""End to end through a real Kafka broker: the worker against a plain faust agent (one model step per event).

Usage: ``.venv/bin/python benchmarks/e2e_kafka.py [--quick] [--bootstrap HOST:PORT] [--repeats 3]``

Without ``--bootstrap`` it starts the project's native broker (``deploy/kafka-local/kafka-local``, as the test
fixture does) and stops it at the end.  Model: an untrained CfC ``Forecaster`` with 8 channels and 64 hidden
units, saved with ``save_model`` and served by both.  Figures:

* **backlog drain**: ``--events`` readings of ``--devices`` devices (random interleaving, irregular gaps) are
  produced first; then ``liquidstream run`` (a subprocess, fresh consumer group, ``--exit-when-idle``)
  drains them, at-least-once and exactly-once in turn; its final stats line gives ``events_per_s``
  (consumed / (last commit - first message)).  Median over ``--repeats``.
* **latency**: readings produced at ``--rate`` per second for ``--latency-s`` seconds into a fresh topic
  while the worker (exactly-once, the default) runs; each reading's ``ts`` is its produce time (epoch ms),
  and a ``read_committed`` consumer of the predictions takes ``receive time - ts``: p50/p95/p99 in ms
  (``produced_p50_ms``/``produced_p99_ms``: the prediction's own CreateTime - ts, the worker-side part).
* **faust peer** (``benchmarks/faust_peer.py``): the same backlog drain (its first ``--faust-events``
  readings) and the same latency run, through faust-streaming.

The last line printed is one JSON object.  Not a test: it asserts nothing, it prints figures.  Timings on a
busy machine are noisy: say so next to any figure quoted.
"""

# Every subprocess argv is built here from this script's own paths and flags (no shell): S603 does not apply.
# ruff: noqa: S603

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from confluent_kafka import Consumer, Producer  # noqa: E402
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]  # noqa: E402

KAFKA_LOCAL = ROOT / "deploy" / "kafka-local" / "kafka-local"
LIQUIDSTREAM = str(Path(sys.executable).with_name("liquidstream"))


def start_broker(data_dir: Path) -> str:
    out = subprocess.run([sys.executable, str(KAFKA_LOCAL), "start", "--port", "0", "--data-dir", str(data_dir)],
                         capture_output=True, text=True, timeout=300, check=True).stdout.strip().splitlines()
    return out[-1].removeprefix("bootstrap=")


def create_topics(bootstrap: str, names: list[str], partitions: int) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(n, partitions, 1) for n in names])
    for f in futures.values():
        f.result(30)


def readings(devices: int, events: int, channels: int, seed: int, end_ms: int) -> list[tuple[bytes, bytes]]:
    """(key, JSON value) of ``events`` readings, random device interleaving, irregular gaps, ending at end_ms."""
    rng = np.random.default_rng(seed)
    dev = rng.integers(0, devices, size=events)
    ts = end_ms - np.sort(rng.uniform(0, 3_600_000, size=events)).astype(np.int64)[::-1]  # last hour, rising
    vals = np.round(rng.normal(size=(events, channels)), 4).tolist()
    out = []
    for d, t, v in zip(dev.tolist(), ts.tolist(), vals, strict=True):
        key = f"device-{d:06d}"
        out.append((key.encode(), json.dumps({"device_id": key, "ts": t, "values": v}).encode()))
    return out


def produce(bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]]) -> None:
    # No compression: the faust peer's aiokafka has no lz4 codec installed.
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "compression.type": "none",
                         "batch.size": 1_000_000})
    for key, value in messages:
        while True:
            try:
                producer.produce(topic, value, key)
                break
            except BufferError:
                producer.poll(0.05)
    if producer.flush(60):
        msg = f"backlog for {topic} not fully delivered"
        raise RuntimeError(msg)


def worker_cmd(bootstrap: str, topic: str, run: str, model: Path, guarantee: str, idle_s: float) -> list[str]:
    return [LIQUIDSTREAM, "run", "--bootstrap", bootstrap, "--input-topic", topic,
            "--predictions-topic", f"{run}-predictions", "--alerts-topic", f"{run}-alerts",
            "--dlq-topic", f"{run}-dlq", "--group-id", f"{run}-{guarantee}-{uuid.uuid4().hex[:6]}",
            "--model", str(model), "--guarantee", guarantee, "--exit-when-idle", str(idle_s),
            "--metrics-port", "0", "--worker-id", f"bench-{uuid.uuid4().hex[:6]}"]


def worker_env() -> dict[str, str]:
    return os.environ | {"LIQUIDSTREAM_LOG_LEVEL": "WARNING", "LIQUIDSTREAM_TORCH_THREADS": "1"}


def drain(cmd: list[str]) -> dict[str, Any]:
    """Run the worker until idle; its last stdout line is the final stats JSON."""
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=worker_env())
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        msg = f"worker failed ({done.returncode}): {done.stderr[-2000:]}"
        raise RuntimeError(msg)
    stats: dict[str, Any] = json.loads(lines[-1])
    return stats


def faust_cmd() -> list[str]:
    return [sys.executable, str(ROOT / "benchmarks" / "faust_peer.py"), "worker", "-l", "warn", "--without-web"]


def faust_env(bootstrap: str, topic: str, out: str, model: Path, partitions: int, expect: int,
              stats: Path | None) -> dict[str, str]:
    return os.environ | {"PEER_BOOTSTRAP": bootstrap, "PEER_INPUT": topic, "PEER_OUTPUT": out,
                         "PEER_APP_ID": f"peer-{uuid.uuid4().hex[:8]}", "PEER_PARTITIONS": str(partitions),
                         "PEER_MODEL": str(model), "PEER_EXPECT": str(expect), "PEER_STATS": str(stats or "")}


def faust_drain(env: dict[str, str], stats: Path, timeout_s: float, workdir: Path) -> dict[str, Any]:
    proc = subprocess.Popen(faust_cmd(), env=env, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout_s
    try:
        while not stats.exists() or not stats.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                dead = proc.poll() is not None and proc.stderr is not None
                err = proc.stderr.read().decode(errors="replace")[-2000:] if dead and proc.stderr else ""
                msg = f"faust peer did not finish (exit {proc.returncode}): {err}"
                raise RuntimeError(msg)
            time.sleep(0.2)
        result: dict[str, Any] = json.loads(stats.read_text())
        return result
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def latency_run(bootstrap: str, topic: str, out_topic: str, proc: subprocess.Popen[Any], rate: float,
                seconds: float, channels: int) -> dict[str, Any]:
    """Offer ``rate`` readings/s for ``seconds``; latency = prediction receive time - reading produce time."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 1})
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"lat-{uuid.uuid4().hex[:8]}",
                         "auto.offset.reset": "earliest", "isolation.level": "read_committed",
                         "fetch.wait.max.ms": 5, "enable.auto.commit": False})
    consumer.subscribe([out_topic])
    rng = np.random.default_rng(7)

    def send(i: int) -> None:
        key = f"lat-{i % 500:04d}"
        now = time.time_ns() // 1_000_000
        value = {"device_id": key, "ts": now, "values": np.round(rng.normal(size=channels), 4).tolist()}
        producer.produce(topic, json.dumps(value).encode(), key.encode())

    # Warm-up: the consumer is ready when readings come out as predictions.
    deadline = time.monotonic() + 120
    got_any, i = False, 0
    while not got_any:
        if proc.poll() is not None or time.monotonic() > deadline:
            msg = f"no prediction within 120 s (peer exit {proc.returncode})"
            raise RuntimeError(msg)
        send(i)
        i += 1
        producer.poll(0)
        got_any = any(m.error() is None for m in consumer.consume(100, timeout=0.2))
    time.sleep(1.0)
    for _ in consumer.consume(10_000, timeout=0.5):
        pass
    start_ms = time.time_ns() // 1_000_000 + 50
    total = int(rate * seconds)
    t0 = time.monotonic() + 0.05
    latencies: list[int] = []
    produced: list[int] = []
    sent = 0
    end_wait = None
    while True:
        now = time.monotonic()
        due = min(total, int((now - t0) * rate))
        while sent < due:
            send(i + sent)
            sent += 1
        producer.poll(0)
        for m in consumer.consume(1000, timeout=0.002):
            if m.error() is None:
                recv = time.time_ns() // 1_000_000
                ts = json.loads(m.value())["ts"]
                if ts >= start_ms:
                    latencies.append(recv - ts)
                    produced.append(m.timestamp()[1] - ts)  # the prediction's CreateTime: worker-side part
        if sent >= total:
            end_wait = end_wait or time.monotonic() + 15
            if len(latencies) >= total or time.monotonic() > end_wait:
                break
    producer.flush(10)
    consumer.close()
    lat = np.array(latencies, dtype=np.float64)
    made = np.array(produced, dtype=np.float64)
    return {"offered_per_s": rate, "seconds": seconds, "sent": total, "received": int(lat.size),
            "produced_p50_ms": float(np.percentile(made, 50)) if made.size else None,
            "produced_p99_ms": float(np.percentile(made, 99)) if made.size else None,
            "p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
            "p95_ms": float(np.percentile(lat, 95)) if lat.size else None,
            "p99_ms": float(np.percentile(lat, 99)) if lat.size else None}


def main() -> None:  # noqa: PLR0915 (one linear script)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller backlog, one repeat, short latency run")
    p.add_argument("--bootstrap", default=None, help="use this broker (default: start kafka-local)")
    p.add_argument("--events", type=int, default=0, help="backlog readings (default 200,000; quick 60,000)")
    p.add_argument("--devices", type=int, default=2000)
    p.add_argument("--channels", type=int, default=8)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--repeats", type=int, default=0, help="drains per guarantee, median (default 3; quick 1)")
    p.add_argument("--rate", type=float, default=5000.0, help="offered readings/s in the latency run")
    p.add_argument("--latency-s", type=float, default=0, help="seconds of offered load (default 30; quick 10)")
    p.add_argument("--faust-events", type=int, default=0, help="backlog readings the faust peer drains "
                   "(default 20,000; quick 8,000)")
    p.add_argument("--skip-faust", action="store_true")
    p.add_argument("--skip-drain", action="store_true", help="latency runs only")
    p.add_argument("--latency-guarantee", choices=("exactly_once", "at_least_once"), default="exactly_once")
    args = p.parse_args()
    events = args.events or (60_000 if args.quick else 200_000)
    repeats = args.repeats or (1 if args.quick else 3)
    latency_s = args.latency_s or (10.0 if args.quick else 30.0)
    faust_events = min(events, args.faust_events or (8_000 if args.quick else 20_000))

    import torch

    from liquidstream.operators import Forecaster
    from liquidstream.operators.model_io import save_model

    work = Path(tempfile.mkdtemp(prefix="ls-e2e-"))
    bootstrap = args.bootstrap or start_broker(work / "kafka")
    out: dict[str, Any] = {"bootstrap_started_here": args.bootstrap is None, "events": events,
                           "devices": args.devices, "channels": args.channels, "hidden": args.hidden,
                           "partitions": args.partitions, "repeats": repeats}
    try:
        torch.manual_seed(0)
        model = work / "model.pt"
        save_model(Forecaster(n_channels=args.channels, hidden_size=args.hidden, cell="cfc"), model)
        run = f"e2e-{uuid.uuid4().hex[:8]}"
        backlog, lat_topic, lat_faust = f"{run}-backlog", f"{run}-latency", f"{run}-latency-faust"
        create_topics(bootstrap, [backlog, lat_topic, lat_faust, f"{run}-predictions", f"{run}-alerts",
                                  f"{run}-dlq", f"{run}-faust-out", f"{run}-faust-lat-out"], args.partitions)
        t = time.monotonic()
        produce(bootstrap, backlog, readings(args.devices, events, args.channels, 1, time.time_ns() // 1_000_000))
        print(f"backlog: {events} readings of {args.devices} devices in {time.monotonic() - t:.1f} s", flush=True)
        for guarantee, tag in () if args.skip_drain else (("at_least_once", "alo"), ("exactly_once", "eos")):
            rates = []
            for _ in range(repeats):
                stats = drain(worker_cmd(bootstrap, backlog, run, model, guarantee, 3.0))
                if stats["consumed"] != events or not stats["balanced"]:
                    msg = f"{guarantee} drain consumed {stats['consumed']} of {events}: {stats}"
                    raise RuntimeError(msg)
                rates.append(float(stats["events_per_s"]))
                print(f"drain {guarantee}: {stats['events_per_s']:,.0f} events/s "
                      f"(busy {stats['busy_events_per_s']:,.0f}/s, {stats['batches']} batches)", flush=True)
            out[f"{tag}_events_per_s"] = statistics.median(rates)
            out[f"{tag}_runs"] = rates
        proc = subprocess.Popen(worker_cmd(bootstrap, lat_topic, f"{run}-lat", model, args.latency_guarantee, 600),
                                env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            lat = latency_run(bootstrap, lat_topic, f"{run}-lat-predictions", proc, args.rate, latency_s,
                              args.channels)
        finally:
            stop(proc)
        # The worker's own account of the latency run (its final stats line): how it batched the load.
        finals = [ln for ln in (proc.stdout.read() if proc.stdout else "").splitlines() if ln.startswith("{")]
        if finals:
            ws = json.loads(finals[-1])
            batches = max(int(ws.get("batches") or 0), 1)
            out |= {"latency_worker_batches": ws.get("batches"),
                    "latency_worker_events_per_batch": round(int(ws.get("consumed") or 0) / batches, 1),
                    "latency_worker_busy_ms_per_batch": round(1000 * float(ws.get("busy_s") or 0) / batches, 2)}
        out |= {"latency_guarantee": args.latency_guarantee, "offered_per_s": args.rate, "latency_s": latency_s,
                "latency_received": lat["received"], "latency_sent": lat["sent"],
                "p50_ms": lat["p50_ms"], "p95_ms": lat["p95_ms"], "p99_ms": lat["p99_ms"],
                "produced_p50_ms": lat["produced_p50_ms"], "produced_p99_ms": lat["produced_p99_ms"]}
        print(f"latency at {args.rate:,.0f}/s ({args.latency_guarantee}): p50 {lat['p50_ms']} ms, "
              f"p95 {lat['p95_ms']} ms, "
              f"p99 {lat['p99_ms']} ms ({lat['received']}/{lat['sent']})", flush=True)
        if not args.skip_faust:
            fr = []
            for k in range(0 if args.skip_drain else repeats):
                stats_file = work / f"faust-{k}.json"
                env = faust_env(bootstrap, backlog, f"{run}-faust-out", model, args.partitions, faust_events,
                                stats_file)
                fr.append(float(faust_drain(env, stats_file, 900, work)["events_per_s"]))
                print(f"faust peer drain: {fr[-1]:,.0f} events/s", flush=True)
            out["faust_events"] = faust_events
            out["faust_events_per_s"] = statistics.median(fr) if fr else None
            out["faust_runs"] = fr
            env = faust_env(bootstrap, lat_faust, f"{run}-faust-lat-out", model, args.partitions, 0, None)
            proc = subprocess.Popen(faust_cmd(), env=env, cwd=work, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            try:
                flat = latency_run(bootstrap, lat_faust, f"{run}-faust-lat-out", proc, args.rate, latency_s,
                                   args.channels)
            finally:
                stop(proc)
            out |= {"faust_p50_ms": flat["p50_ms"], "faust_p95_ms": flat["p95_ms"],
                    "faust_p99_ms": flat["p99_ms"], "faust_latency_received": flat["received"]}
            if fr:
                out["alo_vs_faust"] = round(out["alo_events_per_s"] / out["faust_events_per_s"], 1)
                out["eos_vs_faust"] = round(out["eos_events_per_s"] / out["faust_events_per_s"], 1)
            print(f"faust peer latency at {args.rate:,.0f}/s: p50 {flat['p50_ms']} ms, p99 {flat['p99_ms']} ms "
                  f"({flat['received']}/{flat['sent']})", flush=True)
    finally:
        if args.bootstrap is None:
            subprocess.run([sys.executable, str(KAFKA_LOCAL), "stop", "--data-dir", str(work / "kafka")],
                           capture_output=True, timeout=120, check=False)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
