"""The five extraction schemas of the main demo and the multilingual texts their rows are written from.

Each builder returns (input text, target). Target strings are substrings of the input; enums and booleans
follow fixed cue phrases per language; a nullable field the text does not mention is null. Layouts vary
between a labelled card and prose whose optional clauses are shuffled and sometimes left out.
"""
from __future__ import annotations

from finetune.demo_data.pools import LANGS, Draw, ascii_lower, num


def _string(maxlen: int) -> dict:
    return {"type": "string", "maxLength": maxlen}


def _nullable(maxlen: int) -> dict:
    return {"type": ["string", "null"], "maxLength": maxlen}


def _obj(props: dict) -> dict:
    # Every key required, no extras: one spelling per answer. The bounds (maxLength, maxItems, maximum)
    # let schema-constrained decoding always terminate.
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


SCHEMAS = {
    "contact": _obj({"name": _string(40), "company": _nullable(40), "email": _nullable(60),
                     "phone": _nullable(20), "city": _nullable(30)}),
    "order": _obj({"order_id": _string(12), "customer": _string(40),
                   "items": {"type": "array", "minItems": 1, "maxItems": 2, "items": _obj(
                       {"product": _string(30), "quantity": {"type": "integer", "minimum": 1, "maximum": 99}})},
                   "total": {"type": "number", "minimum": 0}, "currency": {"enum": ["EUR", "USD", "GBP"]}}),
    "event": _obj({"title": _string(60), "date": _string(10), "time": _nullable(5),
                   "location": _obj({"venue": _string(40), "city": _string(30)})}),
    "ticket": _obj({"customer": _string(40), "product": _string(30),
                    "category": {"enum": ["billing", "technical", "shipping", "account"]},
                    "priority": {"enum": ["low", "medium", "high"]}, "order_ref": _nullable(12)}),
    "review": _obj({"product": _string(30), "rating": {"type": "integer", "minimum": 1, "maximum": 5},
                    "reviewer": _nullable(40), "recommend": {"type": ["boolean", "null"]}}),
}

DISTRACTORS = {
    "en": ("Thanks in advance!", "Sent from my phone.", "Hope you are well.", "Have a nice weekend.",
           "Sorry for the late reply."),
    "fr": ("Merci d'avance !", "Envoyé depuis mon téléphone.", "J'espère que vous allez bien.", "Bon week-end !",
           "Désolé pour le retard."),
    "de": ("Vielen Dank im Voraus!", "Von meinem Handy gesendet.", "Ich hoffe, es geht Ihnen gut.",
           "Schönes Wochenende!", "Entschuldigung für die späte Antwort."),
    "es": ("¡Gracias de antemano!", "Enviado desde mi móvil.", "Espero que estés bien.", "¡Buen fin de semana!",
           "Perdón por la respuesta tardía."),
}

# --- contact card ---------------------------------------------------------------------------------------

