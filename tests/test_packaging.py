"""The wheel is what a user installs: build it, install it outside the checkout, and run its console script.

Offline and fast: ``pip wheel --no-deps --no-build-isolation`` (setuptools from this environment, nothing
downloaded), then ``pip install --no-deps --no-index --target`` into a temporary folder; the installed command runs
with this environment's interpreter (its torch, numpy, ... are reused, never downloaded again) and the installed
package first on the path, from a working directory outside the checkout.  Also: the worker's commands import no
optional extra (matplotlib is ``liquidstream[plot]``), and a command that needs a missing extra says which.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from this checkout, installed into a temporary folder (``--target``)."""
    tmp = tmp_path_factory.mktemp("wheel")
    env = os.environ | {"PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    src = tmp / "src"  # a copy: setuptools builds in-tree (build/, *.egg-info), and a stale build/ would ship
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("liquidstream", "operators", "pipeline"):  # liquidstream/ links ../operators and ../pipeline
        shutil.copytree(ROOT / name, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp / "dist"), str(src)], check=True, env=env, cwd=tmp, capture_output=True, timeout=300)
    wheels = list((tmp / "dist").glob("liquidstream-*.whl"))
    assert len(wheels) == 1, wheels
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert "liquidstream/py.typed" in names and "liquidstream/operators/operator.py" in names
    assert "liquidstream/pipeline/wire/contract.py" in names
    assert not any(n.startswith(("operators/", "pipeline/", "tests/")) for n in names)  # one import root
    target = tmp / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target),
                    str(wheels[0])], check=True, env=env, capture_output=True, timeout=300)
    return target


def _run(target: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIQUIDSTREAM_")}
    env["PYTHONPATH"] = str(target)  # before this environment's editable install of the checkout
    script = target / "bin" / "liquidstream"
    return subprocess.run([sys.executable, str(script), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_the_installed_command_runs_from_outside_the_checkout(installed: Path, tmp_path: Path) -> None:
    where = subprocess.run([sys.executable, "-c", "import liquidstream.pipeline.wire.contract as c; print(c.__file__)"],
                           cwd=tmp_path, env=os.environ | {"PYTHONPATH": str(installed)}, capture_output=True,
                           text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(installed), where  # the installed copy, not the checkout
    version = _run(installed, tmp_path, "--version")
    assert version.returncode == 0 and version.stdout.startswith("liquidstream 0.")
    schema = _run(installed, tmp_path, "schema", "prediction")
    assert schema.stdout == (ROOT / "docs" / "schemas" / "prediction.json").read_text()
    src = tmp_path / "r.jsonl"
    src.write_text("".join(json.dumps({"device_id": f"d{k % 2}", "ts": 1_767_225_600_000 + 1000 * k,
                                       "values": [1.0, float(k % 3)]}) + "\n" for k in range(30)))
    replay = _run(installed, tmp_path, "replay", "--input", "r.jsonl", "--out", "out", "--quiet")
    assert replay.returncode == 0, replay.stderr
    assert json.loads(replay.stdout)["predictions"] == 30
    assert "UNTRAINED" in replay.stderr


def test_the_worker_needs_no_extra_and_a_missing_one_is_named(tmp_path: Path) -> None:
    code = ("import sys; sys.modules['matplotlib'] = None\n"  # as if liquidstream[plot] were not installed
            "import liquidstream, liquidstream.pipeline.kafka.worker, liquidstream.pipeline.offline.replay\n"
            "from liquidstream.pipeline.cli.entry import main\n"
            "import importlib.util; importlib.util.find_spec = lambda name, *a: None\n"
            "sys.exit(main(['report', '--readings', 'r', '--predictions', 'p', '--alerts', 'a']))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == ("liquidstream report: error: `liquidstream report` needs matplotlib, which is not "
                                   "installed: pip install 'liquidstream[plot]'")
