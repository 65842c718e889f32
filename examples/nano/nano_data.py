"""A small synthetic multimodal world for the nano MoCa pipeline.

Scenes of coloured shapes and rendered text pages, with captions, questions and queries derived from the scene
attributes, written in the layouts that continual pre-training, contrastive training and evaluation read:

- ``cpt/``: interleaved text + image rows ``{"text", "images"}`` (``datasets.save_to_disk``).
- ``contrastive/<task>/``: ``{"query_text", "query_image", "pos_text", "pos_image", "neg_text", "neg_image"}``
  rows with hard negatives (``datasets.save_to_disk``), and ``contrastive/tasks.json`` with each task's prompts.
- ``mmeb/``: the MMEB-eval layout (``data/<Subset>/test-00000-of-00001.parquet`` + PNG files under ``images/``)
  and ``subsets.json`` (category, in-domain or out-of-domain, chance level) in ``mmeb/`` and in ``mmeb/data/``.
- ``vidore/<name>/``: the ViDoRe-v2 BEIR layout (``corpus``, ``queries``, ``qrels`` parquet files).
- ``manifest.json``: what was written, with row counts, seed and scale.

Everything is a function of ``seed`` and ``scale``: every section draws from its own string-seeded random stream,
images are encoded as PNG by Pillow (no timestamps), and rows are written in generation order, so two runs write
byte-identical files. Evaluation scenes are drawn from other streams than training scenes and any evaluation
scene that happens to equal a training scene is redrawn, so no evaluation image is a training image. Some
shape-colour combinations never appear in training (``HELD_OUT_COMBOS``); out-of-domain subsets ask about them
(classification, VQA, retrieval and grounding of held-out objects) or use a label set that training lacks
(shape-only labels), as MMEB's out-of-domain sets are new data and new label sets for the task types it trains.

Colours and shapes are drawn large and flat so that a tiny model trained for minutes on a CPU can learn them;
page text is rendered too small for such a model to read, so document pages also carry a coloured header and
icons that say what the page is about.
"""

import io
import json
import math
import random
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Dataset, Features, Image, List, Value
from PIL import Image as PILImage
from PIL import ImageDraw, ImageFont

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (40, 70, 220),
    "yellow": (240, 200, 0),
    "purple": (140, 50, 180),
    "orange": (250, 130, 0),
    "cyan": (0, 190, 200),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross", "ring", "hexagon")
PLURALS = {shape: shape + ("es" if shape.endswith("s") else "s") for shape in SHAPES}
COUNT_WORDS = ("one", "two", "three", "four")
# Where a single object sits, as a fraction of the canvas side, and how captions say it.
POSITIONS = {
    "left": ((0.25, 0.5), "on the left"),
    "right": ((0.75, 0.5), "on the right"),
    "top": ((0.5, 0.25), "at the top"),
    "bottom": ((0.5, 0.75), "at the bottom"),
    "center": ((0.5, 0.5), "in the middle"),
}
# Scenes with several objects put them on a wider cross so that they never overlap.
MULTI_POSITIONS = {
    "left": (0.2, 0.5),
    "right": (0.8, 0.5),
    "top": (0.5, 0.2),
    "bottom": (0.5, 0.8),
    "center": (0.5, 0.5),
}
BACKGROUNDS = ((245, 245, 245), (232, 232, 232), (245, 240, 225), (228, 236, 242))
SCENE_SIDES = (56, 84, 112)  # multiples of 28, so the Qwen image processor keeps them as they are
MULTI_SIDE = 112
PAGE_SIZE = (112, 140)
CROP_SIDE = 56

# One held-out colour per shape, each colour held out once (3 is coprime with 8): these combinations appear in
# no training image or text.
COLOUR_NAMES = tuple(COLOURS)
HELD_OUT_COMBOS = frozenset((shape, COLOUR_NAMES[(3 * i + 1) % len(COLOUR_NAMES)]) for i, shape in enumerate(SHAPES))
ALL_COMBOS = tuple((shape, colour) for shape in SHAPES for colour in COLOUR_NAMES)
TRAIN_COMBOS = tuple(combo for combo in ALL_COMBOS if combo not in HELD_OUT_COMBOS)
HELD_OUT_COMBO_LIST = tuple(combo for combo in ALL_COMBOS if combo in HELD_OUT_COMBOS)

SHAPE_FACTS = {
    "circle": "is round and has no corners",
    "square": "has four equal sides",
    "triangle": "has three sides and three corners",
    "star": "has five sharp points",
    "diamond": "is a square standing on one corner",
    "cross": "is made of two crossing bars",
    "ring": "is round with a hole in the middle",
    "hexagon": "has six equal sides",
}
COLOUR_FACTS = {
    "red": "a ripe tomato",
    "green": "fresh grass",
    "blue": "the clear sky",
    "yellow": "a lemon",
    "purple": "a plum",
    "orange": "a pumpkin",
    "cyan": "a swimming pool",
    "black": "a piece of coal",
}
PLACES = ("river", "market", "garden", "harbour", "forest", "school", "bridge", "castle", "station", "library")
# Words of the page bodies: none names a colour, a shape, a number or a place.
_FILLER_TEXT = (
    "paper lamp north quiet table window winter summer letter music stone cloud bread little early silver coffee "
    "pencil travel simple yard ladder farmer basket candle carpet kettle pepper rabbit violin wallet bottle"
)
FILLER_WORDS = tuple(_FILLER_TEXT.split())

