#!/usr/bin/env python3
"""Make tiny SD3-style tokenizers (CLIP-L, CLIP-G, T5) and a token-id fixture.

Everything is trained here, deterministically, on a small built-in English
caption corpus; no hub access is needed.  The files are written in the same
formats as the `tokenizer/`, `tokenizer_2/` and `tokenizer_3/` folders of the
stabilityai/stable-diffusion-3-medium-diffusers checkpoint:

  models/tokenizers/clip/    vocab.json merges.txt special_tokens_map.json
                             tokenizer_config.json tokenizer.json
                             (pad = <|endoftext|>, like CLIP-L `tokenizer/`)
  models/tokenizers/clip_g/  same vocabulary, pad = "!" (like `tokenizer_2/`)
  models/tokenizers/t5/      spiece.model tokenizer.json special_tokens_map.json
                             tokenizer_config.json (like `tokenizer_3/`)

and `crates/sd-text/tests/fixtures/token_ids.json` with the ids that the
diffusers SD3 pipeline computes for a set of prompts (same tokenizer calls as
`StableDiffusion3Pipeline._get_clip_prompt_embeds` / `_get_t5_prompt_embeds`).

Re-running the script gives byte-identical files.

Usage:  /work/refenv/bin/python scripts/make_tiny_tokenizers.py
"""

from __future__ import annotations

import collections
import json
import os
import random
import shutil
import sys
import tempfile
import unicodedata
from pathlib import Path

import regex

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "models" / "tokenizers"
FIXTURE = ROOT / "crates" / "sd-text" / "tests" / "fixtures" / "token_ids.json"

# Target sizes.
CLIP_VOCAB_SIZE = 1536  # 256 bytes + 256 bytes</w> + merges + 2 specials
T5_SPM_VOCAB_SIZE = 1000  # sentencepiece pieces incl. <pad> </s> <unk>
T5_EXTRA_IDS = 100  # <extra_id_0..99>, appended like real T5 (total 1100)
CLIP_MAX_LEN = 77

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"

# --------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------

HANDWRITTEN = [
    "a red circle on the left, a small blue square, green background",
    "a photo of a cat",
    "a photo of a dog",
    "a photograph of an astronaut riding a horse",
    "a cat sitting on a wooden table next to a cup of coffee",
    "a dog running on the beach at sunset",
    "two apples and a banana on a white plate",
    "a bowl of fruit on a kitchen counter",
    "a yellow taxi driving down a busy city street",
    "a red car parked in front of a house",
    "a small boat on a calm lake, mountains in the distance",
    "a bicycle leaning against a brick wall",
    "a vase of flowers on a windowsill",
    "a green tree in the middle of a field",
    "an old man reading a newspaper on a bench",
    "a woman holding an umbrella in the rain",
    "a child playing with a ball in the park",
    "a bird sitting on a branch",
    "a cup of tea and a book on a table",
    "a pizza with cheese and tomatoes",
    "a clock on the wall showing three o'clock",
    "a lamp next to a bed in a dark room",
    "a laptop on a desk with a cup of coffee",
    "a plate of pasta with a fork",
    "a black and white photo of a train station",
    "an orange sunset over the ocean",
    "a snowy mountain under a blue sky",
    "a forest with tall trees and a small river",
    "a city skyline at night with bright lights",
    "a chair and a table in an empty room",
    "a teddy bear on a bed",
    "a horse standing in a green field",
    "a cow eating grass on a farm",
    "a sheep and a goat near a fence",
    "a fish swimming in a glass bowl",
    "a butterfly on a purple flower",
    "a house with a red roof and a white door",
    "a bus stopped at a traffic light",
    "an airplane flying over the clouds",
    "a street sign on a pole",
    "a stop sign at the corner of the road",
    "a pair of shoes on the floor",
    "a man wearing a hat and sunglasses",
    "a girl with long hair smiling at the camera",
    "a boy riding a skateboard",
    "a group of people walking in the street",
    "a close-up photo of a dog's face",
    "it's a sunny day in the park",
    "the cat's toy is under the sofa",
    "don't forget the blue hat",
    "we're looking at a painting of a lighthouse",
    "they've built a sandcastle on the beach",
    "i'll take the red one, you'll take the green one",
    "a painting of a bowl of cherries, oil on canvas",
    "a watercolor painting of a small village",
    "a pencil sketch of a tree",
    "a digital illustration of a robot",
    "a 3d render of a shiny metal sphere",
    "a cartoon drawing of a happy sun",
    "a minimalist poster with a single black line",
    "a logo with the letter a in a circle",
    "a sign that says hello world",
    "a blackboard with the number 42 written on it",
    "a birthday cake with 5 candles",
    "a calendar showing the year 2024",
    "10 red dots on a white background",
    "3 blue triangles and 2 yellow stars",
    "a chessboard with 64 squares",
    "a grid of 9 colored squares",
    "a row of 7 green circles",
    "high quality, detailed, 4k, sharp focus",
    "a beautiful landscape, trending on artstation, highly detailed",
    "photorealistic, studio lighting, soft shadows",
    "a cinematic shot of a car on a wet road at night",
    "an empty white background",
    "a simple black square in the center of a white image",
    "a gradient from blue to purple",
    "a checkerboard pattern of black and white squares",
    "stripes of red, orange, yellow, green, blue and violet",
    "a rainbow over a green hill",
    "a cup, a spoon and a knife on a table",
    "a kitchen with a sink, an oven and a fridge",
    "a living room with a couch, a tv and a plant",
    "a bathroom with a mirror and a towel",
    "a garden with roses and a stone path",
    "a bridge over a river in the fog",
    "a candle burning in the dark",
    "a glass of water on a table",
    "a bottle of wine and two glasses",
    "a basket full of eggs",
    "a sandwich cut in half",
    "a hot dog with mustard",
    "a slice of cake with a strawberry on top",
    "an ice cream cone melting in the sun",
    "a giraffe eating leaves from a tall tree",
    "an elephant walking in the savanna",
    "a zebra and a lion near a water hole",
    "a bear catching a fish in a river",
    "a penguin standing on the ice",
    "a monkey hanging from a branch",
    "a rabbit in the grass",
    "a duck swimming in a pond",
    "an owl sitting on a fence at night",
    "a tiny mouse next to a huge piece of cheese",
    "a large brown dog and a small white cat",
    "a big red ball and a little blue ball",
    "the quick brown fox jumps over the lazy dog",
    "hello! how are you? fine, thanks.",
    "a sign reading: open 24/7",
    "text saying \"sale\" in big letters",
    "a map of the world with blue oceans",
    "a globe on a wooden stand",
    "a guitar leaning against an amplifier",
    "a piano in a concert hall",
    "a violin on a chair",
    "a soccer ball on the grass",
    "a tennis player hitting the ball",
    "a baseball player swinging a bat",
    "a surfer riding a big wave",
    "a skier going down a snowy slope",
    "a kite flying in the sky",
    "a frisbee in the air above a dog",
]

