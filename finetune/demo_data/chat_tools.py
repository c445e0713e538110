"""Free-text chat rows and tool-calling rows of the main demo (see make_extraction_data.py).

Chat: short tasks whose one right answer follows from the prompt (reverse, sort, convert, capitalise), so
exact match and chrF on held-out rows measure the model, not its world knowledge.
Tools: OpenAI chat fine-tuning rows. Every row offers the same three functions in a shuffled order; the
assistant answers with `tool_calls` (content null) whose JSON `arguments` copy the user's values, then,
in about half the rows, a `tool` result and a final reply that restates it. One row in ten needs no tool.
"""
from __future__ import annotations

import json

from finetune.demo_data.pools import LANGS, Draw, num

# --- chat -----------------------------------------------------------------------------------------------

CHAT_SYSTEM = "You are a precise assistant. Reply with the result only."
SENTENCES = ("the {a} is next to the {b}", "we found a {a} under the {b}", "my {a} looks like a {b}",
             "a {a} and a {b} for dinner")


def _sentence(d: Draw) -> str:
    a, b = d.rng.sample(d.pool.words, 2)
    return d.pick(SENTENCES).format(a=a, b=b)


def _km(d: Draw) -> tuple[str, str]:
    km = d.fresh(lambda r: r.choice((r.randint(2, 60), r.randint(2, 60) + 0.5)))
    return f"Convert {num(km)} km to meters.", f"{int(km * 1000)} meters"


def _hours(d: Draw) -> tuple[str, str]:
    h = d.fresh(lambda r: r.randint(2, 48))
    return f"How many minutes are in {h} hours?", f"{h * 60} minutes"


def _add(d: Draw) -> tuple[str, str]:
    a, b = d.fresh(lambda r: r.randint(11, 99)), d.fresh(lambda r: r.randint(11, 99))
    return f"What is {a} + {b}? Reply with the number only.", str(a + b)


def _reverse(d: Draw) -> tuple[str, str]:
    w = d.rng.sample(d.pool.words, 4)
    return f"Reverse the order of these words: {' '.join(w)}", " ".join(reversed(w))


def _sort(d: Draw) -> tuple[str, str]:
    w = d.rng.sample(d.pool.words, 4)
    return f"Sort these words alphabetically: {', '.join(w)}", ", ".join(sorted(w))


def _hyphens(d: Draw) -> tuple[str, str]:
    w = d.rng.sample(d.pool.words, 3)
    return f"Join these words with hyphens: {' '.join(w)}", "-".join(w)


def _upper(d: Draw) -> tuple[str, str]:
    s = _sentence(d)
    return f"Write this sentence in capital letters: {s}", s.upper()


def _title(d: Draw) -> tuple[str, str]:
    s = _sentence(d)
    return f"Capitalise the first letter of every word: {s}", s.title()


CHAT_TASKS = (_reverse, _sort, _hyphens, _upper, _title, _km, _hours, _add)


def chat_rows(d: Draw, n: int) -> list[dict]:
    """Task kinds in turn; every fourth row has a system message."""
    rows = []
    for i in range(n):
        user, answer = CHAT_TASKS[i % len(CHAT_TASKS)](d)
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        if i % 4 == 0:
            messages.insert(0, {"role": "system", "content": CHAT_SYSTEM})
        rows.append({"messages": messages})
    return rows


# --- tools ----------------------------------------------------------------------------------------------

CURRENCIES = ("EUR", "USD", "GBP", "JPY", "CHF")
TO_EUR = {"EUR": 1.0, "USD": 0.92, "GBP": 1.17, "JPY": 0.0062, "CHF": 1.05}  # fixed demo rates, not real ones


