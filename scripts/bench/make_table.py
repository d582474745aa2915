#!/usr/bin/env python3
"""Merges the figures of device calls into results.json, table.md and profile.md.

    make_table.py WORK_DIR [WORK_DIR ...] OUT_DIR

Each WORK_DIR holds what one `scripts/bench/run_bench.sh --device` call wrote:
bench-medium.json, bench-large.json, bench-pipeline.json (sd-cuda),
bench-before-medium.json, bench-before-large.json (the engine before a change, same
call), peer-medium.jsonl, peer-large.jsonl (diffusers, ../shared/peer/sd35_peer.py),
peer-e2e.jsonl (sd35_e2e.py), peer-text.jsonl (peer_text.py), nvidia-smi.csv and
date.txt. A model's figures and their ratios always come from one call (the one whose
directory has its bench and peer files). Standard library only.
"""
import json
import os
import re
import sys

STEPS = 28
FLOP = {"sd3.5-medium": 2.25e13, "sd3.5-large": 6.23e13}


def load_json(p):
    try:
        with open(p) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def load_jsonl(p):
    out = []
    try:
        with open(p) as f:
            for line in f:
                line = line.strip()
                if line.startswith("{"):
                    try:
                        out.append(json.loads(line))
                    except ValueError:
                        pass
                elif line.startswith("torch gemm"):
                    out.append({"gemm": line})
    except OSError:
        pass
    return out


def read(p, default=""):
    try:
        with open(p) as f:
            return f.read().strip()
    except OSError:
        return default


def category(op):
    if op.startswith("linear fp8"):
        return "linear FP8 (quantize + GEMM + epilogue)"
    if op.startswith("linear bf16"):
        return "linear BF16 (GEMM + epilogue)"
    if op.startswith("linear w8a16"):
        return "linear FP8 weight-only (W8A16 GEMV: adaLN)"
    if op.startswith("linear"):
        return "linear other"
    if op.startswith("attention"):
        return "attention"
    if op in ("layer_norm", "layer_norm_modulate", "rms_norm", "group_norm", "modulate",
              "gated_add_layer_norm_modulate", "group_norm_silu", "layer_norm_modulate_for",
              "gated_add_norm"):
        return "norms + modulate"
    if op in ("activation", "add", "mul", "gated_add", "scale_shift"):
        return "elementwise"
    if op in ("concat", "narrow", "chunks", "permute", "reshape", "pad_last", "upload",
              "download"):
        return "layout / copies"
    return "other (" + op + ")"


def ratio(num, den):
    """num / den as "1.23x", or a dash when a figure was not measured in this run."""
    return f"{num / den:.2f}x" if num and den else "—"