# A wider everyday vocabulary, so that the unigram model can reach ~1000 pieces.
NOUNS = """
apple airport anchor ant apron armchair artist backpack bakery balcony balloon
bandage barn basket bathtub battery beach beard bed bee beetle bell belt bench
blanket blender blossom bookshelf bottle bouquet bowl bracelet bread brick
broom bucket building bulb butter button cabin cactus camel camera campfire
candle canoe canyon carpet carrot castle caterpillar cathedral ceiling cherry
chimney church cliff cloud coat coconut coin compass computer cookie corn
cottage crab crayon crocodile crown cucumber curtain cushion deer desert dolphin
donkey door dragon drawer dress drum eagle engine envelope eraser factory
feather fence fireplace fireworks flag flamingo flashlight fork fountain frog
garage gate ghost glacier glove goat grapes guitar hammer hammock harbor helmet
hill honey hospital hotel island jacket jar jellyfish jungle kangaroo kettle key
keyboard kitten knife ladder lake lantern leaf lemon library lighthouse lizard
lobster mailbox mango meadow microscope mirror mitten motorcycle mountain
mushroom necklace nest notebook octopus onion orchard ostrich oven paddle
palace pancake panda parrot peach peacock pear pebble pencil pepper piano
pillow pineapple pizza planet pocket pumpkin puppy quilt rabbit raccoon radio
railway rainbow river robot rocket roof rope rose saddle sailboat salad
scarf scissors seashell shark shelf shovel skyscraper snail snake snowman
sofa spider spoon squirrel stadium staircase statue strawberry submarine
suitcase sunflower swan sweater swing telescope temple tent tomato toothbrush
tower tractor train treasure truck trumpet tunnel umbrella unicorn valley
vase village volcano wagon wallet waterfall whale wheel window windmill wolf
""".split()
ADJECTIVES = """
ancient bright broken calm cheerful clean cozy colorful crooked curly dusty
elegant empty enormous fancy fluffy foggy frozen fuzzy gentle giant glowing
golden graceful greasy hairy happy heavy hollow icy lonely lovely metallic
misty modern muddy narrow neat noisy old peaceful plastic polished quiet
rainy rough rusty sandy scary shiny shiny silky sleepy slippery smooth sparkling
spotted square steep sticky stormy striped sunny tall tangled thick thin tidy
transparent twisted ugly vintage warm wet wide wild windy wooden wrinkled young
""".split()
VERBS = """
sleeping jumping running flying swimming reading dancing singing eating
drinking climbing sitting standing walking painting cooking laughing floating
glowing spinning melting falling rolling hiding waiting smiling shining
""".split()

