"""Deterministic generator of the tiny synthetic LFQA data set that trains and checks the tiny models.

The rows follow the schema of the LFQA data set ``LLukas22/lfqa_preprocessed``: every line of a
``.jsonl`` file is one JSON object ``{"question": str, "answer": str, "context": [str, ...]}``, plus
``facts``: the asked entity's name and every attribute value the answer states, as the passages write them
(what ``fact_recall`` looks for in a generated answer).

All content is about invented entities (towns, animals, plants, machines and festivals with short
invented two-syllable names), so nothing in it is real-world knowledge. Each row asks about one entity;
its context holds 1-2 relevant passages that state every fact of the answer (in different words) plus
distractor passages about other entities written with the same templates, in a shuffled order.

The facts cannot be memorised, only read from the context: every passage draws its attribute values
(region, year, material, colour, size, what the entity is known for, ...) afresh, and the names come from
pools too large to learn (4,000 training entities, 800 places, 800 people), so a name is asked about in a
few rows only, with different facts and even different kinds of entity each time. Within a row the asked
entity's name appears only in its relevant passage(s), which is how a reader tells them apart from the
distractors (whose names start differently). Validation rows use names (entities, the people and the
towns mentioned in passages) that never occur in the training rows, but the same templates and
attribute vocabularies.

The output depends only on the arguments: the same seed and sizes give byte-identical files, and the
validation rows do not depend on the number of training rows (or the other way round).

The 100 validation rows are shipped (``lfqa/data/tiny_validation.jsonl``); the 12,000 training rows
(``lfqa/data/tiny_train.jsonl``, about 20 MB) are written at set-up. Both with::

    python -m lfqa.bundled_data               # both files; --if-missing: the training file, when absent

Options: ``--train N`` (12000), ``--validation M`` (100), ``--seed S`` (0), ``--out DIR`` (the package's
``data/`` folder).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import string
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
TRAIN_FILE = "tiny_train.jsonl"
VALIDATION_FILE = "tiny_validation.jsonl"

TRAIN = "train"
TRAIN_ROWS = 12000  # made at set-up (make setup), not shipped
VALIDATION_ROWS = 100  # shipped
TOKENIZER_ROWS = 4000
PASSAGES_PER_ROW = (2, 4)  # relevant and distractor passages of a row, at least and at most
VALIDATION = "validation"

# --------------------------------------------------------------------------------------------------
# Invented names
# --------------------------------------------------------------------------------------------------

# Names are two syllables of simple letters ("Velmor", "Kadra", "Zalrim") so that a small byte-level
# BPE does not shred them into many pieces.
_NAME_ONSETS = ["b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z"]
_NAME_VOWELS = ["a", "e", "i", "o", "u"]
_NAME_CODAS = ["", "", "l", "n", "r", "m", "s"]
_NAME_MIDDLES = ["b", "d", "g", "k", "l", "m", "n", "r", "s", "t", "v", "z", "dr", "br", "th"]
_NAME_ENDS = ["", "l", "n", "r", "m", "s"]
# English words the syllable pattern can produce.
_NOT_NAMES = set(
    (
        "baron bison bonus demon denim felon fibre human hymen label lemon level linen madam manor "
        "melon minor model molar motel nomad pedal petal pilot radar rebel robin rumor salon satin "
        "sinus solar sonar tenor timer total tumor venom vigor visor vital mural modem panel pupil "
        "rival medal metal moral humor lunar polar tutor saber seven siren token topaz venus lotus "
        "fetal final focal gamut habit hotel medium nasal penal pagan ruler sumo kimono salami banana "
        "tomato"
    ).split()
)

_NOT_PARTS = ("dild", "cum", "tit", "sex", "nig", "pis", "fuk", "kok")

# So many names that a model cannot learn them: it has to find and copy the asked entity's facts.
_ENTITY_NAMES = {TRAIN: 4000, VALIDATION: 400}  # names of the entities rows ask about (and distractors)
_PLACE_NAMES = {TRAIN: 800, VALIDATION: 80}  # towns that hold the festivals
_PEOPLE = {TRAIN: 800, VALIDATION: 80}  # botanists and engineers


def _name_candidate(rng: random.Random) -> str:
    while True:
        first = rng.choice(_NAME_ONSETS) + rng.choice(_NAME_VOWELS) + rng.choice(_NAME_CODAS)
        middle = rng.choice(_NAME_MIDDLES)
        if first[-1] == middle[0] or first[0] == middle[0] or (len(middle) == 2 and first[-1] not in "aeiou"):
            continue  # no doubled letters, no "Molmom", no three consonants in a row
        name = first + middle + rng.choice(_NAME_VOWELS) + rng.choice(_NAME_ENDS)
        if 5 <= len(name) <= 7 and name not in _NOT_NAMES and not any(p in name for p in _NOT_PARTS):
            return name.capitalize()


def _name_pools(seed: int) -> dict[str, dict[str, list[str]]]:
    """The invented names of each split: ``entity``, ``place`` and ``person`` ("First Last") lists.

    The two splits share no name, and no name is part of another (or of any template or vocabulary
    word), so a name found in a passage always means the same name. Independent of the row counts.
    """
    rng = random.Random(f"lfqa-tiny:{seed}:names")
    vocabulary = _vocabulary_text()
    taken: set[str] = set()  # lowercased names
    taken_parts: set[str] = set()  # every substring of a taken name that could be a whole name

    def draw(n: int) -> list[str]:
        out: list[str] = []
        while len(out) < n:
            name = _name_candidate(rng)
            low = name.lower()
            inner = {low[i:j] for i in range(len(low)) for j in range(i + 5, len(low) + 1)}
            if low in vocabulary or low in taken_parts or inner & taken:
                continue  # a name is never part of another name or word
            taken.add(low)
            taken_parts.update(inner)
            out.append(name)
        return out

    pools = {}
    for split in (TRAIN, VALIDATION):
        entity = draw(_ENTITY_NAMES[split])
        place = draw(_PLACE_NAMES[split])
        person = [f"{first} {last}" for first, last in zip(draw(_PEOPLE[split]), draw(_PEOPLE[split]))]
        pools[split] = {"entity": entity, "place": place, "person": person}
    return pools


# --------------------------------------------------------------------------------------------------
# Attribute vocabularies (shared by both splits)
# --------------------------------------------------------------------------------------------------

_REGIONS = [
    "northern hills",
    "eastern lowlands",
    "southern coastlands",
    "western plains",
    "central highlands",
    "northern islands",
    "southern river valleys",
    "western mountains",
    "eastern forests",
    "high desert",
]
_MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]

_TOWN_SETTINGS = [
    "river town",
    "fishing village",
    "mountain town",
    "market town",
    "harbour town",
    "mining town",
    "farming village",
    "lakeside town",
]
_TOWN_LANDMARKS = [
    ("copper bridges", "to carry ore across the valley"),
    ("blue-tiled towers", "to watch for storms coming in from the sea"),
    ("stone windmills", "to grind grain during the long winters"),
    ("glass lighthouses", "to guide boats past the hidden reefs"),
    ("salt terraces", "to dry seawater into salt for trade"),
    ("painted canal locks", "to move barges between the upper and lower lakes"),
    ("clock gardens", "to show farmers the hour by the opening of flowers"),
    ("rope bridges", "to link the two halves of the town over the gorge"),
    ("iron bell towers", "to warn shepherds when the river began to flood"),
    ("underground granaries", "to keep the harvest safe from summer fires"),
]
_TOWN_TRADES = [
    "glassblowers",
    "weavers",
    "beekeepers",
    "rope makers",
    "salt farmers",
    "clockmakers",
    "potters",
    "boat builders",
    "cheese makers",
    "lantern makers",
]

_ANIMAL_CLASSES = [
    ("bird", "birds"),
    ("lizard", "lizards"),
    ("beetle", "beetles"),
    ("fish", "fish"),
    ("deer", "deer"),
    ("frog", "frogs"),
    ("moth", "moths"),
    ("otter", "otters"),
    ("snake", "snakes"),
    ("hare", "hares"),
]
_TERRAINS = [
    "reed beds",
    "pine forests",
    "rocky shores",
    "limestone caves",
    "open grasslands",
    "mangrove swamps",
    "high meadows",
    "salt flats",
    "bamboo thickets",
    "river banks",
]
_ANIMAL_FEATURES = [
    "silver-striped back",
    "bright orange throat",
    "long blue tail",
    "black-tipped ears",
    "copper-coloured scales",
    "speckled green shell",
    "white spotted wings",
    "pale yellow eyes",
    "short curled horns",
    "red-banded legs",
]
_ANIMAL_FOODS = [
    "river snails",
    "fallen figs",
    "moth larvae",
    "seeds of the marsh reed",
    "small crabs",
    "tree sap",
    "wild berries",
    "beetle grubs",
    "floating algae",
    "clover roots",
]
_ANIMAL_METHODS = [
    "by listening for tiny movements under the ground",
    "by following the smell of its prey at night",
    "by watching for reflections in shallow water",
    "by feeling for vibrations with its long whiskers",
    "by sensing warmth through small pits near its eyes",
    "by turning over small stones one at a time",
    "by tapping on bark and waiting for an echo",
    "by sweeping the mud with its flat snout",
]
_ANIMAL_TRAITS = [
    "hums loudly before it rains",
    "changes colour at the start of winter",
    "builds nests from dried mud",
    "can sleep for weeks during a drought",
    "walks backwards when it is threatened",
    "glows faintly in the dark",
    "stores food in hollow trees for the winter",
    "sings in pairs at sunrise",
]

_PLANT_TYPES = [
    ("shrub", "metres"),
    ("vine", "metres"),
    ("moss", "centimetres"),
    ("reed", "metres"),
    ("herb", "centimetres"),
    ("tree", "metres"),
    ("fern", "centimetres"),
    ("creeper", "metres"),
]
_PLANT_TERRAINS = [
    "rocky slopes",
    "wet meadows",
    "shaded gullies",
    "sandy dunes",
    "old forests",
    "lake shores",
    "cliff tops",
    "marshy fields",
]
_PLANT_COLOURS = [
    "pale violet",
    "deep red",
    "golden",
    "white",
    "sky-blue",
    "rose-pink",
    "orange",
    "cream-coloured",
]
_PLANT_USES = [
    "to dye wool a deep green",
    "to brew a bitter tea that eases coughs",
    "to weave light baskets",
    "to flavour bread and soups",
    "to keep moths away from stored clothes",
    "to make a glue for binding books",
    "to polish copper pots",
    "to feed goats during the dry season",
]

_MACHINE_TYPES = [
    ("pump", "to lift water from deep wells"),
    ("loom", "to weave patterned cloth without a second worker"),
    ("clock", "to ring the hours for the whole harbour"),
    ("printing press", "to print maps for sailors"),
    ("grain sorter", "to separate good seed from bad"),
    ("signal lamp", "to send messages between hilltops"),
    ("ice saw", "to cut blocks of ice from frozen lakes"),
    ("bellows", "to keep the fires of a glassworks burning"),
]
_MACHINE_POWERS = [
    "a falling weight",
    "a small steam boiler",
    "the wind",
    "a pedal worked by foot",
    "a water wheel",
    "a coiled spring",
    "a hand crank",
    "a team of goats",
]
_MACHINE_MATERIALS = ["brass", "oak", "iron", "copper", "bronze", "walnut", "tin"]

_FESTIVAL_ACTIVITIES = [
    "people float paper lanterns down the river",
    "children race wooden boats on the lake",
    "farmers parade their goats through the streets",
    "everyone paints their front doors yellow",
    "bakers compete to build the tallest tower of bread",
    "musicians play drums from dawn until dusk",
    "families hang ribbons from every tree",
    "the whole town eats supper together in the square",
]
_FESTIVAL_ORIGINS = [
    "to celebrate the end of a great flood",
    "to remember a harvest that saved the town from famine",
    "to honour the founder of the town",
    "to mark the return of the migrating cranes",
    "to give thanks for a new well",
    "to celebrate the opening of the first bridge",
]

# Numbers come from small lists too, so each value is seen often in training.
_YEARS = [1612, 1648, 1675, 1703, 1731, 1766, 1789, 1812, 1834, 1857, 1880, 1906]
_POPULATIONS = [600, 900, 1500, 2400, 3200, 4800, 6500, 8000, 12000, 15000]
_GROUP_SIZES = [3, 5, 6, 8, 10, 12, 15, 20, 30, 40]
_LIFESPANS = [2, 4, 6, 9, 11, 14, 18, 25, 35, 50]
_HEIGHTS = {
    "metres": [2, 3, 4, 5, 6, 8, 10, 12, 15, 20],
    "centimetres": [10, 15, 20, 25, 30, 40, 50, 60, 80, 90],
}
_MACHINE_COUNTS = [7, 13, 16, 24, 45, 70, 85, 120, 150, 200]
_FESTIVAL_DAYS = [2, 3, 4, 5, 6, 7, 8, 9]

# Sentences without facts, used to vary passage lengths.
_FILLERS = {
    "town": [
        "The weekly market draws traders from nearby villages.",
        "Its narrow streets are lined with old stone houses.",
        "A small museum near the square tells the history of the area.",
        "Winters there are long, and the summers are short and bright.",
        "A single road connects the town with the rest of the region.",
        "Most houses there have steep roofs to shed the snow.",
        "Children learn to swim in the river before they can read.",
        "A bell in the square rings every evening at six.",
    ],
    "animal": [
        "It is rarely seen by travellers.",
        "Naturalists still argue about how it spends the colder months.",
        "Its calls can be heard from far away on quiet evenings.",
        "Young ones stay close to the adults for most of their first year.",
        "Local children often make up songs about it.",
        "Its tracks are easy to confuse with those of its neighbours.",
        "Farmers regard it as a sign of good weather.",
        "Few drawings of it exist in older books.",
    ],
    "plant": [
        "Its seeds are carried long distances by the wind.",
        "Gardeners find it difficult to grow far from home.",
        "Old recipes mention it more often than modern ones do.",
        "Bees visit it constantly while it is in bloom.",
        "Its leaves turn brown quickly once they are picked.",
        "Goats avoid eating it.",
        "Travellers sometimes carry a sprig of it for luck.",
        "Its roots spread widely just below the surface.",
    ],
    "machine": [
        "Several museums still keep one on display.",
        "Its design was copied by many workshops in the following years.",
        "Repairs needed only simple tools.",
        "The original plans were kept in a locked chest for decades.",
        "Apprentices learned the trade by taking one apart.",
        "It was noisy but very reliable.",
        "Collectors pay high prices for working examples.",
        "Its inventor kept improving it for many years.",
    ],
    "festival": [
        "Stalls selling sweets and cider line the main street.",
        "Many visitors book their rooms a year in advance.",
        "Older residents say it was once much quieter.",
        "The mayor opens it with a short speech.",
        "Rain almost never stops the celebrations.",
        "Children are allowed to stay up late on the last night.",
        "Neighbouring villages send musicians to join in.",
        "Shops close early so that everyone can take part.",
    ],
}

KINDS = ["town", "animal", "plant", "machine", "festival"]


def _a(word: str) -> str:
    return ("an " if word[0].lower() in "aeiou" else "a ") + word


# --------------------------------------------------------------------------------------------------
# Entities
# --------------------------------------------------------------------------------------------------


def _make_entity(kind: str, name: str, rng: random.Random, pools: dict[str, list[str]]) -> dict:
    """One entity's facts, drawn afresh every time (a name has no fixed facts)."""
    e: dict = {"kind": kind, "name": name, "region": rng.choice(_REGIONS)}
    if kind == "town":
        e["setting"] = rng.choice(_TOWN_SETTINGS)
        e["landmark"], e["reason"] = rng.choice(_TOWN_LANDMARKS)
        e["trade"] = rng.choice(_TOWN_TRADES)
        e["year"] = rng.choice(_YEARS)
        e["pop"] = rng.choice(_POPULATIONS)
    elif kind == "animal":
        e["cls"], e["plural"] = rng.choice(_ANIMAL_CLASSES)
        e["terrain"] = rng.choice(_TERRAINS)
        e["feature"] = rng.choice(_ANIMAL_FEATURES)
        e["food"] = rng.choice(_ANIMAL_FOODS)
        e["method"] = rng.choice(_ANIMAL_METHODS)
        e["trait"] = rng.choice(_ANIMAL_TRAITS)
        e["group"] = rng.choice(_GROUP_SIZES)
        e["life"] = rng.choice(_LIFESPANS)
    elif kind == "plant":
        e["type"], e["unit"] = rng.choice(_PLANT_TYPES)
        e["height"] = rng.choice(_HEIGHTS[e["unit"]])
        e["terrain"] = rng.choice(_PLANT_TERRAINS)
        e["colour"] = rng.choice(_PLANT_COLOURS)
        e["month"] = rng.choice(_MONTHS)
        e["use"] = rng.choice(_PLANT_USES)
        e["person"] = rng.choice(pools["person"])
        e["year"] = rng.choice(_YEARS)
    elif kind == "machine":
        e["type"], e["purpose"] = rng.choice(_MACHINE_TYPES)
        e["power"] = rng.choice(_MACHINE_POWERS)
        e["material"] = rng.choice(_MACHINE_MATERIALS)
        e["person"] = rng.choice(pools["person"])
        e["year"] = rng.choice(_YEARS)
        e["count"] = rng.choice(_MACHINE_COUNTS)
    elif kind == "festival":
        e["town"] = rng.choice(pools["place"])
        e["month"] = rng.choice(_MONTHS)
        e["days"] = rng.choice(_FESTIVAL_DAYS)
        e["activity"] = rng.choice(_FESTIVAL_ACTIVITIES)
        e["origin"] = rng.choice(_FESTIVAL_ORIGINS)
        e["year"] = rng.choice(_YEARS)
    else:  # pragma: no cover - guarded by KINDS
        raise ValueError(kind)
    return e