def _tool(name: str, description: str, props: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": props, "required": required, "additionalProperties": False}}}


TOOLS = (
    _tool("get_weather", "Current weather in a city.",
          {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, ["city"]),
    _tool("convert_currency", "Convert an amount of money between currencies.",
          {"amount": {"type": "number"}, "from": {"type": "string", "enum": list(CURRENCIES)},
           "to": {"type": "string", "enum": list(CURRENCIES)}}, ["amount", "from", "to"]),
    _tool("book_table", "Book a restaurant table.",
          {"restaurant": {"type": "string"}, "party_size": {"type": "integer", "minimum": 1, "maximum": 20},
           "time": {"type": "string", "pattern": "^[0-2][0-9]:[0-5][0-9]$"}},
          ["restaurant", "party_size", "time"]),
)

CONDITIONS = {"en": ("sunny", "cloudy", "rainy", "windy"), "fr": ("ensoleillé", "nuageux", "pluvieux", "venteux"),
              "de": ("sonnig", "bewölkt", "regnerisch", "windig"), "es": ("soleado", "nublado", "lluvioso", "ventoso")}
WEATHER_ASK = {
    "en": (("What's the weather in {city}?", "How warm is it in {city} right now?", "Weather for {city}, please."),
           {"celsius": "In Celsius, please.", "fahrenheit": "Answer in Fahrenheit."}),
    "fr": (("Quel temps fait-il à {city} ?", "Il fait combien à {city} en ce moment ?"),
           {"celsius": "En degrés Celsius, merci.", "fahrenheit": "En Fahrenheit, s'il te plaît."}),
    "de": (("Wie ist das Wetter in {city}?", "Wie warm ist es gerade in {city}?"),
           {"celsius": "Bitte in Grad Celsius.", "fahrenheit": "Bitte in Fahrenheit."}),
    "es": (("¿Qué tiempo hace en {city}?", "¿Qué temperatura hay ahora en {city}?"),
           {"celsius": "En grados Celsius, por favor.", "fahrenheit": "En Fahrenheit, por favor."}),
}
WEATHER_REPLY = {"en": "It is {t} °{u} and {c} in {city}.", "fr": "Il fait {t} °{u} à {city}, temps {c}.",
                 "de": "In {city} sind es {t} °{u}, {c}.", "es": "En {city} hace {t} °{u}, {c}."}
CURRENCY_NAMES = {
    "en": {"EUR": "euros", "USD": "dollars", "GBP": "pounds", "JPY": "yen", "CHF": "Swiss francs"},
    "fr": {"EUR": "euros", "USD": "dollars", "GBP": "livres", "JPY": "yens", "CHF": "francs suisses"},
    "de": {"EUR": "Euro", "USD": "Dollar", "GBP": "Pfund", "JPY": "Yen", "CHF": "Franken"},
    "es": {"EUR": "euros", "USD": "dólares", "GBP": "libras", "JPY": "yenes", "CHF": "francos suizos"},
}
CONVERT_ASK = {"en": ("Convert {amount} {src} to {dst}.", "How much is {amount} {src} in {dst}?"),
               "fr": ("Convertis {amount} {src} en {dst}.", "Combien font {amount} {src} en {dst} ?"),
               "de": ("Rechne {amount} {src} in {dst} um.", "Wie viel sind {amount} {src} in {dst}?"),
               "es": ("Convierte {amount} {src} a {dst}.", "¿Cuánto son {amount} {src} en {dst}?")}
CONVERT_REPLY = {"en": "{amount} {src} is {result} {dst}.", "fr": "{amount} {src} font {result} {dst}.",
                 "de": "{amount} {src} sind {result} {dst}.", "es": "{amount} {src} son {result} {dst}."}
BOOK_ASK = {
    "en": ("Book a table for {n} at {restaurant} at {time}.", "Can you reserve {restaurant} for {n} people at {time}?",
           "We are {n}. Get us a table at {restaurant} for {time}, please."),
    "fr": ("Réserve une table pour {n} au restaurant {restaurant} à {time}.",
           "Peux-tu réserver {restaurant} pour {n} personnes à {time} ?"),
    "de": ("Reserviere einen Tisch für {n} Personen im {restaurant} um {time}.",
           "Kannst du im {restaurant} für {n} Leute um {time} buchen?"),
    "es": ("Reserva una mesa para {n} en {restaurant} a las {time}.",
           "¿Puedes reservar en {restaurant} para {n} personas a las {time}?"),
}
BOOK_REPLY = {"en": "Done: a table for {n} at {restaurant} at {time}, booking {ref}.",
              "fr": "C'est fait : table pour {n} au {restaurant} à {time}, réservation {ref}.",
              "de": "Erledigt: Tisch für {n} im {restaurant} um {time}, Buchung {ref}.",
              "es": "Listo: mesa para {n} en {restaurant} a las {time}, reserva {ref}."}
NO_TOOL = {"en": ("Thanks, that's all!", "You're welcome!"), "fr": ("Merci, c'est tout !", "Avec plaisir !"),
           "de": ("Danke, das war's!", "Gern geschehen!"), "es": ("¡Gracias, eso es todo!", "¡De nada!")}


def _weather(d: Draw, lang: str) -> tuple[str, dict, dict, str]:
    city, unit = d.pick(d.pool.cities), d.pick((None, None, "celsius", "fahrenheit"))
    asks, unit_words = WEATHER_ASK[lang]
    user = d.pick(asks).format(city=city) + (f" {unit_words[unit]}" if unit else "")
    args = {"city": city} | ({"unit": unit} if unit else {})
    t = d.rng.randint(40, 95) if unit == "fahrenheit" else d.rng.randint(-5, 35)
    i = d.rng.randrange(4)
    result = {"temperature": t, "unit": unit or "celsius", "condition": CONDITIONS["en"][i]}
    reply = WEATHER_REPLY[lang].format(t=t, u="F" if unit == "fahrenheit" else "C", c=CONDITIONS[lang][i], city=city)
    return user, args, result, reply


def _convert(d: Draw, lang: str) -> tuple[str, dict, dict, str]:
    src, dst = d.rng.sample(CURRENCIES, 2)
    amount = d.amount()
    names = CURRENCY_NAMES[lang] if d.chance(0.6) else {c: c for c in CURRENCIES}
    user = d.pick(CONVERT_ASK[lang]).format(amount=num(amount), src=names[src], dst=names[dst])
    converted = round(amount * TO_EUR[src] / TO_EUR[dst], 2)
    reply = CONVERT_REPLY[lang].format(amount=num(amount), src=src, result=num(converted), dst=dst)
    return user, {"amount": amount, "from": src, "to": dst}, {"amount": converted, "currency": dst}, reply


def _book(d: Draw, lang: str) -> tuple[str, dict, dict, str]:
    args = {"restaurant": d.pick(d.pool.restaurants), "party_size": d.rng.randint(2, 8), "time": d.time()}
    fields = {"n": args["party_size"], "restaurant": args["restaurant"], "time": args["time"]}
    ref = f"BK{d.rng.randint(1000, 9999)}"
    result = {"status": "confirmed", "booking_id": ref}
    return d.pick(BOOK_ASK[lang]).format(**fields), args, result, BOOK_REPLY[lang].format(ref=ref, **fields)


CALLS = {"get_weather": _weather, "convert_currency": _convert, "book_table": _book}


def tool_rows(d: Draw, n: int) -> list[dict]:
    """Per ten rows three calls of each tool, in turn, and one row that needs no tool."""
    kinds = [*CALLS, *CALLS, *CALLS, None]  # a short split still gets every tool
    rows = []
    for i in range(n):
        # shifting the language by one per round of ten gives every (kind, language) pair in 40 rows
        kind, lang = kinds[i % len(kinds)], LANGS[(i + i // len(kinds)) % len(LANGS)]
        tools = d.rng.sample(TOOLS, len(TOOLS))
        if kind is None:
            user, reply = NO_TOOL[lang]
            rows.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}],
                         "tools": tools})
            continue
        user, args, result, reply = CALLS[kind](d, lang)
        call_id = f"call_{i:03d}"
        messages = [{"role": "user", "content": user},
                    {"role": "assistant", "content": None, "tool_calls": [{"id": call_id, "type": "function",
                     "function": {"name": kind, "arguments": json.dumps(args, ensure_ascii=False)}}]}]
        if d.chance(0.5):
            messages += [{"role": "tool", "tool_call_id": call_id, "content": json.dumps(result, ensure_ascii=False)},
                         {"role": "assistant", "content": reply}]
        rows.append({"messages": messages, "tools": tools})
    return rows
