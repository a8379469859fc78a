"""The embedded default data set: procedurally generated image–caption pairs.

No machine here can download a data set, so cmalign carries one that is generated from a seed:
scenes of 1–3 coloured shapes on a plain background, each described by several captions in
different phrasings, labelled by colour and shape ("red circle": the 64 classes used for clustering
and zero-shot; with 8 shape classes, zero-shot sat near 23 % and its standard error was 1.3 points on
1000 images, the size of the effects it had to resolve). Attributes (8 shapes × 8 colours × 3
backgrounds × 2 sizes × 5 positions or counts) give enough combinations that retrieval is not trivial,
and the class is a *part* of each caption, as in real data.

Everything is a pure function of ``(seed, split, index)``: the same seed gives the same pixels and
captions on every machine, and scenes render lazily so a DataLoader worker draws only what it needs.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from cmalign.data.records import ReadResult, Record
from cmalign.errors import ConfigError

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross", "hexagon", "ring")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 200),
    "orange": (250, 140, 20),
    "cyan": (40, 210, 220),
    "pink": (250, 120, 190),
}
BACKGROUNDS = {"black": (15, 15, 15), "gray": (115, 115, 115), "white": (240, 240, 240)}
SIZES = ("small", "large")
POSITIONS = {  # name -> centre as a fraction of the canvas
    "top left": (0.3, 0.3),
    "top right": (0.7, 0.3),
    "bottom left": (0.3, 0.7),
    "bottom right": (0.7, 0.7),
    "center": (0.5, 0.5),
}
PLURALS = {"cross": "crosses"}  # the rest take an "s"
CLASSES = tuple(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES)
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
SPLITS = {"train": 10000, "val": 1000, "test": 1000}
CAPTIONS_PER_IMAGE = 5
RENDER_SIZE = 64

# Zero-shot / clustering prompts: the class name in several templates (CLIP's practice); "one {}" and "the {}"
# read as English for every class ("a orange circle" would not).
CLASS_TEMPLATES = (
    "a drawing of one {}.",
    "a picture of the {}.",
    "one {} on a plain background.",
    "an image showing one {}.",
)

_SINGLE_TEMPLATES = (
    "a {size} {colour} {shape} in the {pos}",
    "a {colour} {shape} at the {pos} on a {bg} background",
    "{pos}: one {size} {colour} {shape}",
    "there is a {colour} {shape} near the {pos} of the picture",
    "a picture of a {size} {shape}, coloured {colour}, on {bg}",
    "a {bg} image with a {colour} {shape} placed {pos}",
    "one {shape} in {colour}, {size}, {pos}",
    "a drawing of a {colour} {shape} on {bg}",
    "a picture of a {shape}: {size}, {colour}, {pos}",
)
_MULTI_TEMPLATES = (
    "{count} {size} {colour} {shapes} on a {bg} background",
    "a {bg} image with {count} {colour} {shapes}",
    "there are {count} {colour} {shapes} in the picture",
    "{count} {shapes}, all {colour} and {size}",
    "a group of {count} {size} {colour} {shapes}",
    "{count} {colour} {shapes} scattered on {bg}",
    "a drawing of {count} {colour} {shapes}",
    "a picture of {count} {size} {colour} {shapes} on {bg}",
)


@dataclass(frozen=True)
class Scene:
    """A generated picture: attributes plus a jitter seed; renders on demand (an ImageSource)."""

    shape: str
    colour: str
    background: str
    size: str
    position: str  # "" when count > 1 (objects are scattered)
    count: int
    jitter_seed: int

    def load(self) -> Image.Image:
        rng = random.Random(self.jitter_seed)
        s = RENDER_SIZE
        img = Image.new("RGB", (s, s), BACKGROUNDS[self.background])
        draw = ImageDraw.Draw(img)
        radius = (0.22 if self.size == "large" else 0.15) * s * rng.uniform(0.92, 1.08)
        if self.count == 1:
            cx, cy = POSITIONS[self.position]
            centres = [(cx * s + rng.uniform(-2, 2), cy * s + rng.uniform(-2, 2))]
        else:
            centres = _scatter(rng, self.count, radius, s)
        for cx, cy in centres:
            _draw_shape(draw, self.shape, cx, cy, radius, COLOURS[self.colour], BACKGROUNDS[self.background],
                        rng.uniform(-0.25, 0.25))
        return img

    @property
    def attributes(self) -> dict:
        return {"shape": self.shape, "colour": self.colour, "background": self.background, "size": self.size,
                "position": self.position, "count": self.count}


def _scatter(rng: random.Random, count: int, radius: float, s: int) -> list[tuple[float, float]]:
    centres: list[tuple[float, float]] = []
    for _ in range(200):
        c = (rng.uniform(radius + 1, s - radius - 1), rng.uniform(radius + 1, s - radius - 1))
        if all(math.dist(c, o) > 2 * radius + 1 for o in centres):
            centres.append(c)
            if len(centres) == count:
                break
    return centres


def _polygon(cx: float, cy: float, r: float, n: int, rot: float) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(rot + 2 * math.pi * k / n), cy + r * math.sin(rot + 2 * math.pi * k / n))
            for k in range(n)]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill, bg, rot: float):
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        draw.ellipse([cx - r * 0.55, cy - r * 0.55, cx + r * 0.55, cy + r * 0.55], fill=bg)
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, r * 1.2, 4, math.pi / 4 + rot * 0.3), fill=fill)
    elif shape == "diamond":
        draw.polygon(_polygon(cx, cy, r * 1.25, 4, rot * 0.3), fill=fill)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, r * 1.2, 3, -math.pi / 2 + rot * 0.3), fill=fill)
    elif shape == "hexagon":
        draw.polygon(_polygon(cx, cy, r * 1.1, 6, rot * 0.3), fill=fill)
    elif shape == "star":
        pts = []
        for k in range(10):
            rr = r * 1.25 if k % 2 == 0 else r * 0.5
            a = -math.pi / 2 + rot * 0.3 + math.pi * k / 5
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        draw.polygon(pts, fill=fill)
    elif shape == "cross":
        w = r * 0.38
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    else:  # pragma: no cover - SHAPES is closed
        raise ConfigError(shape)


def _rng_for(seed: int, split: str, index: int) -> random.Random:
    digest = hashlib.sha256(f"cmalign-synth/{seed}/{split}/{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def make_scene(seed: int, split: str, index: int) -> Scene:
    rng = _rng_for(seed, split, index)
    count = rng.choices((1, 2, 3), weights=(0.6, 0.25, 0.15))[0]
    return Scene(
        shape=rng.choice(SHAPES),
        colour=rng.choice(tuple(COLOURS)),
        background=rng.choice(tuple(BACKGROUNDS)),
        size=rng.choice(SIZES),
        position=rng.choice(tuple(POSITIONS)) if count == 1 else "",
        count=count,
        jitter_seed=rng.getrandbits(63),
    )


def image_for_key(key: str) -> Image.Image:
    """The image of a generated record from its key (``synth/SEED/SPLIT/INDEX``), rendered again: what an index
    of the generated set records as its image path."""
    parts = key.split("/")
    if len(parts) != 4 or parts[0] != "synth" or not parts[1].isdigit() or parts[2] not in SPLITS \
            or not parts[3].isdigit():
        raise KeyError(f"not a generated image key: {key!r}")
    return make_scene(int(parts[1]), parts[2], int(parts[3])).load()


def captions_for(scene: Scene, n: int, rng: random.Random) -> list[str]:
    """``n`` different phrasings of one scene (distinct templates while they last)."""
    templates = list(_SINGLE_TEMPLATES if scene.count == 1 else _MULTI_TEMPLATES)
    rng.shuffle(templates)
    words = {"size": scene.size, "colour": scene.colour, "shape": scene.shape, "bg": scene.background,
             "pos": scene.position, "count": COUNT_WORDS[scene.count],
             "shapes": PLURALS.get(scene.shape, scene.shape + "s")}
    caps = [templates[i % len(templates)].format(**words) for i in range(n)]
    return [re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", c) for c in caps]


def synth_split(split: str = "train", seed: int = 0, n_images: int | None = None,
                captions_per_image: int = CAPTIONS_PER_IMAGE) -> ReadResult:
    """Records of one split: ``captions_per_image`` records per scene, sharing the scene's key."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split '{split}', expected one of {', '.join(SPLITS)}")
    n = SPLITS[split] if n_images is None else n_images
    records = []
    for i in range(n):
        scene = make_scene(seed, split, i)
        caps = captions_for(scene, captions_per_image, _rng_for(seed, split + "/captions", i))
        key = f"synth/{seed}/{split}/{i:06d}"
        label = f"{scene.colour} {scene.shape}"
        records.extend(Record(image=scene, caption=c, label=label, key=key, source=f"{key}#{j}")
                       for j, c in enumerate(caps))
    return ReadResult(records=records)


