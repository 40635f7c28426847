"""Rebuild the tiny model, its tokenizer and the small datasets the quickstart and the tests train on.

    .venv/bin/python bench/make_tiny_assets.py            # writes recipes/assets/tiny-llama and recipes/data
    .venv/bin/python bench/make_tiny_assets.py --check    # rebuild in a temporary folder and compare bytes

Everything is deterministic (seeded `random.Random`, sorted inputs, a single-threaded BPE trainer), so
a rebuild reproduces the shipped files byte for byte. Nothing is downloaded.

Outputs:
  recipes/assets/tiny-llama/  config.json (a ~1M-parameter Llama, no weights), tokenizer.json
                              (byte-level BPE trained here on the data below), tokenizer_config.json
                              (special tokens, model_max_length, chat template), README.md
  recipes/data/               alpaca.jsonl, chat.jsonl, corpus.txt, sentiment.csv, pairs.jsonl

The datasets are templated so a tiny randomly initialised model can visibly learn them: short
facts (capitals, animal sounds, fruit colours, antonyms), small arithmetic and word tasks, a gardening
handbook for continued pre-training, movie reviews separable by sentiment words, and preference pairs
whose chosen answer is polite and correct and whose rejected answer is rude or unhelpful.
"""

from __future__ import annotations

import argparse
import csv
import filecmp
import io
import json
import os
import random
import sys
import tempfile
from pathlib import Path
from typing import Callable

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # BPE training single-threaded: reproducible merges
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
SEED = 1234

VOCAB_SIZE = 2048
BOS, EOS, PAD, UNK = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|unk|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
SPECIAL_TOKENS = [BOS, EOS, PAD, UNK, *ROLE_TOKENS]  # ids 0..6, in this order
MODEL_MAX_LENGTH = 512

# Zephyr-like template: role tokens open a turn, eos closes it. The {% generation %} block marks the
# assistant's tokens (content + eos) for `return_assistant_tokens_mask` / TRL `assistant_only_loss`.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|assistant|>\\n' }}{% generation %}{{- message['content'] + eos_token }}{% endgeneration %}"
    "{%- elif message['role'] in ['system', 'user'] %}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + eos_token }}"
    "{%- else %}"
    "{{- raise_exception('chat roles are system, user and assistant; got ' + message['role']) }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"
)

# The Alpaca prompt (used here only so the tokenizer learns its words; the trainer owns the real one).
ALPACA_PROMPT = "Below is an instruction that describes a task. Write a response that appropriately completes the request."

MODEL_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "hidden_act": "silu",
    "max_position_embeddings": MODEL_MAX_LENGTH,
    # ~1/sqrt(hidden): with 0.02 (tuned for 4k-wide models) the frozen, tied random embeddings cap the
    # logits near 2.5 and LoRA on this random base barely moves the loss; with 0.1 it falls ~8.3 -> ~5.2
    # in 120 quickstart steps (response-only loss).
    "initializer_range": 0.1,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "mlp_bias": False,
    "tie_word_embeddings": True,
    "use_cache": True,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": 2,
    "torch_dtype": "float32",
}

