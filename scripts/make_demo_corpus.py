"""Generate the synthetic English-like demo corpus that the bundled demo teacher is trained on.

No external data: every document comes from a small weighted grammar and a handful of templates, driven by a
seeded numpy RNG, so the output is byte-identical on every run and free to redistribute with the project.

The corpus is built to be learnable but not trivial, with real uncertainty left at many positions, so that a
teacher's soft labels carry more than the argmax:

- **grammar** paragraphs: noun phrases with determiners, adjectives and relative clauses; subject-verb number
  agreement across the relative clause; one tense per paragraph (so earlier verbs predict later ones).
- **stories**: a protagonist and a friend with names drawn per document, an object and a place that recur
  later, pronouns that agree with the protagonist, small sums inside the story ("three birds, then two more").
  Copying a name or object from earlier in the document is where attention over context pays off.
- **arithmetic** facts in words or digits ("Seven plus five is twelve.", "9 - 4 = 5"): operands are free, the
  answer is determined.
- **lists and counting**: counting up or down, "what comes after", comparisons, and lists whose length is
  stated at the end ("That is three fruits.").

Usage::

    python scripts/make_demo_corpus.py                 # writes vishwam/assets/demo/{train,eval}.jsonl
    python scripts/make_demo_corpus.py --out-dir /tmp/demo --train-docs 100 --eval-docs 10
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

TRAIN_SEED = 20240611
EVAL_SEED = 77031
TRAIN_DOCS = 7500
EVAL_DOCS = 380
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "vishwam", "assets", "demo")

# ------------------------------------------------------------------------------------------------- lexicon

NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
           "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]

# (singular, plural, weight)
ANIMATE = [("dog", "dogs", 5), ("cat", "cats", 5), ("bird", "birds", 4), ("fox", "foxes", 3),
           ("mouse", "mice", 2), ("child", "children", 3), ("farmer", "farmers", 3), ("teacher", "teachers", 2),
           ("rabbit", "rabbits", 3), ("horse", "horses", 2), ("girl", "girls", 3), ("boy", "boys", 3),
           ("baker", "bakers", 1), ("sailor", "sailors", 1), ("owl", "owls", 2), ("frog", "frogs", 2)]
INANIMATE = [("ball", "balls", 4), ("box", "boxes", 3), ("apple", "apples", 4), ("book", "books", 4),
             ("stone", "stones", 2), ("cup", "cups", 2), ("hat", "hats", 3), ("kite", "kites", 2),
             ("letter", "letters", 2), ("basket", "baskets", 2), ("lamp", "lamps", 1), ("boat", "boats", 2),
             ("cake", "cakes", 2), ("key", "keys", 2), ("map", "maps", 1), ("shoe", "shoes", 1)]
# Adjectives by class, in English order (size before age before colour); quality words fit one kind of noun.
SIZE = [("big", 5), ("small", 5), ("little", 4), ("tiny", 2)]
AGE = [("old", 4), ("new", 3), ("young", 1)]
COLOUR = [("red", 4), ("blue", 3), ("green", 3), ("yellow", 2), ("white", 2), ("brown", 2)]
ANIMATE_QUALITY = [("happy", 3), ("sleepy", 2), ("brave", 2), ("clever", 2), ("quiet", 2), ("hungry", 2)]
INANIMATE_QUALITY = [("shiny", 2), ("heavy", 2), ("soft", 1), ("broken", 1)]
ADJECTIVES = SIZE + AGE + COLOUR + ANIMATE_QUALITY + INANIMATE_QUALITY
# (present 3sg, present plural, past, weight); transitive verbs take an object
TRANSITIVE = [("sees", "see", "saw", 5), ("likes", "like", "liked", 4), ("finds", "find", "found", 3),
              ("carries", "carry", "carried", 2), ("wants", "want", "wanted", 3), ("holds", "hold", "held", 2),
              ("follows", "follow", "followed", 2), ("watches", "watch", "watched", 2),
              ("helps", "help", "helped", 1), ("paints", "paint", "painted", 1)]
INTRANSITIVE = [("sleeps", "sleep", "slept", 3), ("runs", "run", "ran", 4), ("sings", "sing", "sang", 2),
                ("waits", "wait", "waited", 2), ("jumps", "jump", "jumped", 3), ("laughs", "laugh", "laughed", 2),
                ("hides", "hide", "hid", 2), ("swims", "swim", "swam", 1)]
ADVERBS = [("quickly", 3), ("slowly", 3), ("quietly", 2), ("happily", 2), ("again", 2), ("all day", 1)]
PREPOSITIONS = [("near", 3), ("under", 2), ("behind", 2), ("in", 3), ("on", 2), ("by", 1)]
PLACES = [("park", 4), ("river", 3), ("forest", 3), ("market", 2), ("garden", 3), ("beach", 2), ("hill", 2),
          ("village", 2), ("lake", 2), ("school", 2)]
GIRLS = ["Mira", "Anna", "Lila", "Sofia", "Nora", "Ella", "Maya", "Rosa", "Tara", "Ida", "Zoe", "Lucy",
         "Asha", "Nina", "Emma", "Priya"]
BOYS = ["Tom", "Ravi", "Leo", "Sam", "Omar", "Ben", "Kai", "Max", "Arjun", "Finn", "Hugo", "Jack", "Eli",
        "Noah", "Dev", "Milo"]
FRUITS = ["apple", "pear", "plum", "peach", "grape", "lemon", "cherry", "mango", "orange", "banana"]
COLOURS = ["red", "blue", "green", "yellow", "white", "black", "pink", "purple", "brown", "orange"]
ANIMALS = ["dog", "cat", "cow", "pig", "duck", "goat", "horse", "sheep", "hen", "bee"]
TOOLS = ["hammer", "saw", "rope", "bucket", "brush", "ladder", "spoon", "knife"]
LISTS = [("fruits", FRUITS, 3), ("colours", COLOURS, 3), ("animals", ANIMALS, 3), ("tools", TOOLS, 2)]


class Sampler:
    """Weighted choices from a seeded `numpy.random.Generator`."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def pick(self, items):
        """An element of `items`: uniform over plain items, weighted by the last field of tuples."""
        if isinstance(items[0], tuple):
            weights = np.asarray([item[-1] for item in items], dtype=np.float64)
            return items[int(self.rng.choice(len(items), p=weights / weights.sum()))]
        return items[int(self.rng.integers(len(items)))]

    def chance(self, p: float) -> bool:
        return bool(self.rng.random() < p)

    def int(self, low: int, high: int) -> int:
        """A uniform integer in `[low, high]`."""
        return int(self.rng.integers(low, high + 1))

    def sample(self, items, k: int) -> list:
        return [items[i] for i in self.rng.choice(len(items), size=k, replace=False)]