CARD_LABELS = {  # name, company, email, phone, city
    "en": ("Name", "Company", "Email", "Phone", "City"), "fr": ("Nom", "Société", "E-mail", "Tél.", "Ville"),
    "de": ("Name", "Firma", "E-Mail", "Telefon", "Ort"), "es": ("Nombre", "Empresa", "Correo", "Teléfono", "Ciudad"),
}
CONTACT_FIRST_PERSON = {
    "en": {"intro": ("Hi, I'm {name}.", "Hello, this is {name}.", "My name is {name}."),
           "intro_company": ("Hi, I'm {name} from {company}.", "This is {name} at {company}."),
           "company": ("I work at {company}.", "I'm with {company}."),
           "email": ("My email is {email} if you need it.", "Write to me at {email} anytime."),
           "phone": ("My number is {phone} during the day.", "Call me on {phone} if easier."),
           "city": ("I'm based in {city}.", "I live in {city}.")},
    "fr": {"intro": ("Bonjour, je suis {name}.", "Je m'appelle {name}."),
           "intro_company": ("Bonjour, ici {name} de {company}.", "Je suis {name}, de chez {company}."),
           "company": ("Je travaille chez {company}.",),
           "email": ("Mon e-mail : {email} si besoin.", "Écrivez-moi à {email} quand vous voulez."),
           "phone": ("Mon numéro : {phone} en journée.", "Appelez-moi au {phone} si besoin."),
           "city": ("J'habite à {city}.", "Je suis basé à {city}.")},
    "de": {"intro": ("Hallo, ich bin {name}.", "Mein Name ist {name}."),
           "intro_company": ("Hallo, hier ist {name} von {company}.", "Ich bin {name} bei {company}."),
           "company": ("Ich arbeite bei {company}.",),
           "email": ("Meine E-Mail: {email} bei Bedarf.", "Schreiben Sie mir an {email} jederzeit."),
           "phone": ("Rufen Sie mich unter {phone} an.", "Meine Nummer ist {phone} tagsüber."),
           "city": ("Ich wohne in {city}.", "Ich sitze in {city}.")},
    "es": {"intro": ("Hola, soy {name}.", "Me llamo {name}."),
           "intro_company": ("Hola, soy {name} de {company}.", "Te escribe {name}, de {company}."),
           "company": ("Trabajo en {company}.",),
           "email": ("Mi correo es {email} por si acaso.", "Escríbeme a {email} cuando quieras."),
           "phone": ("Mi número es {phone} de día.", "Llámame al {phone} si prefieres."),
           "city": ("Vivo en {city}.", "Estoy en {city}.")},
}
CONTACT_THIRD_PERSON = {
    "en": {"intro": ("New contact: {name}.", "Please save the details of {name}.", "{name} called us today."),
           "company": ("Company: {company}.", "Works for {company}."),
           "email": ("Email address: {email} (work).", "Reachable at {email} on weekdays."),
           "phone": ("Phone: {phone} (mobile).", "Mobile {phone} after 9."),
           "city": ("Based in {city}.", "Location: {city}.")},
    "fr": {"intro": ("Nouveau contact : {name}.", "Merci d'enregistrer les coordonnées de {name}."),
           "company": ("Société : {company}.", "Travaille chez {company}."),
           "email": ("Adresse e-mail : {email} (pro).",),
           "phone": ("Téléphone : {phone} (portable).", "Portable {phone} après 9h."),
           "city": ("Ville : {city}.", "Basé à {city}.")},
    "de": {"intro": ("Neuer Kontakt: {name}.", "Bitte die Daten von {name} speichern."),
           "company": ("Firma: {company}.", "Arbeitet bei {company}."),
           "email": ("E-Mail-Adresse: {email} (dienstlich).",),
           "phone": ("Telefon: {phone} (mobil).", "Mobil {phone} ab 9 Uhr."),
           "city": ("Wohnort: {city}.", "Sitz in {city}.")},
    "es": {"intro": ("Nuevo contacto: {name}.", "Por favor, guarda los datos de {name}."),
           "company": ("Empresa: {company}.", "Trabaja en {company}."),
           "email": ("Correo: {email} (trabajo).",),
           "phone": ("Teléfono: {phone} (móvil).", "Móvil {phone} desde las 9."),
           "city": ("Ciudad: {city}.", "Con sede en {city}.")},
}
WEBMAIL = {"en": "outlook.com", "fr": "orange.fr", "de": "gmx.net", "es": "yahoo.es"}


def _digits(r, n: int, first: str = "") -> str:
    return first + "".join(str(r.randint(0, 9)) for _ in range(n - len(first)))


PHONE_FORMATS = {  # one word each (no spaces), as people write them in each country
    "en": lambda r: r.choice((f"+44{_digits(r, 10, '7')}", f"{_digits(r, 5, '07')}-{_digits(r, 6)}")),
    "fr": lambda r: r.choice((f"+33{_digits(r, 9, '6')}",
                              ".".join([_digits(r, 2, "0" + r.choice("67"))] + [_digits(r, 2) for _ in range(4)]))),
    "de": lambda r: r.choice((f"+49{_digits(r, 10, '1')}", f"{_digits(r, 4, '01' + r.choice('567'))}/{_digits(r, 7)}")),
    "es": lambda r: r.choice((f"+34{_digits(r, 9, '6')}", f"{_digits(r, 3, '6')}-{_digits(r, 3)}-{_digits(r, 3)}")),
}