# ----------------------------------------------------------------------------------------------
# Fact tables (fixed; the generators draw from them with a seeded RNG)

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Portugal", "Lisbon"),
    ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"), ("Canada", "Ottawa"), ("Mexico", "Mexico City"),
    ("Brazil", "Brasilia"), ("Argentina", "Buenos Aires"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Norway", "Oslo"),
    ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Poland", "Warsaw"), ("Greece", "Athens"),
    ("Turkey", "Ankara"), ("Russia", "Moscow"), ("Australia", "Canberra"), ("Ireland", "Dublin"), ("Austria", "Vienna"),
    ("Peru", "Lima"), ("Chile", "Santiago"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("Nigeria", "Abuja"),
    ("Morocco", "Rabat"), ("Belgium", "Brussels"), ("Hungary", "Budapest"), ("Iceland", "Reykjavik"), ("Cuba", "Havana"),
    ("Colombia", "Bogota"), ("Ghana", "Accra"), ("Nepal", "Kathmandu"), ("Iran", "Tehran"), ("South Korea", "Seoul"),
]
ANIMALS = [
    ("dog", "woof", "meat and kibble", "in houses and on farms"), ("cat", "meow", "fish and meat", "in houses"),
    ("cow", "moo", "grass", "on farms"), ("sheep", "baa", "grass", "on hills and farms"), ("duck", "quack", "seeds and insects", "on ponds"),
    ("horse", "neigh", "hay and oats", "on farms and in fields"), ("pig", "oink", "almost anything", "on farms"),
    ("lion", "roar", "meat", "on the savanna"), ("owl", "hoot", "mice", "in forests"), ("frog", "croak", "insects", "in ponds and marshes"),
    ("goat", "bleat", "leaves and grass", "in the mountains and on farms"), ("snake", "hiss", "mice and eggs", "in grass and among rocks"),
    ("bee", "buzz", "nectar", "in hives"), ("wolf", "howl", "meat", "in forests"), ("donkey", "bray", "hay", "on farms"),
    ("chicken", "cluck", "grain", "on farms"), ("crow", "caw", "seeds and scraps", "in trees and towns"),
    ("mouse", "squeak", "seeds", "in fields and houses"), ("bear", "growl", "berries and fish", "in forests"),
    ("elephant", "trumpet", "grass and leaves", "on the savanna"),
]
FRUITS = [
    ("banana", "yellow"), ("lemon", "yellow"), ("strawberry", "red"), ("cherry", "red"), ("tomato", "red"),
    ("lime", "green"), ("kiwi", "green"), ("grape", "purple"), ("plum", "purple"), ("orange", "orange"),
    ("apricot", "orange"), ("blueberry", "blue"), ("coconut", "brown"), ("pear", "green"), ("raspberry", "red"),
    ("mango", "orange"), ("pineapple", "yellow"), ("watermelon", "green"), ("fig", "purple"), ("peach", "orange"),
]
ANTONYMS = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"), ("up", "down"),
    ("open", "closed"), ("early", "late"), ("old", "young"), ("rich", "poor"), ("hard", "soft"), ("full", "empty"),
    ("strong", "weak"), ("loud", "quiet"), ("tall", "short"), ("wet", "dry"), ("clean", "dirty"), ("true", "false"),
    ("good", "bad"), ("high", "low"), ("near", "far"), ("thick", "thin"), ("heavy", "light"), ("first", "last"),
    ("win", "lose"), ("buy", "sell"), ("push", "pull"), ("begin", "end"), ("inside", "outside"), ("day", "night"),
    ("north", "south"), ("east", "west"), ("left", "right"), ("always", "never"), ("easy", "difficult"),
    ("sweet", "sour"), ("brave", "afraid"), ("cheap", "expensive"), ("friend", "enemy"), ("arrive", "leave"),
]
PLURALS = [
    ("cat", "cats"), ("dog", "dogs"), ("box", "boxes"), ("child", "children"), ("mouse", "mice"), ("man", "men"),
    ("woman", "women"), ("foot", "feet"), ("tooth", "teeth"), ("city", "cities"), ("baby", "babies"), ("leaf", "leaves"),
    ("knife", "knives"), ("bus", "buses"), ("glass", "glasses"), ("tomato", "tomatoes"), ("potato", "potatoes"),
    ("sheep", "sheep"), ("fish", "fish"), ("goose", "geese"), ("book", "books"), ("tree", "trees"), ("church", "churches"),
    ("wolf", "wolves"), ("party", "parties"), ("key", "keys"), ("toy", "toys"), ("person", "people"), ("wish", "wishes"),
    ("house", "houses"),
]
NUMBER_WORDS = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
    "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
]
TENS_WORDS = {20: "twenty", 30: "thirty", 40: "forty", 50: "fifty", 60: "sixty", 70: "seventy", 80: "eighty", 90: "ninety"}
COLORS = ["red", "blue", "green", "yellow", "black", "white", "purple", "orange", "pink", "brown", "grey", "gold"]
WORDS = [
    "apple", "river", "stone", "cloud", "garden", "window", "bread", "candle", "forest", "music", "paper", "horse",
    "silver", "winter", "summer", "bridge", "castle", "flower", "pencil", "island", "rocket", "tiger", "lemon",
    "planet", "ocean", "mirror", "basket", "violin", "shadow", "thunder", "kettle", "lantern", "meadow", "harbor",
]
SENTENCES = [
    "the cat sat on the mat", "we went to the market on Monday", "the sun is shining today",
    "my brother likes to read books", "the train leaves at nine", "she planted tomatoes in the garden",
    "birds sing in the morning", "the river flows to the sea", "he forgot his umbrella at home",
    "our team won the last game", "the soup is too hot to eat", "they built a small wooden boat",
    "it rained all night long", "the children played in the park", "please close the door quietly",
    "the old clock stopped at noon", "a fox jumped over the fence", "the library opens at ten",
]


