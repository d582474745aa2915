#!/usr/bin/env python3
"""The tiny shapes world: procedurally drawn, captioned 128x128 images.

Deterministic from a seed (numpy Generator + PIL drawing, no other randomness).

A scene is one of
  * single: one object         "a large red circle in the center, white background"
  * duo:    two objects of different colours, on opposite sides of one axis
            "a small red circle on the left, a large blue square on the right, black background"
  * pair:   two identical objects (a count), on opposite sides of a random axis
            "two small yellow triangles, gray background"

Every object always names its size, colour and shape; singles and duos also name
the position. The caption grammar is fixed and `parse_caption` inverts it, so the
evaluator can score an image against the prompt text alone.

Usage:
  python world.py --seed 0 --n 16 --out /tmp/world      # writes PNGs + captions.txt
"""
from __future__ import annotations

import argparse
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 128  # image side in pixels
SS = 4  # supersampling factor for anti-aliased edges

# Well separated in RGB (pairwise distance >= ~150 between shape colours,
# and between every shape colour and every background).
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 210, 40),
    "purple": (150, 50, 200),
}
BACKGROUNDS = {
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": (24, 32), "large": (44, 54)}  # bounding-box side range, pixels
POSITIONS = {  # nominal centre of the object's bounding box
    "left": (32, 64),
    "right": (96, 64),
    "top": (64, 32),
    "bottom": (64, 96),
    "center": (64, 64),
}
POS_PHRASE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
AXES = {"h": ("left", "right"), "v": ("top", "bottom")}
JITTER = 5  # +- pixels on the centre
SCENE_P = {"single": 0.35, "duo": 0.45, "pair": 0.20}
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}


@dataclass
class Obj:
    shape: str
    colour: str
    size: str
    position: str  # for pair objects: the actual side (not named in the caption)


@dataclass
class Scene:
    kind: str  # single | duo | pair
    background: str
    objects: list[Obj] = field(default_factory=list)

    def caption(self) -> str:
        if self.kind == "pair":
            o = self.objects[0]
            return f"two {o.size} {o.colour} {PLURAL[o.shape]}, {self.background} background"
        parts = [f"a {o.size} {o.colour} {o.shape} {POS_PHRASE[o.position]}" for o in self.objects]
        return ", ".join(parts) + f", {self.background} background"

    def to_json(self) -> dict:
        return asdict(self)


def sample_scene(rng: np.random.Generator) -> Scene:
    kinds = list(SCENE_P)
    kind = kinds[rng.choice(len(kinds), p=[SCENE_P[k] for k in kinds])]
    bg = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    colours = list(COLOURS)

    def obj(position, colour=None):
        return Obj(
            shape=SHAPES[rng.integers(len(SHAPES))],
            colour=colour or colours[rng.integers(len(colours))],
            size=list(SIZES)[rng.integers(len(SIZES))],
            position=position,
        )

    if kind == "single":
        pos = list(POSITIONS)[rng.integers(len(POSITIONS))]
        return Scene(kind, bg, [obj(pos)])
    axis = AXES[list(AXES)[rng.integers(len(AXES))]]
    if kind == "duo":
        c1, c2 = rng.choice(len(colours), size=2, replace=False)
        a, b = obj(axis[0], colours[c1]), obj(axis[1], colours[c2])
        objs = [a, b] if rng.random() < 0.5 else [b, a]  # mention order is random
        return Scene(kind, bg, objs)
    a = obj(axis[0])
    b = Obj(a.shape, a.colour, a.size, axis[1])
    return Scene(kind, bg, [a, b])


def _draw_shape(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, side: float, rgb) -> None:
    h = side / 2
    if shape == "circle":
        d.ellipse([cx - h, cy - h, cx + h, cy + h], fill=rgb)
    elif shape == "square":
        d.rectangle([cx - h, cy - h, cx + h, cy + h], fill=rgb)
    elif shape == "triangle":  # upward, fills its bounding box (base = height = side)
        d.polygon([(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)], fill=rgb)
    else:
        raise ValueError(shape)


