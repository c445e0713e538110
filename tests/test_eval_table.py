"""The base-vs-tuned table a person reads at the end of a run."""
from finetune.evaluation.table import comparison_table

REPORT = {
    "settings": {"decoding": "greedy", "max_new_tokens": 96, "constrain": "none"},
    "metrics": {"rows": 70, "exact_match": 0.65, "json_valid_rate": 1.0, "field_f1": 0.93, "stopped_rate": 1.0,
                "target_loss": 0.21, "field_precision": 0.9},
    "base": {"rows": 70, "exact_match": 0.0, "json_valid_rate": 0.05, "field_f1": 0.1, "stopped_rate": 0.4,
             "target_loss": 1.9},
    "gates": {"json_valid_rate": 0.98, "exact_match": 0.7, "max_target_loss": 0.5},
    "gates_missed": ["exact_match 0.65 < 0.7"],
}


def test_table_shows_base_tuned_change_and_gates():
    lines = comparison_table(REPORT).splitlines()
    assert lines[0] == "held-out rows: 70 (greedy, max 96 new tokens, unconstrained)"
    row = {line.split()[0]: line.split()[1:] for line in lines[2:-1]}
    assert row["json_valid_rate"] == ["0.050", "1.000", "+0.950", ">=", "0.98", "pass"]
    assert row["exact_match"] == ["0.000", "0.650", "+0.650", ">=", "0.7", "FAIL"]
    assert row["target_loss"] == ["1.900", "0.210", "-1.690", "<=", "0.5", "pass"]
    assert "field_precision" not in row  # detail lives in report.md, not in the glance
    assert list(row)[:3] == ["exact_match", "json_valid_rate", "field_f1"]
    assert lines[-1] == "gates: 2 of 3 met: exact_match 0.65 < 0.7"


def test_table_without_a_base_says_so():
    report = {**REPORT, "base": None, "gates": {}, "gates_missed": [],
              "settings": {**REPORT["settings"], "constrain": "json_schema"}}
    lines = comparison_table(report).splitlines()
    assert "constrained: json_schema" in lines[0]
    assert lines[2].split()[:4] == ["exact_match", "-", "0.650", "-"]
    assert not lines[-1].startswith("gates")
