"""The nano world in the paper's proportions, for the ablation grid (scripts/run_nano_ablations.py).

The demo world (`nano_data.py`) trains the base VLM, CPT and contrastive learning on the same concepts, and CPT
reads the very rows the causal warm-up has just learnt. This world mirrors the MoCa paper's setting instead:

- **warm-up corpus** (the base VLM's pre-training): captions, documents and texts about six *core* colours
  (red, green, blue, yellow, purple, orange) and the eight shapes, from random streams of their own: no CPT row
  is in it.
- **CPT corpus** (unlabelled, new): interleaved rows of several images and texts, captions, multi-object scene
  descriptions, rendered pages and texts about all ten colours: the core ones and four *CPT-only* colours (cyan,
  black, pink, brown) that neither the warm-up nor the contrastive data names. It is written at the largest
  scale asked for; smaller scales are its first rows (0.25x is part of 1x, 1x part of 4x).
- **contrastive data** (labelled, small): the demo's seven tasks, a few hundred rows each, core colours only.
- **evaluation** (MMEB layout, ViDoRe layout): in-domain subsets (core colours, seen combinations); out-of-domain
  subsets of two kinds: *held-out combinations* (a core shape-colour pair that appears in no training row of any
  stage) and *CPT-only concepts* (objects of the four colours only the CPT corpus shows).

It reuses the demo world's drawing, wording and row builders; which colours a section may use is set by
`_palette`, which rebinds the demo module's colour tables for the duration of that section (its builders read
them as module globals). Everything is a function of the seed and the sizes: two runs write identical rows.
"""

import contextlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from datasets import Dataset

import nano_data as nd

CORE_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
CPT_ONLY_COLOURS = ("cyan", "black", "pink", "brown")
ALL_COLOURS = CORE_COLOURS + CPT_ONLY_COLOURS
RGB = nd.COLOURS | {"pink": (240, 110, 170), "brown": (130, 80, 30)}
COLOUR_FACTS = nd.COLOUR_FACTS | {"pink": "a flamingo", "brown": "a chestnut"}
# One held-out core colour per shape (each core colour held out at most twice): in no training row of any stage.
HELD_OUT = frozenset((shape, CORE_COLOURS[(5 * i + 1) % len(CORE_COLOURS)]) for i, shape in enumerate(nd.SHAPES))
CORE_SEEN = tuple((s, c) for s in nd.SHAPES for c in CORE_COLOURS if (s, c) not in HELD_OUT)
CPT_ONLY = tuple((s, c) for s in nd.SHAPES for c in CPT_ONLY_COLOURS)
HELD_OUT_LIST = tuple((s, c) for s in nd.SHAPES for c in CORE_COLOURS if (s, c) in HELD_OUT)

# Evaluation groups: the two out-of-domain kinds are both MMEB's "OOD" split; the grid reports them apart too.
GROUP_IND, GROUP_HELD_OUT, GROUP_CPT_ONLY = "IND", "held-out combinations", "CPT-only concepts"


@dataclass(frozen=True)
class WorldSizes:
    warmup_rows: int = 4000
    cpt_rows: int = 800  # at CPT scale 1x
    max_cpt_scale: float = 4.0  # the largest corpus written; smaller scales are its first rows
    contrastive_rows: int = 300  # per task
    mmeb_rows: int = 100  # per subset
    vidore_topics: int = 20  # two pages each, per set


@contextlib.contextmanager
def _palette(colours, held_out=HELD_OUT):
    """Makes the demo world's builders use only `colours` (every shape), with `held_out` combinations excluded
    from their training combinations."""
    names = ("COLOURS", "COLOUR_NAMES", "COLOUR_FACTS", "ALL_COMBOS", "TRAIN_COMBOS", "HELD_OUT_COMBOS",
             "HELD_OUT_COMBO_LIST", "VQA_ANSWERS")  # fmt: skip
    saved = {name: getattr(nd, name) for name in names}
    all_combos = tuple((s, c) for s in nd.SHAPES for c in colours)
    nd.COLOURS = RGB
    nd.COLOUR_NAMES = tuple(colours)
    nd.COLOUR_FACTS = {c: COLOUR_FACTS[c] for c in colours}
    nd.ALL_COMBOS = all_combos
    nd.HELD_OUT_COMBOS = frozenset(c for c in all_combos if c in held_out)
    nd.HELD_OUT_COMBO_LIST = tuple(c for c in all_combos if c in held_out)
    nd.TRAIN_COMBOS = tuple(c for c in all_combos if c not in held_out)
    nd.VQA_ANSWERS = saved["VQA_ANSWERS"] | {"colour": tuple(colours)}
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(nd, name, value)