def _fmt(template: str, e: dict) -> str:
    f = dict(e)
    for key in ("cls", "type", "material"):
        if key in e:
            f["a_" + key] = _a(e[key])
    text = template.format(**f)
    return text[0].upper() + text[1:]


# Passages that state every attribute of an entity (one is picked per use).
_FULL_PASSAGES = {
    "town": [
        (
            "{name} is a {setting} found in the {region}. Its {landmark} were put up in {year} {reason}, and "
            "travellers still come to see them. Roughly {pop} people live there, and most of them earn their "
            "living as {trade}."
        ),
        (
            "Located in the {region}, {name} is a small {setting} of about {pop} inhabitants. The best-known "
            "sight in {name} is its {landmark}, constructed in the year {year} {reason}. Many families in the "
            "town have worked as {trade} for generations."
        ),
    ],
    "animal": [
        (
            "The {name} is {a_cls} of the {terrain} in the {region}, easy to spot by its {feature}. It lives "
            "in groups of about {group} and feeds on {food}, which it locates {method}. Unusually among "
            "{plural}, it {trait}, and it may live {life} years."
        ),
        (
            "Found in the {terrain} of the {region}, the {name} is {a_cls} recognised by its {feature}. It "
            "eats mostly {food}, which it tracks down {method}. It {trait}, which few other {plural} do. "
            "Groups number about {group}, and it can reach {life} years of age."
        ),
    ],
    "plant": [
        (
            "Native to the {terrain} of the {region}, the {name} is {a_type} that can reach {height} {unit} in "
            "height. Its {colour} flowers open every {month}. Local people harvest it {use}. The botanist "
            "{person} first recorded the plant in {year}."
        ),
        (
            "The botanist {person} wrote the first description of the {name} in {year}. This {type} grows wild "
            "in the {terrain} of the {region} and reaches about {height} {unit}. Each {month} it is covered in "
            "{colour} flowers, and villagers gather it {use}."
        ),
    ],
    "machine": [
        (
            "In {year}, the engineer {person} designed the {name}, {a_type} made mostly of {material}. Powered "
            "by {power}, it was meant {purpose}. Around {count} copies were produced before the design was "
            "abandoned."
        ),
        (
            "The {name} was the work of {person}, who completed it in {year}. Built from {material} and driven "
            "by {power}, the {type} was used {purpose}. Only {count} were ever made, and few of them survive."
        ),
    ],
    "festival": [
        (
            "Each {month}, the town of {town} in the {region} holds the {name} festival. It was first "
            "celebrated in {year} {origin}. For {days} days, {activity}, and visitors fill the narrow streets."
        ),
        (
            "The {name} festival began in {year}, when the people of {town} decided {origin}. It now lasts "
            "{days} days every {month}. During the celebration {activity}. {town} lies in the {region}."
        ),
    ],
}