def fmt(v, nd=1):
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def main():
    works, out = sys.argv[1:-1], sys.argv[-1]
    gpus = list(dict.fromkeys(read(os.path.join(w, "nvidia-smi.csv"), "unknown GPU") for w in works))
    dates = list(dict.fromkeys(read(os.path.join(w, "date.txt"), "unknown date") for w in works))
    gpu, date = " / ".join(gpus), ", ".join(dates)
    ours, before, pipeline, variants = [], [], [], []
    attention, vae, fp8_vs_bf16, errors = [], [], [], []
    for work in works:
        for m in ("medium", "large", "pipeline"):
            d = load_json(os.path.join(work, f"bench-{m}.json"))
            if not d:
                continue
            ours += d.get("transformer", [])
            attention += d.get("attention", [])
            vae += d.get("vae", [])
            pipeline += d.get("pipeline", [])
            fp8_vs_bf16 += d.get("fp8_vs_bf16", [])
            errors += d.get("errors", [])
        for m in ("medium", "large"):
            d = load_json(os.path.join(work, f"bench-before-{m}.json"))
            if d:
                before += d.get("transformer", [])
            for v in ("variant", "variant2", "variant3"):
                d = load_json(os.path.join(work, f"bench-{v}-{m}.json"))
                if d:
                    variants += d.get("transformer", [])
    peer = []
    for work in works:
        for m in ("medium", "large", "e2e", "text"):
            peer += load_jsonl(os.path.join(work, f"peer-{m}.jsonl"))
    results = {
        "device": gpu, "date": date, "sd_cuda": ours, "sd_cuda_before": before,
        "sd_cuda_variants": variants,
        "pipeline": pipeline, "attention": attention, "vae": vae,
        "fp8_vs_bf16": fp8_vs_bf16, "errors": errors, "peer": peer,
    }
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)

    def peer_step(model, kind):
        for p in peer:
            if p.get("model") == model and p.get("peer", "").startswith(kind):
                return p
        return None

    L = []
    L.append("# SD3.5 on one GPU: sd-cuda vs diffusers\n")
    L.append(f"Device: **{gpu}**; {len(works)} device call(s) started at {date} (a model's "
             "sd-cuda, \"before\" and diffusers step figures always come from one call; the "
             "text-encoder, full-image and test figures from the call of the pipeline stage). "
             "1024x1024, batch 2 (classifier-free guidance), "
             "333 text tokens, random weights (real architectures). sd-cuda: median of CUDA "
             "events around a step after warm-up (crates/sd-cuda/examples/bench.rs); diffusers: "
             "median of CUDA events (../shared/peer/sd35_peer.py) in the same device call. "
             "\"before\" rows: the engine before this change (its own harness: "
             "stream-synchronised wall time), same call. Peak memory: "
             "sd-cuda's pool high-water mark, diffusers' `max_memory_allocated` "
             "(both include the weights).\n")
    for model in ("sd3.5-medium", "sd3.5-large"):
        rows = [r for r in ours if r.get("model") == model]
        eager = peer_step(model, "diffusers-eager")
        comp = peer_step(model, "diffusers-torch.compile")
        if not rows and not eager:
            continue
        L.append(f"\n## {model}\n")
        L.append("| engine | step ms | vs diffusers eager | vs torch.compile | TFLOP/s | peak GiB | weight GiB |")
        L.append("| --- | --- | --- | --- | --- | --- | --- |")
        e_ms = eager["step_ms"] if eager else None
        c_ms = comp["step_ms"] if comp else None
        if eager:
            L.append(f"| diffusers eager BF16 | {e_ms:.1f} | 1.00x | "
                     f"{ratio(c_ms, e_ms)} | {FLOP[model] / e_ms / 1e9:.0f} | "
                     f"{eager.get('peak_gib', '—')} | {eager.get('params_b', 0) * 2 / 1.0737:.2f} |")
        if comp:
            L.append(f"| diffusers torch.compile BF16 ({comp.get('compile_s', '?')} s compile) | "
                     f"{c_ms:.1f} | {ratio(e_ms, c_ms)} | 1.00x | "
                     f"{FLOP[model] / c_ms / 1e9:.0f} | — | — |")
        elif eager:
            L.append("| diffusers torch.compile BF16 | not run in this call | | | | | |")
        for r in sorted(rows, key=lambda r: r["precision"], reverse=True):
            ms = r["step_ms_median"]
            L.append(f"| sd-cuda {r['precision'].upper()} | {ms:.1f} | "
                     f"{ratio(e_ms, ms)} | {ratio(c_ms, ms)} | "
                     f"{FLOP[model] / ms / 1e9:.0f} | {r['peak_gib']:.2f} | {r['param_gib']:.2f} |")
            if r.get("step_wall_ms_median"):
                L[-1] = L[-1].replace(f"| {ms:.1f} |", f"| {ms:.1f} (wall {r['step_wall_ms_median']:.1f}) |", 1)
            g = r.get("cuda_graph")
            if g:
                gms = g["step_ms_median"]
                same = "identical output" if g.get("output_identical_to_eager") else \
                    f"output differs from eager by up to {g.get('output_max_abs_diff_vs_eager')}"
                L.append(f"| sd-cuda {r['precision'].upper()}, step as a CUDA graph ({same}; "
                         f"{g.get('failed_captures', 0)} failed captures) | {gms:.1f} (wall {g['step_wall_ms_median']:.1f}) | "
                         f"{ratio(e_ms, gms)} | {ratio(c_ms, gms)} | "
                         f"{FLOP[model] / gms / 1e9:.0f} | {g['pool_peak_gib'] + g['graph_peak_gib']:.2f} "
                         f"(pool {g['pool_peak_gib']:.2f} + graph {g['graph_peak_gib']:.2f}) | {r['param_gib']:.2f} |")
            if "exact_attention_step_ms" in r:
                ex = r["exact_attention_step_ms"]
                L.append(f"| sd-cuda {r['precision'].upper()}, exact attention kernel (before this issue's work) | "
                         f"{ex:.0f} | {ratio(e_ms, ex)} | {ratio(c_ms, ex)} | "
                         f"{FLOP[model] / ex / 1e9:.0f} | | |")
        for r in sorted((r for r in variants if r.get("model") == model),
                        key=lambda r: r["precision"], reverse=True):
            ms = r["step_ms_median"]
            L.append(f"| sd-cuda {r['precision'].upper()}, {r.get('variant', 'variant')} | {ms:.1f} | "
                     f"{ratio(e_ms, ms)} | {ratio(c_ms, ms)} | "
                     f"{FLOP[model] / ms / 1e9:.0f} | {r['peak_gib']:.2f} | {r['param_gib']:.2f} |")
        for r in sorted((r for r in before if r.get("model") == model),
                        key=lambda r: r["precision"], reverse=True):
            ms = r["step_ms_median"]
            L.append(f"| sd-cuda {r['precision'].upper()} before this change | {ms:.1f} | "
                     f"{ratio(e_ms, ms)} | {ratio(c_ms, ms)} | "
                     f"{FLOP[model] / ms / 1e9:.0f} | {r['peak_gib']:.2f} | {r['param_gib']:.2f} |")
        by = {r["precision"]: r for r in rows}
        if "fp8" in by and "bf16" in by:
            L.append(f"\nTransformer weight bytes FP8 / BF16: {by['fp8']['param_bytes'] / by['bf16']['param_bytes']:.3f} "
                     f"({by['fp8']['param_gib']:.2f} / {by['bf16']['param_gib']:.2f} GiB; "
                     f"{by['fp8']['fp8_layers']} FP8 GEMM layers"
                     + (f", {by['fp8']['fp8_weight_only_layers']} weight-only FP8 (adaLN modulation)"
                        if by['fp8'].get('fp8_weight_only_layers') else
                        "; the adaLN modulation layers stay BF16") + ").")
        # TensorRT-demo-style per-stage table (what this harness measures).
        fp8 = by.get("fp8")
        if fp8:
            vms = vae[0]["ms_median"] if vae else None
            pv = next((p for p in peer if p.get("peer") == "diffusers-vae-decode-bf16"), None)
            pipe = next(iter(pipeline), None)
            ptext = next((p for p in peer if p.get("peer") == "diffusers-text-encoders-bf16"), None)
            pe2e = next((p for p in peer if p.get("peer") == "diffusers-eager-bf16-pipeline"), None)
            L.append(f"\nPer stage, one 1024x1024 image, {STEPS} steps with CFG 5.0 (TensorRT demo style). "
                     "Text encoders: one prompt per call (CUDA events), x2 per image (prompt and "
                     "negative prompt); the same encoders serve both models. Transformer: step "
                     f"median x {STEPS}. Full image: measured wall time of the whole pipeline "
                     "(SD3.5-medium only; diffusers: `sd35_e2e.py`, eager).\n")
            L.append("| stage | sd-cuda FP8 ms | diffusers eager ms | diffusers compile ms |")
            L.append("| --- | --- | --- | --- |")

            def two(v):
                return None if v is None else 2 * v
            cl = two(pipe and pipe["clip_l_ms"] + pipe["clip_g_ms"])
            pcl = two(ptext and ptext["clip_l_ms"] + ptext["clip_g_ms"])
            t5 = two(pipe and pipe["t5_ms"])
            pt5 = two(ptext and ptext["t5_ms"])
            L.append(f"| CLIP-L + CLIP-G (x2) | {fmt(cl, 1)} (BF16) | {fmt(pcl, 1)} | — |")
            L.append(f"| T5-XXL (x2) | {fmt(t5, 1)} (BF16) | {fmt(pt5, 1)} | — |")
            t_ours = fp8["step_ms_median"] * STEPS
            L.append(f"| transformer x {STEPS} | {t_ours:.0f} | {fmt(e_ms and e_ms * STEPS, 0)} | {fmt(c_ms and c_ms * STEPS, 0)} |")
            L.append(f"| VAE decode | {fmt(vms, 1)} (BF16) | {fmt(pv and pv['ms'], 1)} | — |")
            if vms and cl is not None and t5 is not None:
                tot = cl + t5 + t_ours + vms
                ptot = (pcl + pt5 + e_ms * STEPS + pv["ms"]) if (pcl is not None and e_ms and pv) else None
                ctot = (pcl + pt5 + c_ms * STEPS + pv["ms"]) if (pcl is not None and c_ms and pv) else None
                L.append(f"| sum of stages | {tot:.0f} | {fmt(ptot, 0)} | {fmt(ctot, 0)} |")
            if model == "sd3.5-medium" and (pipe or pe2e):
                L.append(f"| full image, measured | {fmt(pipe and pipe['e2e_ms_median'], 0)} "
                         f"(peak {fmt(pipe and pipe['peak_gib'], 2)} GiB) | "
                         f"{fmt(pe2e and pe2e['median_s'] * 1000.0, 0)} (peak {fmt(pe2e and pe2e.get('peak_gib'), 2)} GiB) | — |")
                if pipe and pipe.get("e2e_cuda_graphs_ms_best"):
                    L.append(f"| full image, measured, step as a CUDA graph | "
                             f"{fmt(pipe['e2e_cuda_graphs_ms_best'], 0)} | — | — |")
    if attention:
        a = attention[0]
        L.append("\n## Joint attention kernel (SD3.5-medium shape)\n")
        for vr in a.get("variants", []):
            ve = vr.get("vs_exact", {})
            L.append(f"- `{vr['kernel']}`: {vr['ms']:.3f} ms, {vr['tflops']:.0f} TFLOP/s"
                     + (f", vs exact max rel {ve['max_rel']:.2e}" if ve else "")
                     + ("" if vr.get("ok", True) else " (FAILED the check)"))
        L.append("")
        L.append(f"{a['shape']}: flash (`{a.get('flash_kernel', 'flash_attn_d64')}`, used for the steps above) "
                 f"{a['flash_ms']:.3f} ms ({a['flash_tflops']:.0f} TFLOP/s)"
                 + (f"; exact reference kernel {a['exact_ms']:.1f} ms ({a['exact_tflops']} TFLOP/s); "
                    f"flash vs exact max rel {a['flash_vs_exact']['max_rel']:.2e}, "
                    f"rms rel {a['flash_vs_exact']['rms_rel']:.2e}" if "exact_ms" in a else "") + ".")
    if vae:
        pv = next((p for p in peer if p.get("peer") == "diffusers-vae-decode-bf16"), None)
        v = vae[0]
        L.append("\n## VAE decode 1024x1024, batch 1, BF16\n")
        L.append(f"sd-cuda {v['ms_median']:.1f} ms (peak {v['peak_gib']:.2f} GiB)"
                 + (f"; diffusers eager {pv['ms']:.1f} ms (sd-cuda / diffusers = "
                    f"{v['ms_median'] / pv['ms']:.2f}x the time)" if pv else "") + ".")
        if v.get("conv_path"):
            L.append(f"\nConvolutions: {v['conv_path']}.")
        for o in v.get("other_paths", []):
            if "error" in o:
                L.append(f"\nConvolutions on `{o['path']}`: FAILED ({o['error']}).")
                continue
            d = o.get("vs_default", {})
            vs_peer = f", {o['ms_median'] / pv['ms']:.2f}x diffusers' time" if pv else ""
            L.append(f"\nSame process and weights, convolutions on `{o['path']}`: {o['ms_median']:.1f} ms "
                     f"(peak {o['peak_gib']:.2f} GiB{vs_peer}; {o['conv_path']}); decoded output vs the default "
                     f"path: max rel {d.get('max_rel', float('nan')):.2e}, rms rel "
                     f"{d.get('rms_rel', float('nan')):.2e}.")
        # Older result files: one im2col comparison.
        if v.get("im2col_ms_median") is not None:
            d = v.get("cudnn_vs_im2col", {})
            L.append(f"\nSame process, convolutions on the im2col + GEMM path (before cuDNN): "
                     f"{v['im2col_ms_median']:.1f} ms; decoded output cuDNN vs im2col: max rel "
                     f"{d.get('max_rel', float('nan')):.2e}, rms rel {d.get('rms_rel', float('nan')):.2e}.")
    for pipe in pipeline:
        if "t5_exact_attention_ms" in pipe:
            d = pipe.get("t5_gemm_vs_exact_attention", {})
            L.append("\n## T5-XXL encoder, one prompt (256 tokens), BF16\n")
            L.append(f"Biased attention as batched GEMMs: {pipe['t5_ms']:.1f} ms; on the exact "
                     f"kernel (before, same process): {pipe['t5_exact_attention_ms']:.1f} ms; output "
                     f"max rel {d.get('max_rel', float('nan')):.2e}, rms rel {d.get('rms_rel', float('nan')):.2e}.")
    if fp8_vs_bf16:
        L.append("\n## FP8 vs BF16 output of one step (random weights)\n")
        for x in fp8_vs_bf16:
            L.append(f"- {x['model']} {x.get('precision', 'fp8').upper()}: max rel {x['max_rel']:.3e}, "
                     f"rms rel {x['rms_rel']:.3e}")
    for r in ours:
        if "flash_vs_exact_step_output" in r:
            x = r["flash_vs_exact_step_output"]
            L.append(f"- {r['model']} {r['precision']}: step output with flash vs exact attention: "
                     f"max rel {x['max_rel']:.3e}, rms rel {x['rms_rel']:.3e}")
    gem = [p["gemm"] for p in peer if "gemm" in p]
    if gem:
        L.append("\n## torch._scaled_mm GEMM ceiling (peer script)\n")
        for g in dict.fromkeys(gem):
            L.append(f"- {g}")
    if errors:
        L.append("\n## Errors\n")
        for e in errors:
            L.append(f"- {e}")
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write("\n".join(L) + "\n")

    P = ["# Where an sd-cuda transformer step spends its time\n",
         f"Device: **{gpu}**; date {date}. One profiled step per engine at 1024x1024, batch 2: the "
         "backend records timing events on its stream before and after every operation and "
         "reads them back after the step (nothing is synchronised in between), so each figure "
         "is the operation's GPU time without launch gaps. Rows marked \"inside linear\" are a "
         "part of a linear layer's time (its FP8 input quantization), shown apart and not "
         "counted twice.\n"]
    for r in ours:
        prof_all = r.get("profile") or []
        parts = [p for p in prof_all if "(inside linear)" in p["op"]]
        prof = [p for p in prof_all if "(inside linear)" not in p["op"]]
        tot = sum(p["ms"] for p in prof) or 1.0
        cats = {}
        for p in prof:
            c = category(p["op"])
            n, ms = cats.get(c, (0, 0.0))
            cats[c] = (n + p["calls"], ms + p["ms"])
        P.append(f"\n## {r['model']} {r['precision'].upper()} (profiled step {r['profiled_step_ms']} ms, "
                 f"normal step {r['step_ms_median']} ms)\n")
        P.append("| category | calls | ms | share |")
        P.append("| --- | --- | --- | --- |")
        for c, (n, ms) in sorted(cats.items(), key=lambda kv: -kv[1][1]):
            P.append(f"| {c} | {n} | {ms:.2f} | {100 * ms / tot:.1f}% |")
        P.append("\nTop operations:\n")
        P.append("| operation | calls | ms | share | TFLOP/s |")
        P.append("| --- | --- | --- | --- | --- |")
        for p in prof[:18]:
            tf = ""
            m = re.match(r"linear \S+ (\d+)x(\d+)->(\d+)", p["op"])
            if m:
                rows, k, n = map(int, m.groups())
                tf = f"{2 * rows * k * n * p['calls'] / p['ms'] / 1e9:.0f}"
            m = re.match(r"attention \S+ (\d+)x(\d+) h(\d+) d(\d+)", p["op"])
            if m:
                sq, sk, h, d = map(int, m.groups())
                tf = f"{4 * 2 * h * sq * sk * d * p['calls'] / p['ms'] / 1e9:.0f}"
            m = re.match(r"attention \S+ joint (\d+)\+(\d+)x(\d+)\+(\d+) h(\d+) d(\d+)", p["op"])
            if m:
                q1, q2, k1, k2, h, d = map(int, m.groups())
                tf = f"{4 * 2 * h * (q1 + q2) * (k1 + k2) * d * p['calls'] / p['ms'] / 1e9:.0f}"
            P.append(f"| {p['op']} | {p['calls']} | {p['ms']:.2f} | {100 * p['ms'] / tot:.1f}% | {tf} |")
        if parts:
            P.append("\nInside the linear layers above:\n")
            P.append("| part | calls | ms | share of step |")
            P.append("| --- | --- | --- | --- |")
            for p in parts:
                P.append(f"| {p['op']} | {p['calls']} | {p['ms']:.2f} | {100 * p['ms'] / tot:.1f}% |")
    for v in vae:
        for run in [v] + [o for o in v.get("other_paths", []) if o.get("profile")]:
            prof = run.get("profile") or []
            tot = sum(p["ms"] for p in prof) or 1.0
            path = f", convolutions on `{run['path']}`" if run.get("path") else ""
            P.append(f"\n## VAE decode 1024x1024 BF16{path}\n")
            P.append("| operation | calls | ms | share |")
            P.append("| --- | --- | --- | --- |")
            for p in prof[:12]:
                P.append(f"| {p['op']} | {p['calls']} | {p['ms']:.2f} | {100 * p['ms'] / tot:.1f}% |")
    with open(os.path.join(out, "profile.md"), "w") as f:
        f.write("\n".join(P) + "\n")
    print("\n".join(L))


if __name__ == "__main__":
    main()