# Instruction prompts in the style of the MoCa release; "<image>" marks where an image goes, "{text}" the text.
IMAGE_DOCUMENT_PROMPT = "<image>Represent the given image.\n"
PROMPTS = {
    "text_pairs": ("Retrieve a sentence that describes the same thing: {text}\n", "{text}"),
    "image_to_caption": ("<image>Find an image caption describing the given everyday image.\n", "{text}"),
    "caption_to_image": ("Find me an everyday image that matches the given caption: {text}\n", IMAGE_DOCUMENT_PROMPT),
    "vqa": ("<image>Represent the given image with the following question: {text}\n", "{text}"),
    "classification": ("<image>Represent the given image for classification.\n", "{text}"),
    "grounding": (
        '<image>Select the portion of the image that isolates the object labeled as "{text}".\n',
        "<image>Represent the given cropped image of the object.\n",
    ),
    "document_retrieval": ("Find a document image that matches the given query: {text}\n", IMAGE_DOCUMENT_PROMPT),
}

NUM_HARD_NEGATIVES = 2
NUM_CANDIDATES = 10

# Rows at scale 1.0, and the fewest rows any scale writes (so that a tiny scale still exercises every layout).
CPT_ROWS = (3000, 24)
CONTRASTIVE_ROWS = {
    "text_pairs": 1000,
    "image_to_caption": 1000,
    "caption_to_image": 1000,
    "vqa": 1000,
    "classification": 500,
    "grounding": 500,
    "document_retrieval": 500,
}
MIN_CONTRASTIVE_ROWS = 8
MMEB_ROWS = (200, 4)  # 200 queries: one query moves a subset by half a point
VIDORE_TOPICS = (20, 4)  # two pages per topic: ~40 pages at scale 1.0


# ----------------------------------------------------------------------------------------------------------------
# The world: what a scene or page is, and how it is drawn.


@dataclass(frozen=True)
class Description:
    """What a caption says about a one-kind scene: `count` objects of one shape and colour. `position` is set
    only for scenes whose single object was placed on purpose (`count == 1`)."""

    shape: str
    colour: str
    count: int = 1
    position: str | None = None


@dataclass(frozen=True)
class Thing:
    shape: str
    colour: str
    x: int
    y: int
    size: int
    position: str | None = None


@dataclass(frozen=True)
class Scene:
    side: int
    background: tuple
    things: tuple


@dataclass(frozen=True)
class Page:
    """A document-like page: a header in the topic colour with the title, `count` icons, then lines of text."""

    shape: str
    colour: str
    count: int
    place: str
    filler: tuple

    @property
    def title(self):
        return f"{self.colour.capitalize()} {PLURALS[self.shape]}"

    @property
    def lines(self):
        return [f"Seen near the {self.place}.", f"Count: {COUNT_WORDS[self.count - 1]}.", *self.filler]

    @property
    def text(self):
        return " ".join([self.title + "."] + self.lines)


def _polygon(shape, cx, cy, r):
    def ring_of(angles_deg, radii):
        return [
            (cx + radius * math.cos(math.radians(angle)), cy + radius * math.sin(math.radians(angle)))
            for angle, radius in zip(angles_deg, radii)
        ]

    if shape == "triangle":
        return ring_of([-90, 30, 150], [r] * 3)
    if shape == "diamond":
        return ring_of([-90, 0, 90, 180], [r] * 4)
    if shape == "hexagon":
        return ring_of(range(0, 360, 60), [r] * 6)
    if shape == "star":
        return ring_of(range(-90, 270, 36), [r, 0.45 * r] * 5)
    if shape == "cross":
        a = r / 3
        return [
            (cx - a, cy - r),
            (cx + a, cy - r),
            (cx + a, cy - a),
            (cx + r, cy - a),
            (cx + r, cy + a),
            (cx + a, cy + a),
            (cx + a, cy + r),
            (cx - a, cy + r),
            (cx - a, cy + a),
            (cx - r, cy + a),
            (cx - r, cy - a),
            (cx - a, cy - a),
        ]
    raise ValueError(f"no polygon for shape {shape!r}")


def _draw_thing(draw, shape, colour, cx, cy, size):
    r = size / 2
    rgb = COLOURS[colour]
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=rgb)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=rgb, width=max(2, round(0.35 * r)))
    elif shape == "square":
        # A little smaller than its box, so that a square does not look heavier than the other shapes.
        s = 0.85 * r
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=rgb)
    else:
        draw.polygon(_polygon(shape, cx, cy, r), fill=rgb)


def render_scene(scene):
    image = PILImage.new("RGB", (scene.side, scene.side), scene.background)
    draw = ImageDraw.Draw(image)
    for thing in scene.things:
        _draw_thing(draw, thing.shape, thing.colour, thing.x, thing.y, thing.size)
    return image


def crop_thing(scene, thing):
    """The object's box with a small margin, scaled to CROP_SIDE (a multiple of 28)."""
    half = thing.size // 2 + 3
    box = (thing.x - half, thing.y - half, thing.x + half, thing.y + half)
    return render_scene(scene).crop(box).resize((CROP_SIDE, CROP_SIDE), PILImage.Resampling.BILINEAR)


def render_page(page):
    image = PILImage.new("RGB", PAGE_SIZE, (250, 250, 250))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    draw.rectangle((0, 0, PAGE_SIZE[0], 20), fill=COLOURS[page.colour])
    light_header = page.colour in ("yellow", "orange", "cyan")
    draw.text((5, 4), page.title, fill=(0, 0, 0) if light_header else (255, 255, 255), font=font)
    for i in range(page.count):
        _draw_thing(draw, page.shape, page.colour, 12 + 22 * i, 34, 16)
    for i, line in enumerate(page.lines):
        draw.text((5, 50 + 14 * i), line, fill=(40, 40, 40), font=font)
    return image