# The same facts split over two passages (both count as relevant).
_SPLIT_PASSAGES = {
    "town": (
        (
            "{name} is a {setting} in the {region}, home to roughly {pop} people. Most of the residents work "
            "as {trade}."
        ),
        (
            "The {landmark} of {name} date back to {year}. They were constructed {reason}, and today they are "
            "the main reason visitors travel to the town."
        ),
    ),
    "animal": (
        (
            "The {name} is {a_cls} that lives in the {terrain} of the {region}. It feeds on {food}, which it "
            "finds {method}."
        ),
        (
            "Observers say the {name} {trait}, which is rare among {plural}. It is recognised by its {feature}, "
            "lives in groups of about {group} and may survive for {life} years."
        ),
    ),
    "plant": (
        "The {name} grows wild in the {terrain} of the {region}, where villagers collect it {use}.",
        (
            "{person}, a botanist, first described the {name} in {year}. The {type} grows to roughly {height} "
            "{unit} and bears {colour} flowers in {month}."
        ),
    ),
    "machine": (
        "{person} built the first {name} in {year}. The {type} was intended {purpose}.",
        (
            "Each {name} was made of {material} and ran on {power}. Records suggest about {count} of them "
            "were made in total."
        ),
    ),
    "festival": (
        (
            "{town} is a town in the {region}. Every {month} it hosts the {name} festival, which lasts {days} "
            "days."
        ),
        (
            "The first {name} festival took place in {year} and was held {origin}. Throughout the festival, "
            "{activity}."
        ),
    ),
}

