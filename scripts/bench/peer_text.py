#!/usr/bin/env python3
"""Peer figures for the per-stage table: the SD3.5 text encoders as diffusers' pipeline
runs them (transformers' CLIPTextModelWithProjection x2 with hidden states, T5EncoderModel),
BF16 on the GPU, real sizes, random weights, one prompt (batch 1: 77 CLIP tokens, 256 T5
tokens) per call. Prints one JSON line. CUDA events, median of 10 after 3 warm-ups.

    python3 scripts/bench/peer_text.py
"""
import json

import torch
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel


def timed(fn, iters=10, warm=3):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e))
    return sorted(ts)[len(ts) // 2]


def clip(hidden, inter, layers, heads, act):
    # The SD3.5 CLIP-L / CLIP-G sizes; eos id 2 = pooled token by argmax (legacy configs).
    return CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=inter,
                          num_hidden_layers=layers, num_attention_heads=heads,
                          projection_dim=hidden, hidden_act=act, eos_token_id=2)


def main():
    torch.manual_seed(0)
    dev = "cuda"
    with torch.device(dev):
        torch.set_default_dtype(torch.bfloat16)
        l = CLIPTextModelWithProjection(clip(768, 3072, 12, 12, "quick_gelu")).eval()
        g = CLIPTextModelWithProjection(clip(1280, 5120, 32, 20, "gelu")).eval()
        t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                     num_heads=64, feed_forward_proj="gated-gelu")).eval()
        torch.set_default_dtype(torch.float32)
    ids77 = torch.randint(3, 49000, (1, 77), device=dev)
    ids256 = torch.randint(3, 32000, (1, 256), device=dev)
    with torch.inference_mode():
        res = {
            "peer": "diffusers-text-encoders-bf16",
            "clip_l_ms": timed(lambda: l(ids77, output_hidden_states=True)),
            "clip_g_ms": timed(lambda: g(ids77, output_hidden_states=True)),
            "t5_ms": timed(lambda: t5(ids256)),
        }
    res = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in res.items()}
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