def build_contact(d: Draw, lang: str) -> tuple[str, dict]:
    first, last = d.pick(d.pool.first), d.pick(d.pool.last)
    company, domain = d.pick(d.pool.companies)
    v = {"name": f"{first} {last}", "company": company if d.chance(0.75) else None}
    if d.chance(0.7):
        given, family = ascii_lower(first), ascii_lower(last)
        local = f"{given}.{family}" if d.chance(0.6) else f"{given[0]}{family}"
        v["email"] = f"{local}@{domain if v['company'] else WEBMAIL[lang]}"
    else:
        v["email"] = None
    v["phone"] = d.fresh(PHONE_FORMATS[lang]) if d.chance(0.6) else None
    v["city"] = d.pick(d.pool.cities) if d.chance(0.6) else None
    optional = [k for k in ("company", "email", "phone", "city") if v[k] is not None]
    style = d.rng.random()
    if style < 0.3:
        labels = dict(zip(("name", "company", "email", "phone", "city"), CARD_LABELS[lang]))
        keys = ["name"] + optional
        if d.chance(0.3):
            d.rng.shuffle(keys)
        text = "\n".join(f"{labels[k]}: {v[k]}" for k in keys)
    else:
        phrases = (CONTACT_FIRST_PERSON if style < 0.65 else CONTACT_THIRD_PERSON)[lang]
        if "intro_company" in phrases and v["company"] and d.chance(0.5):
            clauses, optional = [d.pick(phrases["intro_company"])], optional[1:]
        else:
            clauses = [d.pick(phrases["intro"])]
        d.rng.shuffle(optional)
        clauses += [d.pick(phrases[k]) for k in optional]
        text = " ".join(clauses).format(**v)
    return text, v


# --- order with line items ------------------------------------------------------------------------------

CURRENCY_WORDS = {
    "en": {"EUR": ("EUR", "euros"), "USD": ("USD", "dollars"), "GBP": ("GBP", "pounds")},
    "fr": {"EUR": ("EUR", "euros", "€"), "USD": ("USD", "dollars", "$"), "GBP": ("GBP", "livres sterling", "£")},
    "de": {"EUR": ("EUR", "Euro", "€"), "USD": ("USD", "Dollar", "$"), "GBP": ("GBP", "Pfund", "£")},
    "es": {"EUR": ("EUR", "euros", "€"), "USD": ("USD", "dólares", "$"), "GBP": ("GBP", "libras", "£")},
}
SYMBOL_FIRST = {"EUR": "€", "USD": "$", "GBP": "£"}  # English writes the symbol before the amount
ITEM_FORMATS = {
    "en": ("{q} x {p}", "{q}x {p}", "{p} (qty {q})"), "fr": ("{q} x {p}", "{p} (quantité {q})"),
    "de": ("{q} x {p}", "{q} Stück {p}"), "es": ("{q} x {p}", "{p} (cantidad {q})"),
}
AND = {"en": " and ", "fr": " et ", "de": " und ", "es": " y "}
ORDER_TEMPLATES = {
    "en": ("Order {id} from {customer}: {items}. Total: {total}.",
           "Hi, this is {customer}. I'd like to confirm order {id}: {items}, {total} in total.",
           "{customer} placed order {id} for {items}. Amount due: {total}.",
           "Order no.: {id}\nCustomer: {customer}\nItems: {items}\nTotal: {total}"),
    "fr": ("Commande {id} de {customer} : {items}. Total : {total}.",
           "Bonjour, ici {customer}. Je confirme la commande {id} : {items}, soit {total} au total.",
           "Commande n° {id}\nClient : {customer}\nArticles : {items}\nMontant : {total}"),
    "de": ("Bestellung {id} von {customer}: {items}. Gesamt: {total}.",
           "Hallo, hier ist {customer}. Ich bestätige die Bestellung {id}: {items}, insgesamt {total}.",
           "Bestellnr.: {id}\nKunde: {customer}\nArtikel: {items}\nSumme: {total}"),
    "es": ("Pedido {id} de {customer}: {items}. Total: {total}.",
           "Hola, soy {customer}. Confirmo el pedido {id}: {items}, {total} en total.",
           "N.º de pedido: {id}\nCliente: {customer}\nArtículos: {items}\nImporte: {total}"),
}