# (question variants, answer sentences, optional answer sentences), per kind.
_QA = {
    "town": [
        (
            ["Why is {name} famous?", "What is the town of {name} known for?"],
            [
                "{name} is a {setting} in the {region}.",
                "It is famous for its {landmark}, which were built in {year} {reason}.",
                "Today most people there work as {trade}.",
            ],
            ["About {pop} people live in the town."],
        ),
        (
            [
                "What do people in {name} do for a living, and where is the town?",
                "Where is {name} and what work do its people do?",
            ],
            [
                "{name} lies in the {region} and has a population of about {pop}.",
                "Most of its residents are {trade}.",
                "The town is also known for the {landmark} that were built there in {year}.",
            ],
            ["Those {landmark} were made {reason}."],
        ),
    ],
    "animal": [
        (
            ["How does the {name} find food?", "What does the {name} eat and how does it find it?"],
            [
                "The {name} is {a_cls} that lives in the {terrain} of the {region}.",
                "It searches for {food} {method}.",
            ],
            ["It usually feeds in groups of about {group}.", "You can recognise it by its {feature}."],
        ),
        (
            ["What makes the {name} different from other {plural}?"],
            [
                "Unlike most {plural}, the {name} {trait}.",
                "It is also easy to recognise by its {feature}.",
                "It lives in the {terrain} of the {region} and can reach an age of {life} years.",
            ],
            ["It feeds mainly on {food}."],
        ),
    ],
    "plant": [
        (
            ["Where does the {name} come from and what is it used for?"],
            [
                "The {name} is {a_type} native to the {terrain} of the {region}.",
                "People use it {use}.",
                "It was first described by the botanist {person} in {year}.",
            ],
            ["It flowers in {month}."],
        ),
        (
            ["What does the {name} look like?", "How can you recognise the {name}?"],
            [
                "The {name} is {a_type} that grows to about {height} {unit} tall.",
                "It produces {colour} flowers every {month}.",
                "It is native to the {terrain} of the {region}.",
            ],
            ["People use it {use}."],
        ),
    ],
    "machine": [
        (
            ["How does the {name} work and who invented it?"],
            [
                "The {name} is {a_material} {type} that runs on {power}.",
                "It was invented by {person} in {year} {purpose}.",
            ],
            ["Only about {count} of them were ever built."],
        ),
        (
            ["What was the {name} used for?", "Why was the {name} built?"],
            [
                "The {name} was built {purpose}.",
                "This {type} was made of {material} and powered by {power}.",
                "Its inventor, {person}, finished the first one in {year}.",
            ],
            ["Only about {count} of them were ever built."],
        ),
    ],
    "festival": [
        (
            ["What happens during the {name} festival and why is it held?"],
            [
                "The {name} festival takes place every {month} in the town of {town}.",
                "During the festival, {activity}.",
                "It is held {origin}, and it lasts {days} days.",
            ],
            ["It has been celebrated since {year}."],
        ),
        (
            ["When and where is the {name} festival held?"],
            [
                "The {name} festival is held in {town}, a town in the {region}, every {month}.",
                "The celebrations last for {days} days and have taken place since {year}.",
            ],
            ["They were started {origin}.", "During the festival, {activity}."],
        ),
    ],
}