def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------------------------
# Words: captions, questions and queries derived from the attributes.


def _a(word):
    return ("an " if word[0] in "aeiou" else "a ") + word


def _things(count, shape):
    return PLURALS[shape] if count > 1 else shape


def caption(description, rng):
    """One of several phrasings of what the scene shows; every phrasing names every attribute the scene has."""
    d = description
    if d.position is not None:
        where = POSITIONS[d.position][1]
        templates = (
            f"{_a(d.colour)} {d.shape} {where}.",
            f"a picture of {_a(d.colour)} {d.shape} {where}.",
            f"there is {_a(d.colour)} {d.shape} {where}.",
            f"{_a(d.colour)} {d.shape}, placed {where}.",
        )
    else:
        count_word = COUNT_WORDS[d.count - 1]
        things = _things(d.count, d.shape)
        templates = (
            f"{count_word} {d.colour} {things}.",
            f"a picture of {count_word} {d.colour} {things}.",
            f"there {'are' if d.count > 1 else 'is'} {count_word} {d.colour} {things} in the picture.",
            f"exactly {d.count} {d.colour} {things}.",
        )
    return rng.choice(templates)


def label(shape, colour):
    return f"{colour} {shape}"


def report_query(page, rng):
    """A long-form request for a page, naming its topic, place and count."""
    count_word = COUNT_WORDS[page.count - 1]
    things = PLURALS[page.shape]
    templates = (
        (
            f"I am looking for the report about {page.colour} {things} that were seen near the {page.place}; "
            f"it should list {count_word} of them."
        ),
        f"Which page describes {count_word} {page.colour} {_things(page.count, page.shape)} seen near the {page.place}?",
        f"Find the document on {page.colour} {things}: the one that mentions the {page.place} and a count of {count_word}.",
    )
    return rng.choice(templates)


# ----------------------------------------------------------------------------------------------------------------
# Drawing scenes and pages at random, never repeating one the other side (training or evaluation) has.