def write_synth(out_dir: str | Path, seed: int = 0, sizes: dict[str, int] | None = None,
                captions_per_image: int = CAPTIONS_PER_IMAGE, progress=None) -> dict[str, Path]:
    """Write the generated set as PNG files + open_clip-style CSVs (``filepath,title,label``).

    One CSV row per caption, as open_clip's CSV loader expects; paths are relative to the CSV.
    """
    import csv

    from cmalign.artifacts.atomic import atomic_write, write_json

    out = Path(out_dir)
    written = {}
    sizes = sizes or SPLITS
    bad = {split: n for split, n in sizes.items() if n < 0}
    if bad or captions_per_image < 1:
        raise ConfigError(f"image counts must be >= 0 and captions per image >= 1; got {sizes}, "
                          f"{captions_per_image} captions per image")
    for split, n in sizes.items():
        img_dir = out / "images" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        result = synth_split(split, seed=seed, n_images=n, captions_per_image=captions_per_image)
        csv_path = out / f"{split}.csv"
        with atomic_write(csv_path, "w") as f:
            w = csv.writer(f)
            w.writerow(["filepath", "title", "label"])
            done = set()
            for rec in result.records:
                rel = f"images/{split}/{rec.key.rsplit('/', 1)[1]}.png"
                if rec.key not in done:
                    rec.image.load().save(out / rel)
                    done.add(rec.key)
                    if progress:
                        progress(split, len(done), n)
                w.writerow([rel, rec.caption, rec.label])
        written[split] = csv_path
    write_json(out / "manifest.json", {
        "kind": "cmalign-synth", "seed": seed, "splits": {k: int(v) for k, v in sizes.items()},
        "captions_per_image": captions_per_image, "classes": list(CLASSES),
        "class_templates": list(CLASS_TEMPLATES),
    })
    return written