# Template words, not facts of the entity: the class's plural and the unit of a height (its number is a fact).
_NOT_FACTS = {"plural", "unit"}

_MIN_PASSAGE_WORDS = 30
_MAX_PASSAGE_WORDS = 70


def _pad(text: str, fillers: list[str], extra: int) -> str:
    """Append sentences taken from ``fillers`` until the passage has at least 30 words, plus up to
    ``extra`` more while it stays within 70 words. Used fillers are removed from the list."""
    while fillers:
        n = len(text.split())
        if n >= _MIN_PASSAGE_WORDS and (extra <= 0 or n + len(fillers[-1].split()) > _MAX_PASSAGE_WORDS):
            break
        if n >= _MIN_PASSAGE_WORDS:
            extra -= 1
        text = f"{text} {fillers.pop()}"
    return text


def _fillers(kind: str, rng: random.Random) -> list[str]:
    return rng.sample(_FILLERS[kind], len(_FILLERS[kind]))


def _full_passage(e: dict, rng: random.Random) -> str:
    text = _fmt(rng.choice(_FULL_PASSAGES[e["kind"]]), e)
    return _pad(text, _fillers(e["kind"], rng), extra=rng.choice([0, 0, 1]))


def _split_passages(e: dict, rng: random.Random) -> list[str]:
    fillers = _fillers(e["kind"], rng)  # shared, so the two passages never repeat a sentence
    return [_pad(_fmt(t, e), fillers, extra=rng.choice([0, 1])) for t in _SPLIT_PASSAGES[e["kind"]]]