MORE_NOUNS = """
accordion acorn actor alley alpaca amphitheater antelope aquarium arch archer
astronaut avocado axe baby badger bagel bamboo banjo barrel baseball bat
beaver bicycle bison blacksmith blueberry boulder bowtie boxer branch bridge
broccoli bubble buffalo bull burger bus butterfly cabbage cake calculator
canal candy cannon cap captain cardinal carousel cart cashier cat cave cello
chair chameleon cheese cheetah chef chess chicken chipmunk chocolate cinema
circus city clown coast cobra coffee comet cone cook coral cowboy coyote crane
cricket crow cupcake cyclist daisy dancer dentist diamond dinosaur doctor
doll dome doughnut dove dragonfly duckling dune earth eel egg elephant elk
falcon farmer ferry fig firefighter fisherman flamingo flute forest fox
gardener garlic gazelle gecko gem giraffe glass globe gorilla grasshopper
gull hamster harp hawk hedgehog heron hippo hive horizon hummingbird hunter
hut iceberg igloo iguana jaguar jeep jet judge juggler kayak king kiwi koala
lab ladybug lamb lava lemonade leopard lettuce lily lime llama lynx magician
magnet maple marble market mask meteor milk mole monk moon moose moth mule
muffin museum musician nurse nut oak oar olive orange otter owl oyster painter
pajamas palm panther parachute parrot pasta pelican pen penguin pie pig
pigeon pilot pine pirate plum poet police pond pony popcorn potato prince
princess puffin pyramid queen quail radish raft raven reef reindeer rhino
rice rooster sailor salmon sandal sausage saxophone scientist scooter
seagull seal shepherd ship shrimp singer skeleton skunk sled sloth soldier
soup sparrow spinach sponge squid stag starfish stork student sugar sushi
swamp sword tiger toad toast tortoise toucan tram trout tulip turkey turnip
vulture waiter walrus walnut wasp watermelon weasel wheat wizard woodpecker
worm yak zebra
""".split()
MORE_ADJECTIVES = """
angry blurry bold brave busy careful chubby clever cloudy crispy cute dark
deep delicate dirty dizzy dry eager early faded famous fast fierce flat fresh
friendly funny furry glossy grumpy hidden hot huge humble hungry juicy kind
late lazy leafy light little loud lucky magical massive mighty mysterious
nervous new nice odd orange ornate pale plain playful polite proud purple
rare rich ripe round royal salty secret serious shallow sharp short shy silent
simple slim slow small soft sour spicy strong sweet swift tasty tiny tired
tough velvet vivid weird
""".split()
MORE_VERBS = """
baking barking biting blowing bouncing building carrying catching chasing
chewing clapping crawling crying digging diving drawing dreaming driving
fishing fixing folding gliding growing hopping hugging hunting juggling
kicking kissing knitting landing leaning lifting listening marching mixing
opening packing playing pointing pouring praying pulling pushing racing
resting riding roaring rowing sailing searching sewing shouting skating
skiing sliding sneezing splashing stretching surfing sweeping talking
teaching throwing typing waving whistling writing yawning
""".split()
NOUNS = sorted(set(NOUNS + MORE_NOUNS))
ADJECTIVES = sorted(set(ADJECTIVES + MORE_ADJECTIVES))
VERBS = sorted(set(VERBS + MORE_VERBS))

ACCENTED = [
    "a café with a terrace in the old town",
    "a bowl of crème brûlée on a café table",
    "a naïve painting of a château by a lake",
    "a piñata hanging from a tree at a fiesta",
    "a jalapeño pepper next to a bowl of soup",
    "an über modern façade of glass and steel",
    "a rosé wine glass and a croissant",
    "Zoë and Chloé at the beach",
]