def sentence(words: str) -> str:
    return words[0].upper() + words[1:]


def a_or_an(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# ------------------------------------------------------------------------------------------------- grammar


def noun_phrase(s: Sampler, animate: bool, plural: bool, tense: str, depth: int = 0) -> str:
    noun = s.pick(ANIMATE if animate else INANIMATE)[1 if plural else 0]
    quality = ANIMATE_QUALITY if animate else INANIMATE_QUALITY
    adjectives = [s.pick(group)[0] for group, p in ((quality, 0.15), (SIZE, 0.25), (AGE, 0.1), (COLOUR, 0.2))
                  if s.chance(p)]
    words = " ".join(adjectives[:2] + [noun])
    if plural:
        det = s.pick([("the", 6), ("some", 3), ("these", 1), ("many", 1), ("two", 2), ("three", 1)])[0]
    else:
        det = s.pick([("the", 8), ("a", 6), ("this", 1), ("one", 1), ("every", 1)])[0]
        if det == "a":
            det = a_or_an(words)
    phrase = f"{det} {words}"
    if animate and depth == 0 and s.chance(0.25):
        # The relative clause's verb agrees with the head noun, not with anything inside the clause.
        phrase += " that " + verb_phrase(s, plural, tense, depth + 1)
    elif depth == 0 and s.chance(0.12):
        phrase += f" {s.pick(PREPOSITIONS)[0]} " + noun_phrase(s, False, s.chance(0.3), tense, depth + 1)
    return phrase


def verb_form(verb, plural: bool, tense: str) -> str:
    return verb[2] if tense == "past" else verb[1 if plural else 0]


def verb_phrase(s: Sampler, plural: bool, tense: str, depth: int = 0) -> str:
    if s.chance(0.65):
        verb = s.pick(TRANSITIVE)
        animate_object = s.chance(0.35)
        phrase = f"{verb_form(verb, plural, tense)} " + noun_phrase(s, animate_object, s.chance(0.3), tense,
                                                                     depth + 1)
    else:
        verb = s.pick(INTRANSITIVE)
        phrase = verb_form(verb, plural, tense)
        if s.chance(0.4):
            phrase += " " + s.pick(ADVERBS)[0]
    if depth == 0 and s.chance(0.3):
        place = s.pick(PLACES)[0]
        phrase += f" {s.pick(PREPOSITIONS)[0]} the {place}"
    return phrase


def grammar_sentence(s: Sampler, tense: str) -> str:
    kind = s.rng.random()
    if kind < 0.75:
        plural = s.chance(0.35)
        return sentence(noun_phrase(s, True, plural, tense) + " " + verb_phrase(s, plural, tense)) + "."
    if kind < 0.9:
        plural = s.chance(0.35)
        animate = s.chance(0.5)
        be = ("were" if plural else "was") if tense == "past" else ("are" if plural else "is")
        adjective = s.pick(ANIMATE_QUALITY + SIZE if animate else INANIMATE_QUALITY + SIZE + COLOUR)[0]
        return sentence(f"{noun_phrase(s, animate, plural, tense)} {be} {adjective}") + "."
    plural = s.chance(0.35)
    be = ("were" if plural else "was") if tense == "past" else ("are" if plural else "is")
    there = f"there {be} " + noun_phrase(s, s.chance(0.5), plural, tense, depth=1)
    return sentence(there + f" {s.pick(PREPOSITIONS)[0]} the {s.pick(PLACES)[0]}") + "."


def grammar_document(s: Sampler) -> str:
    tense = "past" if s.chance(0.4) else "present"
    return " ".join(grammar_sentence(s, tense) for _ in range(s.int(3, 7)))


# ------------------------------------------------------------------------------------------------- stories


def story_document(s: Sampler) -> str:
    hero_is_girl = s.chance(0.5)
    hero = s.pick(GIRLS if hero_is_girl else BOYS)
    friend_is_girl = s.chance(0.5)
    friend = s.pick([n for n in (GIRLS if friend_is_girl else BOYS) if n != hero])
    he, his, him = ("she", "her", "her") if hero_is_girl else ("he", "his", "him")
    kind = "girl" if hero_is_girl else "boy"
    place = s.pick(PLACES)[0]
    home_adj = s.pick(SIZE + AGE + COLOUR)[0]
    thing_adj = s.pick(SIZE + AGE + COLOUR + INANIMATE_QUALITY)[0]
    thing = s.pick(INANIMATE)[0]
    pet = s.pick([a for a in ANIMATE if a[0] not in ("child", "farmer", "teacher", "girl", "boy", "baker", "sailor")])[0]

    out = []
    opening = s.pick([("Once upon a time there was a {kind} named {hero}.", 4), ("{hero} was a {adj} {kind}.", 2),
                      ("There once lived a {kind} called {hero}.", 2)])[0]
    out.append(opening.format(kind=kind, hero=hero, adj=s.pick(ANIMATE_QUALITY + SIZE)[0]))
    if s.chance(0.6):
        out.append(f"{sentence(he)} lived in {a_or_an(home_adj)} {home_adj} house near the {place}.")
    out.append(f"{hero} had {a_or_an(thing_adj)} {thing_adj} {thing}" +
               (f" and a {pet}." if s.chance(0.5) else "."))
    has_pet = out[-1].endswith(f"a {pet}.")
    out.append(s.pick([(f"One day, {hero} went to the {place} with {his} {thing}.", 3),
                       (f"One morning, {hero} took {his} {thing} to the {place}.", 2),
                       (f"Later, {he} walked to the {place}.", 1)])[0])
    out.append(f"There {he} met {friend}" +
               s.pick([(".", 3), (f", who was {s.pick(ANIMATE_QUALITY)[0]}.", 2),
                       (f", who had lost {'her' if friend_is_girl else 'his'} {s.pick(INANIMATE)[0]}.", 1)])[0])
    if s.chance(0.7):
        out.append(f'{friend} asked, "Can I {s.pick([("see", 2), ("hold", 1), ("have", 1)])[0]} your {thing}?"')
        if s.chance(0.65):
            out.append(f'{hero} said, "Yes, you can." {sentence(he)} gave {friend} the {thing}.')
        else:
            out.append(f'{hero} said, "No, it is my {thing}." {friend} was sad.')
    if s.chance(0.3):
        out.append(s.pick([(f"The sky was {s.pick([('blue', 2), ('grey', 1), ('clear', 1)])[0]} that day.", 1),
                           (f"{hero} liked the {place} because it was {s.pick([('quiet', 1), ('big', 1), ('pretty', 1)])[0]}.", 2),
                           (f"{sentence(he)} held {his} {thing} {s.pick([('tightly', 1), ('carefully', 1)])[0]}.", 1)])[0])
    if s.chance(0.5):
        first, more = s.int(2, 9), s.int(1, 9)
        creatures = s.pick(ANIMATE[:5])[1]
        out.append(f"{hero} and {friend} saw {NUMBERS[first]} {creatures}, then {NUMBERS[more]} more. "
                   f"Now they saw {NUMBERS[first + more]} {creatures}.")
    if has_pet and s.chance(0.6):
        out.append(f"{sentence(his)} {pet} {s.pick(INTRANSITIVE)[2]} {s.pick(ADVERBS)[0]}.")
    out.append(s.pick([(f"{hero} and {friend} played until the sun went down.", 3),
                       (f"Then {hero} went home with {his} {thing}.", 2),
                       (f"{friend} thanked {him}, and {he} smiled.", 2),
                       (f"At night, {hero} dreamed about the {place}.", 1)])[0])
    if s.chance(0.4):
        out.append("The end.")
    elif s.chance(0.5):
        # Questions whose answers were stated earlier in the document: recall through attention.
        question = s.pick([("place", 2), ("thing", 2), ("friend", 1)])[0]
        if question == "place":
            out.append(f"Where did {hero} go? {sentence(he)} went to the {place}.")
        elif question == "thing":
            out.append(f"What did {hero} have? {sentence(he)} had {a_or_an(thing_adj)} {thing_adj} {thing}.")
        else:
            out.append(f"Who did {hero} meet? {sentence(he)} met {friend}.")
    return " ".join(out)


# ---------------------------------------------------------------------------------------------- arithmetic


def arithmetic_fact(s: Sampler, digits: bool) -> str:
    op = s.pick([("plus", 5), ("minus", 4), ("times", 2)])[0]
    if op == "plus":
        a = s.int(0, 10)
        b = s.int(0, 20 - a if a > 10 else 10)
        c, sym = a + b, "+"
    elif op == "minus":
        a = s.int(1, 20)
        b = s.int(0, a)
        c, sym = a - b, "-"
    else:
        a, b = s.int(0, 5), s.int(0, 4)
        c, sym = a * b, "*"
    if digits:
        return f"{a} {sym} {b} = {c}."
    return sentence(f"{NUMBERS[a]} {op} {NUMBERS[b]} is {NUMBERS[c]}") + "."


def arithmetic_document(s: Sampler) -> str:
    digits = s.chance(0.3)
    return " ".join(arithmetic_fact(s, digits) for _ in range(s.int(4, 9)))


# ------------------------------------------------------------------------------------------ lists, counting


def counting_sentence(s: Sampler) -> str:
    kind = s.pick([("up", 3), ("down", 2), ("after", 2), ("bigger", 2), ("list", 4)])[0]
    if kind == "up":
        start = s.int(0, 14)
        stop = s.int(start + 2, min(start + 7, 20))
        return f"Count from {NUMBERS[start]} to {NUMBERS[stop]}: " + ", ".join(NUMBERS[start:stop + 1]) + "."
    if kind == "down":
        start = s.int(4, 20)
        stop = s.int(max(start - 6, 0), start - 2)
        return (f"Count down from {NUMBERS[start]} to {NUMBERS[stop]}: " +
                ", ".join(NUMBERS[stop:start + 1][::-1]) + ".")
    if kind == "after":
        n = s.int(0, 19)
        return f"The number after {NUMBERS[n]} is {NUMBERS[n + 1]}."
    if kind == "bigger":
        a, b = s.sample(list(range(21)), 2)
        word = s.pick([("bigger", 2), ("smaller", 1)])[0]
        answer = max(a, b) if word == "bigger" else min(a, b)
        return f"Which is {word}, {NUMBERS[a]} or {NUMBERS[b]}? {sentence(NUMBERS[answer])} is {word}."
    name, items, _ = s.pick(LISTS)
    k = s.int(2, 6)
    chosen = s.sample(items, k)
    owner = s.pick(GIRLS + BOYS)
    return (f"{owner} has these {name}: " + ", ".join(chosen[:-1]) + f" and {chosen[-1]}. "
            f"That is {NUMBERS[k]} {name}.")


def counting_document(s: Sampler) -> str:
    return " ".join(counting_sentence(s) for _ in range(s.int(3, 6)))


# ---------------------------------------------------------------------------------------------- documents

GENRES = [(story_document, 40), (grammar_document, 30), (arithmetic_document, 15), (counting_document, 15)]


def documents(seed: int, n: int) -> list[str]:
    """`n` documents, a pure function of `seed`."""
    s = Sampler(seed)
    return [s.pick(GENRES)[0](s) for _ in range(n)]


def write_jsonl(path: str, docs: list[str]) -> int:
    data = "".join(json.dumps({"text": d}, ensure_ascii=True) + "\n" for d in docs).encode("ascii")
    with open(path, "wb") as f:
        f.write(data)
    return len(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default=DEFAULT_OUT)
    parser.add_argument("--train-docs", type=int, default=TRAIN_DOCS)
    parser.add_argument("--eval-docs", type=int, default=EVAL_DOCS)
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    for name, seed, n in (("train", TRAIN_SEED, args.train_docs), ("eval", EVAL_SEED, args.eval_docs)):
        path = os.path.join(args.out_dir, f"{name}.jsonl")
        size = write_jsonl(path, documents(seed, n))
        print(f"wrote {os.path.normpath(path)}: {n} documents, {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