def _qa(e: dict, template: int, rng: random.Random) -> tuple[str, str, list[str]]:
    """The question, the answer and its facts: the values the answer states, in the order it states them."""
    questions, sentences, optional = _QA[e["kind"]][template]
    chosen = list(sentences) + [s for s in optional if rng.random() < 0.5]
    keys = [key for s in chosen for _, key, _, _ in string.Formatter().parse(s) if key]
    values = [str(e[key.removeprefix("a_")]) for key in keys if key.removeprefix("a_") not in _NOT_FACTS]
    return _fmt(rng.choice(questions), e), " ".join(_fmt(s, e) for s in chosen), list(dict.fromkeys(values))


def _vocabulary_text() -> str:
    """Every fixed word of the templates and vocabularies, lowercased (names must not occur in it)."""
    parts: list = [
        _REGIONS,
        _MONTHS,
        _TOWN_SETTINGS,
        _TOWN_LANDMARKS,
        _TOWN_TRADES,
        _ANIMAL_CLASSES,
        _TERRAINS,
        _ANIMAL_FEATURES,
        _ANIMAL_FOODS,
        _ANIMAL_METHODS,
        _ANIMAL_TRAITS,
        _PLANT_TYPES,
        _PLANT_TERRAINS,
        _PLANT_COLOURS,
        _PLANT_USES,
        _MACHINE_TYPES,
        _MACHINE_POWERS,
        _MACHINE_MATERIALS,
        _FESTIVAL_ACTIVITIES,
        _FESTIVAL_ORIGINS,
        _FILLERS,
        _FULL_PASSAGES,
        _SPLIT_PASSAGES,
        _QA,
    ]
    return json.dumps(parts).lower()


