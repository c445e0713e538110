"""Generate the bundled demo data (written by us, no third-party text).

    python -m finetune.demo_data.make_demo_data      # rewrites the four .jsonl files beside this script

Seeded: rerunning produces byte-identical files. The data trains a 2-layer random-init toy model, so
the English is short and simple, and every structured target is copied from its input sentence.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 1234

FIRST = ["Maria", "John", "Aiko", "Omar", "Lena", "Carlos", "Priya", "Tom", "Sara", "Ivan", "Nia", "Paul"]
LAST = ["Lopez", "Smith", "Tanaka", "Haddad", "Berg", "Silva", "Rao", "Reed", "Costa", "Petrov", "Okafor", "Klein"]
CITIES = ["Lisbon", "Paris", "Tokyo", "Cairo", "Oslo", "Lima", "Delhi", "Boston", "Rome", "Kyiv", "Lagos", "Berlin"]
JOBS = ["nurse", "teacher", "baker", "pilot", "farmer", "driver", "chef", "writer", "doctor", "painter"]
ITEMS = ["blue mugs", "red pens", "green cups", "black hats", "white plates", "small boxes", "old books"]

PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "city": {"type": "string"},
        "job": {"type": "string"},
    },
    "required": ["name", "age", "city", "job"],
    "additionalProperties": False,
}
ORDER_SCHEMA = {
    "type": "object",
    "properties": {
        "order_id": {"type": "integer"},
        "item": {"type": "string"},
        "quantity": {"type": "integer"},
        "price": {"type": "integer"},
    },
    "required": ["order_id", "item", "quantity", "price"],
    "additionalProperties": False,
}

PERSON_SENTENCES = [
    "{name}, {age}, lives in {city} and works as a {job}.",
    "{name} is {age} years old, lives in {city} and is a {job}.",
    "Meet {name}: a {job} from {city}, age {age}.",
]
ORDER_SENTENCES = [
    "Order {order_id}: {quantity} {item} for {price} euros.",
    "Order number {order_id} is {quantity} {item} at {price} euros.",
]

SYSTEMS = ["You are a helpful assistant.", "You are a friendly assistant. Answer in one short sentence."]
COLORS = {"sky": "blue", "grass": "green", "snow": "white", "sun": "yellow", "coal": "black", "blood": "red"}
ANIMALS = {"dog": "bark", "cat": "meow", "cow": "moo", "duck": "quack", "lion": "roar", "sheep": "baa"}


def _person(rng: random.Random) -> dict:
    out = {"name": f"{rng.choice(FIRST)} {rng.choice(LAST)}", "age": rng.randint(18, 80),
           "city": rng.choice(CITIES), "job": rng.choice(JOBS)}
    return {"input": rng.choice(PERSON_SENTENCES).format(**out), "output": out, "schema": PERSON_SCHEMA}


def _order(rng: random.Random) -> dict:
    out = {"order_id": rng.randint(1000, 9999), "item": rng.choice(ITEMS),
           "quantity": rng.randint(1, 12), "price": rng.randint(2, 99)}
    return {"input": rng.choice(ORDER_SENTENCES).format(**out), "output": out, "schema": ORDER_SCHEMA}


def structured_rows(rng: random.Random, n: int) -> list[dict]:
    """Three person rows for every order row: two schema variants, one dominant."""
    return [_order(rng) if i % 4 == 3 else _person(rng) for i in range(n)]


def _single_turn(rng: random.Random) -> list[dict]:
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        return [{"role": "user", "content": f"What is {a} plus {b}?"},
                {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]
    if kind == 1:
        thing = rng.choice(sorted(COLORS))
        return [{"role": "user", "content": f"What color is the {thing}?"},
                {"role": "assistant", "content": f"The {thing} is {COLORS[thing]}."}]
    if kind == 2:
        animal = rng.choice(sorted(ANIMALS))
        return [{"role": "user", "content": f"What does a {animal} say?"},
                {"role": "assistant", "content": f"A {animal} says {ANIMALS[animal]}."}]
    city = rng.choice(CITIES)
    return [{"role": "user", "content": f"Say hello to {city}."},
            {"role": "assistant", "content": f"Hello, {city}!"}]


def _multi_turn(rng: random.Random) -> list[dict]:
    name, city = rng.choice(FIRST), rng.choice(CITIES)
    turns = [{"role": "user", "content": f"My name is {name}."},
             {"role": "assistant", "content": f"Nice to meet you, {name}."},
             {"role": "user", "content": "What is my name?"},
             {"role": "assistant", "content": f"Your name is {name}."}]
    if rng.random() < 0.5:
        turns += [{"role": "user", "content": f"I live in {city}. Where do I live?"},
                  {"role": "assistant", "content": f"You live in {city}."}]
    return turns


def instruct_rows(rng: random.Random, n: int) -> list[dict]:
    """One row in three is multi-turn (2-3 user turns); one in three starts with a system message."""
    rows = []
    for i in range(n):
        messages = _multi_turn(rng) if i % 3 == 2 else _single_turn(rng)
        if i % 3 == 0:
            messages = [{"role": "system", "content": rng.choice(SYSTEMS)}] + messages
        rows.append({"messages": messages})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(out_dir: Path = HERE) -> None:
    rng = random.Random(SEED)
    write_jsonl(out_dir / "instruct_train.jsonl", instruct_rows(rng, 48))
    write_jsonl(out_dir / "instruct_val.jsonl", instruct_rows(rng, 8))
    write_jsonl(out_dir / "structured_train.jsonl", structured_rows(rng, 64))
    write_jsonl(out_dir / "structured_val.jsonl", structured_rows(rng, 16))


if __name__ == "__main__":
    main()
