"""The idiomatic faust peer of the worker: a plain faust agent doing one model step per event.

Run by ``benchmarks/e2e_kafka.py`` as ``python benchmarks/faust_peer.py worker -l warn --without-web`` with
its configuration in ``PEER_*`` environment variables (faust's CLI owns the command line):

``PEER_BOOTSTRAP`` host:port, ``PEER_INPUT``/``PEER_OUTPUT`` topics, ``PEER_APP_ID`` (consumer group),
``PEER_PARTITIONS``, ``PEER_MODEL`` (a ``save_model`` file), ``PEER_EXPECT`` (events to count) and
``PEER_STATS`` (where to write ``{"events", "seconds", "events_per_s"}`` once ``PEER_EXPECT`` events are done).

Per event, as a faust user would write it: ``json.loads``, the device's state from a dict of tensors,
forecast-and-score against the previous state, update the running statistics, ``model.advance`` by the real
gap, forecast the next reading, ``await topic.send`` of a JSON prediction.  No dead-letter topic, no
changelog, no alert state machine: less work per event than the worker does.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import faust
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from liquidstream.operators.model_io import load_model  # noqa: E402
from liquidstream.operators.normalization import normalise, scale, update_stats  # noqa: E402

STATS_ALPHA = 0.005


def build_app(env: dict[str, str]) -> faust.App:
    torch.set_num_threads(1)
    model, doc = load_model(env["PEER_MODEL"])
    model.eval()
    expect, stats_path = int(env.get("PEER_EXPECT", "0")), env.get("PEER_STATS")
    app = faust.App(env["PEER_APP_ID"], broker=f"kafka://{env['PEER_BOOTSTRAP']}", store="memory://",
                    web_enabled=False, topic_partitions=int(env["PEER_PARTITIONS"]), key_serializer="raw",
                    value_serializer="raw", consumer_auto_offset_reset="earliest")
    source = app.topic(env["PEER_INPUT"], key_type=bytes, value_type=bytes)
    sink = app.topic(env["PEER_OUTPUT"], key_type=bytes, value_type=bytes)
    states: dict[str, dict[str, torch.Tensor]] = {}
    progress = {"n": 0, "t0": 0.0}

    def step(obj: dict[str, Any]) -> dict[str, Any]:
        x = torch.tensor([obj["values"]], dtype=torch.float32)
        t_ms = int(obj["ts"])
        st = states.get(obj["device_id"])
        score = None
        with torch.no_grad():
            if st is None:
                st = {"h": model.initial_state(1), "mean": torch.zeros_like(x), "var": torch.ones_like(x),
                      "count": torch.zeros(1), "last_ts": torch.tensor([t_ms]), "x_last": x}
                states[obj["device_id"]] = st
                dt = torch.zeros(1)
            else:
                dt = torch.tensor([(t_ms - int(st["last_ts"][0])) / 1000.0])  # ms -> s
                mu, sd = model.forecast(st["h"], normalise(st["x_last"], st["mean"], st["var"]), dt)
                score = float(((x - st["mean"]) / scale(st["mean"], st["var"]) - mu).abs().div(sd).amax())
            st["mean"], st["var"] = update_stats(st["mean"], st["var"], st["count"], x, STATS_ALPHA)
            x_n = normalise(x, st["mean"], st["var"])
            st["h"] = model.advance(st["h"], x_n, dt)
            mu2, sd2 = model.forecast(st["h"], x_n, torch.ones(1))
            sc = scale(st["mean"], st["var"])
            st["count"], st["last_ts"], st["x_last"] = st["count"] + 1, torch.tensor([t_ms]), x
        return {"device_id": obj["device_id"], "ts": t_ms, "forecast": (st["mean"] + mu2 * sc)[0].tolist(),
                "forecast_std": (sd2 * sc)[0].tolist(), "score": score, "model_version": doc["version"]}

    async def peer(stream: faust.StreamT[bytes]) -> None:
        async for key, value in stream.items():
            if progress["n"] == 0:
                progress["t0"] = time.perf_counter()
            try:
                record = step(json.loads(value))
            except (ValueError, KeyError, TypeError):
                continue  # the peer has no dead-letter topic; the benchmark sends only valid readings
            await sink.send(key=key, value=json.dumps(record, separators=(",", ":")).encode())
            progress["n"] += 1
            if progress["n"] == expect and stats_path:
                seconds = time.perf_counter() - progress["t0"]
                Path(stats_path).write_text(json.dumps({"events": expect, "seconds": round(seconds, 3),
                                                        "events_per_s": round(expect / seconds, 1)}))

    app.agent(source, name="faust-peer")(peer)
    return app


def main() -> None:
    build_app(dict(os.environ)).main()


if __name__ == "__main__":
    main()
