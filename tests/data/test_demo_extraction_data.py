"""The main demo's data (finetune/demo_data/make_extraction_data.py): reproducible, valid, and truly held out.

The demo claims the tuned SmolLM2-135M extracts JSON from rows it never saw; these tests make sure the
held-out split cannot be answered from memory and that every target is reachable by copying from the input.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import jsonschema
import pytest

from finetune.demo_data import make_extraction_data

DATA_DIR = Path(make_extraction_data.__file__).resolve().parent
COUNTS = {"extraction_train.jsonl": 400, "extraction_val.jsonl": 60, "chat_train.jsonl": 40, "chat_val.jsonl": 10,
          "tools_train.jsonl": 60, "tools_val.jsonl": 15}
# Common words of each language in these texts; a row must contain more of its own language's words than of
# any other's. Words in two lists ("de", "total", "es") are dropped below: they tell nothing apart.
_MARKERS = {
    "en": {"the", "my", "is", "this", "i'm", "i", "from", "order", "and", "in", "at", "for", "please", "hello", "hi",
           "name", "company", "email", "phone", "city", "event", "time", "venue", "items", "customer", "total",
           "out", "review", "wrote", "by", "anonymous", "what's", "how", "weather", "book", "table", "can", "you",
           "reserve", "people", "convert", "much", "we", "are", "thanks", "works", "does", "it", "broke", "cheap",
           "would", "not", "recommended", "regards", "based", "live", "rush", "urgent", "save", "amount", "due",
           "rating", "new", "contact", "after", "week", "that's", "all", "placed", "join", "us", "on", "will", "have", "nice", "weekend"},
    "fr": {"le", "la", "les", "de", "du", "mon", "je", "est", "bonjour", "ici", "commande", "et", "à", "au", "pour",
           "nom", "société", "ville", "événement", "heure", "lieu", "client", "articles", "montant", "sur", "avis",
           "a", "écrit", "anonyme", "quel", "temps", "fait-il", "réserve", "une", "table", "personnes", "convertis",
           "combien", "font", "merci", "fonctionne", "très", "bien", "cassé", "recommande", "pas", "cordialement",
           "basé", "j'habite", "pressé", "urgent", "note", "nouveau", "coordonnées", "c'est", "tout", "aura",
           "lieu", "rejoignez-nous", "noter", "travaille", "chez", "quantité", "soit", "total", "numéro", "tél",
           "téléphone", "portable", "adresse", "e-mail", "livres", "euros", "dollars", "en", "il", "fait", "vous",
           "finition", "bon", "marché"},
    "de": {"der", "die", "das", "mein", "meine", "ich", "ist", "hallo", "hier", "bestellung", "und", "im", "in",
           "für", "name", "firma", "ort", "veranstaltung", "datum", "uhrzeit", "stadt", "kunde", "artikel", "summe",
           "von", "bewertung", "schrieb", "anonyme", "wie", "wetter", "reserviere", "einen", "tisch", "personen",
           "rechne", "viel", "sind", "danke", "funktioniert", "super", "kaputt", "empfehle", "nicht", "grüße",
           "wohne", "eile", "dringend", "neuer", "kontakt", "bitte", "findet", "statt", "besuchen", "sie", "am",
           "um", "arbeite", "bei", "stück", "insgesamt", "gesamt", "telefon", "mobil", "e-mail", "euro", "dollar",
           "pfund", "es", "mir", "meinen", "kannst", "du", "gerade", "warm", "termin", "vormerken",
           "macht", "genau", "was", "soll", "klare", "empfehlung", "billige", "verarbeitung", "keine"},
    "es": {"el", "la", "los", "de", "mi", "soy", "es", "hola", "pedido", "y", "en", "para", "nombre", "empresa",
           "ciudad", "evento", "fecha", "hora", "lugar", "cliente", "artículos", "importe", "reseña", "escribió",
           "anónima", "qué", "tiempo", "hace", "reserva", "una", "mesa", "personas", "convierte", "cuánto", "son",
           "gracias", "funciona", "genial", "rompió", "recomiendo", "no", "saludos", "vivo", "prisa", "urgente",
           "nota", "nuevo", "contacto", "por", "favor", "celebrará", "acompáñanos", "las", "trabajo", "cantidad",
           "total", "número", "correo", "teléfono", "móvil", "libras", "euros", "dólares", "me", "llamo", "puedes",
           "eso", "todo", "estoy", "cuando", "temperatura", "hay", "acabado", "mala", "calidad",
           "espero", "que", "estés", "justo", "lo", "debe", "gracias", "antemano", "enviado", "desde", "buen", "te",
           "escribe"},
}
MARKERS = {lang: words - set().union(*(w for other, w in _MARKERS.items() if other != lang))
           for lang, words in _MARKERS.items()}


def _rows(name: str, directory: Path = DATA_DIR) -> list[dict]:
    return [json.loads(line) for line in (directory / name).read_text(encoding="utf-8").splitlines()]


def _words(value) -> set[str]:
    return {w.strip(".,;:!?()[]\"'¡¿").lower() for w in str(value).split()} - {""}


def _value_leaves(value, schema: dict):
    """Entity-like leaves of a target: strings and numbers >= 10, not enums, booleans or nulls."""
    if "enum" in schema or value is None or isinstance(value, bool):
        return
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _value_leaves(v, schema["properties"][k])
    elif isinstance(value, list):
        for v in value:
            yield from _value_leaves(v, schema["items"])
    elif isinstance(value, str) or abs(value) >= 10:  # 1-9 (quantities, ratings, party sizes) is a closed set
        yield value


def _tool_calls(row: dict):
    """(call, its parameter schema) for every tool call of a tools row."""
    params = {t["function"]["name"]: t["function"]["parameters"] for t in row["tools"]}
    for m in row["messages"]:
        for call in m.get("tool_calls") or []:
            yield call, params[call["function"]["name"]]


def _values(split: str) -> list:
    out = [v for r in _rows(f"extraction_{split}.jsonl") for v in _value_leaves(r["output"], r["schema"])]
    for r in _rows(f"tools_{split}.jsonl"):
        for call, params in _tool_calls(r):
            out += list(_value_leaves(json.loads(call["function"]["arguments"]), params))
    return out


def test_regenerating_gives_byte_identical_files(tmp_path):
    # A fresh interpreter with another hash seed: set order must never reach the output.
    code = ("from pathlib import Path; from finetune.demo_data import make_extraction_data as m; "
            f"m.main(Path({str(tmp_path)!r}))")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=DATA_DIR.parent.parent)
    for name in COUNTS:
        assert (tmp_path / name).read_bytes() == (DATA_DIR / name).read_bytes(), \
            f"{name} differs from its generator's output; rerun python -m finetune.demo_data.make_extraction_data"


def test_row_counts():
    assert {name: len(_rows(name)) for name in COUNTS} == COUNTS


@pytest.mark.parametrize("split", ["train", "val"])
def test_every_target_validates_against_its_schema(split):
    for i, r in enumerate(_rows(f"extraction_{split}.jsonl")):
        cls = jsonschema.validators.validator_for(r["schema"])
        cls.check_schema(r["schema"])
        errors = [e.message for e in cls(r["schema"]).iter_errors(r["output"])]
        assert not errors, f"extraction_{split}.jsonl row {i}: {errors}"


def test_at_least_five_schemas_each_in_both_splits():
    train = Counter(json.dumps(r["schema"], sort_keys=True) for r in _rows("extraction_train.jsonl"))
    val = Counter(json.dumps(r["schema"], sort_keys=True) for r in _rows("extraction_val.jsonl"))
    assert len(train) >= 5
    assert set(val) == set(train)
    assert min(train.values()) >= 60 and min(val.values()) >= 10


def test_at_least_four_languages_and_labels_match_text():
    rows = _rows("extraction_train.jsonl") + _rows("extraction_val.jsonl")
    langs = Counter(r["lang"] for r in rows)
    assert len(langs) >= 4 and min(langs.values()) >= len(rows) // 8, langs
    for r in rows:
        words = _words(r["input"])
        scores = {lang: len(words & markers) for lang, markers in MARKERS.items()}
        others = max(n for lang, n in scores.items() if lang != r["lang"])
        assert scores[r["lang"]] > others, (r["input"], scores)


def test_targets_are_copied_from_the_input_and_short():
    for name in ("extraction_train.jsonl", "extraction_val.jsonl"):
        for r in _rows(name):
            for v in _value_leaves(r["output"], r["schema"]):
                assert (v if isinstance(v, str) else json.dumps(v)) in r["input"], (v, r["input"])
            # ~3 characters per token for this JSON with SmolLM2's tokenizer: 180 characters is < 70 tokens
            assert len(json.dumps(r["output"], ensure_ascii=False, separators=(",", ":"))) <= 180, r["output"]


def test_nullable_fields_are_sometimes_null_and_sometimes_set():
    seen: dict[tuple[str, str], set[bool]] = {}
    for r in _rows("extraction_train.jsonl"):
        for key, prop in r["schema"]["properties"].items():
            if "null" in (prop.get("type") if isinstance(prop.get("type"), list) else []):
                seen.setdefault((tuple(r["schema"]["properties"])[0], key), set()).add(r["output"][key] is None)
    assert len(seen) >= 7
    assert all(both == {True, False} for both in seen.values()), seen


def test_held_out_values_never_occur_in_training():
    train_words = set().union(*map(_words, _values("train")))
    train_text = set()
    for name in ("extraction_train.jsonl", "tools_train.jsonl"):
        for r in _rows(name):
            train_text |= _words(r["input"]) if "input" in r else _words(r["messages"][0]["content"])
    val = _values("val")
    assert len(val) > 200
    for v in val:
        assert not _words(v) & train_words, f"held-out value {v!r} shares {_words(v) & train_words} with training"
        assert not _words(v) & train_text, f"held-out value {v!r}: {_words(v) & train_text} occurs in a training input"


@pytest.mark.parametrize("split", ["train", "val"])
def test_tool_calls_parse_and_validate_against_the_tool_schema(split):
    rows = _rows(f"tools_{split}.jsonl")
    used = Counter()
    for i, r in enumerate(rows):
        names = [t["function"]["name"] for t in r["tools"]]
        assert sorted(names) == ["book_table", "convert_currency", "get_weather"]
        msgs = r["messages"]
        assert msgs[0]["role"] == "user" and msgs[-1]["role"] == "assistant"
        for call, params in _tool_calls(r):
            args = json.loads(call["function"]["arguments"])
            jsonschema.validate(args, params)
            for v in _value_leaves(args, params):
                assert (v if isinstance(v, str) else json.dumps(v)) in msgs[0]["content"], (v, msgs[0]["content"])
            used[call["function"]["name"]] += 1
        if len(msgs) > 2:  # call -> tool result -> final reply
            assert msgs[1]["content"] is None
            assert [m["role"] for m in msgs] == ["user", "assistant", "tool", "assistant"]
            assert msgs[2]["tool_call_id"] == msgs[1]["tool_calls"][0]["id"]
            json.loads(msgs[2]["content"])
            assert msgs[3]["content"]
    assert set(used) == {"book_table", "convert_currency", "get_weather"}
    assert any("tool_calls" not in r["messages"][-1] and len(r["messages"]) == 2 for r in rows)  # no tool needed


CHAT_ORACLES = [
    (r"Reverse the order of these words: (.+)", lambda s: " ".join(reversed(s.split()))),
    (r"Sort these words alphabetically: (.+)", lambda s: ", ".join(sorted(s.split(", ")))),
    (r"Join these words with hyphens: (.+)", lambda s: "-".join(s.split())),
    (r"Write this sentence in capital letters: (.+)", str.upper),
    (r"Capitalise the first letter of every word: (.+)", lambda s: " ".join(w[0].upper() + w[1:] for w in s.split())),
    (r"Convert ([\d.]+) km to meters\.", lambda s: f"{round(float(s) * 1000)} meters"),
    (r"How many minutes are in (\d+) hours\?", lambda s: f"{int(s) * 60} minutes"),
    (r"What is (\d+) \+ (\d+)\? Reply with the number only\.", lambda a, b: str(int(a) + int(b))),
]


@pytest.mark.parametrize("split", ["train", "val"])
def test_chat_answers_follow_from_the_prompt(split):
    kinds = set()
    for r in _rows(f"chat_{split}.jsonl"):
        user, answer = r["messages"][-2]["content"], r["messages"][-1]["content"]
        for i, (pattern, oracle) in enumerate(CHAT_ORACLES):
            m = re.fullmatch(pattern, user)
            if m:
                assert answer == oracle(*m.groups()), (user, answer)
                kinds.add(i)
                break
        else:
            pytest.fail(f"no oracle for chat prompt {user!r}")
    assert len(kinds) == len(CHAT_ORACLES) if split == "train" else len(kinds) >= 5


def test_training_entities_are_partly_invented_and_leave_the_held_out_rows_alone(monkeypatch):
    # Invented training entities (pools.Draw) make copying the only way to a right name: with the pools alone,
    # every training city is one of 30 and every first name one of 36, which the model learnt by heart. Inventing
    # must not move the shared random sequence, or the held-out rows would change with it.
    from finetune.demo_data.pools import TRAIN

    rows = [r["output"] for r in _rows("extraction_train.jsonl")]
    cities = {o["city"] for o in rows if o.get("city")} | {o["location"]["city"] for o in rows if "location" in o}
    firsts = {(o.get("name") or o.get("customer")).split()[0] for o in rows if o.get("name") or o.get("customer")}
    assert len(cities - set(TRAIN.cities)) >= 20 and len(firsts - set(TRAIN.first)) >= 40, (len(cities), len(firsts))
    invented = make_extraction_data.build_all()
    monkeypatch.setattr(make_extraction_data, "INVENT_P", 0.0)
    plain = make_extraction_data.build_all()
    for name in COUNTS:
        if name.endswith("_val.jsonl"):
            assert invented[name] == plain[name], f"{name} changed with the training rows' invented entities"
    assert invented["extraction_train.jsonl"] != plain["extraction_train.jsonl"]
