"""Synthetic but non-trivial preference pairs for the reward-model benchmark and README figures.

Five kinds of prompts, each with a rule a reader can check and a reward model has to learn from
the response *in the context of its prompt* (length alone does not give the answer away):

* capitals    -- the chosen answer names the right capital, the rejected one a wrong capital;
* arithmetic  -- right versus off-by-a-little result (same wording and length);
* counting    -- "Name N fruits": exactly N distinct items versus N±1 or a repeated item;
* helpfulness -- a short helpful answer versus a dismissive or off-topic one;
* kindness    -- a kind sentence about a subject versus a rude one.

``make_pairs(n, seed)`` returns dicts ``{"prompt", "chosen", "rejected", "kind"}``; the same seed
gives the same pairs.
"""

from __future__ import annotations

import random

CAPITALS = [
    ("France", "Paris"),
    ("Germany", "Berlin"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Portugal", "Lisbon"),
    ("Japan", "Tokyo"),
    ("China", "Beijing"),
    ("Russia", "Moscow"),
    ("Egypt", "Cairo"),
    ("Greece", "Athens"),
    ("Norway", "Oslo"),
    ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"),
    ("Poland", "Warsaw"),
    ("Austria", "Vienna"),
    ("Ireland", "Dublin"),
    ("Canada", "Ottawa"),
    ("Mexico", "Mexico City"),
    ("Peru", "Lima"),
    ("Chile", "Santiago"),
    ("Kenya", "Nairobi"),
    ("India", "New Delhi"),
    ("Thailand", "Bangkok"),
    ("Turkey", "Ankara"),
    ("Cuba", "Havana"),
    ("Argentina", "Buenos Aires"),
    ("Australia", "Canberra"),
    ("Belgium", "Brussels"),
    ("Denmark", "Copenhagen"),
    ("Hungary", "Budapest"),
    ("Vietnam", "Hanoi"),
    ("Iran", "Tehran"),
    ("Colombia", "Bogota"),
    ("Nigeria", "Abuja"),
]
CAPITAL_FORMS = ["The capital of {c} is {x}.", "{x} is the capital of {c}.", "It is {x}.", "{x}."]

FRUITS = ["apple", "banana", "cherry", "mango", "pear", "peach", "plum", "grape", "orange", "lemon", "kiwi", "melon"]
ANIMALS = ["dog", "cat", "horse", "rabbit", "tiger", "lion", "eagle", "shark", "whale", "zebra", "goat", "sheep"]
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "pink", "brown", "grey", "gold"]
CATEGORIES = {"fruits": FRUITS, "animals": ANIMALS, "colours": COLOURS}
NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}

HOW_TO = [
    ("How do I boil an egg?", "Put the egg in boiling water for about nine minutes, then cool it in cold water."),
    (
        "How can I fall asleep faster?",
        "Keep a regular bedtime, avoid screens for an hour before bed and keep the room dark and cool.",
    ),
    (
        "How do I make a cup of tea?",
        "Boil water, pour it over a tea bag, wait three to five minutes, then remove the bag.",
    ),
    (
        "How do I save money each month?",
        "Write down what you spend, set a budget, and move a fixed amount to savings on payday.",
    ),
    (
        "How can I learn a new language?",
        "Practise a little every day, learn common words first, and talk with native speakers.",
    ),
    (
        "How do I keep a plant alive?",
        "Give it light, water it when the top of the soil is dry, and do not let it sit in water.",
    ),
    ("How do I write a good email?", "State the point in the first line, keep it short, and end with a clear request."),
    (
        "How do I clean a cast iron pan?",
        "Rinse it with hot water, scrub with salt, dry it fully and rub in a little oil.",
    ),
    ("How do I start running?", "Begin with short runs mixed with walking three times a week and build up slowly."),
    ("How can I remember names better?", "Repeat the name when you hear it and link it to something about the person."),
    ("How do I fix a slow laptop?", "Close programs you do not use, remove startup apps, and free some disk space."),
    (
        "How do I cook rice?",
        "Rinse one cup of rice, add two cups of water, simmer covered for fifteen minutes, then rest.",
    ),
]
DISMISSIVE = [
    "I don't know. Look it up yourself.",
    "Why would you even ask that?",
    "That is not my problem.",
    "Figure it out on your own.",
    "No idea, and I do not care.",
]
OFF_TOPIC = [
    "The weather was lovely last Tuesday and many people went to the beach.",
    "Bananas are a good source of potassium and are eaten all over the world.",
    "The history of the bicycle goes back to the early nineteenth century in Europe.",
    "Some people collect stamps, and others collect coins or old postcards.",
]