class Sampler:
    """Draws scenes and pages from one random stream. Whatever it draws goes into `used`; whatever is in `forbidden`
    is redrawn, which keeps evaluation scenes apart from training scenes."""

    def __init__(self, stream, seed, used, forbidden=frozenset()):
        self.rng = random.Random(f"moca-nano-{seed}-{stream}")
        self.used = used
        self.forbidden = forbidden

    def _fresh(self, draw):
        while True:
            item = draw()
            if item not in self.forbidden:
                self.used.add(item)
                return item

    def description(self, combos, placed=None):
        """A random one-kind description: `placed` True gives one object at a named position, False a count."""
        shape, colour = self.rng.choice(combos)
        placed = self.rng.random() < 0.5 if placed is None else placed
        if placed:
            return Description(shape, colour, 1, self.rng.choice(tuple(POSITIONS)))
        return Description(shape, colour, self.rng.randint(1, len(COUNT_WORDS)))

    def scene(self, description):
        def draw():
            side = self.rng.choice(SCENE_SIDES)
            background = self.rng.choice(BACKGROUNDS)
            d = description
            if d.position is not None:
                (fx, fy), _ = POSITIONS[d.position]
                jitter = round(0.05 * side)
                size = round(side * self.rng.uniform(0.3, 0.4))
                x = round(fx * side) + self.rng.randint(-jitter, jitter)
                y = round(fy * side) + self.rng.randint(-jitter, jitter)
                things = (Thing(d.shape, d.colour, x, y, size, d.position),)
            else:
                cell = side / 2
                jitter = round(0.04 * side)
                cells = self.rng.sample(range(4), d.count)
                things = tuple(
                    Thing(
                        d.shape,
                        d.colour,
                        round((c % 2 + 0.5) * cell) + self.rng.randint(-jitter, jitter),
                        round((c // 2 + 0.5) * cell) + self.rng.randint(-jitter, jitter),
                        round(side * self.rng.uniform(0.22, 0.3)),
                    )
                    for c in sorted(cells)
                )
            return Scene(side, background, things)

        return self._fresh(draw)

    def multi_scene(self, combos):
        """Three or four objects of distinct shapes and distinct colours at distinct positions."""

        def draw():
            count = self.rng.randint(3, 4)
            positions = self.rng.sample(tuple(MULTI_POSITIONS), count)
            things, shapes, colours = [], set(), set()
            for position in positions:
                shape, colour = self.rng.choice([c for c in combos if c[0] not in shapes and c[1] not in colours])
                shapes.add(shape)
                colours.add(colour)
                fx, fy = MULTI_POSITIONS[position]
                things.append(
                    Thing(
                        shape,
                        colour,
                        round(fx * MULTI_SIDE) + self.rng.randint(-3, 3),
                        round(fy * MULTI_SIDE) + self.rng.randint(-3, 3),
                        self.rng.randint(22, 28),
                        position,
                    )
                )
            return Scene(MULTI_SIDE, self.rng.choice(BACKGROUNDS), tuple(things))

        return self._fresh(draw)

    def page(self, shape, colour, count=None, place=None):
        def draw():
            filler = tuple(" ".join(self.rng.sample(FILLER_WORDS, 3)) for _ in range(2))
            return Page(
                shape,
                colour,
                count if count is not None else self.rng.randint(1, len(COUNT_WORDS)),
                place if place is not None else self.rng.choice(PLACES),
                filler,
            )

        return self._fresh(draw)

    def variants(self, description, combos, k):
        """Up to `k` distinct descriptions that differ from `description` in one attribute its caption names:
        the hard negatives (same shape other colour, same colour other shape, other count or position)."""
        d = description
        options = [replace(d, colour=c) for c in COLOUR_NAMES if c != d.colour and (d.shape, c) in combos]
        options += [replace(d, shape=s) for s in SHAPES if s != d.shape and (s, d.colour) in combos]
        if d.position is not None:
            options += [replace(d, position=p) for p in POSITIONS if p != d.position]
        else:
            options += [replace(d, count=n) for n in range(1, len(COUNT_WORDS) + 1) if n != d.count]
        return self.rng.sample(options, min(k, len(options)))


def _image(image):
    """A datasets Image value that keeps our own PNG bytes (Pillow's PNG writer is deterministic)."""
    return {"bytes": png_bytes(image), "path": None}


# ----------------------------------------------------------------------------------------------------------------
# cpt/: unlabeled interleaved rows.


def _facts():
    shape_facts = [f"{_a(shape)} {fact}." for shape, fact in SHAPE_FACTS.items()]
    colour_facts = [f"{thing} is {colour}." for colour, thing in COLOUR_FACTS.items()]
    return shape_facts + colour_facts


def cpt_rows(sampler, num_rows):
    rng = sampler.rng
    facts = _facts()
    rows = []
    for _ in range(num_rows):
        kind = rng.choices(("text", "caption", "document"), weights=(3, 4, 3))[0]
        if kind == "text":
            source = rng.choice(("fact", "description", "page"))
            if source == "fact":
                text = rng.choice(facts)
            elif source == "description":
                text = " ".join(caption(sampler.description(TRAIN_COMBOS), rng) for _ in range(rng.randint(1, 2)))
            else:
                text = sampler.page(*rng.choice(TRAIN_COMBOS)).text
            rows.append({"text": text, "images": []})
        elif kind == "caption":
            parts, images = [], []
            for _ in range(rng.randint(1, 2)):
                description = sampler.description(TRAIN_COMBOS)
                images.append(_image(render_scene(sampler.scene(description))))
                words = caption(description, rng)
                parts.append(f"<image> {words}" if rng.random() < 0.7 else f"{words} <image>")
            rows.append({"text": " ".join(parts), "images": images})
        else:
            page = sampler.page(*rng.choice(TRAIN_COMBOS))
            rows.append({"text": f"<image> {page.text}", "images": [_image(render_page(page))]})
    return rows


CPT_FEATURES = Features({"text": Value("string"), "images": List(Image())})


# ----------------------------------------------------------------------------------------------------------------
# contrastive/: query, positive and hard negatives per task.


def _row(query_text=None, query_image=None, pos_text=None, pos_image=None, neg_text=(), neg_image=()):
    return {
        "query_text": query_text,
        "query_image": query_image,
        "pos_text": pos_text,
        "pos_image": pos_image,
        "neg_text": list(neg_text),
        "neg_image": list(neg_image),
    }


def _text_pairs(sampler, num_rows):
    rng = sampler.rng
    rows = []
    for _ in range(num_rows):
        kind = rng.choices(("description", "shape_fact", "colour_fact"), weights=(6, 1, 1))[0]
        if kind == "description":
            d = sampler.description(TRAIN_COMBOS)
            query = caption(d, rng)
            positive = caption(d, rng)
            negatives = [caption(v, rng) for v in sampler.variants(d, TRAIN_COMBOS, NUM_HARD_NEGATIVES)]
        elif kind == "shape_fact":
            shape, *others = rng.sample(SHAPES, 1 + NUM_HARD_NEGATIVES)
            query = f"Which shape {SHAPE_FACTS[shape]}?"
            positive = f"{_a(shape)} {SHAPE_FACTS[shape]}."
            negatives = [f"{_a(other)} {SHAPE_FACTS[other]}." for other in others]
        else:
            colour, *others = rng.sample(COLOUR_NAMES, 1 + NUM_HARD_NEGATIVES)
            thing = COLOUR_FACTS[colour]
            query = f"What colour is {thing}?"
            positive = f"{thing} is {colour}."
            negatives = [f"{thing} is {other}." for other in others]
        rows.append(_row(query_text=query, pos_text=positive, neg_text=negatives))
    return rows


def _image_to_caption(sampler, num_rows):
    rows = []
    for _ in range(num_rows):
        d = sampler.description(TRAIN_COMBOS)
        negatives = [caption(v, sampler.rng) for v in sampler.variants(d, TRAIN_COMBOS, NUM_HARD_NEGATIVES)]
        image = _image(render_scene(sampler.scene(d)))
        rows.append(_row(query_image=image, pos_text=caption(d, sampler.rng), neg_text=negatives))
    return rows


def _caption_to_image(sampler, num_rows):
    rows = []
    for _ in range(num_rows):
        d = sampler.description(TRAIN_COMBOS)
        variants = sampler.variants(d, TRAIN_COMBOS, NUM_HARD_NEGATIVES)
        rows.append(
            _row(
                query_text=caption(d, sampler.rng),
                pos_image=_image(render_scene(sampler.scene(d))),
                neg_image=[_image(render_scene(sampler.scene(v))) for v in variants],
            )
        )
    return rows


def vqa_pair(description, kind, rng):
    """A question about a one-kind scene and its short answer; `kind` is colour, shape, count or position (the
    position of a single placed object, answered with the caption's phrase: "on the left")."""
    d = description
    if kind == "colour":
        question = rng.choice(
            (f"What colour is the {d.shape}?", "What colour is the object?")
            if d.count == 1
            else (f"What colour are the {PLURALS[d.shape]}?", "What colour are the objects?")
        )
        return question, d.colour
    if kind == "shape":
        objects = "object is" if d.count == 1 else "objects are"
        return rng.choice(("What shape is shown in the image?", f"What shape {objects} {d.colour}?")), d.shape
    if kind == "position":
        question = rng.choice(
            (
                f"Where is the {d.shape}?",
                f"Where is the {label(d.shape, d.colour)} in the image?",
                "Where is the object?",
            )
        )
        return question, POSITIONS[d.position][1]
    return rng.choice((f"How many {PLURALS[d.shape]} are there?", "How many objects are in the image?")), COUNT_WORDS[
        d.count - 1
    ]


VQA_ANSWERS = {
    "colour": COLOUR_NAMES,
    "shape": SHAPES,
    "count": COUNT_WORDS,
    "position": tuple(where for _, where in POSITIONS.values()),
}
# Which scenes a question kind needs: counts are asked of counted scenes, positions of single placed objects.
VQA_PLACED = {"colour": None, "shape": None, "count": False, "position": True}


def _vqa(sampler, num_rows):
    rng = sampler.rng
    rows = []
    for _ in range(num_rows):
        kind = rng.choice(tuple(VQA_ANSWERS))
        d = sampler.description(TRAIN_COMBOS, placed=VQA_PLACED[kind])
        question, answer = vqa_pair(d, kind, rng)
        negatives = rng.sample([a for a in VQA_ANSWERS[kind] if a != answer], NUM_HARD_NEGATIVES)
        image = _image(render_scene(sampler.scene(d)))
        rows.append(_row(query_text=question, query_image=image, pos_text=answer, neg_text=negatives))
    return rows


def _classification(sampler, num_rows):
    """Object labels ("red circle"), and for a third of the rows colour labels ("red"): labels of more than one
    granularity, so that shape-only labels (ShapeClassification, out-of-domain) are a new label set, not a new
    kind of label."""
    rows = []
    for _ in range(num_rows):
        d = sampler.description(TRAIN_COMBOS, placed=True)
        if sampler.rng.random() < 1 / 3:
            positive = d.colour
            negatives = sampler.rng.sample([c for c in COLOUR_NAMES if c != d.colour], NUM_HARD_NEGATIVES)
        else:
            positive = label(d.shape, d.colour)
            variants = _combo_variants(sampler.rng, d, TRAIN_COMBOS, NUM_HARD_NEGATIVES)
            negatives = [label(v.shape, v.colour) for v in variants]
        image = _image(render_scene(sampler.scene(d)))
        rows.append(_row(query_image=image, pos_text=positive, neg_text=negatives))
    return rows


def _combo_variants(rng, description, combos, k):
    """Up to `k` combinations sharing the shape or the colour of `description` (hard negatives for labels)."""
    d = description
    options = [(s, c) for s, c in combos if (s == d.shape) != (c == d.colour)]
    return [Description(s, c) for s, c in rng.sample(options, min(k, len(options)))]


def _grounding(sampler, num_rows):
    rows = []
    for _ in range(num_rows):
        scene = sampler.multi_scene(TRAIN_COMBOS)
        target, *others = sampler.rng.sample(scene.things, len(scene.things))
        rows.append(
            _row(
                query_text=label(target.shape, target.colour),
                query_image=_image(render_scene(scene)),
                pos_image=_image(crop_thing(scene, target)),
                neg_image=[_image(crop_thing(scene, other)) for other in others[:NUM_HARD_NEGATIVES]],
            )
        )
    return rows


def _page_variants(sampler, page, combos, k):
    """Hard negative pages: same topic with another place or count, or a topic sharing the shape or colour."""
    rng = sampler.rng
    options = [("place", None), ("count", None)] + [
        ("topic", combo) for combo in combos if (combo[0] == page.shape) != (combo[1] == page.colour)
    ]
    pages = []
    for what, combo in rng.sample(options, k):
        if what == "place":
            pages.append(
                sampler.page(page.shape, page.colour, page.count, rng.choice([p for p in PLACES if p != page.place]))
            )
        elif what == "count":
            other_count = rng.choice([n for n in range(1, len(COUNT_WORDS) + 1) if n != page.count])
            pages.append(sampler.page(page.shape, page.colour, other_count, page.place))
        else:
            pages.append(sampler.page(*combo))
    return pages


def _document_retrieval(sampler, num_rows):
    rows = []
    for _ in range(num_rows):
        page = sampler.page(*sampler.rng.choice(TRAIN_COMBOS))
        negatives = _page_variants(sampler, page, TRAIN_COMBOS, NUM_HARD_NEGATIVES)
        rows.append(
            _row(
                query_text=report_query(page, sampler.rng),
                pos_image=_image(render_page(page)),
                neg_image=[_image(render_page(n)) for n in negatives],
            )
        )
    return rows


CONTRASTIVE_BUILDERS = {
    "text_pairs": _text_pairs,
    "image_to_caption": _image_to_caption,
    "caption_to_image": _caption_to_image,
    "vqa": _vqa,
    "classification": _classification,
    "grounding": _grounding,
    "document_retrieval": _document_retrieval,
}
CONTRASTIVE_FEATURES = Features(
    {
        "query_text": Value("string"),
        "query_image": Image(),
        "pos_text": Value("string"),
        "pos_image": Image(),
        "neg_text": List(Value("string")),
        "neg_image": List(Image()),
    }
)


# ----------------------------------------------------------------------------------------------------------------
# mmeb/: the MMEB-eval layout. A row is (query text, query image or None, [(candidate text, image or None), ...])
# with the positive first.


def mmeb_text(prompt, text=""):
    """A training prompt in MMEB's spelling: the same text, with MMEB's "<|image_1|>" as the image marker.

    (Real MMEB texts put a new line after the marker; the nano suite keeps the training prompts exactly, so that
    its scores measure what was learned, not a formatting shift.)
    """
    return prompt.format(text=text).replace("<image>", "<|image_1|>")


MMEB_IMAGE_TARGET = mmeb_text(IMAGE_DOCUMENT_PROMPT)
MMEB_CROP_TARGET = mmeb_text(PROMPTS["grounding"][1])


def _shuffled(rng, items):
    return rng.sample(items, len(items))


def _label_candidates(rng, d, combos):
    """The positive label, then labels sharing its shape or colour, then any others, NUM_CANDIDATES in all."""
    hard = [label(s, c) for s, c in _shuffled(rng, list(combos)) if (s == d.shape) != (c == d.colour)]
    rest = [label(s, c) for s, c in _shuffled(rng, list(ALL_COMBOS)) if s != d.shape and c != d.colour]
    return [label(d.shape, d.colour)] + (hard[:6] + rest)[: NUM_CANDIDATES - 1]


def _mmeb_object_classification(sampler, num_rows, combos):
    prompt = PROMPTS["classification"][0]
    rows = []
    for _ in range(num_rows):
        d = sampler.description(combos, placed=True)
        candidates = _label_candidates(sampler.rng, d, ALL_COMBOS)
        rows.append((mmeb_text(prompt), render_scene(sampler.scene(d)), [(c, None) for c in candidates]))
    return rows


def _mmeb_shape_classification(sampler, num_rows):
    prompt = PROMPTS["classification"][0]
    rows = []
    for _ in range(num_rows):
        d = sampler.description(TRAIN_COMBOS)
        candidates = [d.shape] + _shuffled(sampler.rng, [s for s in SHAPES if s != d.shape])
        rows.append((mmeb_text(prompt), render_scene(sampler.scene(d)), [(c, None) for c in candidates]))
    return rows


def _mmeb_vqa(sampler, num_rows, kinds, combos=TRAIN_COMBOS):
    """Questions of the given kinds (one drawn per row) about scenes of `combos`."""
    prompt = PROMPTS["vqa"][0]
    rows = []
    for _ in range(num_rows):
        kind = sampler.rng.choice(kinds)
        d = sampler.description(combos, placed=VQA_PLACED[kind])
        question, answer = vqa_pair(d, kind, sampler.rng)
        candidates = [answer] + _shuffled(sampler.rng, [a for a in VQA_ANSWERS[kind] if a != answer])
        rows.append((mmeb_text(prompt, question), render_scene(sampler.scene(d)), [(c, None) for c in candidates]))
    return rows


def _mmeb_caption_to_image(sampler, num_rows, combos):
    prompt = PROMPTS["caption_to_image"][0]
    rows = []
    for _ in range(num_rows):
        d = sampler.description(combos)
        variants = sampler.variants(d, ALL_COMBOS, NUM_CANDIDATES - 1)
        images = [render_scene(sampler.scene(x)) for x in [d] + variants]
        rows.append((mmeb_text(prompt, caption(d, sampler.rng)), None, [(MMEB_IMAGE_TARGET, i) for i in images]))
    return rows


def _mmeb_image_to_caption(sampler, num_rows):
    prompt = PROMPTS["image_to_caption"][0]
    rows = []
    for _ in range(num_rows):
        d = sampler.description(TRAIN_COMBOS)
        variants = sampler.variants(d, TRAIN_COMBOS, NUM_CANDIDATES - 1)
        candidates = [caption(x, sampler.rng) for x in [d] + variants]
        rows.append((mmeb_text(prompt), render_scene(sampler.scene(d)), [(c, None) for c in candidates]))
    return rows


def _mmeb_text_to_page(sampler, num_rows):
    prompt = PROMPTS["document_retrieval"][0]
    rows = []
    for _ in range(num_rows):
        page = sampler.page(*sampler.rng.choice(TRAIN_COMBOS))
        negatives = _page_variants(sampler, page, TRAIN_COMBOS, NUM_CANDIDATES - 1)
        targets = [(MMEB_IMAGE_TARGET, render_page(p)) for p in [page] + negatives]
        rows.append((mmeb_text(prompt, report_query(page, sampler.rng)), None, targets))
    return rows


def _grounding_candidates(sampler, scene, target, pool):
    """The target's crop, the other objects of its scene, then crops from other scenes whose labels differ from
    every object in this scene (a crop that could also answer the query would make the row ambiguous)."""
    own = [crop_thing(scene, thing) for thing in [target] + [t for t in scene.things if t != target]]
    labels = {(t.shape, t.colour) for t in scene.things}
    foreign = [(s, t) for s, t in pool if (t.shape, t.colour) not in labels and s != scene]
    extra = sampler.rng.sample(foreign, NUM_CANDIDATES - len(own))
    return [(MMEB_CROP_TARGET, crop) for crop in own + [crop_thing(s, t) for s, t in extra]]


def _mmeb_grounding(sampler, num_rows, held_out=False):
    """Scenes of three or four objects; the query names one by its label and the target is its crop. With
    `held_out`, every scene holds at least one held-out shape-colour combination and the query names one."""
    scenes = []
    while len(scenes) < num_rows + 3:
        scene = sampler.multi_scene(ALL_COMBOS if held_out else TRAIN_COMBOS)
        if not held_out or any((t.shape, t.colour) in HELD_OUT_COMBOS for t in scene.things):
            scenes.append(scene)
    pool = [(scene, thing) for scene in scenes for thing in scene.things]
    rows = []
    for scene in scenes[:num_rows]:
        targets = [t for t in scene.things if not held_out or (t.shape, t.colour) in HELD_OUT_COMBOS]
        target = sampler.rng.choice(targets)
        query = mmeb_text(PROMPTS["grounding"][0], label(target.shape, target.colour))
        rows.append((query, render_scene(scene), _grounding_candidates(sampler, scene, target, pool)))
    return rows


# name -> (MMEB category, IND or OOD, builder(sampler, num_rows))
MMEB_SUBSETS = {
    "ObjectClassification": ("Classification", "IND", lambda s, n: _mmeb_object_classification(s, n, TRAIN_COMBOS)),
    "HeldOutObjectClassification": (
        "Classification",
        "OOD",
        lambda s, n: _mmeb_object_classification(s, n, HELD_OUT_COMBO_LIST),
    ),
    "ShapeClassification": ("Classification", "OOD", _mmeb_shape_classification),
    "ColorVQA": ("VQA", "IND", lambda s, n: _mmeb_vqa(s, n, ("colour",))),
    "CountVQA": ("VQA", "IND", lambda s, n: _mmeb_vqa(s, n, ("count",))),
    "PositionVQA": ("VQA", "IND", lambda s, n: _mmeb_vqa(s, n, ("position",))),
    "HeldOutVQA": ("VQA", "OOD", lambda s, n: _mmeb_vqa(s, n, tuple(VQA_ANSWERS), HELD_OUT_COMBO_LIST)),
    "CaptionToImage": ("Retrieval", "IND", lambda s, n: _mmeb_caption_to_image(s, n, TRAIN_COMBOS)),
    "ImageToCaption": ("Retrieval", "IND", _mmeb_image_to_caption),
    "TextToPage": ("Retrieval", "IND", _mmeb_text_to_page),
    "HeldOutCaptionToImage": ("Retrieval", "OOD", lambda s, n: _mmeb_caption_to_image(s, n, HELD_OUT_COMBO_LIST)),
    "LabelGrounding": ("Visual Grounding", "IND", _mmeb_grounding),
    "HeldOutLabelGrounding": ("Visual Grounding", "OOD", lambda s, n: _mmeb_grounding(s, n, held_out=True)),
}
MMEB_SCHEMA = pa.schema(
    [
        ("qry_text", pa.string()),
        ("qry_img_path", pa.string()),
        ("tgt_text", pa.list_(pa.string())),
        ("tgt_img_path", pa.list_(pa.string())),
    ]
)


def write_mmeb_subset(mmeb_dir, subset, rows):
    """Writes the parquet file and the PNG files of one subset; image paths are relative to `mmeb_dir/images`."""
    image_dir = Path(mmeb_dir) / "images" / subset
    image_dir.mkdir(parents=True, exist_ok=True)

    def save(image, name):
        if image is None:
            return ""
        (image_dir / name).write_bytes(png_bytes(image))
        return f"{subset}/{name}"

    columns = {name: [] for name in MMEB_SCHEMA.names}
    for i, (query_text, query_image, targets) in enumerate(rows):
        columns["qry_text"].append(query_text)
        columns["qry_img_path"].append(save(query_image, f"{i:04d}_query.png"))
        columns["tgt_text"].append([text for text, _ in targets])
        columns["tgt_img_path"].append(
            [save(image, f"{i:04d}_target_{j:02d}.png") for j, (_, image) in enumerate(targets)]
        )
    data_dir = Path(mmeb_dir) / "data" / subset
    data_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns, schema=MMEB_SCHEMA), data_dir / "test-00000-of-00001.parquet")


