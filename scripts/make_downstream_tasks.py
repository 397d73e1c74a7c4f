"""Write the demo domain's lm-evaluation-harness tasks: multiple choice on the demo corpus's facts, and perplexity.

Each task is an lm-eval YAML (`dataset_path: json`, local `data_files`) with its items in JSON lines, generated
from the demo corpus's own templates and lexicon (`scripts/make_demo_corpus.py`) with a seeded numpy RNG, so the
files are byte-identical on every run. The items are new draws, not copies of the training documents:

| task | items (test / few-shot) | what is asked |
|---|---|---|
| `demo_arithmetic` | 300 / 40 | "Seven plus five is" -> "twelve." among four numbers (words or digits) |
| `demo_story_sums` | 300 / 40 | a story's "saw two birds, then nine more. Now they saw" -> "eleven birds." among four |
| `demo_counting` | 300 / 40 | the number after n, the length of a stated list, the bigger or smaller of two |
| `demo_recall` | 300 / 40 | a story, then "Who did Ben meet? He met" -> the friend's name among four names of the story's kind |
| `demo_agreement` | 300 / 40 | subject-verb number agreement across a relative clause: two choices |
| `demo_ppl` | 120 | held-out documents of every genre, scored whole (`loglikelihood_rolling`): word and byte perplexity, bits per byte |

The data paths in the YAML files are relative to the repository root, where vishwam's commands run:

    python scripts/make_downstream_tasks.py          # writes vishwam/assets/demo/tasks/
    python -m vishwam.evaluate --model vishwam/assets/demo/teacher --tasks demo_arithmetic,demo_ppl \\
        --include-path vishwam/assets/demo/tasks
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_demo_corpus as corpus  # noqa: E402

SEED = 28_2026
TEST, FEWSHOT, PPL_DOCS = 300, 40, 120
OUT = os.path.join("vishwam", "assets", "demo", "tasks")
N = corpus.NUMBERS


def _distinct(s: corpus.Sampler, answer: int, candidates: list[int], k: int = 3) -> list[int]:
    """`k` distractors from `candidates` (near the answer first), in a seeded order."""
    pool = [c for c in dict.fromkeys(candidates) if c != answer and 0 <= c <= 20]
    nearest = sorted((c for c in range(21) if c != answer and c not in pool), key=lambda c: (abs(c - answer), c))
    return s.sample(pool + nearest[:max(0, k - len(pool))], k)


def _choices(s: corpus.Sampler, right: str, wrong: list[str]) -> tuple[list[str], int]:
    """The right answer and the wrong ones, shuffled: `(choices, index of the right one)`."""
    options = [right] + wrong
    order = [int(i) for i in s.rng.permutation(len(options))]
    return [options[i] for i in order], order.index(0)


def arithmetic(s: corpus.Sampler) -> dict:
    op = s.pick([("plus", 5), ("minus", 4), ("times", 2)])[0]
    if op == "plus":
        a = s.int(0, 10)
        b = s.int(0, 10)
        c, sym = a + b, "+"
    elif op == "minus":
        a = s.int(1, 20)
        b = s.int(0, a)
        c, sym = a - b, "-"
    else:
        a, b = s.int(0, 5), s.int(0, 4)
        c, sym = a * b, "*"
    wrong = _distinct(s, c, [c + 1, c - 1, c + 2, c - 2, a, b, a + b, abs(a - b), c + 3])
    if s.chance(0.3):
        choices, answer = _choices(s, f"{c}.", [f"{w}." for w in wrong])
        return {"question": f"{a} {sym} {b} =", "choices": choices, "answer": answer}
    choices, answer = _choices(s, f"{N[c]}.", [f"{N[w]}." for w in wrong])
    return {"question": corpus.sentence(f"{N[a]} {op} {N[b]} is"), "choices": choices, "answer": answer}


def _opening(s: corpus.Sampler, hero: str, kind: str) -> str:
    return s.pick([(f"Once upon a time there was a {kind} named {hero}.", 2), (f"There once lived a {kind} called "
                                                                                f"{hero}.", 1)])[0]


def _cast(s: corpus.Sampler):
    girl = s.chance(0.5)
    hero = s.pick(corpus.GIRLS if girl else corpus.BOYS)
    friend_girl = s.chance(0.5)
    names = [n for n in (corpus.GIRLS if friend_girl else corpus.BOYS) if n != hero]
    return hero, ("girl" if girl else "boy"), ("she" if girl else "he"), names


def story_sum(s: corpus.Sampler) -> dict:
    hero, kind, he, names = _cast(s)
    friend = s.pick(names)
    place = s.pick(corpus.PLACES)[0]
    first, more = s.int(2, 9), s.int(1, 9)
    creatures = s.pick(corpus.ANIMATE[:5])[1]
    total = first + more
    text = (f"{_opening(s, hero, kind)} Later, {he} walked to the {place}. There {he} met {friend}. {hero} and "
            f"{friend} saw {N[first]} {creatures}, then {N[more]} more. Now they saw")
    wrong = _distinct(s, total, [total + 1, total - 1, total + 2, total - 2, first, more, abs(first - more)])
    choices, answer = _choices(s, f"{N[total]} {creatures}.", [f"{N[w]} {creatures}." for w in wrong])
    return {"question": text, "choices": choices, "answer": answer}


def counting(s: corpus.Sampler) -> dict:
    kind = s.pick([("after", 1), ("list", 1), ("bigger", 1)])[0]
    if kind == "after":
        n = s.int(0, 19)
        wrong = _distinct(s, n + 1, [n + 2, n - 1, n, n + 3])
        choices, answer = _choices(s, f"{N[n + 1]}.", [f"{N[w]}." for w in wrong])
        return {"question": f"The number after {N[n]} is", "choices": choices, "answer": answer}
    if kind == "list":
        name, items, _ = s.pick(corpus.LISTS)
        k = s.int(2, 6)
        chosen = s.sample(items, k)
        owner = s.pick(corpus.GIRLS + corpus.BOYS)
        wrong = _distinct(s, k, [k + 1, k - 1, k + 2, k - 2, k + 3])
        choices, answer = _choices(s, f"{N[k]} {name}.", [f"{N[w]} {name}." for w in wrong])
        text = f"{owner} has these {name}: " + ", ".join(chosen[:-1]) + f" and {chosen[-1]}. That is"
        return {"question": text, "choices": choices, "answer": answer}
    a, b = s.sample(list(range(21)), 2)
    word = s.pick([("bigger", 2), ("smaller", 1)])[0]
    right = max(a, b) if word == "bigger" else min(a, b)
    other = min(a, b) if word == "bigger" else max(a, b)
    choices, answer = _choices(s, f"{corpus.sentence(N[right])} is {word}.", [f"{corpus.sentence(N[other])} is "
                                                                                f"{word}."])
    return {"question": f"Which is {word}, {N[a]} or {N[b]}?", "choices": choices, "answer": answer}


def recall(s: corpus.Sampler) -> dict:
    hero, kind, he, names = _cast(s)
    friend, *others = s.sample(names, 4)
    thing = s.pick(corpus.INANIMATE)[0]
    place = s.pick(corpus.PLACES)[0]
    text = (f"{_opening(s, hero, kind)} {hero} had a {thing}. One day, {hero} went to the {place}. There {he} met "
            f"{friend}. {hero} and {friend} played until the sun went down. Who did {hero} meet? "
            f"{corpus.sentence(he)} met")
    choices, answer = _choices(s, f"{friend}.", [f"{o}." for o in others])
    return {"question": text, "choices": choices, "answer": answer}


def agreement(s: corpus.Sampler) -> dict:
    plural = s.chance(0.5)
    tense = "present"
    subject = s.pick(corpus.ANIMATE)[1 if plural else 0]
    det = s.pick([("the", 3), ("some", 1)])[0] if plural else s.pick([("the", 3), ("a", 1)])[0]
    if det == "a":
        det = corpus.a_or_an(subject)
    # A relative clause whose object has the other number, so that the nearest noun does not give the answer.
    rel_verb = s.pick(corpus.TRANSITIVE)
    obj = corpus.noun_phrase(s, False, not plural, tense, depth=1)
    verb = s.pick(corpus.TRANSITIVE)
    tail = corpus.noun_phrase(s, False, s.chance(0.3), tense, depth=1)
    text = corpus.sentence(f"{det} {subject} that {corpus.verb_form(rel_verb, plural, tense)} {obj}")
    choices, answer = _choices(s, f"{corpus.verb_form(verb, plural, tense)} {tail}.",
                               [f"{corpus.verb_form(verb, not plural, tense)} {tail}."])
    return {"question": text, "choices": choices, "answer": answer}


MULTIPLE_CHOICE = {"demo_arithmetic": arithmetic, "demo_story_sums": story_sum, "demo_counting": counting,
                   "demo_recall": recall, "demo_agreement": agreement}


def _jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="ascii", newline="\n") as f:
        f.write("".join(json.dumps(r, ensure_ascii=True) + "\n" for r in rows))


def _yaml(name: str, body: str) -> str:
    return f"# Generated by scripts/make_downstream_tasks.py; data paths are relative to the repository root.\n" \
           f"task: {name}\n" + body


def multiple_choice_yaml(name: str, out: str) -> str:
    return _yaml(name, f"""dataset_path: json