def _scene_description(scene):
    """A caption of a multi-object scene: every object with its colour, shape and position."""
    where = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
             "center": "in the middle"}  # fmt: skip
    parts = [f"{nd._a(t.colour)} {t.shape} {where[t.position]}" for t in scene.things]
    return ", ".join(parts[:-1]) + " and " + parts[-1] + "."


def cpt_rows(sampler, num_rows):
    """Unlabelled rows about every CPT colour (call inside `_palette(ALL_COLOURS)`): interleaved rows of two or
    three images with their captions and a fact, single captions, multi-object scenes, pages and texts."""
    rng = sampler.rng
    facts = nd._facts()
    rows = []
    for _ in range(num_rows):
        kind = rng.choices(("interleaved", "caption", "scene", "document", "text"), weights=(3, 2, 2, 2, 1))[0]
        if kind in ("interleaved", "caption"):
            parts, images = [], []
            for _ in range(rng.randint(2, 3) if kind == "interleaved" else 1):
                description = sampler.description(nd.TRAIN_COMBOS)
                images.append(nd._image(nd.render_scene(sampler.scene(description))))
                words = nd.caption(description, rng)
                parts.append(f"<image> {words}" if rng.random() < 0.7 else f"{words} <image>")
                if kind == "interleaved" and rng.random() < 0.5:
                    parts.append(f"{COLOUR_FACTS[description.colour]} is {description.colour}.")
            rows.append({"text": " ".join(parts), "images": images})
        elif kind == "scene":
            scene = sampler.multi_scene(nd.TRAIN_COMBOS)
            rows.append({"text": f"<image> {_scene_description(scene)}", "images": [nd._image(nd.render_scene(scene))]})
        elif kind == "document":
            page = sampler.page(*rng.choice(nd.TRAIN_COMBOS))
            rows.append({"text": f"<image> {page.text}", "images": [nd._image(nd.render_page(page))]})
        else:
            rows.append({"text": rng.choice(facts), "images": []})
    return rows


def cpt_rows_at(scale: float, sizes: WorldSizes) -> int:
    return max(1, round(sizes.cpt_rows * scale))


def cpt_dir(world: Path, scale: float) -> Path:
    return Path(world) / f"cpt-{scale:g}x"


# name -> (MMEB category, group, builder(sampler, rows)), each built under the palette its group needs.
def _mmeb_subsets():
    core, everything = CORE_COLOURS, ALL_COLOURS
    return {
        "ObjectClassification": ("Classification", GROUP_IND, core, lambda s, n: nd._mmeb_object_classification(s, n, CORE_SEEN)),
        "ColorVQA": ("VQA", GROUP_IND, core, lambda s, n: nd._mmeb_vqa(s, n, ("colour",), CORE_SEEN)),
        "CountVQA": ("VQA", GROUP_IND, core, lambda s, n: nd._mmeb_vqa(s, n, ("count",), CORE_SEEN)),
        "PositionVQA": ("VQA", GROUP_IND, core, lambda s, n: nd._mmeb_vqa(s, n, ("position",), CORE_SEEN)),
        "CaptionToImage": ("Retrieval", GROUP_IND, core, lambda s, n: nd._mmeb_caption_to_image(s, n, CORE_SEEN)),
        "ImageToCaption": ("Retrieval", GROUP_IND, core, nd._mmeb_image_to_caption),
        "TextToPage": ("Retrieval", GROUP_IND, core, nd._mmeb_text_to_page),
        "LabelGrounding": ("Visual Grounding", GROUP_IND, core, nd._mmeb_grounding),
        "HeldOutObjectClassification": ("Classification", GROUP_HELD_OUT, core,
                                        lambda s, n: nd._mmeb_object_classification(s, n, HELD_OUT_LIST)),
        "HeldOutVQA": ("VQA", GROUP_HELD_OUT, core, lambda s, n: nd._mmeb_vqa(s, n, tuple(nd.VQA_ANSWERS), HELD_OUT_LIST)),
        "HeldOutCaptionToImage": ("Retrieval", GROUP_HELD_OUT, core,
                                  lambda s, n: nd._mmeb_caption_to_image(s, n, HELD_OUT_LIST)),
        "HeldOutLabelGrounding": ("Visual Grounding", GROUP_HELD_OUT, core, lambda s, n: nd._mmeb_grounding(s, n, held_out=True)),
        "NewColourClassification": ("Classification", GROUP_CPT_ONLY, everything,
                                    lambda s, n: nd._mmeb_object_classification(s, n, CPT_ONLY)),
        "NewColourVQA": ("VQA", GROUP_CPT_ONLY, everything, lambda s, n: nd._mmeb_vqa(s, n, ("colour",), CPT_ONLY)),
        "NewColourCaptionToImage": ("Retrieval", GROUP_CPT_ONLY, everything,
                                    lambda s, n: nd._mmeb_caption_to_image(s, n, CPT_ONLY)),
    }  # fmt: skip


