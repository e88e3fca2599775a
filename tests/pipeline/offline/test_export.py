"""``liquidstream export``: the exported step (ONNX through onnxruntime, TorchScript through ``torch.jit.load``), looped
one reading at a time with its explicit state over a 1,000-reading irregular stream of four interleaved devices (a
long gap, an incident with alerts), gives the forecasts and spreads of ``LiquidOperator.process`` within 1e-5."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from liquidstream.operators import Forecaster, LiquidOperator, OperatorSettings
from liquidstream.operators.edge_step import INPUTS, STATE
from liquidstream.operators.model_io import save_model
from liquidstream.pipeline.cli.entry import main
from liquidstream.pipeline.offline.export import export_step

T0 = 1_767_225_600_000  # epoch ms
SETTINGS = OperatorSettings(max_gap_s=30.0, warmup_events=10)
Runner = Callable[[list[np.ndarray]], list[np.ndarray]]


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread() -> Iterator[None]:
    """Tiny tensors: intra-op threads only add overhead (tens of times slower on a busy 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model() -> Forecaster:
    torch.manual_seed(0)
    m = Forecaster(n_channels=3, hidden_size=16, cell="cfc", time_scale_s=2.0)
    for p in m.head[-1].parameters():  # not persistence: the state, the gap and the head all matter
        torch.nn.init.normal_(p, std=0.3)
    return m.eval()


@pytest.fixture(scope="module")
def exported(model: Forecaster, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("export")
    files = {"torchscript": out / "step.ts"}
    if importlib.util.find_spec("onnxscript") is not None:
        files["onnx"] = out / "step.onnx"
    for fmt, path in files.items():
        export_step(model, SETTINGS, fmt, path)
    return files


def runner(fmt: str, path: Path) -> Runner:
    if fmt == "onnx":
        ort = pytest.importorskip("onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # one step of one device: threads only spin
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return lambda arrays: session.run(None, dict(zip(INPUTS, arrays, strict=True)))
    module = torch.jit.load(str(path))

    def run(arrays: list[np.ndarray]) -> list[np.ndarray]:
        with torch.no_grad():
            return [t.numpy() for t in module(*(torch.from_numpy(a) for a in arrays))]

    return run


def irregular_stream(n: int = 1000) -> tuple[list[str], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    devices = [f"d{i}" for i in range(4)]
    ids = [devices[i] for i in rng.integers(0, 4, n)]
    gaps = rng.exponential(1500.0, n).astype(np.int64) + 1  # ms between readings of the fleet
    gaps[500] = 80_000  # every device then waits longer than max_gap_s (30 s)
    ts = T0 + np.cumsum(gaps)
    values = np.sin(ts[:, None] / 6000.0 + np.arange(3)) + 0.05 * rng.standard_normal((n, 3))
    values[700:730, 1] += 5.0  # an incident: alerts open, the statistics stop learning meanwhile
    return ids, ts, values.astype(np.float32)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_the_exported_step_matches_the_operator_over_an_irregular_stream(
        fmt: str, model: Forecaster, exported: dict[str, Path]) -> None:
    if fmt not in exported:
        pytest.skip("onnxscript (the export extra) is not installed")
    run = runner(fmt, exported[fmt])
    ids, ts, values = irregular_stream()
    op = LiquidOperator(model, SETTINGS)
    results = [op.process(ids[a:a + 100], ts[a:a + 100], values[a:a + 100]) for a in range(0, len(ids), 100)]
    forecast = np.concatenate([r.forecast for r in results])
    std = np.concatenate([r.forecast_std for r in results])
    live = np.concatenate([r.is_alert for r in results])  # an alert is live: open after the reading, or closed on it
    for k, r in enumerate(results):
        for c in r.closed:
            live[100 * k + c.index] = True
    assert sum(len(r.alerts) for r in results) >= 1 and live.sum() >= 3  # the learn input matters here
    assert np.concatenate([r.long_gap for r in results]).sum() >= 3

    states = {d: [np.zeros((1, 16), np.float32), *(np.full((1, 3), v, np.float32) for v in (0, 0, 1, 1)),
                  np.zeros(1, np.float32), np.zeros(1, np.int64)] for d in set(ids)}  # STATE order, neutral values
    last: dict[str, int] = {}
    got_f, got_s = np.empty_like(forecast), np.empty_like(std)
    for i, d in enumerate(ids):
        dt_s = np.array([(ts[i] - last.get(d, ts[i])) / 1000.0], np.float32)  # ms -> s, as the planner does
        out = run([values[i:i + 1], dt_s, np.array([not live[i]]), *states[d]])
        got_f[i], got_s[i] = out[2][0], out[3][0]
        states[d], last[d] = list(out[5:]), int(ts[i])
    np.testing.assert_allclose(got_f, forecast, rtol=0, atol=1e-5)
    np.testing.assert_allclose(got_s, std, rtol=0, atol=1e-5)
    assert len(STATE) == len(states["d0"])


def test_export_command_writes_a_torchscript_step(model: Forecaster, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    save_model(model, tmp_path / "model.pt")
    assert main(["export", "--model", str(tmp_path / "model.pt"), "--format", "torchscript",
                 "--out", str(tmp_path / "edge" / "model.ts")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["bytes"] == (tmp_path / "edge" / "model.ts").stat().st_size > 0
    assert info["state"] == list(STATE) and info["channels"] == 3 and info["baked"]["gap_policy"] == "decay"
    step = torch.jit.load(str(tmp_path / "edge" / "model.ts"))
    out = step(torch.ones(2, 3), torch.tensor([0.0, 0.0]), torch.tensor([True, True]), torch.zeros(2, 16),
               torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), torch.ones(2, 3), torch.zeros(2),
               torch.zeros(2, dtype=torch.int64))
    assert out[-1].tolist() == [1, 1] and out[4].tolist() == [1.0, 1.0]  # a first reading: horizon 1 s


def test_export_without_its_extra_or_model_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    assert main(["export", "--model", "m.pt", "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("liquidstream export: error: `liquidstream export --format onnx` needs onnx, which is not "
                   "installed: pip install 'liquidstream[export]'")
    assert main(["export", "--model", str(tmp_path / "none.pt"), "--format", "torchscript", "--out", "x.ts"]) == 2
    assert capsys.readouterr().err.strip().endswith("no such file")
