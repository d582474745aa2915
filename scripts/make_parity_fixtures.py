#!/usr/bin/env python3
"""Compute diffusers reference tensors for the tiny SD3 / SD3.5 models.

For every model directory models/<name>/ this loads
    StableDiffusion3Pipeline.from_pretrained(dir, torch_dtype=torch.float32)
on the CPU and writes tests/fixtures/parity/<name>.safetensors. The Rust parity
tests read these tensors by name; see tests/fixtures/parity/README.md for the
list. All tensors are float32, except gen.image and gen_nocfg.image, which are
stored as float16 to keep the files small (they are post-processed [0, 1] images;
fp16 rounding there is <= 2.5e-4, far below one 8-bit level). Even so each
file is ~1.86 MB, over the 1.5 MB target: the requested tensors do not fit
(the two 256x256x3 images alone are 1.57 MB in fp32).

The no-T5 model is loaded with text_encoder_3=None, tokenizer_3=None (see
load_pipeline). Re-running the script gives byte-identical files.

Usage:
    /work/refenv/bin/python scripts/make_parity_fixtures.py [--models models] [--out tests/fixtures/parity]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

import diffusers
import transformers
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]

MODEL_NAMES = ["tiny-sd3", "tiny-sd35m", "tiny-sd35l-no-t5"]
PROMPT = "a red circle on the left, a small blue square, green background"
NEGATIVE = ""
MAX_SEQ = 64
GEN_STEPS = 4
GEN_CFG = 5.0
GEN_SIZE = 256

# Seeds of the torch.Generator used for each random input.
SEED_TR = 11
SEED_TR2 = 12
SEED_VAE = 13
SEED_GEN = 14

# Tensors stored as float16 (see module docstring).
FP16_TENSORS = {"gen.image", "gen_nocfg.image"}
SIZE_LIMIT = 1_500_000


def seeded_randn(shape, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float32)


def load_pipeline(path: Path) -> StableDiffusion3Pipeline:
    """StableDiffusion3Pipeline.from_pretrained(path, torch_dtype=float32).

    Components that model_index.json lists as [null, null] (text_encoder_3 /
    tokenizer_3 of the no-T5 model) must be passed as None explicitly: diffusers
    0.42.1 refuses to build the pipeline otherwise ("expected [...] but only
    {...} were passed"), because they are not in _optional_components.
    """
    index = json.loads((Path(path) / "model_index.json").read_text())
    missing = {k: None for k, v in index.items()
               if isinstance(v, list) and v == [None, None]
               and k not in StableDiffusion3Pipeline._optional_components}
    return StableDiffusion3Pipeline.from_pretrained(path, torch_dtype=torch.float32, **missing)


def warn_if_tokenizers_stale(model_dir: Path, tok_root: Path) -> None:
    """The model dirs hold copies of models/tokenizers/*; warn if those changed since."""
    for sub, src in (("tokenizer", "clip"), ("tokenizer_2", "clip_g"), ("tokenizer_3", "t5")):
        if not (model_dir / sub).is_dir() or not (tok_root / src).is_dir():
            continue
        for f in sorted((tok_root / src).iterdir()):
            g = model_dir / sub / f.name
            if not g.is_file() or g.read_bytes() != f.read_bytes():
                print(f"WARNING: {g} differs from {f}; re-run scripts/make_tiny_models.py", file=sys.stderr)


@torch.no_grad()
def fixtures_for(model_dir: Path) -> dict[str, torch.Tensor]:
    warn_if_tokenizers_stale(model_dir, ROOT / "models" / "tokenizers")
    pipe = load_pipeline(model_dir)
    pipe.set_progress_bar_config(disable=True)
    t: dict[str, torch.Tensor] = {}

    # ---- text encoding --------------------------------------------------
    pe, npe, pooled, npooled = pipe.encode_prompt(
        prompt=PROMPT,
        prompt_2=None,
        prompt_3=None,
        do_classifier_free_guidance=True,
        negative_prompt=NEGATIVE,
        max_sequence_length=MAX_SEQ,
    )
    t["text.prompt_embeds"] = pe
    t["text.pooled"] = pooled
    t["text.neg_prompt_embeds"] = npe
    t["text.neg_pooled"] = npooled
    seq = pe.shape[1]

    # ---- scheduler --------------------------------------------------------
    sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    for n in (4, 28):
        sched.set_timesteps(n)
        t[f"sched.sigmas.n{n}"] = sched.sigmas.clone()
        t[f"sched.timesteps.n{n}"] = sched.timesteps.clone()
    # shift overridden to 1.0 through the config (as a model whose scheduler_config
    # says shift=1.0 would load it).
    sched1 = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=1.0)
    sched1.set_timesteps(10)
    t["sched.sigmas.n10.shift1"] = sched1.sigmas.clone()
    t["sched.timesteps.n10.shift1"] = sched1.timesteps.clone()

    # ---- transformer forward ---------------------------------------------
    tr = pipe.transformer
    hs = seeded_randn((2, 16, 32, 32), SEED_TR)
    ehs = torch.cat([npe, pe], dim=0)  # [uncond, cond], as the pipeline batches CFG
    pp = torch.cat([npooled, pooled], dim=0)
    ts = torch.tensor([900.0, 250.0], dtype=torch.float32)
    out = tr(hidden_states=hs, encoder_hidden_states=ehs, pooled_projections=pp, timestep=ts).sample
    t["tr.hidden_states"] = hs
    t["tr.encoder_hidden_states"] = ehs
    t["tr.pooled"] = pp
    t["tr.timestep"] = ts
    t["tr.out"] = out

    # non-square latent: 24x40 -> 12x20 patches, cropped from the centre of the 48x48 pos-embed grid
    hs2 = seeded_randn((1, 16, 24, 40), SEED_TR2)
    ts2 = torch.tensor([500.0], dtype=torch.float32)
    out2 = tr(hidden_states=hs2, encoder_hidden_states=pe, pooled_projections=pooled, timestep=ts2).sample
    t["tr2.hidden_states"] = hs2
    t["tr2.encoder_hidden_states"] = pe.clone()
    t["tr2.pooled"] = pooled.clone()
    t["tr2.timestep"] = ts2
    t["tr2.out"] = out2

    # ---- VAE decode (raw) -------------------------------------------------
    vl = seeded_randn((1, 16, 16, 16), SEED_VAE)
    t["vae.latents"] = vl
    t["vae.image"] = pipe.vae.decode(vl).sample

    # ---- full generation --------------------------------------------------
    gl = seeded_randn((1, 16, GEN_SIZE // 8, GEN_SIZE // 8), SEED_GEN)
    t["gen.latents"] = gl
    for prefix, cfg in (("gen", GEN_CFG), ("gen_nocfg", 1.0)):
        common = dict(
            prompt=PROMPT,
            negative_prompt=NEGATIVE,
            num_inference_steps=GEN_STEPS,
            guidance_scale=cfg,
            height=GEN_SIZE,
            width=GEN_SIZE,
            latents=gl.clone(),
            max_sequence_length=MAX_SEQ,
        )
        t[f"{prefix}.final_latents"] = pipe(**common, output_type="latent").images
        img = pipe(**common, output_type="np").images  # numpy [1, H, W, 3] float32 in [0, 1]
        t[f"{prefix}.image"] = torch.from_numpy(np.ascontiguousarray(img[0]))

    t["meta.max_sequence_length"] = torch.tensor([float(MAX_SEQ)])

    out_t = {}
    for k, v in t.items():
        v = v.detach().to("cpu").contiguous()
        v = v.to(torch.float16 if k in FP16_TENSORS else torch.float32)
        out_t[k] = v.contiguous()
    print(f"  S (prompt_embeds sequence length) = {seq}")
    return out_t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, default=ROOT / "models")
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "parity")
    ap.add_argument("--only", nargs="*", default=None)
    args = ap.parse_args()

    torch.use_deterministic_algorithms(True)
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}")
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.only or MODEL_NAMES:
        print(f"== {name}")
        tensors = fixtures_for(args.models / name)
        path = args.out / f"{name}.safetensors"
        # A single metadata key: safetensors writes the metadata map in hash order, so
        # several keys would make the file bytes differ from run to run.
        info = json.dumps({
            "model": name,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "prompt": PROMPT,
        }, sort_keys=True)
        save_file(tensors, str(path), metadata={"made_with": info})
        path.chmod(0o644)
        for k, v in tensors.items():
            print(f"  {k:28s} {str(v.dtype):14s} {tuple(v.shape)}  std {v.float().std().item() if v.numel() > 1 else float('nan'):.4f}")
        size = path.stat().st_size
        print(f"  wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} ({size / 1e6:.3f} MB)")
        if size > SIZE_LIMIT:
            print(f"  NOTE: {path.name} is over {SIZE_LIMIT / 1e6} MB", file=sys.stderr)


if __name__ == "__main__":
    main()