COLOURS = [
    "red", "blue", "green", "yellow", "orange", "purple", "pink", "black",
    "white", "gray", "grey", "brown", "cyan", "magenta", "teal", "navy",
    "gold", "silver", "beige", "violet", "light blue", "dark green",
    "bright red", "pale yellow",
]
SHAPES = [
    "circle", "square", "triangle", "rectangle", "star", "hexagon", "oval",
    "diamond", "heart", "cross", "cube", "sphere", "cone", "pyramid",
    "cylinder", "ring", "dot", "line", "arrow", "pentagon",
]
SIZES = ["small", "large", "big", "tiny", "huge", "medium", "little", "giant"]
POSITIONS = [
    "on the left", "on the right", "at the top", "at the bottom",
    "in the center", "in the middle", "in the top left corner",
    "in the top right corner", "in the bottom left corner",
    "in the bottom right corner", "above the square", "below the circle",
    "next to the triangle", "behind the cube", "in front of the sphere",
    "near the edge", "on top of the box",
]
BACKGROUNDS = [
    "green background", "white background", "black background",
    "blue background", "gray background", "on a plain background",
    "with a yellow background", "on a wooden floor", "on a sandy beach",
    "in a grassy field", "against a cloudy sky", "on a red carpet",
]
COUNTS = [
    ("one", 1), ("two", 2), ("three", 3), ("four", 4), ("five", 5),
    ("six", 6), ("seven", 7), ("eight", 8), ("nine", 9), ("ten", 10),
]
ANIMALS = [
    "cat", "dog", "horse", "bird", "fish", "cow", "sheep", "rabbit", "fox",
    "bear", "duck", "owl", "frog", "turtle", "lion", "tiger", "mouse",
]
OBJECTS = [
    "cup", "chair", "table", "lamp", "book", "ball", "box", "car", "bottle",
    "clock", "phone", "apple", "banana", "flower", "tree", "house", "boat",
    "hat", "shoe", "kite",
]
PLACES = [
    "in a kitchen", "in the park", "on a beach", "in a forest",
    "on a city street", "in a living room", "on a mountain", "in the snow",
    "under a bridge", "in a garden", "at the market", "in a classroom",
]
STYLES = [
    "a photo of", "a painting of", "a drawing of", "a picture of",
    "an illustration of", "a 3d render of", "a sketch of", "a close-up of",
]


def plural(word: str) -> str:
    if word.endswith(("s", "x", "sh", "ch")):
        return word + "es"
    if word == "mouse":
        return "mice"
    if word == "sheep" or word == "fish":
        return word
    return word + "s"


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def generated_captions(rng: random.Random, n: int) -> list[str]:
    out = []
    for i in range(n):
        kind = i % 8
        c1, c2, c3 = rng.choice(COLOURS), rng.choice(COLOURS), rng.choice(COLOURS)
        s1, s2 = rng.choice(SHAPES), rng.choice(SHAPES)
        z1, z2 = rng.choice(SIZES), rng.choice(SIZES)
        p1, p2 = rng.choice(POSITIONS), rng.choice(POSITIONS)
        bg = rng.choice(BACKGROUNDS)
        word, num = rng.choice(COUNTS)
        if kind == 0:
            t = f"{article(c1)} {c1} {s1} {p1}, {article(z1)} {z1} {c2} {s2}, {bg}"
        elif kind == 1:
            t = f"{word} {c1} {plural(s1)} {p1} and {article(c2)} {c2} {s2} {p2}"
        elif kind == 2:
            t = f"{num} {z1} {plural(s1)} on {article(c1)} {c1} background"
        elif kind == 3:
            a = rng.choice(ANIMALS)
            t = f"{rng.choice(STYLES)} {article(z1)} {z1} {c1} {a} {rng.choice(PLACES)}"
        elif kind == 4:
            o1, o2 = rng.choice(OBJECTS), rng.choice(OBJECTS)
            t = f"{article(c1)} {c1} {o1} next to {article(c2)} {c2} {o2}, {bg}"
        elif kind == 5:
            a = rng.choice(ANIMALS)
            t = f"{word} {plural(a)} and {article(z2)} {z2} {rng.choice(OBJECTS)} {rng.choice(PLACES)}"
        elif kind == 6:
            t = f"{article(z1)} {z1} {c1} {s1} {p1}; {article(z2)} {z2} {c3} {s2} {p2}. {bg}."
        else:
            o = rng.choice(OBJECTS)
            t = f"{rng.choice(STYLES)} {num} {c1} {plural(o)}, {c2} and {c3}, {bg}"
        out.append(t)
    return out


def vocabulary_captions(rng: random.Random) -> list[str]:
    out = []
    nouns = NOUNS[:]
    rng.shuffle(nouns)
    for i, noun in enumerate(nouns):
        adj = ADJECTIVES[i % len(ADJECTIVES)]
        verb = VERBS[i % len(VERBS)]
        other = nouns[(i * 7 + 3) % len(nouns)]
        kind = i % 4
        if kind == 0:
            t = f"{article(adj)} {adj} {noun} {verb} {rng.choice(PLACES)}"
        elif kind == 1:
            t = f"{rng.choice(STYLES)} {article(noun)} {noun} and {article(other)} {other}, {rng.choice(BACKGROUNDS)}"
        elif kind == 2:
            t = f"{article(adj)} {adj} {rng.choice(COLOURS)} {noun} next to {article(other)} {other}"
        else:
            t = f"{rng.choice(COUNTS)[0]} {plural(noun)} {verb} near {article(other)} {adj} {other}"
        out.append(t)
    return out


def build_corpus() -> list[str]:
    rng = random.Random(20240613)
    corpus = HANDWRITTEN + generated_captions(rng, 360)
    for _ in range(2):
        corpus += vocabulary_captions(rng)
    # T5 is case-sensitive: add sentence-case, title-case and upper-case copies
    for i, line in enumerate(HANDWRITTEN):
        corpus.append(line[0].upper() + line[1:] + ".")
        if i % 3 == 0:
            corpus.append(line.title())
        if i % 10 == 0:
            corpus.append(line.upper())
    corpus += ACCENTED
    return corpus


