#!/usr/bin/env python3
"""Prompt-adherence evaluator for the tiny shapes world (world.py).

Deterministic, numpy + pillow only, no downloads. For an image and its prompt:
  1. background = the background palette colour nearest to the median border pixel;
  2. every pixel is assigned to the nearest of {that background, the 5 shape colours};
     each shape colour's mask is split into 4-connected components, and components
     smaller than MIN_AREA pixels are dropped;
  3. each component gets
       shape    from its fill ratio (area / bounding-box area): square ~1.0,
                circle ~pi/4, triangle ~0.5;
       size     from its bounding-box side (small 24-32 px, large 44-54 px);
       position from its bounding-box centre (center, or the dominant direction);
  4. the prompt (parsed back with world.parse_caption) is checked attribute by
     attribute: background; per object colour present, shape, size, position;
     count (each mentioned colour has exactly the expected number of components and
     no other colour has any).
A prompt "passes" when every check passes; adherence = % of prompts that pass.

Usage:
  python evaluate.py --ground-truth 2000 [--seed 1]       # accuracy on the generator's own images
  python evaluate.py --dir DIR                             # DIR/prompts.tsv: file<TAB>prompt
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import world  # noqa: E402

MIN_AREA = 60
FILL_SQUARE = 0.89  # fill >= this: square
FILL_CIRCLE = 0.64  # fill >= this (and < FILL_SQUARE): circle; below: triangle
SIZE_SPLIT = 38  # bbox side >= this: large
CENTER_TOL = 16  # |offset| < this on both axes: center
SIDE = world.SIZE

_COLOUR_NAMES = list(world.COLOURS)
_COLOUR_RGB = np.array([world.COLOURS[c] for c in _COLOUR_NAMES], np.float32)
_BG_NAMES = list(world.BACKGROUNDS)
_BG_RGB = np.array([world.BACKGROUNDS[c] for c in _BG_NAMES], np.float32)


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected component labels (1..n, 0 = off) by iterated min-propagation."""
    h, w = mask.shape
    big = np.int64(h * w + 1)
    lab = np.where(mask, np.arange(1, h * w + 1, dtype=np.int64).reshape(h, w), big)
    while True:
        m = lab.copy()
        m[1:, :] = np.minimum(m[1:, :], lab[:-1, :])
        m[:-1, :] = np.minimum(m[:-1, :], lab[1:, :])
        m[:, 1:] = np.minimum(m[:, 1:], lab[:, :-1])
        m[:, :-1] = np.minimum(m[:, :-1], lab[:, 1:])
        m = np.where(mask, m, big)
        # pointer jumping: a pixel takes the label of the pixel its label names
        flat = m.reshape(-1)
        idx = np.where(flat < big, flat - 1, 0)
        jumped = np.where(flat < big, np.minimum(flat, flat[idx]), big).reshape(h, w)
        if np.array_equal(jumped, lab):
            break
        lab = jumped
    uniq = np.unique(lab[mask])
    out = np.zeros((h, w), np.int32)
    if uniq.size:
        remap = {int(u): i + 1 for i, u in enumerate(uniq)}
        out[mask] = np.vectorize(remap.get)(lab[mask])
    return out, int(uniq.size)


def classify_position(cx: float, cy: float) -> str:
    dx, dy = cx - SIDE / 2, cy - SIDE / 2
    if max(abs(dx), abs(dy)) < CENTER_TOL:
        return "center"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def analyse(img: np.ndarray) -> dict:
    """Detects the background and the objects of an RGB uint8 image [H, W, 3]."""
    if img.shape[:2] != (SIDE, SIDE):
        img = np.asarray(Image.fromarray(img).resize((SIDE, SIDE), Image.Resampling.BILINEAR))
    x = img[..., :3].astype(np.float32)
    border = np.concatenate([x[:2].reshape(-1, 3), x[-2:].reshape(-1, 3),
                             x[:, :2].reshape(-1, 3), x[:, -2:].reshape(-1, 3)])
    med = np.median(border, axis=0)
    bg_i = int(np.argmin(((_BG_RGB - med) ** 2).sum(1)))
    palette = np.concatenate([_BG_RGB[bg_i:bg_i + 1], _COLOUR_RGB])  # 0 = background
    d2 = ((x[:, :, None, :] - palette[None, None]) ** 2).sum(-1)
    nearest = d2.argmin(-1)
    objects = []
    for ci, cname in enumerate(_COLOUR_NAMES):
        mask = nearest == ci + 1
        if mask.sum() < MIN_AREA:
            continue
        lab, n = label_components(mask)
        for k in range(1, n + 1):
            ys, xs = np.nonzero(lab == k)
            area = ys.size
            if area < MIN_AREA:
                continue
            x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
            bw, bh = x1 - x0, y1 - y0
            fill = area / float(bw * bh)
            shape = "square" if fill >= FILL_SQUARE else "circle" if fill >= FILL_CIRCLE else "triangle"
            side = max(bw, bh)
            objects.append(dict(
                colour=cname, shape=shape, size="large" if side >= SIZE_SPLIT else "small",
                position=classify_position((x0 + x1) / 2, (y0 + y1) / 2),
                area=int(area), fill=round(fill, 3), bbox=[int(x0), int(y0), int(bw), int(bh)],
            ))
    return dict(background=_BG_NAMES[bg_i], objects=objects)