def number_to_words(n: int) -> str:
    if n < 20:
        return NUMBER_WORDS[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return TENS_WORDS[tens * 10] + ("" if ones == 0 else "-" + NUMBER_WORDS[ones])
    hundreds, rest = divmod(n, 100)
    return NUMBER_WORDS[hundreds] + " hundred" + ("" if rest == 0 else " and " + number_to_words(rest))


# ----------------------------------------------------------------------------------------------
# Instruction tasks: each returns (instruction, input, output)

Task = Callable[[random.Random], tuple[str, str, str]]


def t_capital(r: random.Random):
    country, city = r.choice(CAPITALS)
    q = r.choice([f"What is the capital of {country}?", f"Name the capital city of {country}.", f"Which city is the capital of {country}?"])
    return q, "", f"The capital of {country} is {city}."


def t_capital_input(r: random.Random):
    country, city = r.choice(CAPITALS)
    return "Give the capital city of the country.", country, city


def t_add(r: random.Random):
    a, b = r.randint(0, 99), r.randint(0, 99)
    return "Add the two numbers.", f"{a} + {b}", f"{a} + {b} = {a + b}"


def t_sub(r: random.Random):
    a, b = r.randint(0, 99), r.randint(0, 99)
    a, b = max(a, b), min(a, b)
    return "Subtract the second number from the first.", f"{a} - {b}", f"{a} - {b} = {a - b}"


def t_mul(r: random.Random):
    a, b = r.randint(2, 12), r.randint(2, 12)
    return "Multiply the two numbers.", f"{a} x {b}", f"{a} x {b} = {a * b}"


def t_larger(r: random.Random):
    a, b = r.sample(range(1000), 2)
    return "Which of the two numbers is larger?", f"{a} and {b}", f"{max(a, b)} is larger."


def t_even(r: random.Random):
    n = r.randint(0, 999)
    return "Is the number even or odd?", str(n), f"{n} is {'even' if n % 2 == 0 else 'odd'}."


def t_sort(r: random.Random):
    xs = r.sample(range(100), r.randint(3, 6))
    return "Sort the numbers from smallest to largest.", ", ".join(map(str, xs)), ", ".join(map(str, sorted(xs)))


def t_words(r: random.Random):
    n = r.randint(0, 199)
    return "Write the number in words.", str(n), number_to_words(n)


def t_antonym(r: random.Random):
    a, b = r.choice(ANTONYMS)
    if r.random() < 0.5:
        a, b = b, a
    return "Give the opposite of the word.", a, f'The opposite of "{a}" is "{b}".'


def t_plural(r: random.Random):
    s, p = r.choice(PLURALS)
    return "Write the plural of the noun.", s, p


def t_reverse(r: random.Random):
    ws = r.sample(WORDS + COLORS, r.randint(3, 6))
    return "Reverse the order of the words.", " ".join(ws), " ".join(reversed(ws))


def t_upper(r: random.Random):
    s = r.choice(SENTENCES)
    return "Rewrite the text in capital letters.", s, s.upper()


def t_count_words(r: random.Random):
    s = r.choice(SENTENCES)
    n = len(s.split())
    return "How many words are in the sentence?", s, f"There are {n} words."


def t_first_letter(r: random.Random):
    w = r.choice(WORDS)
    return "What is the first letter of the word?", w, f'The first letter of "{w}" is "{w[0]}".'


def t_spell(r: random.Random):
    w = r.choice(WORDS)
    return "Spell the word letter by letter.", w, " ".join(w.upper())


def t_sound(r: random.Random):
    animal, sound, _, _ = r.choice(ANIMALS)
    return f"What sound does a {animal} make?", "", f"A {animal} says {sound}."


def t_diet(r: random.Random):
    animal, _, food, _ = r.choice(ANIMALS)
    return f"What does a {animal} eat?", "", f"A {animal} eats {food}."


def t_habitat(r: random.Random):
    animal, _, _, home = r.choice(ANIMALS)
    return "Where does this animal live?", animal, f"The {animal} lives {home}."


def t_fruit(r: random.Random):
    fruit, color = r.choice(FRUITS)
    return f"What color is a ripe {fruit}?", "", f"A ripe {fruit} is {color}."


TASKS: list[Task] = [
    t_capital, t_capital_input, t_add, t_sub, t_mul, t_larger, t_even, t_sort, t_words, t_antonym, t_plural,
    t_reverse, t_upper, t_count_words, t_first_letter, t_spell, t_sound, t_diet, t_habitat, t_fruit,
]


def make_alpaca(r: random.Random, n: int = 1000) -> list[dict]:
    out, seen = [], set()
    while len(out) < n:
        ins, inp, outp = r.choice(TASKS)(r)
        if (ins, inp) in seen:
            continue
        seen.add((ins, inp))
        out.append({"instruction": ins, "input": inp, "output": outp})
    return out


# ----------------------------------------------------------------------------------------------
# Chat

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a friendly assistant. Answer in one short sentence.",
    "You are a patient tutor who answers clearly.",
]
GREETINGS = [
    ("Hello!", "Hello! How can I help you today?"),
    ("Hi there.", "Hi! What would you like to know?"),
    ("Good morning!", "Good morning! How can I help?"),
    ("Thank you!", "You are welcome! Let me know if you need anything else."),
    ("Thanks for the help.", "Happy to help. Have a nice day!"),
    ("Who are you?", "I am a small assistant. I can answer simple questions about facts, numbers and words."),
    ("Goodbye!", "Goodbye! Have a great day."),
]


