"""A finished run whose merge parity or gates fail says so in its summary and exits 2 (issue 18)."""
import json

import pytest

import finetune.merge.stream as stream
from finetune.config import FinetuneConfig
from finetune.pipeline import RunChecksFailed, _merge_and_evaluate


def _fake_merge(tmp_path, ok: bool):
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "parity.json").write_text(json.dumps({
        "ok": ok, "greedy_token_agreement": 0.97 if not ok else 1.0, "identical_greedy_outputs": 5, "prompts": 8,
        "max_abs_logit_diff": 17.0, "warning": None if ok else "merged model agrees on only 97.0%",
        "merge": {"base": "original"}}))
    return lambda cfg, run_dir: merged


@pytest.mark.parametrize("parity_fail", [True, False])
def test_a_parity_failure_is_in_the_summary_and_fails_the_run_by_default(tmp_path, monkeypatch, parity_fail):
    monkeypatch.setattr(stream, "merge_adapter", _fake_merge(tmp_path, ok=False))
    cfg = FinetuneConfig()
    cfg.eval.enabled, cfg.merge.parity_fail = False, parity_fail
    summary: dict = {}
    failures = _merge_and_evaluate(cfg, tmp_path, None, summary)
    assert summary["parity"]["ok"] is False and summary["parity"]["greedy_token_agreement"] == 0.97
    assert summary["parity"]["base"] == "original"
    assert bool(failures) == parity_fail
    if parity_fail:
        assert "97.0%" in failures[0] and "merge.parity_fail=false" in failures[0]
        assert issubclass(RunChecksFailed, Exception)


def test_a_good_parity_fails_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(stream, "merge_adapter", _fake_merge(tmp_path, ok=True))
    cfg = FinetuneConfig()
    cfg.eval.enabled = False
    summary: dict = {}
    assert _merge_and_evaluate(cfg, tmp_path, None, summary) == [] and summary["parity"]["ok"] is True