CHECKS = ("background", "present", "shape", "size", "position", "count")


def score(img: np.ndarray, prompt: str) -> dict:
    """Checks one image against its prompt; returns {check: [bool, ...]} plus 'pass' and 'found'."""
    spec = world.parse_caption(prompt)
    found = analyse(img)
    res: dict[str, list[bool]] = defaultdict(list)
    res["background"].append(found["background"] == spec["background"])
    by_colour = defaultdict(list)
    for o in found["objects"]:
        by_colour[o["colour"]].append(o)
    want_colours = defaultdict(int)
    for o in spec["objects"]:
        want_colours[o["colour"]] += 1
    if spec["kind"] == "pair":
        o = spec["objects"][0]
        got = sorted(by_colour.get(o["colour"], []), key=lambda d: -d["area"])[:2]
        res["present"].append(len(got) >= 1)
        res["shape"].append(len(got) == 2 and all(g["shape"] == o["shape"] for g in got))
        res["size"].append(len(got) == 2 and all(g["size"] == o["size"] for g in got))
        pos = sorted(g["position"] for g in got)
        res["position"].append(pos in (["left", "right"], ["bottom", "top"]))
    else:
        for o in spec["objects"]:
            got = sorted(by_colour.get(o["colour"], []), key=lambda d: -d["area"])
            res["present"].append(bool(got))
            g = got[0] if got else None
            res["shape"].append(g is not None and g["shape"] == o["shape"])
            res["size"].append(g is not None and g["size"] == o["size"])
            res["position"].append(g is not None and g["position"] == o["position"])
    count_ok = all(len(by_colour.get(c, [])) == n for c, n in want_colours.items()) and all(
        c in want_colours for c in by_colour)
    res["count"].append(count_ok)
    out = {k: v for k, v in res.items()}
    out["pass"] = all(all(v) for v in res.values())
    out["found"] = found
    return out


class Tally:
    """Accumulates per-check accuracies, overall and per scene kind."""

    def __init__(self) -> None:
        self.n = 0
        self.passed = 0
        self.check = defaultdict(lambda: [0, 0])
        self.kind = defaultdict(lambda: [0, 0])

    def add(self, prompt: str, r: dict) -> None:
        kind = world.parse_caption(prompt)["kind"]
        self.n += 1
        self.passed += int(r["pass"])
        self.kind[kind][0] += int(r["pass"])
        self.kind[kind][1] += 1
        for c in CHECKS:
            for v in r.get(c, []):
                self.check[c][0] += int(v)
                self.check[c][1] += 1

    def adherence(self) -> float:
        return 100.0 * self.passed / max(1, self.n)

    def summary(self) -> dict:
        return dict(
            prompts=self.n, adherence_pct=round(self.adherence(), 2),
            per_check_pct={c: round(100.0 * a / b, 2) for c, (a, b) in self.check.items() if b},
            per_kind_pct={k: round(100.0 * a / b, 2) for k, (a, b) in self.kind.items()},
            per_kind_n={k: b for k, (a, b) in self.kind.items()},
        )

    def report(self, label: str = "") -> str:
        s = self.summary()
        lines = [f"{label}adherence (all checks pass): {s['adherence_pct']:.1f}% of {self.n} prompts"]
        for c in CHECKS:
            if c in s["per_check_pct"]:
                a, b = self.check[c]
                lines.append(f"  {c:10s} {s['per_check_pct'][c]:6.1f}%  ({a}/{b})")
        for k in sorted(s["per_kind_pct"]):
            a, b = self.kind[k]
            lines.append(f"  kind {k:6s} {s['per_kind_pct'][k]:6.1f}%  ({a}/{b})")
        return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ground-truth", type=int, default=0, help="score N generator images")
    ap.add_argument("--seed", type=int, default=1, help="generator stream for --ground-truth")
    ap.add_argument("--dir", type=Path, help="directory with prompts.tsv (file<TAB>prompt)")
    ap.add_argument("--json", type=Path, help="write the summary here")
    ap.add_argument("-v", "--verbose", action="store_true", help="print each failure")
    args = ap.parse_args()
    t = Tally()
    if args.ground_truth:
        for i in range(args.ground_truth):
            sc, im = world.sample(args.seed, i)
            r = score(im, sc.caption())
            t.add(sc.caption(), r)
            if args.verbose and not r["pass"]:
                print(f"FAIL {i}: {sc.caption()}  {json.dumps(r['found'])}")
        print(t.report("ground truth: "))
    elif args.dir:
        for line in (args.dir / "prompts.tsv").read_text().splitlines():
            if not line.strip():
                continue
            f, p = line.split("\t")[:2]
            im = np.asarray(Image.open(args.dir / f).convert("RGB"))
            r = score(im, p)
            t.add(p, r)
            if args.verbose and not r["pass"]:
                print(f"FAIL {f}: {p}  {json.dumps(r['found'])}")
        print(t.report(f"{args.dir}: "))
    else:
        ap.error("give --ground-truth N or --dir DIR")
    if args.json:
        args.json.write_text(json.dumps(t.summary(), indent=1) + "\n")


if __name__ == "__main__":
    main()
