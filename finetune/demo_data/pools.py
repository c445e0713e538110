"""Entity pools and random draws of the main demo's data (see make_extraction_data.py).

Train and val pools share no word; `Draw.fresh` redraws a held-out value (id, phone, date, amount, time)
until none of its words occurs in a training value, so no held-out row can be answered from memory.
"""
from __future__ import annotations

import json
import random
import unicodedata
from dataclasses import dataclass
from typing import Any, Callable

LANGS = ("en", "fr", "de", "es")
PUNCT = ".,;:!?()[]\"'¡¿"


@dataclass(frozen=True)
class Pool:
    """Entity pools of one split; train and val share no word."""

    first: tuple[str, ...]
    last: tuple[str, ...]
    companies: tuple[tuple[str, str], ...]    # (name, e-mail domain)
    cities: tuple[str, ...]
    brands: tuple[str, ...]
    model_letters: str
    venues: tuple[str, ...]
    title_words: tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]
    minutes: tuple[int, ...]                  # times end in :00/:30 in train, :15/:45 in val
    restaurants: tuple[str, ...]
    words: tuple[str, ...]                    # chat tasks


TRAIN = Pool(
    first=("Lena", "Marco", "Sofía", "Lukas", "Camille", "Javier", "Amélie", "Tobias", "Lucía", "Hugo", "Elena",
           "Felix", "Chloé", "Diego", "Inès", "Jonas", "Clara", "Mateo", "Nora", "Pablo", "Emma", "Louis",
           "Carmen", "Max", "Julie", "Andrés", "Hanna", "Théo", "Marta", "Paul", "Alice", "Sergio", "Greta",
           "Victor", "Laura", "Jürgen"),
    last=("Berg", "Rossi", "Martin", "Schneider", "Dubois", "García", "Weber", "Lefèvre", "Fernández", "Keller",
          "Moreau", "López", "Fischer", "Bernard", "Navarro", "Wagner", "Laurent", "Romero", "Hoffmann", "Girard",
          "Ortiz", "Becker", "Roux", "Castillo", "Schulz", "Fontaine", "Vega", "Krause", "Mercier", "Herrera",
          "Braun", "Lambert", "Molina", "Vogel", "Chevalier", "Suárez"),
    companies=(("Nordwind GmbH", "nordwind.de"), ("Brightpath Ltd", "brightpath.co.uk"),
               ("Soleil Conseil", "soleil-conseil.fr"), ("Altamira Foods", "altamira.es"),
               ("Bluestone Labs", "bluestone.io"), ("Tannhaus AG", "tannhaus.de"), ("Cobalt Systems", "cobalt.com"),
               ("Vireo Software", "vireo.io"), ("Lumen Partners", "lumen.co.uk"), ("Eisenwerk Kraft", "eisenwerk.de"),
               ("Atelier Moulin", "moulin.fr"), ("Grupo Ribera", "ribera.es"), ("Fjord Logistics", "fjord.com"),
               ("Kestrel Media", "kestrel.co.uk"), ("Papeterie Dumas", "dumas.fr"),
               ("Sierra Verde SA", "sierraverde.es"),
               ("Hansa Digital", "hansa.de"), ("Oakridge Health", "oakridge.com"), ("Quill Analytics", "quill.io"),
               ("Marea Textil", "marea.es")),
    cities=("Lyon", "Hamburg", "Valencia", "Porto", "Munich", "Bordeaux", "Seville", "Zurich", "Leeds", "Graz",
            "Nantes", "Bilbao", "Cologne", "Toulouse", "Málaga", "Dublin", "Antwerp", "Geneva", "Bristol", "Leipzig",
            "Marseille", "Granada", "Vienna", "Lille", "Dresden", "Córdoba", "Bremen", "Zaragoza", "Glasgow", "Turin"),
    brands=("Aerolux", "Brisa", "Calyx", "Dunmore", "Everlite", "Fennec", "Glimmer", "Halcyon", "Ionis", "Jubilo",
            "Kairo", "Lumio"),
    model_letters="ABCDEFGHJK",
    venues=("Kesselhaus", "Palau Ribes", "Espace Corvin", "Tivoli Arena", "Rosengarten", "Teatro Alba",
            "Maison Verlaine", "Brickworks", "Sala Tercera", "Hangar Nord", "Kulturwerk", "Théâtre Bellevue",
            "Corn Exchange", "Auditorio Miramar", "Salle Rameau", "Lagerhalle"),
    title_words=(("Spring", "Midnight", "Golden", "Northern", "Harbor", "Urban", "Wild", "Blue"),
                 ("Jazz", "Code", "Film", "Design", "Poetry", "Startup", "Wine", "Robotics"),
                 ("Festival", "Night", "Summit", "Meetup", "Fair", "Gala")),
    minutes=(0, 30),
    restaurants=("Trattoria Sole", "Le Petit Zinc", "Casa Pepe", "Zum Hirschen", "Brasserie Octave", "Taberna Luna",
                 "Bistro Fauve", "Gasthaus Linde", "Osteria Mare", "Sushi Kaze", "La Cocotte", "El Faro"),
    words=("apple", "river", "window", "garden", "candle", "pencil", "mountain", "orange", "blanket", "bridge",
           "coffee", "rabbit", "silver", "forest", "ticket", "guitar", "lemon", "castle", "rocket", "pillow"),
)
VAL = Pool(
    first=("Ingrid", "Rafael", "Margot", "Dominik", "Beatriz", "Anouk", "Ulrich", "Ximena", "Quentin", "Leonor",
           "Henrik", "Solène", "Gonzalo", "Wiebke"),
    last=("Zimmermann", "Delacroix", "Villanueva", "Brandt", "Marchetti", "Quiroga", "Lindqvist", "Beaumont",
          "Echeverría", "Oberhauser", "Thibault", "Salcedo", "Rasmussen", "Okonkwo"),
    companies=(("Polaris BV", "polaris.nl"), ("Ardoise SARL", "ardoise.fr"), ("Kranich KG", "kranich.de"),
               ("Tesela SL", "tesela.es"), ("Harrow Inc", "harrow.com"), ("Brume Studio", "brume.fr"),
               ("Lichtblick Werke", "lichtblick.de"), ("Corriente Energía", "corriente.es")),
    cities=("Strasbourg", "Salamanca", "Innsbruck", "Rotterdam", "Montpellier", "Nuremberg", "Cádiz", "Aberdeen",
            "Bergen", "Ghent", "Lausanne", "Alicante", "Freiburg"),
    brands=("Nubra", "Orvano", "Pixelle", "Quenta", "Ravelle", "Sorrel", "Tavio", "Umbra"),
    model_letters="MNPRSTVWXZ",
    venues=("Glasshouse", "Quai Lumière", "Werkhalle Ost", "Pavillon Ardent", "Patio Nervión", "Speicherhof"),
    title_words=(("Autumn", "Crimson", "Velvet", "Coastal"), ("Cello", "Ceramics", "Chess", "Tango"),
                 ("Symposium", "Showcase", "Forum", "Jamboree")),
    minutes=(15, 45),
    restaurants=("Auberge Marius", "Ristorante Nuvola", "Wirtshaus Eiche", "Cantina Rayo", "Izakaya Hoshi"),
    words=("violin", "meadow", "lantern", "compass", "walnut", "glacier", "teapot", "falcon", "saddle", "marble"),
)