dataset_kwargs:
  data_files:
    train: {out}/{name}.train.jsonl
    test: {out}/{name}.test.jsonl
output_type: multiple_choice
training_split: train
test_split: test
fewshot_split: train
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""")


def perplexity_yaml(out: str) -> str:
    return _yaml("demo_ppl", f"""dataset_path: json
dataset_kwargs:
  data_files:
    test: {out}/demo_ppl.test.jsonl
output_type: loglikelihood_rolling
test_split: test
num_fewshot: 0
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
metadata:
  version: 1.0
""")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default=OUT, help="where the YAML and JSON lines go (a path relative to the "
                                                      "repository root: the YAML files name their data by it)")
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    out = args.out_dir.rstrip("/")
    for i, (name, make) in enumerate(MULTIPLE_CHOICE.items()):
        s = corpus.Sampler(SEED + i)
        seen: set[str] = set()
        rows: list[dict] = []
        while len(rows) < TEST + FEWSHOT:  # distinct questions, so few-shot items never repeat a test item
            row = make(s)
            if row["question"] not in seen:
                seen.add(row["question"])
                rows.append(row)
        _jsonl(os.path.join(out, f"{name}.test.jsonl"), rows[:TEST])
        _jsonl(os.path.join(out, f"{name}.train.jsonl"), rows[TEST:])
        with open(os.path.join(out, f"{name}.yaml"), "w", encoding="ascii", newline="\n") as f:
            f.write(multiple_choice_yaml(name, out))
        print(f"wrote {name}: {TEST} test and {FEWSHOT} few-shot items")
    docs = corpus.documents(SEED + len(MULTIPLE_CHOICE), PPL_DOCS)
    _jsonl(os.path.join(out, "demo_ppl.test.jsonl"), [{"text": d} for d in docs])
    with open(os.path.join(out, "demo_ppl.yaml"), "w", encoding="ascii", newline="\n") as f:
        f.write(perplexity_yaml(out))
    print(f"wrote demo_ppl: {PPL_DOCS} documents")


if __name__ == "__main__":
    main()