# ----------------------------------------------------------------------------------------------------------------
# vidore/: BEIR layout. Pages come in pairs that share a topic; a query names one page, which is fully relevant
# (score 2), and its sibling is partly relevant (score 1).


def _vidore_set(sampler, num_topics, sibling_differs_in):
    rng = sampler.rng
    pages, queries, qrels = [], [], []
    for topic in rng.sample(ALL_COMBOS, num_topics):
        first = sampler.page(*topic)
        if sibling_differs_in == "place":
            second = sampler.page(*topic, count=first.count, place=rng.choice([p for p in PLACES if p != first.place]))
        else:
            second = sampler.page(
                *topic, count=rng.choice([n for n in range(1, 5) if n != first.count]), place=first.place
            )
        pair = [len(pages), len(pages) + 1]
        pages += [first, second]
        for corpus_id, sibling_id in (pair, pair[::-1]):
            page = pages[corpus_id]
            if sibling_differs_in == "place":
                query = f"Which report describes {page.colour} {PLURALS[page.shape]} seen near the {page.place}?"
            else:
                query = (
                    f"Which page lists {COUNT_WORDS[page.count - 1]} {page.colour} {_things(page.count, page.shape)}?"
                )
            query_id = len(queries)
            queries.append(query)
            qrels += [(query_id, corpus_id, 2), (query_id, sibling_id, 1)]
    return pages, queries, qrels


