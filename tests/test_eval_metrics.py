"""Scoring rules of the evaluation (no model): matches, JSON and schema validity, field P/R/F1, chrF, gates."""
import json

import pytest
from sacrebleu.metrics import CHRF

from finetune.errors import ConfigError
from finetune.evaluation.run import check_gates
from finetune.evaluation.metrics import aggregate, deltas, field_counts, flatten, normalize_text, score_row, word_diff
from finetune.config import EvalGates, to_typed, validate

SCHEMA = json.dumps({"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                     "required": ["name", "age"], "additionalProperties": False})
GOLD = '{"name": "Ada", "age": 36}'


def scored(generated, target=GOLD, task="structured", schema=SCHEMA):
    return {**score_row(generated, target, task, schema), "generated": generated, "target": target, "task": task,
            "stopped": 1.0}


def test_structured_exact_normalized_and_validity():
    same = score_row(GOLD, GOLD, "structured", SCHEMA)
    assert same == {**same, "exact_match": 1.0, "normalized_match": 1.0, "json_valid": 1.0, "schema_valid": 1.0,
                    "field_f1": 1.0}
    reordered = score_row('{"age":36,"name":"Ada"}', GOLD, "structured", SCHEMA)
    assert (reordered["exact_match"], reordered["normalized_match"], reordered["field_f1"]) == (0.0, 1.0, 1.0)
    wrong_type = score_row('{"name": "Ada", "age": "36"}', GOLD, "structured", SCHEMA)
    assert (wrong_type["json_valid"], wrong_type["schema_valid"], wrong_type["normalized_match"]) == (1.0, 0.0, 0.0)
    assert (wrong_type["field_tp"], wrong_type["field_pred"], wrong_type["field_gold"]) == (1, 2, 2)
    broken = score_row('{"name": "Ada", "age": 36', GOLD, "structured", SCHEMA)
    assert (broken["json_valid"], broken["schema_valid"], broken["field_f1"]) == (0.0, 0.0, 0.0)
    assert (broken["field_pred"], broken["field_gold"]) == (0, 2)  # an unparsable reply costs recall


def test_text_rows_get_normalized_match_and_chrf_not_json_metrics():
    row = score_row("hello,  LIMA!", "Hello, Lima.", "chat")
    assert row["exact_match"] == 0.0 and row["normalized_match"] == 1.0
    assert "json_valid" not in row and "field_f1" not in row
    assert row["chrf"] == pytest.approx(CHRF().sentence_score("hello,  LIMA!", ["Hello, Lima."]).score)
    assert score_row("Hello, Lima.", "Hello, Lima.", "chat")["chrf"] == 100.0
    assert normalize_text(" A  cow\tsays moo. ") == "a cow says moo"
    assert normalize_text("moo cow") != normalize_text("cow moo")  # order still counts


def test_flatten_and_field_counts_on_nested_values():
    gold = {"a": {"b": [1, 2]}, "tags": [], "ok": True}
    assert flatten(gold) == {"a.b[0]": 1, "a.b[1]": 2, "tags": [], "ok": True}
    assert field_counts({"a": {"b": [1, 3]}, "tags": [], "ok": 1, "x": 0}, gold) == (2, 5, 4)  # 1 != true
    assert field_counts({"a": {"b": [1.0, 2]}, "tags": [], "ok": True}, gold) == (4, 4, 4)  # 1.0 == 1


def test_aggregate_micro_averages_fields_and_uses_corpus_chrf():
    rows = [scored(GOLD), scored('{"name": "Bob", "age": 36, "x": 1}'), scored("not json"),
            scored("The blood is red.", "The blood is red.", "chat", ""),
            scored("Sky is green", "The sky is blue.", "chat", "")]
    m = aggregate(rows)
    # fields: tp 2+1+0 = 3, predicted 2+3+0 = 5, gold 2+2+2 = 6
    assert m["field_precision"] == pytest.approx(3 / 5) and m["field_recall"] == pytest.approx(3 / 6)
    assert m["field_f1"] == pytest.approx(2 * 0.6 * 0.5 / 1.1)
    assert m["json_valid_rate"] == pytest.approx(2 / 3) and m["schema_valid_rate"] == pytest.approx(1 / 3)
    assert m["exact_match"] == pytest.approx(2 / 5)
    assert (m["rows"], m["rows_structured"], m["rows_text"]) == (5, 3, 2)
    expected = CHRF().corpus_score(["The blood is red.", "Sky is green"], [["The blood is red.", "The sky is blue."]])
    assert m["chrf"] == pytest.approx(expected.score)


def test_word_diff_marks_removed_and_added_words():
    assert word_diff('{"city": "Lima"}', '{"city": "Rome"}') == '{"city": "[-Lima-]{+Rome+}"}'
    assert word_diff("a b c", "a b c") == "a b c"


def test_deltas_are_tuned_minus_base_without_row_counts():
    assert deltas({"exact_match": 0.75, "rows": 4, "target_loss": 1.0}, {"exact_match": 0.25, "rows": 4,
                                                                          "target_loss": 3.0}) == \
        {"exact_match": 0.5, "target_loss": -2.0}


def test_gates_name_threshold_and_value_and_respect_direction():
    metrics = {"exact_match": 0.5, "json_valid_rate": 1.0, "target_perplexity": 12.0, "rows": 4}
    missed = check_gates(metrics, {"exact_match": 0.9, "json_valid_rate": 0.98, "max_target_perplexity": 10.0})
    assert len(missed) == 2
    assert "eval.gates.exact_match" in missed[0] and "0.5000" in missed[0] and "0.9" in missed[0]
    assert "eval.gates.max_target_perplexity" in missed[1] and "12.0000 > threshold 10.0" in missed[1]
    assert check_gates(metrics, {"exact_match": 0.5, "max_target_perplexity": 12.0}) == []
    (unmeasured,) = check_gates(metrics, {"chrf": 40.0})
    assert "'chrf' was not measured" in unmeasured and "exact_match" in unmeasured


def test_gate_values_are_validated_and_unknown_gate_names_rejected():
    cfg = to_typed({"eval": {"gates": {"exact_match": 1.5, "chrf": 120, "max_target_loss": -1}}})
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    text = str(e.value)
    assert "eval.gates.exact_match=1.5" in text and "eval.gates.chrf=120" in text and "max_target_loss" in text
    with pytest.raises(Exception, match="exact_matsh"):
        to_typed({"eval": {"gates": {"exact_matsh": 0.9}}})
    assert EvalGates(exact_match=0.9).active() == {"exact_match": 0.9}
    assert to_typed({"eval": {"gates": {"chrf": 40, "max_target_perplexity": 3.0}}}).eval.problems() == []


def test_a_json_reply_is_scored_as_structured_whatever_its_format():
    from finetune.evaluation.metrics import aggregate, score_row

    row = score_row('{"name": "Ada", "city": "Paris"}', '{"name": "Ada", "city": "Lyon"}', task="chat")
    assert row["json_valid"] == 1.0 and row["field_f1"] == 0.5 and "chrf" not in row
    text = score_row("Paris", "Paris", task="chat")
    assert "json_valid" not in text and text["chrf"] == 100.0
    scored = [{**row, "task": "chat", "stopped": 1.0, "generated": "{}", "target": "{}"},
              {**text, "task": "chat", "stopped": 1.0, "generated": "Paris", "target": "Paris"}]
    out = aggregate(scored)
    assert out["rows_structured"] == 1 and out["json_valid_rate"] == 1.0