# --------------------------------------------------------------------------
# CLIP byte-level BPE (same algorithm and vocab layout as OpenAI CLIP)
# --------------------------------------------------------------------------

CLIP_PAT = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


def bytes_to_unicode() -> dict[int, str]:
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def clip_normalize(text: str) -> str:
    text = unicodedata.normalize("NFC", text)
    text = regex.sub(r"\s+", " ", text).strip()
    return text.lower()


def train_clip_bpe(corpus: list[str], vocab_size: int):
    b2u = bytes_to_unicode()
    words: collections.Counter[tuple[str, ...]] = collections.Counter()
    for line in corpus:
        for tok in CLIP_PAT.findall(clip_normalize(line)):
            chars = [b2u[b] for b in tok.encode("utf-8")]
            chars[-1] = chars[-1] + "</w>"
            words[tuple(chars)] += 1

    base = list(b2u.values())
    vocab = base + [v + "</w>" for v in base]
    seen = set(vocab)
    merges: list[tuple[str, str]] = []
    n_merges = vocab_size - len(vocab) - 2
    word_list = sorted(words.items())
    while len(merges) < n_merges:
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for w, f in word_list:
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] += f
        if not pairs:
            break
        # most frequent pair, ties broken by the pair itself (deterministic)
        best = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        merged = best[0] + best[1]
        if merged in seen:
            # would not add a vocab entry; drop this pair from the words
            # (cannot happen for CLIP-style words, kept for safety)
            raise RuntimeError(f"duplicate merge result {merged!r}")
        merges.append(best)
        vocab.append(merged)
        seen.add(merged)
        new_list = []
        for w, f in word_list:
            if len(w) > 1:
                nw: list[str] = []
                i = 0
                while i < len(w):
                    if i + 1 < len(w) and w[i] == best[0] and w[i + 1] == best[1]:
                        nw.append(merged)
                        i += 2
                    else:
                        nw.append(w[i])
                        i += 1
                w = tuple(nw)
            new_list.append((w, f))
        word_list = new_list
    if len(merges) < n_merges:
        raise RuntimeError(
            f"corpus supports only {len(merges)} merges, wanted {n_merges}"
        )
    vocab.extend([BOS, EOS])
    return {tok: i for i, tok in enumerate(vocab)}, merges


def dump_json(path: Path, obj, indent=2) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        json.dump(obj, f, indent=indent, ensure_ascii=False, sort_keys=False)
        f.write("\n")


def added_token(content: str, normalized: bool, special: bool = True) -> dict:
    return {
        "content": content,
        "lstrip": False,
        "normalized": normalized,
        "rstrip": False,
        "single_word": False,
        "special": special,
    }


def write_clip_dir(d: Path, vocab: dict[str, int], merges, pad: str) -> None:
    d.mkdir(parents=True, exist_ok=True)
    # vocab.json: one line, like the real CLIP file
    with open(d / "vocab.json", "w", encoding="utf-8", newline="\n") as f:
        json.dump(vocab, f, ensure_ascii=False, separators=(",", ":"))
    with open(d / "merges.txt", "w", encoding="utf-8", newline="\n") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")

    def tokmap(content: str, normalized: bool) -> dict:
        t = added_token(content, normalized)
        del t["special"]
        return t

    special_map = {
        "bos_token": tokmap(BOS, True),
        "eos_token": tokmap(EOS, False),
        "pad_token": EOS if pad == EOS else tokmap(pad, False),
        "unk_token": tokmap(EOS, False),
    }
    dump_json(d / "special_tokens_map.json", special_map)

    added = {}
    if pad != EOS:
        # real CLIP-G tokenizer_2 configs register "!" (id 0) as a special token
        added[str(vocab[pad])] = added_token(pad, False)
    added[str(vocab[BOS])] = added_token(BOS, True)
    added[str(vocab[EOS])] = added_token(EOS, False)
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "bos_token": BOS,
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "eos_token": EOS,
        "errors": "replace",
        "model_max_length": CLIP_MAX_LEN,
        "pad_token": pad,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": EOS,
    }
    dump_json(d / "tokenizer_config.json", config)

    # tokenizer.json: what the transformers CLIP (fast) tokenizer saves when
    # built from vocab.json + merges.txt.
    from transformers import CLIPTokenizerFast

    tj = d / "tokenizer.json"
    if tj.exists():
        tj.unlink()
    tok = CLIPTokenizerFast.from_pretrained(str(d))
    tok.backend_tokenizer.save(str(tj), pretty=True)
    # normalise the end of file
    text = tj.read_text(encoding="utf-8").rstrip("\n") + "\n"
    tj.write_text(text, encoding="utf-8")