VIDORE_SETS = {"nano_reports": "place", "nano_inventory": "count"}
VIDORE_CORPUS_FEATURES = Features({"corpus-id": Value("int64"), "image": Image()})


def write_vidore_set(set_dir, pages, queries, qrels):
    set_dir = Path(set_dir)
    for part in ("corpus", "queries", "qrels"):
        (set_dir / part).mkdir(parents=True, exist_ok=True)
    # datasets writes the Image feature into the parquet metadata, so load_dataset decodes the column to images.
    corpus = Dataset.from_dict(
        {"corpus-id": list(range(len(pages))), "image": [_image(render_page(p)) for p in pages]},
        features=VIDORE_CORPUS_FEATURES,
    )
    corpus.to_parquet(str(set_dir / "corpus" / "test-00000-of-00001.parquet"))
    pq.write_table(
        pa.table({"query-id": pa.array(range(len(queries)), pa.int64()), "query": pa.array(queries, pa.string())}),
        set_dir / "queries" / "test-00000-of-00001.parquet",
    )
    query_ids, corpus_ids, scores = zip(*qrels)
    pq.write_table(
        pa.table(
            {
                "query-id": pa.array(query_ids, pa.int64()),
                "corpus-id": pa.array(corpus_ids, pa.int64()),
                "score": pa.array(scores, pa.int64()),
            }
        ),
        set_dir / "qrels" / "test-00000-of-00001.parquet",
    )