def value_tokens(value: Any) -> set[str]:
    """The words of a value as the disjointness rule sees them: whitespace-split, edge punctuation off, lowercased."""
    return {w.strip(PUNCT).lower() for w in str(value).split()} - {""}


# Invented entities for training rows. With only the pools above, the training rows repeat each of 36 first
# names about 8 times and each of 30 cities about 4 times: the tuned model learnt the pool and wrote pieces of
# it back on held-out rows ("Calypion Ardent" for "Crimson Cello Showcase", "Londoradam" for "Innsbruck",
# "Gonalo" for "Gonzalo"). A name made of random syllables occurs once, so copying it from the input is the
# only way to get it right. Measured effect: make_extraction_data.INVENT_P.
ONSETS = ("b", "br", "c", "ch", "d", "dr", "f", "g", "gr", "h", "j", "k", "kl", "l", "m", "n", "p", "pr", "qu",
          "r", "s", "st", "t", "tr", "v", "w", "z", "")
VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ie", "ou", "au")
ACCENTED = ("é", "è", "ü", "ö", "í", "á", "ó", "ä")  # one syllable in eight, as in the held-out names
CODAS = ("", "", "", "n", "r", "l", "s", "m", "rt", "nd", "ck", "x")
SUFFIXES = {  # the kind of entity -> endings that make it look like one (training words only)
    "last": ("", "", "", "mann", "ez", "ier", "sson", "elli", "berg", "ova"),
    "cities": ("", "", "burg", "ville", "ford", "stadt", "ona", "heim", "mont"),
    "venues": (" Hall", " Arena", " Loft", "haus"),
    "companies": (" GmbH", " Ltd", " Labs", " AG", " Systems", " Media", " SA", " Digital", " Partners"),
}
TLDS = (".de", ".fr", ".es", ".co.uk", ".com", ".io")