SUBJECTS = [
    "my neighbour",
    "a teacher",
    "the new intern",
    "my grandmother",
    "a bus driver",
    "the team",
    "a nurse",
    "my best friend",
    "the baker",
    "a volunteer",
]
KIND = [
    "{s} always makes the day brighter with a warm smile.",
    "I am grateful for {s}, who is patient and generous.",
    "{s} works hard and deserves every bit of thanks.",
    "Everyone is lucky to know {s}, who is so thoughtful.",
]
RUDE = [
    "{s} is useless and nobody likes them.",
    "I can't stand {s}, who is lazy and annoying.",
    "{s} ruins everything and should just leave.",
    "Nobody cares about {s}, who is a waste of time.",
]


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def _capitals(rng: random.Random) -> tuple[str, str, str]:
    country, capital = rng.choice(CAPITALS)
    wrong = rng.choice([c for _, c in CAPITALS if c != capital])
    form = rng.choice(CAPITAL_FORMS)
    prompt = rng.choice(
        ["What is the capital of {c}?", "Which city is the capital of {c}?", "Name the capital of {c}."]
    )
    return prompt.format(c=country), form.format(c=country, x=capital), form.format(c=country, x=wrong)


def _arithmetic(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(2, 40), rng.randint(2, 40)
    op, value = rng.choice([("plus", a + b), ("minus", a - b), ("times", a * b)])
    wrong = value + rng.choice([-3, -2, -1, 1, 2, 3, 10])
    form = rng.choice(["{a} {op} {b} is {v}.", "The answer is {v}.", "{v}"])
    prompt = rng.choice(["What is {a} {op} {b}?", "Compute {a} {op} {b}.", "Please tell me {a} {op} {b}."])
    return (
        prompt.format(a=a, op=op, b=b),
        form.format(a=a, op=op, b=b, v=value),
        form.format(a=a, op=op, b=b, v=wrong),
    )


def _counting(rng: random.Random) -> tuple[str, str, str]:
    name, pool = rng.choice(list(CATEGORIES.items()))
    n = rng.choice([2, 3, 4, 5])
    items = rng.sample(pool, n + 1)
    good = items[:n]
    mistake = rng.choice(["fewer", "more", "repeat"])
    if mistake == "fewer" and n > 2:
        bad = items[: n - 1]
    elif mistake == "repeat":
        bad = items[: n - 1] + [items[0]]
    else:
        bad = items
    prompt = rng.choice(["Name {w} {c}.", "List exactly {w} {c}.", "Give me {w} {c}, please."]).format(
        w=NUMBER_WORDS[n], c=name
    )
    return prompt, _cap(", ".join(good)) + ".", _cap(", ".join(bad)) + "."


def _helpfulness(rng: random.Random) -> tuple[str, str, str]:
    question, answer = rng.choice(HOW_TO)
    bad = rng.choice(DISMISSIVE + OFF_TOPIC + [a for q, a in HOW_TO if q != question])
    return question, answer, bad


def _kindness(rng: random.Random) -> tuple[str, str, str]:
    subject = rng.choice(SUBJECTS)
    prompt = rng.choice(["Write one sentence about {s}.", "Say something about {s}.", "Describe {s} in a sentence."])
    return (
        prompt.format(s=subject),
        _cap(rng.choice(KIND).format(s=subject)),
        _cap(rng.choice(RUDE).format(s=subject)),
    )


KINDS = {
    "capitals": _capitals,
    "arithmetic": _arithmetic,
    "counting": _counting,
    "helpfulness": _helpfulness,
    "kindness": _kindness,
}


def make_pairs(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    names = list(KINDS)
    out = []
    for i in range(n):
        kind = names[i % len(names)]
        prompt, chosen, rejected = KINDS[kind](rng)
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "kind": kind})
    rng.shuffle(out)
    return out


if __name__ == "__main__":
    import argparse
    import json
    from pathlib import Path

    parser = argparse.ArgumentParser(description="write train.jsonl and eval.jsonl of synthetic preference pairs")
    parser.add_argument("folder", type=Path)
    parser.add_argument("--train_pairs", type=int, default=160)
    parser.add_argument("--eval_pairs", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    pairs = make_pairs(args.train_pairs + args.eval_pairs, seed=args.seed)
    args.folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", pairs[: args.train_pairs]), ("eval", pairs[args.train_pairs :])):
        (args.folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {args.folder}/train.jsonl ({args.train_pairs} pairs) and eval.jsonl ({args.eval_pairs} pairs)")