def _as_question(ins: str, inp: str) -> str:
    if not inp:
        return ins
    return f"{ins}\n{inp}" if ins.endswith((".", ":")) or "\n" in inp else f"{ins} {inp}"


def _as_answer(ins: str, inp: str, outp: str) -> str:
    """A chat-style sentence: capitalised, ending with a full stop."""
    outp = outp[:1].upper() + outp[1:]
    return outp if outp.endswith((".", "!", "?", '"')) else f"{outp}."


def make_chat(r: random.Random, n: int = 500) -> list[dict]:
    out, seen = [], set()
    while len(out) < n:
        msgs: list[dict] = []
        if r.random() < 0.4:
            msgs.append({"role": "system", "content": r.choice(SYSTEM_PROMPTS)})
        if r.random() < 0.25:
            g, a = r.choice(GREETINGS[:3])
            msgs += [{"role": "user", "content": g}, {"role": "assistant", "content": a}]
        for _ in range(r.choice([1, 1, 2, 3])):
            ins, inp, outp = r.choice(TASKS)(r)
            msgs += [{"role": "user", "content": _as_question(ins, inp)}, {"role": "assistant", "content": _as_answer(ins, inp, outp)}]
        if r.random() < 0.15:
            g, a = r.choice(GREETINGS[3:])
            msgs += [{"role": "user", "content": g}, {"role": "assistant", "content": a}]
        key = json.dumps(msgs)
        if key in seen:
            continue
        seen.add(key)
        out.append({"messages": msgs})
    return out


# ----------------------------------------------------------------------------------------------
# Corpus: a gardening handbook (consistent facts per plant, so continued pre-training can learn them)

