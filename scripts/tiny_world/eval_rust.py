#!/usr/bin/env python3
"""Prompt adherence of the Rust pipeline (`sd-build generate`) on the held-out prompts.

For each of the first --n held-out prompts (world.heldout_scenes: a seeded stream that
train.py excludes from training) it runs

    sd-build generate --model MODEL --prompt P --steps S --guidance G --seed i
                      --width 128 --height 128 --precision fp32 [EXTRA...] --out DIR/i.png

scores every PNG with evaluate.py and prints the adherence %, per check and per scene
kind. It also writes a picture grid (prompt | image per run) and a JSON summary.

The same script gives the FP8 figures: pass the extra sd-build flags and a label, e.g.
    eval_rust.py --label fp8-calibrated --extra "--precision fp8 --calibration X"
and put several runs side by side in one grid with --grid-with LABEL=DIR (DIR = the
--out-dir of an earlier run).

--backend diffusers generates with diffusers on the CPU instead (a reference check;
needs torch + diffusers).

Usage:
  python scripts/tiny_world/eval_rust.py                      # fp32, 100 prompts, grid to docs/images/
  python scripts/tiny_world/eval_rust.py --label fp8 --extra "--precision fp8 ..." \
      --grid-with fp32=/tmp/tiny_eval/fp32 --grid docs/images/tiny-shapes-grid-fp8.png
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
import evaluate  # noqa: E402
import world  # noqa: E402


def run_rust(args, prompts, out_dir: Path) -> list[float]:
    extra = shlex.split(args.extra)
    times = [0.0] * len(prompts)

    def one(i):
        png = out_dir / f"{i:03d}.png"
        if args.resume and png.exists():
            return
        cmd = [str(args.bin), "generate", "--model", str(args.model), "--prompt", prompts[i],
               "--negative-prompt", "", "--steps", str(args.steps), "--guidance", str(args.guidance),
               "--width", "128", "--height", "128", "--seed", str(i)]
        if "--precision" not in extra:
            cmd += ["--precision", "fp32"]
        cmd += extra + ["--out", str(png)]
        t0 = time.time()
        r = subprocess.run(cmd, capture_output=True, text=True)
        times[i] = time.time() - t0
        if r.returncode != 0:
            raise RuntimeError(f"sd-build failed on prompt {i} ({prompts[i]!r}):\n{' '.join(map(shlex.quote, cmd))}\n"
                               f"{r.stderr[-3000:]}")

    with ThreadPoolExecutor(args.jobs) as ex:
        list(ex.map(one, range(len(prompts))))
    return times


def run_diffusers(args, prompts, out_dir: Path) -> list[float]:
    import torch
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(args.model, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    times = []
    for i, p in enumerate(prompts):
        t0 = time.time()
        im = pipe(prompt=p, negative_prompt="", num_inference_steps=args.steps, guidance_scale=args.guidance,
                  height=128, width=128, max_sequence_length=256,
                  generator=torch.Generator().manual_seed(i)).images[0]
        im.save(out_dir / f"{i:03d}.png")
        times.append(time.time() - t0)
    return times


def make_grid(prompts, columns: list[tuple[str, Path]], n: int, path: Path, cell: int = 160,
              per_row: int = 4) -> None:
    """Tiles of (one image per column, side by side; the prompt below), per_row tiles a row."""
    font = ImageFont.load_default()
    n = min(n, len(prompts))
    head, text_h, pad = 20, 58, 6
    tile_w = cell * len(columns) + pad
    tile_h = head + cell + text_h
    rows = (n + per_row - 1) // per_row
    g = Image.new("RGB", (tile_w * per_row + pad, tile_h * rows + pad), (255, 255, 255))
    d = ImageDraw.Draw(g)
    for k in range(n):
        x0 = pad + (k % per_row) * tile_w
        y0 = pad + (k // per_row) * tile_h
        for c, (label, folder) in enumerate(columns):
            d.text((x0 + c * cell + 2, y0 + 4), label, fill=(90, 90, 90), font=font)
            f = folder / f"{k:03d}.png"
            if f.exists():
                im = Image.open(f).convert("RGB").resize((cell - 4, cell - 4), Image.Resampling.NEAREST)
                g.paste(im, (x0 + c * cell, y0 + head))
        for j, line in enumerate(textwrap.wrap(prompts[k], (cell * len(columns)) // 6)[:4]):
            d.text((x0 + 2, y0 + head + cell + 13 * j), line, fill=(0, 0, 0), font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    g.save(path, optimize=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "tiny-sd35m-shapes")
    ap.add_argument("--bin", type=Path, default=ROOT / "target" / "release" / "sd-build")
    ap.add_argument("--backend", choices=("rust", "diffusers"), default="rust")
    ap.add_argument("--label", default="fp32")
    ap.add_argument("--extra", default="", help="extra sd-build generate flags, e.g. \"--precision fp8 ...\"")
    ap.add_argument("--n", type=int, default=100, help="held-out prompts (at most 100 are excluded from training)")
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--jobs", type=int, default=2, help="sd-build processes at a time")
    ap.add_argument("--out-dir", type=Path, help="images go here (default /tmp/tiny_eval/LABEL)")
    ap.add_argument("--resume", action="store_true", help="keep PNGs already in --out-dir")
    ap.add_argument("--grid", type=Path, default=ROOT / "docs" / "images" / "tiny-shapes-grid.png")
    ap.add_argument("--grid-n", type=int, default=16, help="prompts (rows) in the grid")
    ap.add_argument("--grid-with", action="append", default=[], metavar="LABEL=DIR",
                    help="add an earlier run's images as a grid column (repeatable)")
    ap.add_argument("--no-grid", action="store_true")
    ap.add_argument("--json", type=Path, help="summary JSON (default OUT_DIR/summary.json)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()

    if args.n > 100:
        print("warning: prompts past the first 100 may have been seen in training", file=sys.stderr)
    out_dir = args.out_dir or Path("/tmp/tiny_eval") / args.label
    out_dir.mkdir(parents=True, exist_ok=True)
    prompts = [s.caption() for s in world.heldout_scenes(args.n)]
    (out_dir / "prompts.tsv").write_text("".join(f"{i:03d}.png\t{p}\n" for i, p in enumerate(prompts)))
    if args.backend == "rust" and not args.bin.exists():
        sys.exit(f"{args.bin} not found: cargo build --release -p sd-build (or --backend diffusers)")

    t0 = time.time()
    times = (run_rust if args.backend == "rust" else run_diffusers)(args, prompts, out_dir)
    wall = time.time() - t0

    t = evaluate.Tally()
    for i, p in enumerate(prompts):
        im = np.asarray(Image.open(out_dir / f"{i:03d}.png").convert("RGB"))
        r = evaluate.score(im, p)
        t.add(p, r)
        if args.verbose and not r["pass"]:
            print(f"FAIL {i:03d}: {p}\n      found {json.dumps(r['found']['objects'])}")
    desc = (f"[{args.label}] backend {args.backend} {args.extra or ''} steps {args.steps} guidance {args.guidance} "
            f"128x128: ")
    print(t.report(desc))
    timed = [x for x in times if x > 0]
    print(f"[{args.label}] {len(prompts)} images in {wall:.1f}s wall ({args.jobs} jobs), "
          f"{np.mean(timed) if timed else 0:.2f}s per image")
    summary = dict(label=args.label, backend=args.backend, extra=args.extra, steps=args.steps,
                   guidance=args.guidance, model=str(args.model), **t.summary(),
                   seconds_per_image=round(float(np.mean(timed)), 3) if timed else None)
    (args.json or out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    if not args.no_grid:
        cols = [(f"{args.label} ({args.backend})", out_dir)]
        for spec in args.grid_with:
            label, d = spec.split("=", 1)
            cols.append((label, Path(d)))
        make_grid(prompts, cols, args.grid_n, args.grid)
        print(f"grid: {args.grid}")


if __name__ == "__main__":
    main()