def build_order(d: Draw, lang: str) -> tuple[str, dict]:
    products: list[str] = []
    while len(products) < d.pick((1, 2, 2)):  # three items would take the target past 80 tokens
        p = d.product()
        if p not in products:
            products.append(p)
    items = [{"product": p, "quantity": d.rng.randint(1, 5)} for p in products]
    v = {"order_id": d.order_ref(), "customer": d.name(), "items": items, "total": d.amount(),
         "currency": d.pick(("EUR", "USD", "GBP"))}
    shown = [d.pick(ITEM_FORMATS[lang]).format(q=i["quantity"], p=i["product"]) for i in items]
    items_text = shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + AND[lang] + shown[-1]
    if lang == "en" and d.chance(0.4):
        total = f"{SYMBOL_FIRST[v['currency']]}{num(v['total'])}"
    else:
        total = f"{num(v['total'])} {d.pick(CURRENCY_WORDS[lang][v['currency']])}"
    text = d.pick(ORDER_TEMPLATES[lang]).format(id=v["order_id"], customer=v["customer"], items=items_text,
                                                 total=total)
    return text, v


# --- event with a nested location -----------------------------------------------------------------------

EVENT_TEMPLATES = {  # with a time, then without one
    "en": (("Join us for the {title} on {date} at {time}, {venue}, {city}.",
            "Save the date: {date}, {time} - {title} at {venue} ({city}).",
            "Event: {title}\nDate: {date}\nTime: {time}\nVenue: {venue}\nCity: {city}"),
           ("The {title} will take place at {venue} in {city} on {date}.",
            "{city}, {venue}: the {title} opens its doors on {date}.")),
    "fr": (("Rejoignez-nous pour le {title} le {date} à {time}, {venue}, {city}.",
            "À noter : {date}, {time} - {title} à {venue} ({city}).",
            "Événement : {title}\nDate : {date}\nHeure : {time}\nLieu : {venue}\nVille : {city}"),
           ("Le {title} aura lieu à {venue}, à {city}, le {date}.",
            "{city}, {venue} : le {title} ouvre ses portes le {date}.")),
    "de": (("Besuchen Sie das {title} am {date} um {time} im {venue} in {city}.",
            "Termin vormerken: {date}, {time} - {title} im {venue} ({city}).",
            "Veranstaltung: {title}\nDatum: {date}\nUhrzeit: {time}\nOrt: {venue}\nStadt: {city}"),
           ("Das {title} findet am {date} in {city} statt, Ort: {venue}.",
            "{city}, {venue}: Das {title} öffnet am {date}.")),
    "es": (("Acompáñanos en el {title} el {date} a las {time} en {venue}, {city}.",
            "Apunta la fecha: {date}, {time} - {title} en {venue} ({city}).",
            "Evento: {title}\nFecha: {date}\nHora: {time}\nLugar: {venue}\nCiudad: {city}"),
           ("El {title} se celebrará en {venue} ({city}) el {date}.",
            "{city}, {venue}: el {title} abre sus puertas el {date}.")),
}


def build_event(d: Draw, lang: str) -> tuple[str, dict]:
    adj, noun, kind = (d.pick(words) for words in d.pool.title_words)
    v = {"title": f"{adj} {noun} {kind}", "date": d.date(), "time": d.time() if d.chance(0.7) else None,
         "location": {"venue": d.pick(d.pool.venues), "city": d.pick(d.pool.cities)}}
    with_time, without = EVENT_TEMPLATES[lang]
    template = d.pick(with_time if v["time"] else without)
    return template.format(title=v["title"], date=v["date"], time=v["time"], **v["location"]), v


# --- support ticket -------------------------------------------------------------------------------------

