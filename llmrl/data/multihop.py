"""A generated knowledge base of fictional facts, and multi-hop questions over it: the built-in
agent task, runnable on a CPU with no download.

The world (fixed seed, so every machine builds the same one) has people, cities, countries and
companies with invented names. Each entity has one short document:
    "Person Arlo Venn was born in the city of Quessa and works for the company Dorvik Mills."
    "The city of Quessa lies in the country of Taluria."
    "The company Dorvik Mills was founded by Sela Orrin and is based in the city of Brem."
A question names a person and needs two lookups: the person's document gives a city or a company,
whose own document holds the answer. The names are invented, so a model cannot answer from memory.
People 0-239 ask the training questions and 240-299 the held-out ones, so held-out questions are
about people never seen in training (their cities and companies are shared).
Every task carries a demonstration of the search protocol (`expert_turns`) for warm starts.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

WORLD_SEED = 20261202
NUM_PEOPLE, NUM_CITIES, NUM_COUNTRIES, NUM_COMPANIES = 300, 40, 12, 40
TRAIN_PEOPLE = 240  # the rest are held out
QUESTION_KINDS = ("country_of_birth", "founder_of_employer", "city_of_employer")

_ONSETS = ["b", "br", "d", "dr", "f", "g", "k", "kr", "l", "m", "n", "p", "qu", "r", "s", "t", "th", "v", "z", "h", "j", "w"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou"]
_CODAS = ["", "n", "r", "l", "s", "th", "m", "x", "v", "nd", "rk"]


@dataclass(frozen=True)
class World:
    people: list[tuple[str, int, int]]  # name, birth city, employer
    cities: list[tuple[str, int]]  # name, country
    countries: list[str]
    companies: list[tuple[str, int, int]]  # name, founder (a person), base city


def _words(rng: random.Random, count: int, taken: set[str]) -> list[str]:
    out = []
    while len(out) < count:
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(rng.choice((2, 2, 3)))).capitalize()
        if word not in taken and 4 <= len(word) <= 10:
            taken.add(word)
            out.append(word)
    return out


@lru_cache(maxsize=1)
def build_world() -> World:
    rng = random.Random(WORLD_SEED)
    taken: set[str] = set()
    firsts, lasts = _words(rng, NUM_PEOPLE, taken), _words(rng, NUM_PEOPLE, taken)
    city_names = _words(rng, NUM_CITIES, taken)
    countries = _words(rng, NUM_COUNTRIES, taken)
    company_words = _words(rng, NUM_COMPANIES, taken)
    suffixes = ["Mills", "Works", "Labs", "Foundry", "Trading", "Press", "Studios", "Freight"]
    cities = [(name, rng.randrange(NUM_COUNTRIES)) for name in city_names]
    companies = [(f"{word} {rng.choice(suffixes)}", rng.randrange(NUM_PEOPLE), rng.randrange(NUM_CITIES)) for word in company_words]
    people = [(f"{f} {l}", rng.randrange(NUM_CITIES), rng.randrange(NUM_COMPANIES)) for f, l in zip(firsts, lasts)]
    return World(people, cities, countries, companies)


def person_doc(world: World, i: int) -> str:
    name, city, company = world.people[i]
    return f"Person {name} was born in the city of {world.cities[city][0]} and works for the company {world.companies[company][0]}."


def city_doc(world: World, i: int) -> str:
    name, country = world.cities[i]
    return f"The city of {name} lies in the country of {world.countries[country]}."


def company_doc(world: World, i: int) -> str:
    name, founder, city = world.companies[i]
    return f"The company {name} was founded by {world.people[founder][0]} and is based in the city of {world.cities[city][0]}."


def corpus_documents() -> list[str]:
    """Every document of the world, one per entity (the `multihop` search corpus)."""
    world = build_world()
    return (
        [person_doc(world, i) for i in range(NUM_PEOPLE)]
        + [city_doc(world, i) for i in range(NUM_CITIES)]
        + [company_doc(world, i) for i in range(NUM_COMPANIES)]
    )


def _question(world: World, person: int, kind: str) -> tuple[str, str, list[tuple[str, str]]]:
    """(question, answer, demonstration): the demonstration alternates the agent's searches with
    the documents a search returns, ending in the answer."""
    name, city, company = world.people[person]
    company_name, founder, base = world.companies[company]
    if kind == "country_of_birth":
        question = f"In which country was {name} born?"
        hop, answer, second_doc = world.cities[city][0], world.countries[world.cities[city][1]], city_doc(world, city)
    elif kind == "founder_of_employer":
        question = f"Who founded the company that {name} works for?"
        hop, answer, second_doc = company_name, world.people[founder][0], company_doc(world, company)
    else:
        question = f"In which city is the company that {name} works for based?"
        hop, answer, second_doc = company_name, world.cities[base][0], company_doc(world, company)
    demonstration = [
        ("policy", f"<search>{name}</search>"),
        ("observation", person_doc(world, person)),
        ("policy", f"<search>{hop}</search>"),
        ("observation", second_doc),
        ("policy", f"<answer>{answer}</answer>"),
    ]
    return question, answer, demonstration


DEMO_TOPK = 2  # documents per search in the demonstrations, as the shipped recipes retrieve


def multihop_rows(split: str, limit: int | None = None) -> list[dict]:
    """The split's question rows: train asks about people 0-239, any other split about 240-299.
    `expert_turns` is the demonstration in the tag protocol: each observation is what a BM25
    search of the `multihop` corpus with topk 2 returns for the query, wrapped in
    <information> tags, exactly as a rollout would see it."""
    from llmrl.tools.protocols import tag_observation
    from llmrl.tools.search import Search, SearchOptions

    search = Search(SearchOptions(corpus="multihop", topk=DEMO_TOPK))
    world = build_world()
    people = range(TRAIN_PEOPLE) if split == "train" else range(TRAIN_PEOPLE, NUM_PEOPLE)
    rows = []
    for person in people:
        for kind in QUESTION_KINDS:
            question, answer, demonstration = _question(world, person, kind)
            demonstration = [
                (role, tag_observation(search(query=demonstration[i - 1][1][len("<search>"):-len("</search>")])) if role == "observation" else text)
                for i, (role, text) in enumerate(demonstration)
            ]
            rows.append({
                "id": f"multihop-{split}-{person:03d}-{kind}",
                "question": question,
                "answer": answer,
                "expert_turns": [{"role": role, "text": text} for role, text in demonstration],
            })
    random.Random(f"{WORLD_SEED}-{split}").shuffle(rows)  # kinds and people interleaved
    return rows[:limit]