# --------------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------------


def _balanced(items: list, n: int, rng: random.Random) -> list:
    """``n`` items that use every item of ``items`` equally often (up to one), in a random order."""
    out: list = []
    while len(out) < n:
        out.extend(rng.sample(items, min(len(items), n - len(out))))
    rng.shuffle(out)
    return out


def _distractor_names(names: list[str], asked: str, n: int, rng: random.Random) -> list[str]:
    """``n`` other names, none starting like the asked one (a reader tells passages apart by the name)."""
    out: list[str] = []
    while len(out) < n:
        other = rng.choice(names)
        if other[:3] != asked[:3] and all(other[:3] != o[:3] for o in out):
            out.append(other)
    return out


def _generate_split(n_rows: int, seed: int, split: str) -> list[dict]:
    pools = _name_pools(seed)[split]
    rng = random.Random(f"lfqa-tiny:{seed}:{split}")
    names = pools["entity"]
    questions = _balanced([(k, t) for k in KINDS for t in range(len(_QA[k]))], n_rows, rng)
    asked = _balanced(names, n_rows, rng)

    rows = []
    for (kind, template), name in zip(questions, asked):
        target = _make_entity(kind, name, rng, pools)
        question, answer, facts = _qa(target, template, rng)
        relevant = _split_passages(target, rng) if rng.random() < 0.35 else [_full_passage(target, rng)]
        n_passages = rng.randint(max(PASSAGES_PER_ROW[0], len(relevant) + 1), PASSAGES_PER_ROW[1])
        # Distractors: other names (each at most once per row), half of them the asked entity's kind.
        distractors = [
            _make_entity(kind if rng.random() < 0.5 else rng.choice(KINDS), other, rng, pools)
            for other in _distractor_names(names, name, n_passages - len(relevant), rng)
        ]
        context = relevant + [_full_passage(d, rng) for d in distractors]
        rng.shuffle(context)
        rows.append({"question": question, "answer": answer, "context": context, "facts": facts})
    return rows