PROBLEMS = {  # category -> what went wrong, by language
    "en": {"billing": ("I was charged twice for my {product}.", "The invoice for my {product} shows the wrong amount."),
           "technical": ("My {product} keeps restarting.", "The {product} won't turn on anymore."),
           "shipping": ("My {product} still hasn't arrived.", "The {product} was delivered to the wrong address."),
           "account": ("I can't log in to the account I registered my {product} with.",
                       "Please reset my password, I need it to register my {product}.")},
    "fr": {"billing": ("J'ai été débité deux fois pour mon {product}.", "La facture de mon {product} est fausse."),
           "technical": ("Mon {product} redémarre sans arrêt.", "Le {product} ne s'allume plus."),
           "shipping": ("Mon {product} n'est toujours pas arrivé.",
                        "Le {product} a été livré à la mauvaise adresse."),
           "account": ("Je n'arrive plus à me connecter au compte de mon {product}.",
                       "Merci de réinitialiser mon mot de passe pour enregistrer mon {product}.")},
    "de": {"billing": ("Mir wurde der {product} doppelt berechnet.", "Die Rechnung für meinen {product} ist falsch."),
           "technical": ("Mein {product} startet ständig neu.", "Der {product} lässt sich nicht mehr einschalten."),
           "shipping": ("Mein {product} ist immer noch nicht angekommen.",
                        "Der {product} wurde an die falsche Adresse geliefert."),
           "account": ("Ich kann mich nicht in das Konto einloggen, mit dem ich den {product} registriert habe.",
                       "Bitte setzen Sie mein Passwort zurück, ich will meinen {product} registrieren.")},
    "es": {"billing": ("Me cobraron dos veces el {product}.",
                       "La factura de mi {product} tiene un importe incorrecto."),
           "technical": ("Mi {product} se reinicia todo el rato.", "El {product} ya no enciende."),
           "shipping": ("Mi {product} todavía no ha llegado.",
                        "El {product} se entregó en una dirección equivocada."),
           "account": ("No puedo entrar en la cuenta con la que registré mi {product}.",
                       "Por favor, restablezcan mi contraseña para registrar mi {product}.")},
}
PRIORITY_CUES = {
    "en": {"high": ("This is urgent!", "Please help ASAP."), "medium": ("Please look into it this week.",),
           "low": ("No rush.", "Whenever you have time.")},
    "fr": {"high": ("C'est urgent !", "Aidez-moi au plus vite."), "medium": ("Merci de regarder cette semaine.",),
           "low": ("Ce n'est pas pressé.", "Quand vous aurez le temps.")},
    "de": {"high": ("Das ist dringend!", "Bitte schnell helfen."), "medium": ("Bitte diese Woche prüfen.",),
           "low": ("Keine Eile.", "Wenn Sie Zeit haben.")},
    "es": {"high": ("¡Es urgente!", "Ayuda lo antes posible, por favor."),
           "medium": ("Por favor, revísenlo esta semana.",), "low": ("Sin prisa.", "Cuando tengan tiempo.")},
}
TICKET_PARTS = {  # name in a greeting, in a header line, in a signature line; order reference
    "en": ("Hello, this is {customer}.", "From: {customer}", ("Regards, {customer}", "- {customer}"),
           ("Order {ref}.", "My order number is {ref}.")),
    "fr": ("Bonjour, ici {customer}.", "De : {customer}", ("Cordialement, {customer}", "- {customer}"),
           ("Commande {ref}.", "Mon numéro de commande est {ref}.")),
    "de": ("Hallo, hier ist {customer}.", "Von: {customer}", ("Viele Grüße, {customer}", "- {customer}"),
           ("Bestellung {ref}.", "Meine Bestellnummer ist {ref}.")),
    "es": ("Hola, soy {customer}.", "De: {customer}", ("Saludos, {customer}", "- {customer}"),
           ("Pedido {ref}.", "Mi número de pedido es {ref}.")),
}


def build_ticket(d: Draw, lang: str) -> tuple[str, dict]:
    v = {"customer": d.name(), "product": d.product(),
         "category": d.pick(("billing", "technical", "shipping", "account")),
         "priority": d.pick(("low", "medium", "high")), "order_ref": d.order_ref() if d.chance(0.6) else None}
    greeting, header, signatures, refs = TICKET_PARTS[lang]
    body = [d.pick(PROBLEMS[lang][v["category"]]), d.pick(PRIORITY_CUES[lang][v["priority"]])]
    if v["order_ref"]:
        body.insert(d.rng.randint(0, 2), d.pick(refs))
    text = " ".join(body)
    where = d.rng.randrange(3)
    if where == 0:
        text = f"{greeting} {text}"
    elif where == 1:
        text = f"{header}\n{text}"
    else:
        text = f"{text}\n{d.pick(signatures)}"
    return text.format(customer=v["customer"], product=v["product"], ref=v["order_ref"]), v


# --- product review -------------------------------------------------------------------------------------

