#!/usr/bin/env python3
"""Build the tiny Stable Diffusion 3 / 3.5 test models under models/.

The models use the REAL diffusers / transformers classes (SD3Transformer2DModel,
CLIPTextModelWithProjection, T5EncoderModel, AutoencoderKL,
FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline) and are written with
save_pretrained, so the on-disk layout is exactly the diffusers format of the
real checkpoints -- only the sizes are tiny.

    models/tiny-sd3/          SD3-medium style MMDiT (no qk-norm, no dual attention), with T5.
                              transformer saved as fp16.
    models/tiny-sd35m/        SD3.5-medium style MMDiT-X: dual_attention_layers=(0, 1),
                              qk_norm="rms_norm", 4 layers, with T5. transformer saved as bf16
                              and sharded (diffusion_pytorch_model.safetensors.index.json).
    models/tiny-sd35l-no-t5/  SD3.5-large style MMDiT with qk_norm="rms_norm", WITHOUT
                              text_encoder_3 / tokenizer_3 (model_index.json: [null, null]).
                              transformer saved as fp32.

Text encoders and VAE: fp16 in tiny-sd3 / tiny-sd35m (as in the real
checkpoints); in tiny-sd35l-no-t5 the CLIPs are fp32 and the VAE fp16 (all-fp32
would exceed the 3 MB size budget).

Loading: pass torch_dtype (the fixtures use torch.float32). With transformers 5
a plain from_pretrained(dir) keeps fp16 text encoders in fp16 while diffusers
loads the transformer in fp32, and the pipeline then fails with a dtype
mismatch -- exactly as it does for the real fp16 SD3 checkpoints. The no-T5
model additionally needs text_encoder_3=None, tokenizer_3=None (see
load_pipeline).

Every parameter is re-initialised from a seeded torch.Generator after
construction (weights ~ N(0, 1/fan_in), norm weights ~ 1 + 0.1 N(0,1),
biases ~ 0.1 N(0,1), embeddings ~ 0.5 N(0,1)), so that a reimplementation that
forgets a bias or a norm weight produces visibly different numbers. Re-running
the script produces byte-identical safetensors files.

The tokenizers are copied verbatim from models/tokenizers/{clip,clip_g,t5}
(written by scripts/make_tiny_tokenizers.py).

Usage:
    /work/refenv/bin/python scripts/make_tiny_models.py [--out models] [--tokenizers models/tokenizers]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
from pathlib import Path

import torch
import torch.nn as nn

import diffusers
import transformers
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

ROOT = Path(__file__).resolve().parents[1]

PROMPT = "a red circle on the left, a small blue square, green background"

# ----------------------------------------------------------------------------
# Sizes shared by all three models
# ----------------------------------------------------------------------------
TRANSFORMER_COMMON = dict(
    sample_size=32,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_attention_heads=2,
    attention_head_dim=16,  # inner dim 32
    caption_projection_dim=32,
    joint_attention_dim=96,
    pooled_projection_dim=80,  # 32 (CLIP-L proj) + 48 (CLIP-G proj)
    pos_embed_max_size=48,
)

MODELS = {
    # Mirrors stabilityai/stable-diffusion-3-medium-diffusers, which stores every
    # component as fp16.
    "tiny-sd3": dict(
        seed=1000,
        transformer=dict(num_layers=3, dual_attention_layers=(), qk_norm=None),
        transformer_dtype=torch.float16,
        text_encoder_dtype=torch.float16,
        vae_dtype=torch.float16,
        max_shard_size=None,
        with_t5=True,
    ),
    "tiny-sd35m": dict(
        seed=2000,
        transformer=dict(num_layers=4, dual_attention_layers=(0, 1), qk_norm="rms_norm"),
        transformer_dtype=torch.bfloat16,
        text_encoder_dtype=torch.float16,
        vae_dtype=torch.float16,
        # The bf16 transformer is ~500 KB (the pos_embed buffer, 147 KB, is the largest
        # tensor); 200 KB shards give 3 files.
        max_shard_size="200KB",
        with_t5=True,
    ),
    # fp32 transformer and text encoders, so this model also loads with a plain
    # from_pretrained() (transformers 5 loads text encoders in their stored dtype by
    # default, diffusers loads its models in fp32; fp16 text encoders + fp32
    # transformer then fail in the pipeline). The VAE is fp16: with it in fp32 too
    # the directory would be ~3.25 MB, over the 3 MB budget.
    "tiny-sd35l-no-t5": dict(
        seed=3000,
        transformer=dict(num_layers=3, dual_attention_layers=(), qk_norm="rms_norm"),
        transformer_dtype=torch.float32,
        text_encoder_dtype=torch.float32,
        vae_dtype=torch.float16,
        max_shard_size=None,
        with_t5=False,
    ),
}

NORM_TYPES = (nn.LayerNorm, nn.GroupNorm)
NORM_CLASS_NAMES = {"RMSNorm", "T5LayerNorm", "LayerNorm", "GroupNorm", "FP32LayerNorm"}


# ----------------------------------------------------------------------------
# Deterministic re-initialisation of every parameter
# ----------------------------------------------------------------------------
def _weight_gain(full_name: str, extra_gain: dict[str, float]) -> float:
    for pattern, gain in extra_gain.items():
        if pattern in full_name:
            return gain
    return 1.0


@torch.no_grad()
def reinit_parameters(model: nn.Module, seed: int, extra_gain: dict[str, float] | None = None) -> int:
    """Re-initialise every parameter of `model` from a generator seeded with `seed`.

    Linear / Conv weights ~ N(0, 1) * gain / sqrt(fan_in); their biases ~ 0.1 N(0, 1).
    Norm weights ~ 1 + 0.1 N(0, 1); norm biases ~ 0.1 N(0, 1).
    Embeddings ~ 0.5 N(0, 1).
    Raises if a parameter belongs to a module type not covered above.
    Returns the number of parameters initialised.
    """
    extra_gain = extra_gain or {}
    g = torch.Generator().manual_seed(seed)
    done: set[int] = set()
    count = 0

    def randn(shape):
        return torch.randn(shape, generator=g, dtype=torch.float32)

    for mname, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            if id(p) in done:
                continue
            full = f"{mname}.{pname}" if mname else pname
            shape = tuple(p.shape)
            if isinstance(mod, nn.Embedding):
                val = 0.5 * randn(shape)
            elif isinstance(mod, (nn.Linear, nn.Conv2d, nn.Conv1d)):
                if pname == "weight":
                    fan_in = math.prod(shape[1:])
                    val = randn(shape) * (_weight_gain(full, extra_gain) / math.sqrt(fan_in))
                elif pname == "bias":
                    val = 0.1 * randn(shape)
                else:
                    raise RuntimeError(f"unexpected parameter {full}")
            elif isinstance(mod, NORM_TYPES) or type(mod).__name__ in NORM_CLASS_NAMES:
                if pname == "weight":
                    val = 1.0 + 0.1 * randn(shape)
                elif pname == "bias":
                    val = 0.1 * randn(shape)
                else:
                    raise RuntimeError(f"unexpected parameter {full}")
            else:
                raise RuntimeError(f"no init rule for {full} in {type(mod).__name__}")
            p.copy_(val.to(p.dtype))
            done.add(id(p))
            count += 1

    n_params = len({id(p) for p in model.parameters()})
    if count != n_params:
        raise RuntimeError(f"initialised {count} of {n_params} parameters")
    return count


# ----------------------------------------------------------------------------
# Tokenizer helpers
# ----------------------------------------------------------------------------
def tok_len(tok) -> int:
    """Number of ids the tokenizer can emit (base vocab + added tokens)."""
    return len(tok)


def clip_special_ids(tok) -> dict:
    return dict(bos=tok.bos_token_id, eos=tok.eos_token_id, pad=tok.pad_token_id)


def load_tokenizers(tok_root: Path):
    clip = CLIPTokenizer.from_pretrained(tok_root / "clip")
    clip_g = CLIPTokenizer.from_pretrained(tok_root / "clip_g")
    t5 = T5TokenizerFast.from_pretrained(tok_root / "t5")
    for name, tok in (("clip", clip), ("clip_g", clip_g)):
        if tok.model_max_length != 77:
            raise RuntimeError(f"{name} tokenizer model_max_length is {tok.model_max_length}, expected 77")
    # The legacy eos_token_id=2 of CLIP-L selects the pooled token with argmax(input_ids),
    # which is only right when the real eos id is the largest id the tokenizer emits.
    if clip.eos_token_id != tok_len(clip) - 1:
        print(
            f"WARNING: CLIP-L eos id {clip.eos_token_id} is not the largest id ({tok_len(clip) - 1}); "
            "argmax pooling (eos_token_id=2 legacy path) will not pick the eos token",
            file=sys.stderr,
        )
    return clip, clip_g, t5


# ----------------------------------------------------------------------------
# Component builders
# ----------------------------------------------------------------------------
def build_clip_l(tok, seed: int) -> CLIPTextModelWithProjection:
    ids = clip_special_ids(tok)
    cfg = CLIPTextConfig(
        vocab_size=tok_len(tok),
        hidden_size=32,
        intermediate_size=64,
        projection_dim=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        attention_dropout=0.0,
        dropout=0.0,
        bos_token_id=ids["bos"],
        eos_token_id=2,  # legacy value, as in the real SD3 text_encoder/config.json
        pad_token_id=ids["pad"],
    )
    torch.manual_seed(seed)
    m = CLIPTextModelWithProjection(cfg)
    reinit_parameters(m, seed)
    return m.eval()


def build_clip_g(tok, seed: int) -> CLIPTextModelWithProjection:
    ids = clip_special_ids(tok)
    cfg = CLIPTextConfig(
        vocab_size=tok_len(tok),
        hidden_size=48,
        intermediate_size=96,
        projection_dim=48,
        num_hidden_layers=3,
        num_attention_heads=2,
        max_position_embeddings=77,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        attention_dropout=0.0,
        dropout=0.0,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],  # real eos id -> "first eos position" pooling
        pad_token_id=ids["pad"],
    )
    torch.manual_seed(seed)
    m = CLIPTextModelWithProjection(cfg)
    reinit_parameters(m, seed)
    return m.eval()


def build_t5(tok, seed: int) -> T5EncoderModel:
    n = tok_len(tok)
    # The real t5-v1_1-xxl embedding (32128 rows) is larger than the tokenizer (32100 ids);
    # mimic that by padding the vocab to a multiple of 64.
    vocab = ((n + 63) // 64) * 64
    cfg = T5Config(
        vocab_size=vocab,
        d_model=96,
        d_kv=16,
        num_heads=4,
        d_ff=128,
        num_layers=2,
        num_decoder_layers=2,
        feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
        is_encoder_decoder=True,
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id,
    )
    assert cfg.dense_act_fn == "gelu_new" and cfg.is_gated_act
    torch.manual_seed(seed)
    m = T5EncoderModel(cfg)
    # T5 attention has no 1/sqrt(d_kv) scaling: scale q so the logits stay O(1)
    # (this is also what the original T5 initialiser does).
    reinit_parameters(m, seed, extra_gain={"SelfAttention.q.": 1.0 / math.sqrt(16)})
    return m.eval()


def build_vae(seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    m = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=1,
        act_fn="silu",
        latent_channels=16,
        norm_num_groups=8,
        sample_size=128,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
        force_upcast=True,
        mid_block_add_attention=True,
    )
    reinit_parameters(m, seed)
    return m.eval()


def build_transformer(spec: dict, seed: int) -> SD3Transformer2DModel:
    torch.manual_seed(seed)
    m = SD3Transformer2DModel(**TRANSFORMER_COMMON, **spec)
    # pos_embed.pos_embed is a persistent buffer (fixed 2-D sin-cos table, stored in the
    # checkpoint); it is not a parameter and is left as diffusers computes it.
    reinit_parameters(m, seed)
    return m.eval()


def build_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


# ----------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------
def _std(x: torch.Tensor) -> float:
    return x.float().std().item()


@torch.no_grad()
def check_activations(pipe: StableDiffusion3Pipeline, name: str) -> None:
    """Print std of the text embeddings, transformer output and VAE image; fail if outside 0.1..10."""
    stats = {}
    pe, npe, pooled, npooled = pipe.encode_prompt(
        prompt=PROMPT, prompt_2=None, prompt_3=None, do_classifier_free_guidance=True,
        negative_prompt="", max_sequence_length=64,
    )
    stats["prompt_embeds[:, :77] (CLIP)"] = _std(pe[:, :77, :80])
    if pipe.text_encoder_3 is not None:
        stats["prompt_embeds[:, 77:] (T5)"] = _std(pe[:, 77:])
    stats["pooled"] = _std(pooled)
    stats["neg pooled"] = _std(npooled)

    g = torch.Generator().manual_seed(0)
    hs = torch.randn(2, 16, 32, 32, generator=g)
    ehs = torch.cat([npe, pe]).to(pipe.transformer.dtype)
    pp = torch.cat([npooled, pooled]).to(pipe.transformer.dtype)
    out = pipe.transformer(
        hidden_states=hs.to(pipe.transformer.dtype), encoder_hidden_states=ehs, pooled_projections=pp,
        timestep=torch.tensor([900.0, 250.0]),
    ).sample
    stats["transformer out"] = _std(out)
    stats["transformer out (cond - uncond)"] = _std(out[1] - out[0])

    lat = torch.randn(1, 16, 16, 16, generator=g)
    img = pipe.vae.decode(lat).sample
    stats["vae decode (raw)"] = _std(img)
    stats["vae decode mean"] = img.mean().item()

    for k, v in stats.items():
        print(f"  [{name}] std {k:34s} {v:.4f}")
    for k, v in stats.items():
        if "mean" in k:
            continue
        if not (0.1 <= v <= 10.0):
            raise RuntimeError(f"{name}: std of {k} = {v} outside 0.1..10")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    h.update(path.read_bytes())
    return h.hexdigest()


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ----------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------
def build_model(name: str, spec: dict, out_root: Path, tok_root: Path) -> Path:
    seed = spec["seed"]
    clip_tok, clip_g_tok, t5_tok = load_tokenizers(tok_root)

    text_encoder = build_clip_l(clip_tok, seed + 1)
    text_encoder_2 = build_clip_g(clip_g_tok, seed + 2)
    text_encoder_3 = build_t5(t5_tok, seed + 3) if spec["with_t5"] else None
    vae = build_vae(seed + 4)
    transformer = build_transformer(spec["transformer"], seed + 5)
    scheduler = build_scheduler()

    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=clip_g_tok,
        text_encoder_3=text_encoder_3,
        tokenizer_3=t5_tok if spec["with_t5"] else None,
    )

    out = out_root / name
    if out.exists():
        shutil.rmtree(out)
    transformer.to(spec["transformer_dtype"])
    vae.to(spec["vae_dtype"])
    for te in (text_encoder, text_encoder_2, text_encoder_3):
        if te is not None:
            te.to(spec["text_encoder_dtype"])
    pipe.save_pretrained(out, safe_serialization=True)

    if spec["max_shard_size"]:
        shutil.rmtree(out / "transformer")
        transformer.save_pretrained(out / "transformer", safe_serialization=True,
                                    max_shard_size=spec["max_shard_size"])
        shards = sorted((out / "transformer").glob("diffusion_pytorch_model-*.safetensors"))
        if len(shards) < 2 or not (out / "transformer/diffusion_pytorch_model.safetensors.index.json").exists():
            raise RuntimeError(f"{name}: transformer not sharded: {shards}")

    # Tokenizers: verbatim copies of models/tokenizers/*, not re-serialised ones.
    for sub, src in (("tokenizer", "clip"), ("tokenizer_2", "clip_g"), ("tokenizer_3", "t5")):
        dst = out / sub
        if dst.exists():
            shutil.rmtree(dst)
        if sub == "tokenizer_3" and not spec["with_t5"]:
            continue
        shutil.copytree(tok_root / src, dst)

    # save_pretrained writes some files 0600 (via tempfiles); normalise.
    for f in out.rglob("*"):
        f.chmod(0o755 if f.is_dir() else 0o644)

    # model_index.json sanity: null entries for the missing T5.
    index = json.loads((out / "model_index.json").read_text())
    if not spec["with_t5"]:
        assert index["text_encoder_3"] == [None, None] and index["tokenizer_3"] == [None, None], index
    return out


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


@torch.no_grad()
def check_load_and_generate(path: Path) -> None:
    """Reload with from_pretrained (fp32, as the fixtures do), check activation scales, generate."""
    pipe = load_pipeline(path)
    pipe.set_progress_bar_config(disable=True)
    check_activations(pipe, path.name)
    img = pipe(
        prompt=PROMPT, negative_prompt="", num_inference_steps=2, guidance_scale=5.0,
        height=128, width=128, max_sequence_length=64, output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    print(f"  [{path.name}] reload + generate OK: image {tuple(img.shape)} mean {img.mean():.4f} std {img.std():.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "models")
    ap.add_argument("--tokenizers", type=Path, default=ROOT / "models" / "tokenizers")
    ap.add_argument("--only", nargs="*", default=None, help="subset of model names")
    ap.add_argument("--no-check", action="store_true", help="skip reload + generate check")
    args = ap.parse_args()

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}")

    names = args.only or list(MODELS)
    for name in names:
        print(f"== {name}")
        out = build_model(name, MODELS[name], args.out, args.tokenizers)
        if not args.no_check:
            check_load_and_generate(out)
        size = dir_size(out)
        print(f"  [{name}] size on disk {size / 1e6:.3f} MB")
        if size >= 3_000_000:
            raise RuntimeError(f"{name} is {size} bytes (limit 3 MB)")
        for f in sorted(out.rglob("*.safetensors")):
            print(f"  sha256 {sha256(f)}  {f.relative_to(args.out)}")


if __name__ == "__main__":
    main()
