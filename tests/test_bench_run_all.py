"""benchmarks/run_all.py (make bench): runs each benchmark in a subprocess, tabulates goals, survives failures.

The real benchmarks are smoke-tested in their own test files; here stand-in scripts keep this under a few seconds.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "run_all.py"


def _module(busy: str | None = None):
    """The script as a module, with the busy-machine check answering `busy` (tests run on a shared machine)."""
    ra = load_script(SCRIPT, "bench_run_all")
    ra.machine_busy = lambda: busy
    return ra


def _fake(tmp_path: Path, name: str, body: str) -> None:
    (tmp_path / f"{name}.py").write_text("import json, sys\n" + body)


def test_table_goals_failures_and_skips(tmp_path, monkeypatch, capsys):
    ra = _module()
    _fake(tmp_path, "good",
          "print('summary line')\nprint(json.dumps({'speedup': 3.5, 'rate': 1234.5, 'args': sys.argv[1:]}))\n")
    _fake(tmp_path, "slowish", "print(json.dumps({'ratio': 0.7}))\n")
    _fake(tmp_path, "broken", "print('no json here'); sys.exit(3)\n")
    monkeypatch.setattr(ra, "HERE", tmp_path)
    monkeypatch.setattr(ra, "BENCHES", [
        ra.Bench("good", ["--quick"], [("speedup", ">=", 2)], ["rate"]),
        ra.Bench("slowish", [], [("ratio", "<=", 0.5)]),
        ra.Bench("broken", []),
        ra.Bench("absent", []),
    ])
    out_file = tmp_path / "bench.json"
    status = ra.main(["--out", str(out_file)])
    out = capsys.readouterr().out
    combined = json.loads(out.strip().splitlines()[-1])
    assert status == 1  # one benchmark produced no JSON
    assert combined == json.loads(out_file.read_text())
    assert combined["good"]["args"] == ["--quick"]  # the quick arguments are passed by default
    assert combined["slowish"] == {"ratio": 0.7}
    assert combined["failed"] == ["broken"] and combined["skipped"] == ["absent"]
    assert set(combined["seconds"]) == {"good", "slowish", "broken"}
    rows = {tuple(line.split()[:2]): line.split() for line in out.splitlines() if line.split()[:1] in (
        ["good"], ["slowish"], ["broken"])}
    assert rows[("good", "speedup")][2:5] == ["3.5", ">=", "2"] and rows[("good", "speedup")][5] == "yes"
    assert rows[("good", "rate")][2] == "1,234"
    assert rows[("slowish", "ratio")][5] == "NO"  # a missed goal is reported, not an error
    assert rows[("broken", "FAILED")][2:4] == ["exit", "3:"]
    assert "skipped, benchmarks/absent.py is not in this checkout" in out


def test_full_passes_no_quick_arguments(tmp_path, monkeypatch, capsys):
    ra = _module()
    _fake(tmp_path, "good", "print(json.dumps({'args': sys.argv[1:]}))\n")
    monkeypatch.setattr(ra, "HERE", tmp_path)
    monkeypatch.setattr(ra, "BENCHES", [ra.Bench("good", ["--quick"])])
    assert ra.main(["--full"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["good"]["args"] == []


def test_every_cpu_benchmark_is_in_the_run():
    ra = _module()
    names = [b.name for b in ra.BENCHES]
    assert names == ["preprocess", "generate", "generate_engines", "train_throughput", "train_throughput_qwen",
                     "memory", "train_throughput_peers"]
    assert [b.name for b in ra.BENCHES if b.group == "peers"] == ["train_throughput_peers"]
    peers_entry = next(b for b in ra.BENCHES if b.name == "train_throughput_peers")
    assert "--arms" not in peers_entry.quick and "--peers" not in peers_entry.quick  # every arm, every peer
    assert ["--peers", "none"] == next(b for b in ra.BENCHES if b.name == "train_throughput").quick[-2:]
    assert all(b.path.is_file() for b in ra.BENCHES if b.name != "generate")
    qwen = next(b for b in ra.BENCHES if b.name == "train_throughput_qwen")
    assert qwen.path.name == "train_throughput.py" and "qwen2.5-0.5b" in qwen.quick and not qwen.in_full


def test_an_entry_runs_its_script_and_quick_only_entries_stay_out_of_full(tmp_path, monkeypatch, capsys):
    ra = _module()
    _fake(tmp_path, "shared", "print(json.dumps({'args': sys.argv[1:]}))\n")
    monkeypatch.setattr(ra, "HERE", tmp_path)
    monkeypatch.setattr(ra, "BENCHES", [ra.Bench("a", ["--x"], script="shared"),
                                        ra.Bench("b", ["--y"], script="shared", in_full=False)])
    assert ra.main([]) == 0
    combined = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert combined["a"]["args"] == ["--x"] and combined["b"]["args"] == ["--y"]
    assert ra.main(["--full"]) == 0
    combined = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert combined["a"]["args"] == [] and "b" not in combined and set(combined["seconds"]) == {"a"}


def test_unknown_benchmark_name_is_refused():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--only", "memroy"], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 2 and "memroy" in proc.stderr and "train_throughput" in proc.stderr


def test_a_busy_machine_is_refused_unless_forced(tmp_path, monkeypatch, capsys):
    ra = _module(busy="this machine is busy: other processes use 1.5 of 2 cores (python (pid 9) 99%)")
    _fake(tmp_path, "good", "open(__file__ + '.ran', 'w').close(); print(json.dumps({'x': 1}))\n")
    monkeypatch.setattr(ra, "HERE", tmp_path)
    monkeypatch.setattr(ra, "BENCHES", [ra.Bench("good", [])])
    assert ra.main([]) == ra.BUSY_EXIT == 3
    captured = capsys.readouterr()
    assert "REFUSED: this machine is busy" in captured.err and "--force" in captured.err
    assert not (tmp_path / "good.py.ran").exists()  # nothing was measured
    assert ra.main(["--force"]) == 0
    out = capsys.readouterr().out
    assert "WARNING (--force): this machine is busy" in out and (tmp_path / "good.py.ran").exists()
    combined = json.loads(out.strip().splitlines()[-1])
    assert combined["busy"].startswith("this machine is busy") and combined["good"] == {"x": 1}


def test_the_run_names_date_cpu_and_its_compute_dtype(tmp_path, monkeypatch, capsys):
    ra = _module()
    _fake(tmp_path, "good", "print(json.dumps({}))\n")
    monkeypatch.setattr(ra, "HERE", tmp_path)
    monkeypatch.setattr(ra, "BENCHES", [ra.Bench("good", [])])
    assert ra.main([]) == 0
    out = capsys.readouterr().out
    machine = json.loads(out.strip().splitlines()[-1])["machine"]
    assert set(machine) >= {"date", "cpu", "capability", "bf16_flags", "physical_cores", "auto_dtype"}
    assert machine["auto_dtype"] in ("float32", "bfloat16") and machine["physical_cores"] >= 1
    assert out.splitlines()[0].startswith(f"== {machine['date']}: {machine['cpu']}; torch capability ")


def test_make_bench_leaves_the_peers_group_to_bench_peers(tmp_path, monkeypatch, capsys):
    """make bench runs the main group only; --peers (make bench-peers) only the peers group; --only names either."""
    ra = _module()
    _fake(tmp_path, "shared", "print(json.dumps({'args': sys.argv[1:]}))\n")
    monkeypatch.setattr(ra, "HERE", tmp_path)
    monkeypatch.setattr(ra, "BENCHES", [ra.Bench("main", ["--m"], script="shared"),
                                        ra.Bench("peer", ["--p"], script="shared", in_full=False, group="peers")])
    assert ra.main([]) == 0
    assert set(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["seconds"]) == {"main"}
    assert ra.main(["--peers"]) == 0
    combined = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(combined["seconds"]) == {"peer"} and combined["peer"]["args"] == ["--p"]
    assert ra.main(["--only", "peer"]) == 0
    assert set(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["seconds"]) == {"peer"}