def generate(n_train: int = TRAIN_ROWS, n_validation: int = VALIDATION_ROWS,
             seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Return ``(train_rows, validation_rows)``; each row is ``{"question", "answer", "context", "facts"}``.

    Deterministic in its arguments. The two splits draw their invented names from disjoint pools, so
    no entity (or any other invented name) is shared between them.
    """
    if n_train < 0 or n_validation < 0:
        raise ValueError("row counts must be non-negative")
    return _generate_split(n_train, seed, TRAIN), _generate_split(n_validation, seed, VALIDATION)


def tokenizer_rows() -> list[dict]:
    """Training rows for the tiny models' tokenizer: enough to use every training name several times."""
    return _generate_split(TOKENIZER_ROWS, 0, TRAIN)


def ensure_training_file(patterns: list[str]) -> Path | None:
    """Write the bundled training rows if ``patterns`` names their file and it is not there yet.

    The training rows are made at set-up rather than shipped (they are tens of megabytes); a fresh clone that
    skips ``make setup`` gets them on its first run. Returns the path written, or None.
    """
    target = DATA_DIR / TRAIN_FILE
    if target.exists() or not any(Path(p).resolve() == target for p in patterns):
        return None
    _dump(generate(TRAIN_ROWS, 0)[0], target)
    return target


def _dump(rows: list[dict], path: Path) -> None:
    """Write through a temporary file and a rename, so that a reader never sees half a file."""
    lines = [
        json.dumps(
            {"question": r["question"], "answer": r["answer"], "context": r["context"], "facts": r["facts"]},
            ensure_ascii=False,
        )
        for r in rows
    ]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, path)


def write(
    out_dir: str | Path = DATA_DIR, n_train: int = TRAIN_ROWS, n_validation: int = VALIDATION_ROWS, seed: int = 0
) -> tuple[Path, Path]:
    """Generate the data set and write ``tiny_train.jsonl`` and ``tiny_validation.jsonl`` to ``out_dir``.

    Returns the two paths written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, validation = generate(n_train, n_validation, seed)
    train_path, validation_path = out / TRAIN_FILE, out / VALIDATION_FILE
    _dump(train, train_path)
    _dump(validation, validation_path)
    return train_path, validation_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lfqa.bundled_data",
        description="Write the tiny synthetic LFQA data set (deterministic for a given seed).",
    )
    parser.add_argument("--train", type=int, default=TRAIN_ROWS, help=f"training rows (default {TRAIN_ROWS})")
    parser.add_argument("--validation", type=int, default=VALIDATION_ROWS,
                        help=f"validation rows (default {VALIDATION_ROWS})")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--out", type=Path, default=DATA_DIR, help=f"output folder (default {DATA_DIR})")
    parser.add_argument("--if-missing", action="store_true",
                        help="only write the package's training file, and only when it is not there (make setup)")
    args = parser.parse_args(argv)
    if args.if_missing:
        ensure_training_file([str(DATA_DIR / TRAIN_FILE)])
        return
    for path in write(args.out, args.train, args.validation, args.seed):
        print(path)


if __name__ == "__main__":
    main()
