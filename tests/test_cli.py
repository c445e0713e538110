"""The command-line contract: recipes listed, Hydra's own flags work, and the wheel carries configs + recipes."""
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.support import REPO, run_cli
from finetune.cli import RECIPES


def test_help_lists_every_recipe():
    res = run_cli("--help")
    assert res.returncode == 0
    for name in ("train", "merge", "eval", "generate", "preprocess"):
        assert f"  {name}" in res.stdout
    for name in RECIPES:  # each listed recipe has a script
        assert (REPO / "recipes" / f"{name}.py").is_file()


def test_console_script_and_module_agree():
    exe = Path(sys.executable).parent / "finetune"
    if not exe.exists():
        pytest.fail("console script `finetune` is not installed; run `make setup`")
    a = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    assert a.returncode == 0 and a.stdout == run_cli("--help").stdout


def test_unknown_recipe_is_a_clear_error():
    res = run_cli("trian")
    assert res.returncode == 2 and "unknown recipe 'trian'" in res.stderr and "train" in res.stderr


def test_recipe_help_is_hydras():
    res = run_cli("train", "--help")
    assert res.returncode == 0
    assert "== Configuration groups ==" in res.stdout and "quant:" in res.stdout


@pytest.fixture(scope="module")
def wheel_site(tmp_path_factory):
    """Build the wheel and unpack it: a stand-in for `pip install finetune` without the checkout."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(out), str(REPO)], check=True, capture_output=True)
    (whl,) = out.glob("finetune-*.whl")
    site = out / "site"
    zipfile.ZipFile(whl).extractall(site)
    return site


def test_wheel_ships_configs_recipes_and_demo_data(wheel_site):
    pkg = wheel_site / "finetune"
    for rel in ("configs/config.yaml", "configs/experiment/demo.yaml", "configs/model/tiny.yaml",
                "recipes/train.py", "recipes/merge.py", "demo_data/structured_train.jsonl"):
        assert (pkg / rel).is_file(), rel


def test_cfg_job_works_from_an_installed_wheel_outside_the_checkout(wheel_site, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(wheel_site)}
    code = ("import finetune, finetune.paths as p, sys; "
            "print(finetune.__file__, p.CONFIG_DIR, file=sys.stderr); "
            "from finetune.cli import main; sys.exit(main(['train', '--cfg', 'job']))")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert str(wheel_site) in res.stderr  # the package and its configs came from the wheel, not the checkout
    assert "name_or_path: embedded:tiny" in res.stdout and "method: nf4" in res.stdout


def test_preprocess_honours_hydra_run_dir(tmp_path):
    res = run_cli("preprocess", f"hydra.run.dir={tmp_path}/pre")
    assert res.returncode == 0, res.stderr[-3000:]
    stats = json.loads((tmp_path / "pre/data/stats.json").read_text())
    assert stats["rows_kept"] > 0
    assert (tmp_path / "pre/config.yaml").is_file()
    assert "[[" in res.stdout  # label spans are marked in the printed samples


def test_multirun_sweeps_into_separate_job_dirs(tmp_path):
    res = run_cli("preprocess", "-m", "data.max_length=256,384", f"hydra.sweep.dir={tmp_path}/sweep")
    assert res.returncode == 0, res.stderr[-3000:]
    lengths = sorted(json.loads((tmp_path / f"sweep/{i}/config.yaml").read_text().split("max_length: ")[1]
                                .split("\n")[0]) for i in (0, 1))
    assert lengths == [256, 384]
    assert all((tmp_path / f"sweep/{i}/data/stats.json").is_file() for i in (0, 1))