PLANTS = [
    "tomato", "potato", "carrot", "onion", "garlic", "lettuce", "spinach", "cabbage", "broccoli", "cauliflower",
    "pea", "bean", "pumpkin", "courgette", "cucumber", "pepper", "aubergine", "beetroot", "radish", "leek",
    "celery", "kale", "chard", "parsnip", "turnip", "sweetcorn", "strawberry", "raspberry", "blackcurrant", "gooseberry",
    "rhubarb", "asparagus", "basil", "parsley", "mint", "thyme", "rosemary", "sage", "chive", "dill",
    "lavender", "sunflower", "marigold", "nasturtium", "sweet pea", "dahlia", "tulip", "daffodil", "rose", "melon",
]
KINDS = ["vegetable", "fruit", "herb", "flower"]
SOILS = ["light sandy", "rich loamy", "heavy clay", "well-drained chalky", "moist peaty"]
LIGHT = ["full sun", "partial shade", "light shade", "a warm sunny wall"]
WATER = ["every day in hot weather", "twice a week", "once a week", "only when the soil is dry"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"]
PESTS = ["slugs", "aphids", "caterpillars", "carrot fly", "blackfly", "whitefly", "birds", "mice", "red spider mite", "snails"]
REMEDIES = {
    "slugs": "a ring of grit around each plant and evening checks with a torch",
    "aphids": "a spray of soapy water or a visit from ladybirds",
    "caterpillars": "fine netting and picking them off by hand",
    "carrot fly": "a low barrier of fleece around the bed",
    "blackfly": "pinching out the tips of the plants",
    "whitefly": "sticky yellow traps hung above the leaves",
    "birds": "netting stretched over a simple frame",
    "mice": "sowing seeds in pots and planting them out later",
    "red spider mite": "misting the leaves with water in dry weather",
    "snails": "collecting them at dusk and moving them far away",
}
VARIETY_WORDS = ["Golden", "Early", "Giant", "Royal", "Little", "Crimson", "Winter", "Summer", "Emerald", "Velvet", "Northern", "Sweet"]
VARIETY_NOUNS = ["Queen", "Star", "Gem", "Dawn", "King", "Beauty", "Prince", "Jewel", "Arrow", "Crown", "Lady", "Rocket"]
TRAITS = [
    "crops heavily", "resists disease", "stands up well to wind", "grows well in pots", "has a fine flavour",
    "is ready very early", "keeps well after harvest", "copes with cold nights", "needs little water", "grows quickly",
]
STORES = [
    "keep it in a cool dark shed", "store it in the fridge", "dry it on a rack in a warm room", "freeze it in small bags",
    "use it fresh on the same day", "pack it in boxes of dry sand",
]
YELLOW_FIX = ["more nitrogen", "less water", "more water", "a sunnier spot", "fresh compost", "a dose of seaweed feed"]
WILT_FIX = [
    "water it deeply in the evening", "give it some shade at midday", "check the roots for grubs",
    "add a thick mulch around the stem", "move the pot out of the wind",
]
FEEDS = ["a general fertiliser", "well-rotted manure", "a high-potash feed", "garden compost", "seaweed feed", "nothing at all"]


def plant_facts(r: random.Random, name: str, i: int) -> dict:
    kind = "herb" if i in range(32, 40) else "flower" if i in range(40, 49) else "fruit" if i in (26, 27, 28, 29, 49) else "vegetable"
    sow = r.randint(1, 6)
    return {
        "name": name,
        "kind": kind,
        "soil": r.choice(SOILS),
        "light": r.choice(LIGHT),
        "water": r.choice(WATER),
        "sow": MONTHS[sow],
        "plant_out": MONTHS[min(sow + r.randint(1, 2), 11)],
        "harvest": MONTHS[min(sow + r.randint(3, 5), 11)],
        "height": r.choice([10, 15, 20, 30, 40, 50, 60, 80, 100, 150, 200]),
        "spacing": r.choice([5, 10, 15, 20, 30, 45, 60]),
        "pests": r.sample(PESTS, 2),
        "feed": r.choice(FEEDS),
        "days": r.randint(5, 21),
        "years": r.choice([1, 1, 1, 2, 3, 5]),
        "varieties": [(f"{v} {w}", t) for v, w, t in zip(r.sample(VARIETY_WORDS, 3), r.sample(VARIETY_NOUNS, 3), r.sample(TRAITS, 3))],
        "store": r.choice(STORES),
        "keeps": r.randint(1, 12),
        "yellow": r.choice(YELLOW_FIX),
        "wilt": r.choice(WILT_FIX),
        "companions": r.sample([x for x in PLANTS if x != name], 2),
    }


def corpus_text(r: random.Random) -> str:
    facts = [plant_facts(r, name, i) for i, name in enumerate(PLANTS)]
    by_name = {f["name"]: f for f in facts}
    paras: list[str] = ["The Small Garden Handbook", "A plain guide to growing vegetables, fruit, herbs and flowers in a small garden."]
    paras.append(
        "Every plant in this handbook is described in the same order: what it is, where it grows best, how to sow "
        "and plant it, how to water and feed it, which pests trouble it, and when to harvest. Read the chapter for "
        "a plant before you sow it, and keep notes of what worked in your own garden."
    )
    for f in facts:
        n, N = f["name"], f["name"].capitalize()
        companions = f["companions"]
        p1, p2 = f["pests"]
        paras.append(f"Chapter: {N}")
        paras.append(
            f"The {n} is a {f['kind']} grown in many small gardens. It grows best in {f['soil']} soil and "
            f"prefers {f['light']}. A healthy {n} reaches a height of about {f['height']} centimetres."
        )
        paras.append(
            f"Sow {n} seeds in {f['sow']}. The seeds germinate in about {f['days']} days. Plant the young {n} "
            f"out in {f['plant_out']}, leaving {f['spacing']} centimetres between plants so that air can move "
            f"between the leaves."
        )
        paras.append(
            f"Water the {n} {f['water']}. Feed it with {f['feed']} while it is growing. "
            + ("Too much feed makes soft leaves that pests enjoy. " if f["feed"] != "nothing at all" else "It does well in poor soil. ")
            + f"A mulch of compost keeps the roots cool and the soil moist."
        )
        paras.append(
            f"The main pests of the {n} are {p1} and {p2}. Against {p1}, try {REMEDIES[p1]}. "
            f"Against {p2}, try {REMEDIES[p2]}. Check the plants every few days and act early."
        )
        paras.append(
            f"Harvest the {n} in {f['harvest']}. "
            + (f"A {n} plant lives for about {f['years']} years." if f["years"] > 1 else f"The {n} is grown as an annual and is sown again each year.")
            + f" Good companions for the {n} are the {companions[0]} and the {companions[1]}."
        )
        (v1, t1), (v2, t2), (v3, t3) = f["varieties"]
        paras.append(
            f"Three varieties of {n} do well in a small garden. '{v1}' {t1}. '{v2}' {t2}. '{v3}' {t3}. "
            f"If you have room for only one {n}, choose '{v1}'."
        )
        paras.append(
            f"After the harvest, {f['store']}. Stored this way, the {n} keeps for about {f['keeps']} weeks. "
            f"If the leaves of the {n} turn yellow, the plant usually needs {f['yellow']}. If the {n} wilts in "
            f"the afternoon, {f['wilt']}."
        )
        paras.append(
            f"Notes from the garden: last year the {n} did best in {f['light']}. I sowed it in {f['sow']}, planted it "
            f"out in {f['plant_out']} and picked the first {n} in {f['harvest']}. The {p1} arrived soon after planting, "
            f"so now I deal with them at once. Next year I will grow '{v1}' again beside the {companions[0]}."
        )
    paras.append("The Garden Calendar")
    for m in MONTHS:
        sow = [f["name"] for f in facts if f["sow"] == m]
        plant = [f["name"] for f in facts if f["plant_out"] == m]
        harvest = [f["name"] for f in facts if f["harvest"] == m]
        lines = [f"In {m}"]
        lines.append(f"sow {', '.join(sow)}" if sow else "sow nothing new")
        lines.append(f"plant out {', '.join(plant)}" if plant else "plant nothing out")
        lines.append(f"and harvest {', '.join(harvest)}." if harvest else "and harvest nothing yet.")
        paras.append(lines[0] + ", " + "; ".join(lines[1:]))
    paras.append("Questions and Answers")
    qa = []
    for f in facts:
        n = f["name"]
        qa += [
            f"Question: When should I sow the {n}? Answer: Sow the {n} in {f['sow']}.",
            f"Question: Which soil does the {n} like? Answer: The {n} likes {f['soil']} soil.",
            f"Question: How often should I water the {n}? Answer: Water the {n} {f['water']}.",
            f"Question: When is the {n} ready to harvest? Answer: Harvest the {n} in {f['harvest']}.",
            f"Question: What pests attack the {n}? Answer: The {n} is attacked by {f['pests'][0]} and {f['pests'][1]}.",
            f"Question: How far apart should I plant the {n}? Answer: Leave {f['spacing']} centimetres between plants.",
            f"Question: How tall does the {n} grow? Answer: The {n} grows to about {f['height']} centimetres.",
            f"Question: What should I feed the {n}? Answer: Feed the {n} with {f['feed']}.",
            f"Question: Which plants grow well next to the {n}? Answer: The {f['companions'][0]} and the {f['companions'][1]}.",
            f"Question: Which variety of {n} should I choose? Answer: Choose '{f['varieties'][0][0]}'; it {f['varieties'][0][1]}.",
            f"Question: When do I plant out the {n}? Answer: Plant the {n} out in {f['plant_out']}.",
            f"Question: Does the {n} like sun or shade? Answer: The {n} prefers {f['light']}.",
            f"Question: How long does the {n} keep? Answer: About {f['keeps']} weeks if you {f['store']}.",
        ]
    r.shuffle(qa)
    paras += qa
    assert len(by_name) == len(PLANTS)
    return "\n\n".join(paras) + "\n"


# ----------------------------------------------------------------------------------------------
# Sentiment reviews (IMDB-style, short, separable by sentiment words)

POS_ADJ = ["wonderful", "brilliant", "excellent", "moving", "delightful", "superb", "charming", "beautiful", "gripping", "funny", "clever", "fantastic"]
NEG_ADJ = ["terrible", "boring", "awful", "dull", "disappointing", "dreadful", "clumsy", "tedious", "weak", "painful", "messy", "lifeless"]
POS_VERB = ["loved", "enjoyed", "adored", "really liked"]
NEG_VERB = ["hated", "disliked", "could not stand", "regretted watching"]
POS_END = ["I would happily watch it again.", "Highly recommended.", "A great night out.", "Ten out of ten.", "One of the best films this year."]
NEG_END = ["I want my money back.", "Avoid it.", "A waste of two hours.", "One out of ten.", "One of the worst films this year."]
ASPECTS = ["acting", "story", "music", "ending", "script", "cast", "camera work", "dialogue", "pacing", "soundtrack"]
GENRES = ["film", "movie", "drama", "comedy", "thriller", "documentary", "western", "musical"]
OPENERS = ["I watched this {g} last night.", "This {g} came out last year.", "My friend took me to see this {g}.", "I finally saw this {g}.", ""]


def review(r: random.Random, positive: bool) -> str:
    adj, verb, end = (POS_ADJ, POS_VERB, POS_END) if positive else (NEG_ADJ, NEG_VERB, NEG_END)
    g = r.choice(GENRES)
    a1, a2 = r.sample(ASPECTS, 2)
    j1, j2, j3 = r.sample(adj, 3)
    parts = [
        r.choice(OPENERS).format(g=g),
        r.choice([f"The {a1} was {j1}.", f"What a {j1} {g}.", f"It is a {j1} {g}."]),
        r.choice([f"The {a2} was {j2} too.", f"The {a2} felt {j2}.", f"Even the {a2} was {j2}."]),
        r.choice([f"I {r.choice(verb)} it.", f"Overall it was {j3}.", f"I {r.choice(verb)} every minute of it." if positive else f"Every minute of it was {j3}."]),
        r.choice(end),
    ]
    return " ".join(p for p in parts if p)


def make_sentiment(r: random.Random, n: int = 1000) -> list[tuple[str, str]]:
    out, seen = [], set()
    while len(out) < n:
        positive = len(out) % 2 == 0 if r.random() < 0.5 else r.random() < 0.5
        text = review(r, positive)
        if text in seen:
            continue
        seen.add(text)
        out.append((text, "positive" if positive else "negative"))
    return out


# ----------------------------------------------------------------------------------------------
# Preference pairs (hh-rlhf-style): chosen is polite and correct, rejected is rude or unhelpful

POLITE_OPEN = ["Sure!", "Of course.", "Good question.", "Happy to help.", "Certainly."]
POLITE_CLOSE = ["", " Let me know if you have any other questions.", " I hope that helps.", " Feel free to ask more."]
RUDE = [
    "Look it up yourself.",
    "Why would I tell you that?",
    "That is a stupid question.",
    "I don't care. Ask someone else.",
    "Figure it out on your own.",
    "Stop bothering me with silly questions.",
    "No.",
    "Whatever. It does not matter.",
]


def make_pairs(r: random.Random, n: int = 500) -> list[dict]:
    out, seen = [], set()
    while len(out) < n:
        ins, inp, outp = r.choice(TASKS)(r)
        prompt = _as_question(ins, inp)
        if prompt in seen:
            continue
        seen.add(prompt)
        answer = _as_answer(ins, inp, outp)
        chosen = f"{r.choice(POLITE_OPEN)} {answer}{r.choice(POLITE_CLOSE)}"
        style = r.random()
        if style < 0.6:
            rejected = r.choice(RUDE)
        elif style < 0.85:
            # rude and wrong: an answer drawn for some other question
            _, _, other = r.choice(TASKS)(r)
            rejected = f"{r.choice(RUDE)} {_as_answer('', '', other)}"
        else:
            rejected = f"{r.choice(RUDE)} Fine: {answer}"
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return out


# ----------------------------------------------------------------------------------------------
# Tokenizer


def train_tokenizer(texts: list[str]):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1", special_tokens=[(BOS, bos_id)]),
    ])
    return tok