def render(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Draws the scene; returns uint8 [SIZE, SIZE, 3]."""
    S = SIZE * SS
    img = Image.new("RGB", (S, S), BACKGROUNDS[scene.background])
    d = ImageDraw.Draw(img)
    for o in scene.objects:
        lo, hi = SIZES[o.size]
        side = rng.uniform(lo, hi)
        cx, cy = POSITIONS[o.position]
        cx += rng.uniform(-JITTER, JITTER)
        cy += rng.uniform(-JITTER, JITTER)
        _draw_shape(d, o.shape, cx * SS, cy * SS, side * SS, COLOURS[o.colour])
    img = img.resize((SIZE, SIZE), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.uint8)


def sample(seed: int, index: int) -> tuple[Scene, np.ndarray]:
    """Sample `index` of stream `seed`: independent of every other index."""
    rng = np.random.default_rng([seed, index])
    scene = sample_scene(rng)
    return scene, render(scene, rng)


def sample_batch(seed: int, start: int, count: int, exclude: set[str] | None = None):
    """Samples [start, start+count) of stream `seed`, skipping captions in `exclude`.

    Returns (captions, images uint8 [N,H,W,3]); N <= count when some were excluded.
    """
    caps, imgs = [], []
    for i in range(start, start + count):
        sc, im = sample(seed, i)
        c = sc.caption()
        if exclude and c in exclude:
            continue
        caps.append(c)
        imgs.append(im)
    return caps, np.stack(imgs) if imgs else np.zeros((0, SIZE, SIZE, 3), np.uint8)


# ----------------------------------------------------------------------------
# Held-out prompt set
# ----------------------------------------------------------------------------
HELDOUT_SEED = 777_000


def heldout_scenes(n: int = 100, seed: int = HELDOUT_SEED) -> list[Scene]:
    """n scenes with distinct captions, from a stream never used for training.

    Training (train.py) also drops every sample whose caption is in this set, so
    these prompts are never seen verbatim during training.
    """
    out, seen, i = [], set(), 0
    while len(out) < n:
        sc, _ = sample(seed, i)
        i += 1
        c = sc.caption()
        if c in seen:
            continue
        seen.add(c)
        out.append(sc)
    return out


# ----------------------------------------------------------------------------
# Caption parser (inverse of Scene.caption)
# ----------------------------------------------------------------------------
_C = "|".join(COLOURS)
_S = "|".join(SHAPES)
_Z = "|".join(SIZES)
_P = "|".join(re.escape(p) for p in POS_PHRASE.values())
_BG = "|".join(BACKGROUNDS)
_OBJ = re.compile(rf"^an? ({_Z}) ({_C}) ({_S}) ({_P})$")
_PAIR = re.compile(rf"^two ({_Z}) ({_C}) ({'|'.join(PLURAL.values())})$")
_BGRE = re.compile(rf"^({_BG}) background$")


def parse_caption(caption: str) -> dict:
    """Returns {'kind', 'background', 'objects': [{shape, colour, size, position|None}]}."""
    parts = [p.strip() for p in caption.strip().lower().split(",")]
    m = _BGRE.match(parts[-1])
    if not m:
        raise ValueError(f"no background in {caption!r}")
    bg = m.group(1)
    objs = []
    phrase_to_pos = {v: k for k, v in POS_PHRASE.items()}
    sing = {v: k for k, v in PLURAL.items()}
    if len(parts) == 2 and (mp := _PAIR.match(parts[0])):
        o = dict(shape=sing[mp.group(3)], colour=mp.group(2), size=mp.group(1), position=None)
        return dict(kind="pair", background=bg, objects=[o, dict(o)])
    for p in parts[:-1]:
        mo = _OBJ.match(p)
        if not mo:
            raise ValueError(f"cannot parse {p!r} in {caption!r}")
        objs.append(dict(size=mo.group(1), colour=mo.group(2), shape=mo.group(3),
                         position=phrase_to_pos[mo.group(4)]))
    return dict(kind="single" if len(objs) == 1 else "duo", background=bg, objects=objs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--heldout", action="store_true", help="write the held-out prompt set instead")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    lines = []
    if args.heldout:
        for sc in heldout_scenes(args.n):
            lines.append(sc.caption())
    else:
        for i in range(args.n):
            sc, im = sample(args.seed, i)
            Image.fromarray(im).save(args.out / f"{i:05d}.png")
            lines.append(f"{i:05d}.png\t{sc.caption()}\t{json.dumps(sc.to_json())}")
    (args.out / "captions.txt").write_text("\n".join(lines) + "\n")
    print(f"wrote {len(lines)} entries to {args.out}")


if __name__ == "__main__":
    main()