# --------------------------------------------------------------------------
# T5 sentencepiece unigram
# --------------------------------------------------------------------------


# Real T5 uses sentencepiece's `nmt_nfkc` rules, whose precompiled charsmap
# alone is ~240 KB.  To keep the files small we compile a subset: NFKC for
# the Latin, punctuation, number-form, ligature and full-width blocks, and
# all whitespace / line breaks to a plain space (as nmt_nfkc does).
NORMALIZATION_BLOCKS = [
    (0x00A0, 0x024F),  # Latin-1 supplement, Latin extended-A/B
    (0x2000, 0x206F),  # general punctuation (odd spaces, ellipsis, ...)
    (0x2150, 0x218F),  # number forms (fractions, roman numerals)
    (0x2460, 0x24FF),  # enclosed alphanumerics
    (0x3000, 0x3000),  # ideographic space
    (0xFB00, 0xFB06),  # latin ligatures
    (0xFF01, 0xFF5E),  # full-width ASCII
]


def normalization_rules_tsv() -> str:
    lines = []
    for cp in (0x09, 0x0A, 0x0B, 0x0C, 0x0D):
        lines.append(f"{cp:X}\t20")
    for lo, hi in NORMALIZATION_BLOCKS:
        for cp in range(lo, hi + 1):
            ch = chr(cp)
            if ch.isspace():
                target = " "
            else:
                target = unicodedata.normalize("NFKC", ch)
            if target == ch or not target:
                continue
            lines.append(f"{cp:X}\t" + " ".join(f"{ord(c):X}" for c in target))
    return "\n".join(lines) + "\n"