def tokenizer_config(tok) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": UNK,
        "additional_special_tokens": ROLE_TOKENS,
        "model_max_length": MODEL_MAX_LENGTH,
        "padding_side": "right",
        "truncation_side": "right",
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {
            str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
            for i, t in enumerate(SPECIAL_TOKENS)
        },
    }


README = """# tiny-llama

A tiny Llama (853,120 parameters: {layers} layers, hidden {hidden}, {heads} heads, {kv} KV heads, vocab {vocab},
context {ctx}, tied embeddings, fp32) for the quickstart and the tests. It trains on a laptop CPU in
seconds; it is not a useful language model.

`initializer_range` is {init} (about 1/sqrt(hidden)), not Llama's 0.02: LoRA trains adapters on a
frozen random base, and with 0.02 the tied random embeddings keep every logit small, so the loss
could hardly fall. With {init}, the quickstart's loss falls from about 8.3 to about 5.2.

**There are no weights in this folder.** ftl initialises random weights from `config.json` when a
model folder has no `*.safetensors`/`*.bin` (as `AutoModelForCausalLM.from_config` does, seeded by
`train.seed`). `ftl estimate` reads only `config.json` and counts local data with `tokenizer.json`.

Files, all rebuilt byte for byte by `bench/make_tiny_assets.py` (nothing is downloaded):

- `config.json`: the architecture (`model_type: llama`).
- `tokenizer.json`: byte-level BPE trained on `recipes/data/` with the `tokenizers` package. Encoding
  prepends `{bos}` (like Llama 3); it never appends an end token, so a trainer appends `{eos}` itself.
- `tokenizer_config.json`: `PreTrainedTokenizerFast`, `model_max_length` {ctx}, and the chat template.

Special tokens (ids 0-6): `{bos}` bos, `{eos}` eos (also the end of every chat turn), `{pad}` pad
(distinct from eos), `{unk}` unk (byte-level BPE never emits it), `<|system|>`, `<|user|>`,
`<|assistant|>` (chat roles).

Chat template (`messages` with roles system/user/assistant):

```
{bos}<|system|>\\nSYSTEM{eos}<|user|>\\nUSER{eos}<|assistant|>\\nANSWER{eos}
```

`add_generation_prompt=True` appends `<|assistant|>\\n`. The assistant's content and its closing
`{eos}` sit inside a `{{% generation %}}` block, so `return_assistant_tokens_mask=True` (and TRL's
`assistant_only_loss`) marks exactly the tokens to train on. The rendered text starts with `{bos}`;
tokenize it with `add_special_tokens=False` (as `apply_chat_template` does) to avoid a second bos.

Loading, fully offline:

```python
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained("recipes/assets/tiny-llama")
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained("recipes/assets/tiny-llama"))
```
"""


