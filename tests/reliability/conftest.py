"""The trained run every artifact case and fault test starts from (one per session: 2 steps of the tiny model)."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys

import psutil
import pytest

from tests.reliability.cases import FAST
from tests.reliability.harness import run_inprocess


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory, tiny_dir):
    """A trained, merged run (2 steps); another base of the same shapes; a live process that is not ours."""
    root = tmp_path_factory.mktemp("corpus")
    out = run_inprocess(["train", *FAST, "eval.enabled=false", f"hydra.run.dir={root / 'run'}"])
    assert out.code == 0, out.text[-3000:]
    other = root / "other_base"
    shutil.copytree(tiny_dir, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["rms_norm_eps"] = cfg.get("rms_norm_eps", 1e-6) * 10  # another model, same shapes
    (other / "config.json").write_text(json.dumps(cfg))
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(900)"])
    yield {"run": root / "run", "other_base": other, "live_pid": sleeper.pid,
           "live_started": psutil.Process(sleeper.pid).create_time(), "host": socket.gethostname()}
    sleeper.kill()
    sleeper.wait()