RATING_FORMATS = {"en": ("{r}/5", "{r} out of 5", "Rating: {r}/5"), "fr": ("{r}/5", "{r} sur 5", "Note : {r}/5"),
                  "de": ("{r}/5", "{r} von 5", "Bewertung: {r}/5"), "es": ("{r}/5", "{r} de 5", "Nota: {r}/5")}
REVIEW_COMMENTS = {  # positive, negative
    "en": (("Works great and looks nice.", "Does exactly what it should."),
           ("Broke after a week.", "Cheap build quality.")),
    "fr": (("Fonctionne très bien.", "Fait exactement ce qu'il faut."),
           ("Cassé au bout d'une semaine.", "Finition bon marché.")),
    "de": (("Funktioniert super.", "Macht genau, was es soll."), ("Nach einer Woche kaputt.", "Billige Verarbeitung.")),
    "es": (("Funciona genial.", "Hace justo lo que debe."), ("Se rompió en una semana.", "Acabado de mala calidad.")),
}
RECOMMEND_CUES = {
    "en": {True: ("I would recommend it.", "Highly recommended."),
           False: ("I would not recommend it.", "Not recommended.")},
    "fr": {True: ("Je le recommande.", "À recommander."), False: ("Je ne le recommande pas.", "À éviter.")},
    "de": {True: ("Ich empfehle es weiter.", "Klare Empfehlung."),
           False: ("Ich kann es nicht empfehlen.", "Keine Empfehlung.")},
    "es": {True: ("Lo recomiendo.", "Muy recomendable."), False: ("No lo recomiendo.", "No es recomendable.")},
}
REVIEWER = {  # named (before the text, after it), anonymous
    "en": (("{reviewer} wrote:", "Review by {reviewer}:"), "- {reviewer}", "Anonymous review."),
    "fr": (("{reviewer} a écrit :", "Avis de {reviewer} :"), "- {reviewer}", "Avis anonyme."),
    "de": (("{reviewer} schrieb:", "Bewertung von {reviewer}:"), "- {reviewer}", "Anonyme Bewertung."),
    "es": (("{reviewer} escribió:", "Reseña de {reviewer}:"), "- {reviewer}", "Reseña anónima."),
}


def build_review(d: Draw, lang: str) -> tuple[str, dict]:
    rating = d.rng.randint(1, 5)
    # recommend follows the rating when the text says it at all: never a "5/5 ... not recommended" row
    recommend = None
    if rating != 3 and d.chance(0.6):
        recommend = rating >= 4
    v = {"product": d.product(), "rating": rating, "reviewer": d.name() if d.chance(0.65) else None,
         "recommend": recommend}
    positive, negative = REVIEW_COMMENTS[lang]
    parts = [f"{v['product']}: {d.pick(RATING_FORMATS[lang]).format(r=rating)}.",
             d.pick(positive if rating >= 3 else negative)]
    if recommend is not None:
        parts.append(d.pick(RECOMMEND_CUES[lang][recommend]))
    before, after, anonymous = REVIEWER[lang]
    if v["reviewer"] and d.chance(0.5):
        parts.insert(0, d.pick(before).format(reviewer=v["reviewer"]))
    elif v["reviewer"]:
        return " ".join(parts) + "\n" + after.format(reviewer=v["reviewer"]), v
    elif d.chance(0.5):
        parts.insert(0, anonymous)
    return " ".join(parts), v


BUILDERS = {"contact": build_contact, "order": build_order, "event": build_event, "ticket": build_ticket,
            "review": build_review}


def extraction_rows(d: Draw, n: int) -> list[dict]:
    """Schema cycles fastest, then language, so every (schema, language) pair gets n / 20 rows."""
    kinds = list(BUILDERS)
    rows = []
    for i in range(n):
        kind, lang = kinds[i % len(kinds)], LANGS[(i // len(kinds)) % len(LANGS)]
        text, output = BUILDERS[kind](d, lang)
        if d.chance(0.35):
            extra = d.pick(DISTRACTORS[lang])
            sep = "\n" if "\n" in text else " "  # a card or header layout keeps one item per line
            text = f"{extra}{sep}{text}" if d.chance(0.5) else f"{text}\n{extra}"
        rows.append({"input": text, "output": output, "schema": SCHEMAS[kind], "lang": lang})
    return rows