# ----------------------------------------------------------------------------------------------------------------


def _rows(base_and_minimum, scale):
    base, minimum = base_and_minimum
    return max(minimum, round(base * scale))


def _write_json(path, value):
    Path(path).write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def make_nano_data(out_dir, seed=0, scale=1.0):
    """Writes the nano world under `out_dir` and returns the paths of its parts (see the module docstring).

    `scale` multiplies every row count (each keeps a small minimum); the number of candidates per MMEB row and of
    hard negatives per contrastive row does not change with it.
    """
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_scenes, eval_scenes = set(), set()
    manifest = {"seed": seed, "scale": scale, "cpt": {}, "contrastive": {}, "mmeb": {}, "vidore": {}}

    rows = cpt_rows(Sampler("cpt", seed, train_scenes), _rows(CPT_ROWS, scale))
    Dataset.from_list(rows, features=CPT_FEATURES).save_to_disk(str(out_dir / "cpt"))
    manifest["cpt"] = {"path": "cpt", "rows": len(rows)}

    contrastive_dir = out_dir / "contrastive"
    tasks = {}
    for task, build in CONTRASTIVE_BUILDERS.items():
        rows = build(
            Sampler(f"contrastive-{task}", seed, train_scenes),
            _rows((CONTRASTIVE_ROWS[task], MIN_CONTRASTIVE_ROWS), scale),
        )
        Dataset.from_list(rows, features=CONTRASTIVE_FEATURES).save_to_disk(str(contrastive_dir / task))
        manifest["contrastive"][task] = {"path": f"contrastive/{task}", "rows": len(rows)}
        query_prompt, document_prompt = PROMPTS[task]
        tasks[task] = {"query_prompt": query_prompt, "document_prompt": document_prompt, "weight": len(rows)}
    total = sum(task["weight"] for task in tasks.values())
    for task in tasks.values():
        task["weight"] = round(task["weight"] / total, 6)
    _write_json(contrastive_dir / "tasks.json", tasks)

    mmeb_dir = out_dir / "mmeb"
    subsets = {}
    frozen_train_scenes = frozenset(train_scenes)
    for subset, (category, split, build) in MMEB_SUBSETS.items():
        rows = build(Sampler(f"mmeb-{subset}", seed, eval_scenes, frozen_train_scenes), _rows(MMEB_ROWS, scale))
        write_mmeb_subset(mmeb_dir, subset, rows)
        chance = sum(1 / len(targets) for _, _, targets in rows) / len(rows)
        subsets[subset] = {"category": category, "split": split, "chance": round(chance, 6)}
        manifest["mmeb"][subset] = {"path": f"mmeb/data/{subset}/test-00000-of-00001.parquet", "rows": len(rows)}
    _write_json(mmeb_dir / "subsets.json", subsets)
    # eval.mmeb reads the subset table beside the subset folders it is pointed at (its --data_dir).
    _write_json(mmeb_dir / "data" / "subsets.json", subsets)

    for name, sibling_differs_in in VIDORE_SETS.items():
        sampler = Sampler(f"vidore-{name}", seed, eval_scenes, frozen_train_scenes)
        pages, queries, qrels = _vidore_set(sampler, _rows(VIDORE_TOPICS, scale), sibling_differs_in)
        write_vidore_set(out_dir / "vidore" / name, pages, queries, qrels)
        manifest["vidore"][name] = {
            "path": f"vidore/{name}",
            "corpus": len(pages),
            "queries": len(queries),
            "qrels": len(qrels),
        }
    _write_json(out_dir / "manifest.json", manifest)

    return {
        "cpt": str(out_dir / "cpt"),
        "contrastive": str(contrastive_dir),
        "tasks": str(contrastive_dir / "tasks.json"),
        "mmeb": str(mmeb_dir),
        "vidore": str(out_dir / "vidore"),
        "manifest": str(out_dir / "manifest.json"),
    }