# ----------------------------------------------------------------------------------------------


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def _csv(rows: list[tuple[str, str]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["text", "label"])
    w.writerows(rows)
    return buf.getvalue()


def build(out_root: Path) -> list[Path]:
    data_dir = out_root / "recipes" / "data"
    model_dir = out_root / "recipes" / "assets" / "tiny-llama"
    data_dir.mkdir(parents=True, exist_ok=True)
    model_dir.mkdir(parents=True, exist_ok=True)

    # one RNG per dataset, so changing one generator leaves the others' files unchanged
    alpaca = make_alpaca(random.Random(SEED + 1))
    chat = make_chat(random.Random(SEED + 2))
    corpus = corpus_text(random.Random(SEED + 3))
    sentiment = make_sentiment(random.Random(SEED + 4))
    pairs = make_pairs(random.Random(SEED + 5))

    files: dict[Path, str] = {
        data_dir / "alpaca.jsonl": _jsonl(alpaca),
        data_dir / "chat.jsonl": _jsonl(chat),
        data_dir / "corpus.txt": corpus,
        data_dir / "sentiment.csv": _csv(sentiment),
        data_dir / "pairs.jsonl": _jsonl(pairs),
    }

    # tokenizer training texts, in a fixed order
    texts: list[str] = []
    for rec in alpaca:
        texts.append(f"{ALPACA_PROMPT}\n\n### Instruction:\n{rec['instruction']}\n\n### Input:\n{rec['input']}\n\n### Response:\n{rec['output']}")
    for rec in chat:
        texts += [m["content"] for m in rec["messages"]]
    texts += corpus.split("\n\n")
    texts += [t for t, _ in sentiment] + ["positive", "negative"]
    for rec in pairs:
        texts += [rec["prompt"], rec["chosen"], rec["rejected"]]
    texts += [f"Human: {rec['prompt']}\n\nAssistant: {rec['chosen']}" for rec in pairs[:50]]
    tok = train_tokenizer(texts)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    assert vocab == VOCAB_SIZE, f"the BPE trainer stopped at {vocab} tokens; lower VOCAB_SIZE or add data"

    config = dict(MODEL_CONFIG)
    files[model_dir / "config.json"] = json.dumps(config, indent=2) + "\n"
    files[model_dir / "tokenizer.json"] = tok.to_str(pretty=True) + "\n"
    files[model_dir / "tokenizer_config.json"] = json.dumps(tokenizer_config(tok), indent=2, ensure_ascii=False) + "\n"
    files[model_dir / "README.md"] = README.format(
        layers=config["num_hidden_layers"], hidden=config["hidden_size"], heads=config["num_attention_heads"],
        kv=config["num_key_value_heads"], vocab=config["vocab_size"], ctx=config["max_position_embeddings"],
        init=config["initializer_range"],
        bos=BOS, eos=EOS, pad=PAD, unk=UNK,
    )
    for path, text in files.items():
        path.write_text(text, encoding="utf-8")
    return list(files)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="rebuild in a temporary folder and compare with the shipped files")
    args = ap.parse_args()
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            built = build(Path(tmp))
            bad = [p.relative_to(tmp) for p in built
                   if not (ROOT / p.relative_to(tmp)).is_file() or not filecmp.cmp(p, ROOT / p.relative_to(tmp), shallow=False)]
        for p in bad:
            print(f"differs: {p}")
        print("ok: shipped assets match a rebuild" if not bad else f"{len(bad)} file(s) differ; run bench/make_tiny_assets.py")
        return 1 if bad else 0
    for p in build(ROOT):
        print(f"{p.stat().st_size:>9,d}  {p.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