def invented_word(r: random.Random, syllables: tuple[int, int] = (1, 2)) -> str:
    word = "".join(r.choice(ONSETS) + r.choice(ACCENTED if r.random() < 0.125 else VOWELS) + r.choice(CODAS)
                   for _ in range(r.randint(*syllables)))
    return word[:1].upper() + word[1:]


class Draw:
    """Random choices of one split; `fresh` values never share a word with `avoid` (the training values).

    With `invent` (a second generator, training only), `pick` replaces a first name, last name, city, brand,
    venue, company or title word by an invented one (invented_word) with probability `invent_p`. The pool value
    is drawn from `rng` first in either case, so `rng` runs the same sequence with or without inventing and the
    held-out rows drawn after the training rows stay the same. Invented words never equal a word of `exclude`
    (the held-out pools).
    """

    def __init__(self, rng: random.Random, pool: Pool, avoid: frozenset[str] = frozenset(),
                 invent: random.Random | None = None, invent_p: float = 0.0, exclude: frozenset[str] = frozenset()):
        self.rng, self.pool, self.avoid, self.used = rng, pool, avoid, set()
        self.invent, self.invent_p, self.exclude = invent, invent_p, exclude
        kinds = [("first", pool.first), ("last", pool.last), ("cities", pool.cities), ("brands", pool.brands),
                 ("venues", pool.venues), ("companies", pool.companies), *(("title", w) for w in pool.title_words)]
        self._kinds = {id(seq): kind for kind, seq in kinds}

    def _invented(self, kind: str) -> Any:
        r = self.invent
        for _ in range(1000):
            stem = invented_word(r, (2, 3) if kind in ("last", "cities") else (1, 2))
            if kind in SUFFIXES:
                stem += r.choice(SUFFIXES[kind])
            if value_tokens(stem) & self.exclude:
                continue
            if kind == "companies":  # (name, e-mail domain)
                return stem, ascii_lower(stem.split()[0]) + r.choice(TLDS)
            return stem
        raise RuntimeError(f"could not invent a {kind} that avoids the held-out words")

    def pick(self, seq: Any) -> Any:
        drawn = self.rng.choice(seq)
        kind = self._kinds.get(id(seq))
        if self.invent is not None and kind is not None and self.invent.random() < self.invent_p:
            return self._invented(kind)
        return drawn

    def fresh(self, make: Callable[[random.Random], Any]) -> Any:
        for _ in range(10_000):
            value = make(self.rng)
            words = value_tokens(value)
            if not words & self.avoid:
                self.used |= words
                return value
        raise RuntimeError("could not draw a held-out value disjoint from training; widen the value range")

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def name(self) -> str:
        return f"{self.pick(self.pool.first)} {self.pick(self.pool.last)}"

    def product(self) -> str:
        code = f"{self.pick(self.pool.model_letters)}{self.pick((2, 3, 4, 5, 7, 8, 9, 10, 20, 40, 60, 80))}"
        return f"{self.pick(self.pool.brands)} {code}"

    def time(self) -> str:
        return self.fresh(lambda r: f"{r.randint(9, 22):02d}:{r.choice(self.pool.minutes):02d}")

    def date(self) -> str:
        return self.fresh(lambda r: f"{r.randint(2024, 2026)}-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}")

    def amount(self) -> int | float:
        # round(): 10 + 0.95 is 10.950000000000001 in binary floating point
        return self.fresh(lambda r: round(r.randint(10, 990) + r.choice((0, 0, 0.5, 0.25, 0.95, 0.99)), 2))

    def order_ref(self) -> str:
        return self.fresh(lambda r: r.choice((f"{r.choice('ABKRZ')}-{r.randint(10000, 99999)}",
                                              f"{r.choice(('OR', 'PO', 'WB'))}{r.randint(100000, 999999)}")))


def num(x: int | float) -> str:
    """A number exactly as the JSON target spells it, so the input shows the same characters."""
    return json.dumps(x)


def ascii_lower(s: str) -> str:
    return unicodedata.normalize("NFKD", s).encode("ascii", "ignore").decode().lower()


def pool_words(pool: Pool) -> set[str]:
    """Every word of a split's named entities."""
    words: set[str] = set()
    for seq in (pool.first, pool.last, pool.cities, pool.brands, pool.venues, pool.restaurants, pool.words,
                [c for c, _ in pool.companies], *pool.title_words):
        for item in seq:
            words |= value_tokens(item)
    return words
