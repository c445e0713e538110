"""`finetune generate`: merged model by default, adapter on request, jsonl out, interactive chat,
schema-constrained decoding through finetune.generate.constrained (issue items 4 and 5)."""
import json

import jsonschema
import pytest

from tests.support import run_cli
from finetune.errors import DataError, FinetuneError
from finetune.generate.generation import chat, generate_run
from finetune.merge.stream import merge_adapter
from tests.test_merge_parity import run_cfg
from tests.test_merge_weights import make_run

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
COLOUR = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]},
                                           "tags": {"type": "array", "items": {"type": "string", "maxLength": 4},
                                                    "maxItems": 2}},
          "required": ["colour", "tags"], "additionalProperties": False}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("gen") / "run")  # nf4 adapter, like the demo
    merge_adapter(run_cfg(run, "merge.parity_prompts=0"), run)
    return run


def prompts_file(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_merged_model_by_default_results_as_jsonl_with_input_fields(run, tmp_path):
    p = prompts_file(tmp_path / "p.jsonl", [{"id": "a", "prompt": "Hi"},
                                            {"id": "b", "messages": [{"role": "user", "content": "Name a colour."}]}])
    out = generate_run(run_cfg(run, f"generate.prompts={p}", f"generate.output={tmp_path / 'o.jsonl'}",
                               "generate.max_new_tokens=6"), run)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b"]
    assert rows[0]["messages"] == [{"role": "user", "content": "Hi"}]
    assert all(set(r) >= {"generated", "new_tokens", "stopped"} and 0 < r["new_tokens"] <= 6 for r in rows)


def test_val_split_by_default_and_the_unmerged_adapter_on_request(run, tmp_path):
    merged = generate_run(run_cfg(run, f"generate.output={tmp_path / 'm.jsonl'}", "generate.max_new_tokens=4"), run)
    adapter = generate_run(run_cfg(run, f"generate.output={tmp_path / 'a.jsonl'}", "generate.max_new_tokens=4",
                                   "generate.use_adapter=true"), run)
    m = [json.loads(line) for line in merged.read_text().splitlines()]
    a = [json.loads(line) for line in adapter.read_text().splitlines()]
    assert len(m) == len(a) == 24 and m[0]["origin"] == a[0]["origin"] and "target" in m[0]  # the 24 val rows
    assert [r["messages"] for r in m] == [r["messages"] for r in a]


def test_interactive_chat_keeps_history_and_resets(run, capsys):
    from finetune.generate.generation import load_generation_model

    cfg = run_cfg(run, "generate.interactive=true", "generate.max_new_tokens=5", "generate.system=Be brief.")
    model, tok = load_generation_model(cfg, run, "cpu")
    lines = iter(["Hello", "/reset", "Hi again", "How are you?", "/exit", "never read"])
    history = chat(model, tok, cfg, read=lambda prompt: next(lines), write=lambda *a: None)
    assert [m["role"] for m in history] == ["system", "user", "assistant", "user", "assistant"]
    assert history[1]["content"] == "Hi again" and history[3]["content"] == "How are you?"
    assert history[2]["content"] and history[2]["content"] in capsys.readouterr().out  # streamed as generated


def test_interactive_chat_on_the_command_line(run, tmp_path):
    import os
    import subprocess
    import sys

    from tests.support import REPO

    # run_cli has no stdin; the same command with typed input
    res = subprocess.run([sys.executable, "-m", "finetune", "generate", f"run={run}", "generate.interactive=true",
                          "generate.max_new_tokens=4", f"generate.output={tmp_path / 'chat.jsonl'}"],
                         input="Hello there\n/exit\n", cwd=REPO, env=dict(os.environ), capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "/exit" in res.stdout  # the banner
    saved = json.loads((tmp_path / "chat.jsonl").read_text())
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant"]


def test_constrained_outputs_parse_and_validate_against_each_rows_schema(run, tmp_path):
    """End to end through the real command: finetune.generate.constrained's processor, one schema per row."""
    (tmp_path / "colour.json").write_text(json.dumps(COLOUR))
    rows = [{"prompt": "Extract: Ada is 36.", "schema": PERSON},
            {"prompt": "Pick a colour."},  # gets generate.schema
            {"messages": [{"role": "user", "content": "Who is Bob, 7?"}], "schema": json.dumps(PERSON)},
            {"prompt": "Another colour, with tags."}]
    p = prompts_file(tmp_path / "p.jsonl", rows)
    out = tmp_path / "o.jsonl"
    res = run_cli("generate", f"run={run}", f"generate.prompts={p}", f"generate.output={out}",
                  "generate.constrain=json_schema", f"generate.schema={tmp_path / 'colour.json'}",
                  "generate.max_new_tokens=96", "generate.batch_size=3")
    assert res.returncode == 0, res.stderr[-3000:]
    got = [json.loads(line) for line in out.read_text().splitlines()]
    for row, schema in zip(got, [PERSON, COLOUR, PERSON, COLOUR]):
        jsonschema.validate(json.loads(row["generated"]), schema)
        assert row["json_valid"] == row["schema_valid"] == 1.0 and row["stopped"]


def test_unconstrained_random_model_does_not_produce_valid_json(run, tmp_path):
    """The control for the test above: without the constraint the same rows are not valid JSON."""
    p = prompts_file(tmp_path / "p.jsonl", [{"prompt": "Extract: Ada is 36.", "schema": PERSON}])
    out = generate_run(run_cfg(run, f"generate.prompts={p}", f"generate.output={tmp_path / 'o.jsonl'}",
                               "generate.max_new_tokens=24"), run)
    assert json.loads(out.read_text())["schema_valid"] == 0.0


def test_constrained_rows_need_a_schema(run, tmp_path):
    p = prompts_file(tmp_path / "p.jsonl", [{"prompt": "a", "schema": PERSON}, {"prompt": "no schema here"}])
    with pytest.raises(DataError, match=r"1 prompt\(s\) have no 'schema' \(first: .*p.jsonl:2\)"):
        generate_run(run_cfg(run, f"generate.prompts={p}", "generate.constrain=json_schema"), run)


def test_missing_model_folders_are_named(tmp_path):
    from finetune.cli import setup
    from tests.test_merge_weights import compose_config

    p = prompts_file(tmp_path / "p.jsonl", [{"prompt": "a"}])
    cfg = setup(compose_config(f"generate.model={tmp_path / 'nothing'}", f"generate.prompts={p}"))
    with pytest.raises(FinetuneError, match="nothing: no merged model here"):
        generate_run(cfg, None)
    with pytest.raises(FinetuneError, match="use_adapter=true needs run="):
        generate_run(setup(compose_config("generate.use_adapter=true", f"generate.prompts={p}")), None)
