#!/usr/bin/env python3
"""Train a tiny SD3.5-medium-architecture model on the tiny shapes world (world.py).

Real diffusers / transformers classes, small configurations:
  transformer    SD3Transformer2DModel (MMDiT-X: dual_attention_layers, qk_norm rms_norm)
  text_encoder   CLIPTextModelWithProjection (CLIP-L style, legacy eos_token_id=2)
  text_encoder_2 CLIPTextModelWithProjection (CLIP-G style)
  text_encoder_3 T5EncoderModel
  vae            AutoencoderKL, 16 latent channels, 8x downsampling
  scheduler      FlowMatchEulerDiscreteScheduler(shift=3.0)
tokenizers: models/tokenizers/{clip,clip_g,t5}, copied verbatim.

Stages (each limited by wall-clock seconds, so the whole run fits a 10-minute slot):
  1. draw N captioned 128x128 images (multiprocessing), dropping held-out captions;
  2. VAE: reconstruction (MSE + L1) + small KL;
  3. freeze the VAE; latents of all images; scaling/shift factors from their statistics;
  4. text embeddings through pipe.encode_prompt (max_sequence_length 256, the CLI default);
     the text encoders stay at their random initialisation and frozen (default), or
     train jointly with the transformer (--train-text-encoders);
  5. transformer: rectified-flow matching (target noise - x0, logit-normal sigmas
     shifted by 3.0), 10% caption dropout to "" for classifier-free guidance,
     EMA of the weights (saved);
  6. save with StableDiffusion3Pipeline.save_pretrained (transformer bf16, the rest fp16),
     plus train_config.json and training_log.txt;
  7. optionally (--eval N) generate the held-out prompts with diffusers on the device
     and score them with evaluate.py.

Usage (accelerator): python train.py --out models/tiny-sd35m-shapes
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
import world  # noqa: E402

import diffusers  # noqa: E402
import transformers  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import (  # noqa: E402
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

MAX_SEQ = 256  # T5 tokens; sd-build generate's default --max-sequence-length
HELDOUT_N = 100  # held-out prompts (world.heldout_scenes) never trained on; eval uses a prefix of them

TRANSFORMER = dict(
    sample_size=16,  # latent side -> 128x128 default image
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=6,
    attention_head_dim=64,
    num_attention_heads=3,  # inner dim 192
    joint_attention_dim=128,  # = T5 d_model = CLIP-L hidden + CLIP-G hidden
    caption_projection_dim=192,
    pooled_projection_dim=128,  # CLIP-L proj 64 + CLIP-G proj 64
    pos_embed_max_size=16,  # up to 256x256
    dual_attention_layers=(0, 1, 2),  # MMDiT-X: first half of the blocks, as SD3.5-medium
    qk_norm="rms_norm",
)
VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(32, 64, 64, 64),
    layers_per_block=1,
    act_fn="silu",
    latent_channels=16,
    norm_num_groups=16,
    sample_size=128,
    scaling_factor=1.0,  # replaced from latent statistics
    shift_factor=0.0,
    use_quant_conv=False,
    use_post_quant_conv=False,
    force_upcast=True,
    mid_block_add_attention=True,
)


def log(msg: str, fh=None) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    if fh is not None:
        fh.write(line + "\n")
        fh.flush()


# ----------------------------------------------------------------------------
# Components
# ----------------------------------------------------------------------------
def load_tokenizers(tok_root: Path):
    clip = CLIPTokenizer.from_pretrained(tok_root / "clip")
    clip_g = CLIPTokenizer.from_pretrained(tok_root / "clip_g")
    t5 = T5TokenizerFast.from_pretrained(tok_root / "t5")
    return clip, clip_g, t5


def clip_config(tok, hidden, proj, act, legacy_eos):
    return CLIPTextConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden, projection_dim=proj,
        num_hidden_layers=3, num_attention_heads=2, max_position_embeddings=77, hidden_act=act,
        layer_norm_eps=1e-5, attention_dropout=0.0, dropout=0.0,
        bos_token_id=tok.bos_token_id, eos_token_id=2 if legacy_eos else tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def build_components(seed: int, tok_root: Path):
    clip_tok, clip_g_tok, t5_tok = load_tokenizers(tok_root)
    torch.manual_seed(seed + 1)
    te1 = CLIPTextModelWithProjection(clip_config(clip_tok, 64, 64, "quick_gelu", True))
    torch.manual_seed(seed + 2)
    te2 = CLIPTextModelWithProjection(clip_config(clip_g_tok, 64, 64, "gelu", False))
    vocab = ((len(t5_tok) + 63) // 64) * 64
    t5cfg = T5Config(
        vocab_size=vocab, d_model=128, d_kv=32, num_heads=4, d_ff=256, num_layers=2, num_decoder_layers=2,
        feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128,
        dropout_rate=0.0, layer_norm_epsilon=1e-6, is_encoder_decoder=True, tie_word_embeddings=False,
        pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id,
        decoder_start_token_id=t5_tok.pad_token_id,
    )
    torch.manual_seed(seed + 3)
    te3 = T5EncoderModel(t5cfg)
    torch.manual_seed(seed + 4)
    vae = AutoencoderKL(**VAE)
    torch.manual_seed(seed + 5)
    tr = SD3Transformer2DModel(**TRANSFORMER)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipe = StableDiffusion3Pipeline(
        transformer=tr, scheduler=sched, vae=vae,
        text_encoder=te1, tokenizer=clip_tok, text_encoder_2=te2, tokenizer_2=clip_g_tok,
        text_encoder_3=te3, tokenizer_3=t5_tok,
    )
    return pipe


def nparams(m) -> int:
    return sum(p.numel() for p in m.parameters())


# ----------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------
_EXCLUDE: set[str] = set()


def _init_worker(exclude):
    global _EXCLUDE
    _EXCLUDE = exclude


def _gen_chunk(args):
    seed, start, count = args
    return world.sample_batch(seed, start, count, _EXCLUDE)


def make_dataset(seed: int, n: int, exclude: set[str], workers: int):
    chunk = 1000
    jobs = [(seed, s, min(chunk, n - s)) for s in range(0, n, chunk)]
    caps, imgs = [], []
    with mp.get_context("fork").Pool(workers, initializer=_init_worker, initargs=(exclude,)) as pool:
        for c, im in pool.imap(_gen_chunk, jobs):
            caps += c
            imgs.append(im)
    return caps, np.concatenate(imgs)


# ----------------------------------------------------------------------------
# Training stages
# ----------------------------------------------------------------------------
def lr_at(step_frac: float, warm_frac: float, base: float, final_ratio: float = 0.1) -> float:
    if step_frac < warm_frac:
        return base * step_frac / warm_frac
    p = min(1.0, (step_frac - warm_frac) / max(1e-8, 1 - warm_frac))
    return base * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def train_vae(vae, images_u8, seconds, batch, lr, kl_w, dev, fh, max_steps=None):
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    g = torch.Generator(device=dev).manual_seed(123)
    n = images_u8.shape[0]
    t0 = time.time()
    step, hist = 0, []
    while True:
        el = time.time() - t0
        if el > seconds or (max_steps and step >= max_steps):
            break
        for pg in opt.param_groups:
            pg["lr"] = lr_at(el / seconds, 0.05, lr)
        idx = torch.randint(0, n, (batch,), device=dev, generator=g)
        x = images_u8[idx].permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            post = vae.encode(x).latent_dist
            z = post.sample(generator=None)
            rec = vae.decode(z).sample
        rec = rec.float()
        mse = F.mse_loss(rec, x)
        l1 = (rec - x).abs().mean()
        kl = post.kl().mean() / z[0].numel()  # per latent element
        loss = mse + 0.5 * l1 + kl_w * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        hist.append((mse.item(), l1.item(), kl.item()) if step % 25 == 0 else None)
        if step % 250 == 0:
            log(f"vae step {step:5d} t={el:6.1f}s mse {mse.item():.5f} l1 {l1.item():.4f} kl/elem {kl.item():.3f}", fh)
        step += 1
    log(f"vae done: {step} steps in {time.time() - t0:.1f}s, last mse {mse.item():.5f} l1 {l1.item():.4f} "
        f"kl/elem {kl.item():.3f}", fh)
    vae.eval()
    return step


@torch.no_grad()
def encode_latents(vae, images_u8, dev, bs=512):
    out = []
    for s in range(0, images_u8.shape[0], bs):
        x = images_u8[s:s + bs].permute(0, 3, 1, 2).float() / 127.5 - 1
        out.append(vae.encode(x).latent_dist.mode())
    return torch.cat(out)


def encode_text(pipe, prompts, dev, grad=False, bs=512):
    pe, pp = [], []
    ctx = torch.enable_grad() if grad else torch.no_grad()
    with ctx:
        for s in range(0, len(prompts), bs):
            e, _, p, _ = pipe.encode_prompt(
                prompt=prompts[s:s + bs], prompt_2=None, prompt_3=None, device=dev,
                do_classifier_free_guidance=False, max_sequence_length=MAX_SEQ,
            )
            pe.append(e)
            pp.append(p)
    return torch.cat(pe), torch.cat(pp)


def sample_sigmas(b, shift, dev, g):
    u = torch.randn(b, device=dev, generator=g)
    s = torch.sigmoid(u)  # logit-normal(0, 1)
    return shift * s / (1 + (shift - 1) * s)


def train_transformer(pipe, lat, cap_idx, uniq_caps, empty_i, args, dev, fh):
    tr = pipe.transformer
    tr.train()
    ema = [p.detach().clone() for p in tr.parameters()]
    params = list(tr.parameters())
    tes = [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3]
    if args.train_text_encoders:
        for te in tes:
            te.train()
            te.requires_grad_(True)
        params += [p for te in tes for p in te.parameters()]
        cache = None
    else:
        t0 = time.time()
        cache = encode_text(pipe, uniq_caps, dev)
        cache = (cache[0].to(torch.bfloat16), cache[1].float())
        log(f"text embeddings cached: {len(uniq_caps)} captions, {tuple(cache[0].shape)} in {time.time() - t0:.1f}s; "
            f"std prompt_embeds {cache[0].float().std():.3f} pooled {cache[1].std():.3f}", fh)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    g = torch.Generator(device=dev).manual_seed(args.seed + 77)
    n = lat.shape[0]
    t0 = time.time()
    step = 0
    run = []
    while True:
        el = time.time() - t0
        if el > args.dit_seconds or (args.dit_steps and step >= args.dit_steps):
            break
        lr = lr_at(el / args.dit_seconds, 0.03, args.lr)
        for pg in opt.param_groups:
            pg["lr"] = lr
        idx = torch.randint(0, n, (args.batch,), device=dev, generator=g)
        x0 = lat[idx]
        ci = cap_idx[idx]
        drop = torch.rand(args.batch, device=dev, generator=g) < args.cond_drop
        ci = torch.where(drop, torch.full_like(ci, empty_i), ci)
        noise = torch.randn(x0.shape, device=dev, generator=g)
        sig = sample_sigmas(args.batch, 3.0, dev, g)
        xt = (1 - sig[:, None, None, None]) * x0 + sig[:, None, None, None] * noise
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            if cache is not None:
                pe, pp = cache[0][ci].float(), cache[1][ci]
            else:
                caps = [uniq_caps[i] for i in ci.tolist()]
                pe, pp = encode_text(pipe, caps, dev, grad=True)
            pred = tr(hidden_states=xt, encoder_hidden_states=pe, pooled_projections=pp,
                      timestep=sig * 1000, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        d = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in tr.parameters()], 1 - d)
        if step % 50 == 0:
            run.append(loss.item())
        if step % 500 == 0:
            recent = np.mean(run[-10:]) if run else float("nan")
            log(f"dit step {step:6d} t={el:6.1f}s lr {lr:.2e} loss {loss.item():.4f} (avg {recent:.4f}) "
                f"gnorm {gn.item():.3f}", fh)
        step += 1
    log(f"dit done: {step} steps in {time.time() - t0:.1f}s ({(time.time() - t0) / max(1, step) * 1000:.1f} ms/step), "
        f"batch {args.batch}, last-500-step loss {np.mean(run[-10:]):.4f}", fh)
    with torch.no_grad():
        for p, e in zip(tr.parameters(), ema):
            p.copy_(e)
    tr.eval()
    for te in tes:
        te.eval()
        te.requires_grad_(False)
    return step, run


# ----------------------------------------------------------------------------
# Save / evaluate
# ----------------------------------------------------------------------------
def save(pipe, out: Path, tok_root: Path):
    if out.exists():
        shutil.rmtree(out)
    pipe.transformer.to(torch.bfloat16)
    pipe.vae.to(torch.float16)
    for te in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        te.to(torch.float16)
    pipe.save_pretrained(out, safe_serialization=True)
    for sub, src in (("tokenizer", "clip"), ("tokenizer_2", "clip_g"), ("tokenizer_3", "t5")):
        shutil.rmtree(out / sub, ignore_errors=True)
        shutil.copytree(tok_root / src, out / sub)
    for f in out.rglob("*"):
        f.chmod(0o755 if f.is_dir() else 0o644)
    return sum(f.stat().st_size for f in out.rglob("*") if f.is_file())


@torch.no_grad()
def device_eval(model_dir: Path, n: int, dev, fh, settings, grid_path=None):
    """Generates the held-out prompts with diffusers (fp32) and scores them."""
    import evaluate
    pipe = StableDiffusion3Pipeline.from_pretrained(model_dir, torch_dtype=torch.float32).to(dev)
    pipe.set_progress_bar_config(disable=True)
    prompts = [s.caption() for s in world.heldout_scenes(n)]
    results = {}
    for steps, cfg in settings:
        t = evaluate.Tally()
        imgs = []
        for s in range(0, n, 50):
            ps = prompts[s:s + 50]
            gens = [torch.Generator(device="cpu").manual_seed(s + i) for i in range(len(ps))]
            ims = pipe(prompt=ps, negative_prompt=[""] * len(ps), num_inference_steps=steps, guidance_scale=cfg,
                       height=128, width=128, max_sequence_length=MAX_SEQ, generator=gens,
                       output_type="np").images
            imgs.append((ims * 255).round().clip(0, 255).astype(np.uint8))
        imgs = np.concatenate(imgs)
        for p, im in zip(prompts, imgs):
            t.add(p, evaluate.score(im, p))
        log(t.report(f"diffusers fp32 on device, steps {steps} cfg {cfg}: "), fh)
        results[f"steps{steps}_cfg{cfg}"] = t.summary()
        if grid_path is not None and (steps, cfg) == settings[0]:
            from PIL import Image
            k = min(32, n)
            grid = imgs[:k].reshape(k // 8, 8, 128, 128, 3).transpose(0, 2, 1, 3, 4).reshape(k // 8 * 128, 8 * 128, 3)
            Image.fromarray(grid).save(grid_path)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "models" / "tiny-sd35m-shapes")
    ap.add_argument("--tokenizers", type=Path, default=ROOT / "models" / "tokenizers")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--data-seed", type=int, default=1000)
    ap.add_argument("--n-train", type=int, default=60_000)
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--vae-seconds", type=float, default=60)
    ap.add_argument("--vae-steps", type=int, default=0)
    ap.add_argument("--vae-batch", type=int, default=32)
    ap.add_argument("--vae-lr", type=float, default=1e-3)
    ap.add_argument("--kl", type=float, default=1e-4, help="KL weight (per latent element)")
    ap.add_argument("--dit-seconds", type=float, default=380)
    ap.add_argument("--dit-steps", type=int, default=0)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--cond-drop", type=float, default=0.1)
    ap.add_argument("--train-text-encoders", action="store_true")
    ap.add_argument("--eval", type=int, default=0, help="held-out prompts to score on the device after saving")
    ap.add_argument("--eval-settings", default="20:5.0", help="steps:cfg,steps:cfg,...")
    ap.add_argument("--cpu", action="store_true")
    args = ap.parse_args()

    dev = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    args.out.mkdir(parents=True, exist_ok=True)
    logf = args.out.parent / (args.out.name + ".training_log.txt")
    fh = open(logf, "w")
    T0 = time.time()
    log(f"torch {torch.__version__} diffusers {diffusers.__version__} transformers {transformers.__version__} "
        f"device {torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'}", fh)
    log(f"args {vars(args)}", fh)
    torch.manual_seed(args.seed)

    heldout = {s.caption() for s in world.heldout_scenes(HELDOUT_N)}
    t0 = time.time()
    caps, imgs = make_dataset(args.data_seed, args.n_train, heldout, args.workers)
    log(f"data: {len(caps)} images ({args.n_train - len(caps)} held-out captions dropped), "
        f"{len(set(caps))} distinct captions, {time.time() - t0:.1f}s", fh)

    pipe = build_components(args.seed, args.tokenizers)
    pipe.to(dev)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        log(f"params {name:15s} {nparams(getattr(pipe, name)):>10,d}", fh)
    for te in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        te.requires_grad_(False)

    images = torch.from_numpy(imgs).to(dev)
    del imgs
    vae_steps = train_vae(pipe.vae, images, args.vae_seconds, args.vae_batch, args.vae_lr, args.kl, dev, fh,
                          args.vae_steps)
    pipe.vae.requires_grad_(False)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        lat = encode_latents(pipe.vae, images, dev).float()
    with torch.no_grad():
        x = images[:256].permute(0, 3, 1, 2).float() / 127.5 - 1
        rec = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mode()).sample
        vae_mse = F.mse_loss(rec, x).item()
    shift = lat.mean().item()
    scale = 1.0 / lat.std().item()
    pipe.vae.register_to_config(scaling_factor=scale, shift_factor=shift)
    log(f"latents {tuple(lat.shape)} mean {shift:.4f} std {1 / scale:.4f} -> shift_factor {shift:.4f} "
        f"scaling_factor {scale:.4f}; fp32 recon mse (mode) {vae_mse:.5f}", fh)
    lat = (lat - shift) * scale
    del images

    uniq = sorted(set(caps)) + [""]
    index = {c: i for i, c in enumerate(uniq)}
    cap_idx = torch.tensor([index[c] for c in caps], device=dev)
    dit_steps, run = train_transformer(pipe, lat, cap_idx, uniq, index[""], args, dev, fh)

    size = save(pipe, args.out, args.tokenizers)
    log(f"saved {args.out}: {size / 1e6:.2f} MB; total wall {time.time() - T0:.1f}s", fh)
    cfg = dict(
        seed=args.seed, data_seed=args.data_seed, args={k: str(v) for k, v in vars(args).items()},
        transformer=TRANSFORMER, vae={**VAE, "scaling_factor": scale, "shift_factor": shift},
        vae_steps_done=vae_steps, transformer_steps_done=dit_steps, max_sequence_length=MAX_SEQ,
        heldout_seed=world.HELDOUT_SEED, train_images=len(caps), distinct_captions=len(uniq) - 1,
        loss_every_50_steps=[round(v, 5) for v in run],
        versions=dict(torch=torch.__version__, diffusers=diffusers.__version__, transformers=transformers.__version__),
        device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
        size_bytes=size,
    )
    if args.eval:
        settings = [tuple(float(v) if "." in v else int(v) for v in s.split(":")) for s in args.eval_settings.split(",")]
        cfg["device_eval"] = device_eval(args.out, args.eval, dev, fh, settings,
                                         grid_path=args.out.parent / (args.out.name + ".grid.png"))
    (args.out / "train_config.json").write_text(json.dumps(cfg, indent=1) + "\n")
    fh.close()
    shutil.copy(logf, args.out / "training_log.txt")
    log(f"all done in {time.time() - T0:.1f}s")


if __name__ == "__main__":
    main()