MMEB_GROUPS = {name: group for name, (_, group, _, _) in _mmeb_subsets().items()}


def make_paper_world(out_dir, seed=0, sizes=WorldSizes()):
    """Writes the world under `out_dir`: warmup/, cpt-<scale>x/ (for 0.25x, 1x and the largest scale),
    contrastive/, mmeb/, vidore/ and manifest.json. Returns the manifest."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_scenes, eval_scenes = set(), set()
    manifest = {"seed": seed, "sizes": asdict(sizes), "cpt": {}, "contrastive": {}, "mmeb": {}, "vidore": {}}

    with _palette(CORE_COLOURS):
        rows = nd.cpt_rows(nd.Sampler("paper-warmup", seed, train_scenes), sizes.warmup_rows)
    Dataset.from_list(rows, features=nd.CPT_FEATURES).save_to_disk(str(out / "warmup"))
    manifest["warmup"] = {"rows": len(rows)}

    with _palette(ALL_COLOURS):
        rows = cpt_rows(nd.Sampler("paper-cpt", seed, train_scenes), cpt_rows_at(sizes.max_cpt_scale, sizes))
    corpus = Dataset.from_list(rows, features=nd.CPT_FEATURES)
    for scale in sorted({0.25, 1.0, sizes.max_cpt_scale}):
        part = corpus.select(range(min(len(corpus), cpt_rows_at(scale, sizes))))
        part.save_to_disk(str(cpt_dir(out, scale)))
        manifest["cpt"][f"{scale:g}x"] = {"rows": len(part)}

    tasks = {}
    with _palette(CORE_COLOURS):
        for task, build in nd.CONTRASTIVE_BUILDERS.items():
            rows = build(nd.Sampler(f"paper-contrastive-{task}", seed, train_scenes), sizes.contrastive_rows)
            Dataset.from_list(rows, features=nd.CONTRASTIVE_FEATURES).save_to_disk(str(out / "contrastive" / task))
            manifest["contrastive"][task] = {"rows": len(rows)}
            query_prompt, document_prompt = nd.PROMPTS[task]
            tasks[task] = {"query_prompt": query_prompt, "document_prompt": document_prompt,
                           "weight": round(1 / len(nd.CONTRASTIVE_BUILDERS), 6)}  # fmt: skip
    nd._write_json(out / "contrastive" / "tasks.json", tasks)

    subsets = {}
    frozen_train = frozenset(train_scenes)
    for subset, (category, group, colours, build) in _mmeb_subsets().items():
        with _palette(colours):
            rows = build(nd.Sampler(f"paper-mmeb-{subset}", seed, eval_scenes, frozen_train), sizes.mmeb_rows)
        nd.write_mmeb_subset(out / "mmeb", subset, rows)
        chance = sum(1 / len(targets) for _, _, targets in rows) / len(rows)
        split = "IND" if group == GROUP_IND else "OOD"
        subsets[subset] = {"category": category, "split": split, "group": group, "chance": round(chance, 6)}
        manifest["mmeb"][subset] = {"rows": len(rows)}
    nd._write_json(out / "mmeb" / "subsets.json", subsets)
    nd._write_json(out / "mmeb" / "data" / "subsets.json", subsets)

    with _palette(ALL_COLOURS):
        for name, sibling_differs_in in nd.VIDORE_SETS.items():
            sampler = nd.Sampler(f"paper-vidore-{name}", seed, eval_scenes, frozen_train)
            pages, queries, qrels = nd._vidore_set(sampler, sizes.vidore_topics, sibling_differs_in)
            nd.write_vidore_set(out / "vidore" / name, pages, queries, qrels)
            manifest["vidore"][name] = {"corpus": len(pages), "queries": len(queries)}
    nd._write_json(out / "manifest.json", manifest)
    return manifest


if __name__ == "__main__":
    import sys

    print(json.dumps(make_paper_world(sys.argv[1], seed=int(sys.argv[2]) if len(sys.argv) > 2 else 0), indent=1))