def train_t5(corpus: list[str], d: Path) -> None:
    import sentencepiece as spm
    import io

    d.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(1234)
    model = io.BytesIO()
    rules = d / "_normalization_rules.tsv"
    rules.write_text(normalization_rules_tsv(), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        model_type="unigram",
        vocab_size=T5_SPM_VOCAB_SIZE,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        character_coverage=1.0,
        normalization_rule_tsv=str(rules),
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        hard_vocab_limit=True,
        split_digits=False,
        minloglevel=2,
    )
    rules.unlink()
    (d / "spiece.model").write_bytes(model.getvalue())

    extra = [f"<extra_id_{i}>" for i in range(T5_EXTRA_IDS)]
    n = T5_SPM_VOCAB_SIZE
    added = {
        "0": added_token("<pad>", False),
        "1": added_token("</s>", False),
        "2": added_token("<unk>", False),
    }
    # like real T5: <extra_id_0> is the last id, <extra_id_99> comes first
    for i in range(T5_EXTRA_IDS):
        added[str(n + T5_EXTRA_IDS - 1 - i)] = added_token(f"<extra_id_{i}>", False)
    added = dict(sorted(added.items(), key=lambda kv: int(kv[0])))
    config = {
        "add_prefix_space": True,
        "added_tokens_decoder": added,
        "additional_special_tokens": extra,
        "clean_up_tokenization_spaces": True,
        "eos_token": "</s>",
        "extra_ids": T5_EXTRA_IDS,
        "legacy": True,
        "model_max_length": 512,
        "pad_token": "<pad>",
        "sp_model_kwargs": {},
        "tokenizer_class": "T5Tokenizer",
        "unk_token": "<unk>",
    }
    dump_json(d / "tokenizer_config.json", config)

    def tokmap(content: str) -> dict:
        t = added_token(content, False)
        del t["special"]
        return t

    special_map = {
        "additional_special_tokens": extra,
        "eos_token": tokmap("</s>"),
        "pad_token": tokmap("<pad>"),
        "unk_token": tokmap("<unk>"),
    }
    dump_json(d / "special_tokens_map.json", special_map)

    # tokenizer.json from the sentencepiece model, as transformers converts it
    from transformers import T5TokenizerFast

    tj = d / "tokenizer.json"
    if tj.exists():
        tj.unlink()
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("spiece.model", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(d / name, Path(tmp) / name)
        tok = T5TokenizerFast.from_pretrained(tmp)
        tok.backend_tokenizer.save(str(tj), pretty=True)
    text = tj.read_text(encoding="utf-8").rstrip("\n") + "\n"
    tj.write_text(text, encoding="utf-8")


# --------------------------------------------------------------------------
# Fixture
# --------------------------------------------------------------------------

LONG_PROMPT = (
    "a very long and detailed description of a large painting: in the top left "
    "corner there is a small red circle, next to it a tiny blue square, below "
    "them a huge green triangle with a thin black outline, in the middle of the "
    "image a yellow star with five points surrounded by seven little orange dots, "
    "on the right side a purple hexagon above a pink heart, at the bottom a row "
    "of ten gray cubes, three brown cones and two silver spheres, all on a white "
    "background with soft shadows, high quality, sharp focus, studio lighting, "
    "4k, 8k, trending on artstation, masterpiece"
)

PROMPTS = [
    "",
    " ",
    "a photo of a cat",
    "a red circle on the left, a small blue square, green background",
    "A Photo Of A Cat",
    "A RED CIRCLE ON THE LEFT",
    "a   red    circle\ton the\nleft",
    "   leading and trailing spaces   ",
    "hello! how are you?",
    "wow!!! amazing!!!",
    "!",
    "a, b. c; d: e? f! (g) [h] {i} \"j\" 'k'",
    "1234567890",
    "3 red squares and 12 blue circles",
    "the year 2024, 4k, 8k uhd",
    "it's the cat's toy, don't touch, we're here, they'll go, i'd say, you've seen",
    "café",
    "a café in paris, crème brûlée and naïve art",
    "Ünïcödé ÅÇÉ",
    "日本語のテキスト",
    "emoji 🐱🎨 test",
    "a photo of a quokka eating a zucchini",
    "xylophone jazz quartz vex",
    "supercalifragilisticexpialidocious",
    "antidisestablishmentarianism is a long word",
    "hyphen-ated and under_scored words",
    "email@example.com and https://example.com/path?x=1",
    "tabs\tand\nnewlines\r\nand more",
    "<|startoftext|>a cat<|endoftext|>",
    "<|STARTOFTEXT|> shouting special tokens <|ENDOFTEXT|>",
    "<extra_id_0> a sentinel <extra_id_99>",
    "a <pad> and </s> and <unk>",
    "fullwidth ＡＢＣ １２３",
    "ﬁ ligature and ½ fraction",
    "cafe\u0301 with a combining accent, İstanbul, straße, ǅ",
    "zero\u200bwidth\ufeffbom nul\u0000char del\u007f \u00a0nbsp\u3000ideographic",
    "Ω ℃ ™ … — “quotes” ‘single’ «guillemets»",
    "a" * 100,
    " ".join(["cat"] * 74),
    " ".join(["cat"] * 75),
    " ".join(["cat"] * 76),
    " ".join(["dog"] * 300),
    LONG_PROMPT,
    LONG_PROMPT + " " + LONG_PROMPT,
    "a red circle on the left, a small blue square, green background, " * 6,
]


def make_fixture(clip_dir: Path, clip_g_dir: Path, t5_dir: Path) -> dict:
    from transformers import CLIPTokenizer, T5TokenizerFast

    tok = CLIPTokenizer.from_pretrained(str(clip_dir))
    tok2 = CLIPTokenizer.from_pretrained(str(clip_g_dir))
    tok3 = T5TokenizerFast.from_pretrained(str(t5_dir))

    entries = []
    for prompt in PROMPTS:
        e: dict = {"prompt": prompt}
        for name, t in (("clip", tok), ("clip_g", tok2)):
            # StableDiffusion3Pipeline._get_clip_prompt_embeds
            ids = t(
                prompt,
                padding="max_length",
                max_length=CLIP_MAX_LEN,
                truncation=True,
                return_tensors=None,
            ).input_ids
            untrunc = t(prompt, padding="longest").input_ids
            e[name] = {
                "ids": ids,
                "untruncated_len": len(untrunc),
                "truncated": len(untrunc) > CLIP_MAX_LEN,
            }
        for L in (256, 77):
            # StableDiffusion3Pipeline._get_t5_prompt_embeds
            ids = tok3(
                prompt,
                padding="max_length",
                max_length=L,
                truncation=True,
                add_special_tokens=True,
            ).input_ids
            untrunc = tok3(prompt, padding="longest").input_ids
            e[f"t5_{L}"] = {
                "ids": ids,
                "untruncated_len": len(untrunc),
                "truncated": len(untrunc) > L,
            }
        entries.append(e)

    return {
        "generator": "scripts/make_tiny_tokenizers.py",
        "clip": {
            "vocab_size": len(tok),
            "bos_id": tok.bos_token_id,
            "eos_id": tok.eos_token_id,
            "pad_id": tok.pad_token_id,
        },
        "clip_g": {
            "vocab_size": len(tok2),
            "bos_id": tok2.bos_token_id,
            "eos_id": tok2.eos_token_id,
            "pad_id": tok2.pad_token_id,
        },
        "t5": {
            "vocab_size": len(tok3),
            "eos_id": tok3.eos_token_id,
            "pad_id": tok3.pad_token_id,
            "unk_id": tok3.unk_token_id,
        },
        "prompts": entries,
    }


def write_fixture(obj: dict) -> None:
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    # compact id lists, one entry per line group: keeps the file readable
    text = json.dumps(obj, indent=1, ensure_ascii=False)
    # put each id list on one line
    text = regex.sub(
        r"\[\s*((?:-?\d+,\s*)*-?\d+)\s*\]",
        lambda m: "[" + ",".join(x.strip() for x in m.group(1).split(",")) + "]",
        text,
    )
    FIXTURE.write_text(text + "\n", encoding="utf-8")


# --------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------


def classic_clip_ids(text: str, vocab: dict[str, int], merges) -> list[int]:
    """Original CLIP `SimpleTokenizer.bpe` (what the slow CLIPTokenizer runs),
    on the normalized text: an independent check of vocab.json/merges.txt."""
    ranks = {tuple(m): i for i, m in enumerate(merges)}
    b2u = bytes_to_unicode()
    ids = [vocab[BOS]]
    for tok in CLIP_PAT.findall(clip_normalize(text)):
        t = "".join(b2u[b] for b in tok.encode("utf-8"))
        word = tuple(t[:-1]) + (t[-1] + "</w>",)
        while len(word) > 1:
            best = min(zip(word, word[1:]), key=lambda p: ranks.get(p, float("inf")))
            if best not in ranks:
                break
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            word = tuple(out)
        ids += [vocab[w] for w in word]
    return ids + [vocab[EOS]]


def check(clip_dir: Path, clip_g_dir: Path, t5_dir: Path, fixture: dict) -> None:
    import sentencepiece as spm
    from tokenizers import Tokenizer
    from transformers import CLIPTokenizer, CLIPTokenizerFast, T5TokenizerFast

    vocab = json.loads((clip_dir / "vocab.json").read_text(encoding="utf-8"))
    merges = [
        tuple(line.split(" "))
        for line in (clip_dir / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    ]
    for d in (clip_dir, clip_g_dir):
        # from vocab.json + merges.txt only
        with tempfile.TemporaryDirectory() as tmp:
            for name in ("vocab.json", "merges.txt", "tokenizer_config.json",
                         "special_tokens_map.json"):
                shutil.copy(d / name, Path(tmp) / name)
            slow_like = CLIPTokenizer.from_pretrained(tmp)
            fast = CLIPTokenizerFast.from_pretrained(str(d))
            raw = Tokenizer.from_file(str(d / "tokenizer.json"))
            for p in PROMPTS:
                a = slow_like(p, padding="max_length", max_length=77, truncation=True).input_ids
                b = fast(p, padding="max_length", max_length=77, truncation=True).input_ids
                assert a == b, (d, p, a, b)
                c = raw.encode(p).ids
                full = fast(p).input_ids
                assert c == full, (d, p, c, full)
                if "<|" not in p and (d == clip_dir or "!" not in p):
                    classic = classic_clip_ids(p, vocab, merges)
                    assert classic == full, ("classic bpe", d, p, classic, full)

    sp = spm.SentencePieceProcessor(model_file=str(t5_dir / "spiece.model"))
    t5 = T5TokenizerFast.from_pretrained(str(t5_dir))
    raw = Tokenizer.from_file(str(t5_dir / "tokenizer.json"))
    for p in PROMPTS:
        if "<" in p:
            continue  # sentencepiece does not know the added special tokens
        a = sp.encode(p) + [1]
        b = t5(p).input_ids
        assert a == b, ("t5 vs sentencepiece", p, a, b)
        c = raw.encode(p).ids
        assert c == b, ("t5 vs tokenizer.json", p, c, b)

    clip_vocab = fixture["clip"]["vocab_size"]
    assert fixture["clip"]["eos_id"] == clip_vocab - 1
    assert fixture["clip"]["bos_id"] == clip_vocab - 2
    assert fixture["clip_g"]["pad_id"] == 0
    for d in (clip_dir, clip_g_dir, t5_dir):
        size = sum(f.stat().st_size for f in d.iterdir())
        assert size < 300 * 1024, (d, size)


def main() -> int:
    corpus = build_corpus()
    vocab, merges = train_clip_bpe(corpus, CLIP_VOCAB_SIZE)
    clip_dir, clip_g_dir, t5_dir = OUT / "clip", OUT / "clip_g", OUT / "t5"
    write_clip_dir(clip_dir, vocab, merges, EOS)
    write_clip_dir(clip_g_dir, vocab, merges, "!")
    train_t5(corpus, t5_dir)
    fixture = make_fixture(clip_dir, clip_g_dir, t5_dir)
    write_fixture(fixture)
    check(clip_dir, clip_g_dir, t5_dir, fixture)
    for d in (clip_dir, clip_g_dir, t5_dir):
        size = sum(f.stat().st_size for f in d.iterdir())
        print(f"{d.relative_to(ROOT)}: {size} bytes")
    print(json.dumps({k: fixture[k] for k in ("clip", "clip_g", "t5")}))
    print(f"corpus: {len(corpus)} captions; fixture: {len(fixture['prompts'])} prompts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
