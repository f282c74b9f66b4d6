"""The one-shot GPU check: everything this project has not yet measured on a CUDA GPU, in one command
that fits a short GPU lease, each part under its own time cap.

Run it on a machine with one CUDA GPU (H100 / H200), from the repository's root:

    export SGG_ALIGN_CACHE=/tmp/sgg_align_cache PYTHONUNBUFFERED=1; python gpu_check.py --out $OUT

Expected duration on one H100 / H200: about 5 minutes (an estimate: it has not run on a GPU yet); at
most 8 (--budget 480 s: no part starts after it, and each part stops at its cap). Without a GPU the
same command takes about 10 seconds: the `mirror` part runs (on the PyTorch path), and every CUDA
part prints one line `[part] skipped: ...`.

The parts, in order. Each runs in a subprocess of its own, so that a part that fails, runs out of
time or breaks the CUDA context is recorded as such and the next part still starts:

    part     cap   CUDA  what it checks or measures
    mirror    45 s  no   Align-SGTR's mirror gives the same outputs, gradients and seeds with the fused
                         kernel as with SDPA given the materialised mask (what `steps` compares)
    tests     90 s  yes  pytest tests/test_kernels.py -k cuda: the 14 CUDA tests (the kernel against
                         the naive reference, forward and backward, fp32 / fp16 / bf16, D 16..128)
    kernels  110 s  yes  forward + backward of the fused kernel vs SDPA with a materialised bool mask
                         vs plain SDPA: ms, peak MiB and error at the SGTR shapes (H 8, Lq 100..300,
                         Lk 100..1500, D 32 / 64, B 4..16); fills kernels/BENCH.md's GPU section
    data      25 s  yes  the synthetic dataset, generated once into $SGG_ALIGN_CACHE (~10-25 s)
    steps    100 s  yes  training steps, baseline vs aligned, Motifs PredCls and SGTR, and SGTR aligned
                         with SDPA + the materialised mask instead of the kernel (the same masks), at
                         the default sizes and at --preset vg on VG-sized images: ms/step, it/s, peak
                         memory, and the wall time of the --preset vg schedules projected from them
    motifs    55 s  yes  python motifs_align.py --predcls with a short budget, end to end on CUDA
    sgtr      55 s  yes  python sgtr_align.py with a short budget, end to end on CUDA

It writes into --out (default runs/gpu_check; at most 5 files, one folder):
    gpu_check.log    every line printed, each part's output prefixed with [part]
    gpu_check.json   every number, per part: status (ok / failed / timeout / skipped), seconds, cap
    gpu_check.md     the summary: the targets, the tables
    BENCH.md         kernels/BENCH.md with its GPU section filled in (also rewritten in place)
    bench.png        the kernel timings as bars
`--parts kernels,steps` reruns only some parts. `--rehearse` runs the CUDA parts on the CPU at toy
sizes, to try their code paths without a GPU (about 4 minutes on one core; the numbers mean nothing).

The targets: fused forward + backward >= 2x faster than SDPA with a materialised mask and
<= 1.3x plain SDPA, no (B, H, Lq, Lk) mask in memory; an aligned SGTR step <= 1.6x the baseline's;
the CUDA results equal to the CPU reference within the tests' tolerances.

Symbols: B batch, H heads, Lq queries, Lk keys, D head dimension (Dh in sgtr_align.py).
"""
import argparse
import contextlib
import datetime
import gc
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.abspath(__file__))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# (name, cap in seconds, needs CUDA); the caps add up to the default --budget of 480 s
PARTS = [("mirror", 45, False), ("tests", 90, True), ("kernels", 110, True), ("data", 25, True),
         ("steps", 100, True), ("motifs", 55, True), ("sgtr", 55, True)]
BUDGET = 480
REHEARSAL_SCALE = 6  # --rehearse: the CPU is slower, caps and budget x this


# ----------------------------------------------------------------------------------------------
# The mirror's cross-attention without the kernel: SDPA given the materialised mask

def sdpa_with_materialised_mask(q, k, v, key_padding_mask, mask_p, seed):
    """A drop-in for sgtr_align.masked_cross_attention, written as one would without the fused kernel:
    materialise the mask of the same seed (kernels.bernoulli_mask: the very bits the kernel draws) and
    hand it to PyTorch's scaled_dot_product_attention. q (B, H, Lq, D), k / v (B, H, Lk, D)."""
    from kernels import bernoulli_mask
    B, H, Lq, _ = q.shape
    keep = ~bernoulli_mask(seed, (B, H, Lq, k.shape[2]), mask_p, q.device)   # (B, H, Lq, Lk) in memory
    if key_padding_mask is not None:
        keep &= ~key_padding_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)             # (B, H, Lq, D)
    # a row without a kept key: zeros, as masked_attention defines it (SDPA gives NaN or 0 by backend)
    return torch.where(keep.any(-1, keepdim=True), out, 0.0)


@contextlib.contextmanager
def mirror_attention(sgtr, fn):
    """Run sgtr_align's mirror with `fn` as its cross-attention. MultiheadAttention.forward looks the
    module-level name masked_cross_attention up at each call, so swapping it swaps the mirror's only."""
    saved = sgtr.masked_cross_attention
    sgtr.masked_cross_attention = fn
    try:
        yield
    finally:
        sgtr.masked_cross_attention = saved


def part_mirror(ctx):
    """Same seeds, same masks: the mirror's outputs and gradients with the fused kernel (on CPU: its
    PyTorch path) and with sdpa_with_materialised_mask agree, so `steps` compares like with like."""
    import sgtr_align as sgtr
    torch.manual_seed(0)
    cfg = sgtr.parse_config(["--device", ctx.device.type])          # the default (synthetic-size) model
    model = sgtr.SGTR(cfg, 32, 26).to(ctx.device)
    images = torch.randn(2, 3, 128, 128, device=ctx.device)
    targets = [{"size": (128, 96)}, {"size": (80, 128)}]           # padded: the key padding mask matters
    with torch.no_grad():
        inputs = model(images, sgtr.pad_mask_for(images, targets))[2]
    keys = ("pred_logits", "sub_logits", "obj_logits")
    runs = {}
    for name, fn in (("fused", sgtr.masked_cross_attention), ("sdpa_mask", sdpa_with_materialised_mask)):
        seeds = []

        def recording(q, k, v, kpm, p, seed, fn=fn, seeds=seeds):
            seeds.append(seed)
            return fn(q, k, v, kpm, p, seed)

        model.mirror.mask_rng.manual_seed(123)
        model.zero_grad(set_to_none=True)
        with mirror_attention(sgtr, recording):
            last = model.mirror(model, inputs)[-1]                      # the mirror's last layer
        w = torch.Generator().manual_seed(1)
        loss = sum((last[k] * torch.randn(last[k].shape, generator=w).to(ctx.device)).sum() for k in keys)
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        runs[name] = (seeds, {k: last[k].detach() for k in keys}, grads)
    (seeds_a, out_a, grad_a), (seeds_b, out_b, grad_b) = runs["fused"], runs["sdpa_mask"]
    rel = lambda a, b: ((a - b).norm() / b.norm().clamp(min=1e-30)).item()
    out_err = max(rel(out_a[k], out_b[k]) for k in keys)
    # over all parameters at once: some gradients are 0 in exact arithmetic (a key projection's bias
    # shifts every logit of a row alike), so their own relative error is rounding over rounding
    grad_err = rel(torch.cat([grad_a[n].flatten() for n in grad_b]), torch.cat([g.flatten() for g in grad_b.values()]))
    tol = 1e-4 if ctx.cuda else 1e-5     # CUDA: the Triton kernel's fp32 sums against SDPA's
    res = dict(masked_calls=len(seeds_a), same_seeds=seeds_a == seeds_b, same_params=set(grad_a) == set(grad_b),
               max_rel_err_out=out_err, max_rel_err_grad=grad_err, tolerance=tol,
               path="Triton kernel" if ctx.cuda else "PyTorch path (CPU)")
    res["ok"] = res["same_seeds"] and res["same_params"] and max(out_err, grad_err) < tol and len(seeds_a) > 0
    print(f"mirror: {len(seeds_a)} masked cross-attention calls, same seeds: {res['same_seeds']}, "
          f"fused ({res['path']}) vs SDPA + materialised mask: outputs {out_err:.1e}, gradients "
          f"{grad_err:.1e} relative (tolerance {tol:g}) -> {'equal' if res['ok'] else 'NOT EQUAL'}")
    return res


# ----------------------------------------------------------------------------------------------
# The CUDA tests

def run_echo(cmd, env=None):
    """Run cmd, echo its output line by line as it comes (so a killed part still leaves it in the
    log) -> (return code, the lines)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    lines = []
    for line in proc.stdout:
        print(line, end="", flush=True)
        lines.append(line.rstrip("\n"))
    return proc.wait(), lines


def part_tests(ctx):
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_kernels.py",
           "-k", "cuda"]
    if ctx.cuda and importlib.util.find_spec("xdist"):
        cmd += ["-n", "4"]   # the tests mostly wait for Triton to compile: four at a time
    print(" ".join(cmd[1:]), flush=True)
    rc, lines = run_echo(cmd)
    summary = next((l for l in reversed(lines) if re.search(r"\d+ (passed|failed|skipped)", l)), "")
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", summary)}
    # on a GPU nothing may be skipped: a skip there means the tests did not see the GPU
    ok = rc == 0 and counts.get("passed", 0) > 0 and not (ctx.cuda and counts.get("skipped"))
    return dict(ok=ok or (ctx.rehearse and rc == 0), returncode=rc, summary=summary.strip("= "), **counts)


# ----------------------------------------------------------------------------------------------
# The kernel against SDPA with a materialised mask and against plain SDPA

KERNEL_SHAPES = [(4, 100, 100), (4, 200, 600), (8, 300, 1500), (16, 100, 600), (16, 300, 1500)]  # (B, Lq, Lk)
OTHER_DTYPE_SHAPES = [(8, 200, 600), (16, 300, 1500)]
# relative error of output and gradients against float64 SDPA given the same mask: ~10x what each
# precision gives (another mask than the kernel's gives 1e-1 and more)
KERNEL_TOL = {"float32": 1e-4, "float32 (tf32)": 5e-3, "float16": 1e-2, "bfloat16": 5e-2}


def kernel_error(B, Lq, Lk, D, dtype, device, seed=7):
    """Max relative error of the fused kernel's output and dq, dk, dv against float64 SDPA given
    bernoulli_mask's mask, at one shape (H = 8)."""
    from kernels import bernoulli_mask, masked_attention
    from kernels.bench import P
    g = torch.Generator(device=device).manual_seed(1)
    q, k, v = (torch.randn(B, 8, L, D, device=device, generator=g).to(dtype).requires_grad_()
               for L in (Lq, Lk, Lk))
    dout = torch.randn(B, 8, Lq, D, device=device, generator=g)
    out = masked_attention(q, k, v, P, seed)
    got = (out,) + torch.autograd.grad(out, (q, k, v), dout.to(dtype))
    keep = ~bernoulli_mask(seed, (B, 8, Lq, Lk), P, device)                  # (B, H, Lq, Lk)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(q64, k64, v64, attn_mask=keep)
    refs = (ref,) + torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    return max(((a.double() - b).norm() / b.norm()).item() for a, b in zip(got, refs))


def part_kernels(ctx):
    from kernels import bench
    # (precision, shapes, head dims, methods), most wanted first: a part near its cap drops the last.
    # Each (precision, D, p > 0 or not) compiles four kernels anew (~1 s each): the grids stay small.
    both = ["ours", "ours_p0", "sdpa_mask", "sdpa"]
    if ctx.rehearse:
        grids = [("float32", [(2, 16, 40)], (32,), both)]
    else:
        grids = [("float16", KERNEL_SHAPES, (32, 64), both),
                 ("bfloat16", OTHER_DTYPE_SHAPES, (32, 64), both[:1] + both[2:]),
                 # fp32: what the model scripts run (no autocast); D = 32 is their head dim
                 ("float32 (tf32)", OTHER_DTYPE_SHAPES, (32,), both[:1] + both[2:]),
                 ("float32", OTHER_DTYPE_SHAPES, (32,), both[:1] + both[2:])]
    res = ctx.result
    res.update(rows={}, methods={}, skipped=[])
    for label, shapes, dims, methods in grids:
        dtype = getattr(torch, label.split()[0])
        torch.backends.cuda.matmul.allow_tf32 = "tf32" in label    # the kernel follows torch's setting
        res["rows"][label], res["methods"][label] = [], methods
        for (B, Lq, Lk), D in ((s, d) for s in shapes for d in dims):
            if ctx.time_left() < 20:
                res["skipped"].append(f"{label} B={B} Lq={Lq} Lk={Lk} D={D}")
                print(f"skipped {label} B={B} Lq={Lq} Lk={Lk} D={D}: the part's cap is near", flush=True)
                continue
            row = bench.run_grid([(B, Lq, Lk)], [D], dtype, ctx.device, 2 if ctx.rehearse else 10, methods)[0]
            try:
                row["max_rel_err"] = kernel_error(B, Lq, Lk, D, dtype, ctx.device)
            except Exception as e:    # recorded; the other shapes still run
                row["max_rel_err"] = float("nan")
                row.setdefault("errors", []).append(f"error check: {type(e).__name__}: {str(e)[:200]}")
            row["err_ok"] = row["max_rel_err"] < KERNEL_TOL[label]   # False for NaN
            print(f"    {label}: fused kernel vs float64 SDPA with the same mask, max relative error "
                  f"{row['max_rel_err']:.1e} (tolerance {KERNEL_TOL[label]:g})", flush=True)
            res["rows"][label].append(row)
            ctx.save()
    torch.backends.cuda.matmul.allow_tf32 = False
    rows = [r for rs in res["rows"].values() for r in rs]
    res["targets"] = {label: kernel_targets(rs) for label, rs in res["rows"].items() if rs}
    res["errors_ok"] = all(r["err_ok"] for r in rows)
    res["ok"] = res["errors_ok"] and not res["skipped"] and not any(r.get("errors") for r in rows)
    first = next(iter(res["rows"]))
    if not res["rows"][first]:
        return res
    # BENCH.md's GPU section: fp16 first (the kernel's fast case; note that the model scripts train in
    # fp32, which `steps` times), then the other precisions
    env = bench.environment(ctx.device)
    text = bench.gpu_section(res["rows"][first], res["methods"][first], f"{env}, {first}",
                             "python gpu_check.py --parts kernels")
    for label, rs in list(res["rows"].items())[1:]:
        if rs:
            text += f"\n**{label}**\n\n" + bench.table(rs, res["methods"][label], with_memory=True) + "\n"
    text += ("\nError: max over output, dq, dk, dv of |kernel - SDPA| / |SDPA|, SDPA in float64 given the "
             "kernel's own mask: " + ", ".join(f"{r['max_rel_err']:.1e}" for r in rows) + ".\n")
    bench.plot(res["rows"][first], res["methods"][first], os.path.join(ctx.out, "bench.png"),
               f"masked cross-attention, {first}, {env}")
    with open(os.path.join(bench.HERE, "BENCH.md")) as f:
        doc = f.read()
    copy = os.path.join(ctx.out, "BENCH.md")
    with open(copy, "w") as f:
        f.write(doc)
    bench.write_section("gpu", text, path=copy)
    if ctx.cuda:                                   # on the GPU machine's copy of the repository
        bench.write_section("gpu", text)
    return res


def kernel_targets(rows):
    """How many shapes meet each of the kernel's targets (bench.gpu_section counts the same)."""
    ok = [r for r in rows if all(math.isfinite(r[m][0]) for m in ("ours", "sdpa_mask", "sdpa"))]
    return dict(shapes=len(rows), timed=len(ok),
                faster_2x_than_sdpa_mask=sum(r["ratios"][0] >= 2.0 for r in ok),
                within_1_3x_of_sdpa=sum(r["ratios"][1] <= 1.3 for r in ok),
                no_mask_sized_memory=sum(r["ours"][1] - r["sdpa"][1] < r["mask_mib"] for r in ok),
                sdpa_mask_over_ours=[round(r["ratios"][0], 3) for r in ok],
                ours_over_sdpa=[round(r["ratios"][1], 3) for r in ok])


# ----------------------------------------------------------------------------------------------
# The data, once

def part_data(ctx):
    import data
    t0 = time.time()
    root = data.ensure_synthetic()
    print(f"synthetic data at {root} ({time.time() - t0:.0f} s)")
    return dict(ok=True, root=root, seconds=time.time() - t0)


# ----------------------------------------------------------------------------------------------
# Training steps: what the alignment costs, and what the kernel saves, inside a real step

# --rehearse: toy sizes for the CPU (the code paths, not the numbers)
REHEARSAL_ARGS = {
    "default": ["--batch-size", "2", "--det-batch", "2"],
    ("vg", "sgtr"): ["--max-size", "128", "--batch-size", "2", "--det-batch", "2", "--enc-layers", "1",
                     "--ent-dec-layers", "1", "--rel-enc-layers", "1", "--pred-dec-layers", "2",
                     "--ffn-dim", "256", "--num-ent-queries", "20", "--num-pred-queries", "30"],
    ("vg", "motifs"): ["--max-size", "128", "--batch-size", "2", "--det-batch", "2", "--roi-dim", "256",
                       "--union-dim", "256", "--hidden", "64", "--embed-dim", "32", "--mirror-dim", "64"],
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def first_batches(ds, batch_size, n, device, move_targets):
    """n batches of the training stream, on the device -> (batches, seconds to load one, 1 worker)."""
    import data
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=data.collate,
                                         sampler=data.TrainingSampler(len(ds), seed=0))
    it, t0, batches = iter(loader), time.time(), []
    for _ in range(n):
        images, targets = next(it)
        batches.append((images, targets))
    load = (time.time() - t0) / n
    return [(im.to(device), move_targets(tg)) for im, tg in batches], load


def time_steps(step, batches, device, warmup, steps):
    """Median ms of `steps` calls of step(images, targets) after `warmup` calls, and the peak GPU
    memory (MiB) of the whole (model, optimizer state and activations included)."""
    for i in range(warmup):
        step(*batches[i % len(batches)])
    sync(device)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        step(*batches[(warmup + i) % len(batches)])
        sync(device)
        times.append(1e3 * (time.perf_counter() - t0))
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    ms = statistics.median(times)
    return dict(ms=ms, ms_min=min(times), it_per_s=1e3 / ms, peak_mib=peak, steps=steps)


def failed(ctx, info, name, e):
    """A variant that raised: its error in the log (traceback) and in the results, then the next one."""
    traceback.print_exc()
    ctx.result["runs"].append(dict(info, variant=name, error=f"{type(e).__name__}: {str(e)[:300]}"))
    ctx.save()


def fresh_gpu(device):
    """Free what the last variant left, so that the next one's peak memory is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def sgtr_variants(ctx, sizes, warmup, steps):
    """SGTR SGDet: the pretraining step of its detector, the baseline step, the aligned step with the
    fused kernel and with SDPA + the materialised mask (same weights, batches and mask seeds)."""
    import sgtr_align as sgtr
    argv = ["--device", ctx.device.type] + (["--preset", "vg"] if sizes == "vg" else [])
    if ctx.rehearse:
        argv += REHEARSAL_ARGS["default" if sizes == "default" else ("vg", "sgtr")]
    cfg = sgtr.parse_config(argv)
    train = sgtr.load_datasets(cfg)[0]
    C, P = train.num_classes, train.num_predicates
    batches, load_s = first_batches(train, cfg.batch_size, 3, ctx.device, lambda t: t)
    det_batches = [(im[:cfg.det_batch], tg[:cfg.det_batch]) for im, tg in batches]
    info = dict(model="sgtr", sizes=sizes, batch=cfg.batch_size, det_batch=cfg.det_batch,
                image_hw=list(batches[0][0].shape[-2:]), load_s_per_batch=load_s,
                iters=cfg.iters, det_iters=cfg.det_iters, d_model=cfg.d_model, nheads=cfg.nheads,
                queries=(cfg.num_ent_queries, cfg.num_pred_queries))

    def build(name):
        """-> step(images, targets): one training step of this variant on a freshly made model."""
        vcfg = sgtr.dataclasses.replace(cfg, no_align=name.startswith(("baseline", "detector")))
        sgtr.seed_everything(0)
        model = sgtr.SGTR(vcfg, C, P).to(ctx.device)
        model.train()
        if name == "detector":   # as pretrain_detector: entity losses of every entity decoder layer
            params = [p for _, p in model.detector_parameters()]
            opt = torch.optim.AdamW(params, lr=cfg.det_lr, weight_decay=cfg.weight_decay)

            def step(images, targets):
                ent_out = model.detect(images, sgtr.pad_mask_for(images, targets))[0]
                tg = sgtr.normalised_targets(targets, images.device)
                loss = sum(sgtr.entity_loss(o, tg, vcfg) for o in ent_out)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, vcfg.grad_clip)
                opt.step()
            return step
        if vcfg.lr_detector == 0 and vcfg.lr_backbone == 0:   # as train(): frozen unless fine-tuned
            model.freeze_detector()
        if model.mirror is not None:
            model.mirror.mask_rng.manual_seed(0)     # the same mask seeds in every aligned variant
        opt = sgtr.build_optimizer(model, vcfg)[0]

        def step(images, targets):
            losses = sgtr.train_step(model, images, targets, vcfg)
            opt.zero_grad(set_to_none=True)
            losses["total"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), vcfg.grad_clip)
            opt.step()
        return step

    variants = [("detector", None, False), ("baseline", None, False), ("aligned", None, False),
                ("aligned_sdpa_mask", sdpa_with_materialised_mask, False)]
    if sizes == "vg" and ctx.cuda:   # fp32 matmuls as TF32 (the kernel follows torch's flag too)
        variants += [(n + "_tf32", fn, True) for n, fn, _ in variants[1:]]
    for name, attn, tf32 in variants:
        if ctx.time_left() < 20:
            print(f"skipped sgtr {sizes} {name}: the part's cap is near", flush=True)
            ctx.result["runs"].append(dict(info, variant=name, skipped=True))
            continue
        torch.backends.cuda.matmul.allow_tf32 = tf32
        fresh_gpu(ctx.device)
        try:
            step = build(name)
            with mirror_attention(sgtr, attn or sgtr.masked_cross_attention):
                r = time_steps(step, det_batches if name == "detector" else batches, ctx.device, warmup, steps)
        except Exception as e:        # recorded; the other variants still run
            failed(ctx, info, name, e)
            continue
        finally:
            step = None               # the model and its optimizer go with it
        ctx.result["runs"].append(dict(info, variant=name, **r))
        ctx.save()
        print(f"sgtr {sizes:7s} {name:22s} {r['ms']:8.1f} ms/step  {r['it_per_s']:6.2f} it/s  "
              f"peak {r['peak_mib']:8.0f} MiB", flush=True)
    torch.backends.cuda.matmul.allow_tf32 = False


def motifs_variants(ctx, sizes, warmup, steps):
    """Motifs PredCls: the detector's training step, the baseline and the aligned relation step (the
    detector frozen, random weights: in PredCls a step costs the same with any, as study.py bench)."""
    import motifs_align as motifs
    argv = ["--predcls", "--device", ctx.device.type] + (["--preset", "vg"] if sizes == "vg" else [])
    if ctx.rehearse:
        argv += REHEARSAL_ARGS["default" if sizes == "default" else ("vg", "motifs")]
    cfg = motifs.parse_config(argv)
    train = motifs.load_datasets(cfg, 0)[1]["train"]
    C, P = train.num_classes, train.num_predicates
    batches, load_s = first_batches(train, cfg.batch_size, 3, ctx.device,
                                    lambda t: motifs.to_device(t, ctx.device))
    det_batches = [(im[:cfg.det_batch], tg[:cfg.det_batch]) for im, tg in batches]
    info = dict(model="motifs", sizes=sizes, batch=cfg.batch_size, det_batch=cfg.det_batch,
                image_hw=list(batches[0][0].shape[-2:]), load_s_per_batch=load_s,
                iters=cfg.iters, det_iters=cfg.det_iters, backbone=cfg.backbone)

    def build(name):
        """-> step(images, targets): one training step of this variant on a freshly made model."""
        torch.manual_seed(0)
        detector = motifs.Detector(cfg, C).to(ctx.device)
        if name == "detector":   # as train_detector
            detector.train()
            params = [p for p in detector.parameters() if p.requires_grad]
            opt = (torch.optim.SGD(params, lr=cfg.det_lr, momentum=0.9, weight_decay=1e-4)
                   if cfg.det_optimizer == "sgd" else torch.optim.AdamW(params, lr=cfg.det_lr, weight_decay=1e-4))

            def step(images, targets):
                losses = detector(images, [t["size"] for t in targets], targets)
                loss = sum(losses.values())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 10.0)
                opt.step()
            return step
        detector.eval().requires_grad_(False)      # as train(), stage 2
        vcfg = motifs.dataclasses.replace(cfg, no_align=name == "baseline")
        model = motifs.MotifsRelationModel(vcfg, C, P, detector.backbone.out_channels, detector.stride,
                                           torch.zeros(C, C, P)).to(ctx.device)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=vcfg.lr, momentum=vcfg.momentum,
                              weight_decay=vcfg.weight_decay)

        def step(images, targets):
            losses = motifs.train_step(model, detector, images, targets, vcfg)
            opt.zero_grad(set_to_none=True)
            losses["total"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), vcfg.grad_clip)
            opt.step()
        return step

    for name in ("detector", "baseline", "aligned"):
        if ctx.time_left() < 20:
            print(f"skipped motifs {sizes} {name}: the part's cap is near", flush=True)
            ctx.result["runs"].append(dict(info, variant=name, skipped=True))
            continue
        fresh_gpu(ctx.device)
        try:
            step = build(name)
            torch.manual_seed(0)     # the same pairs and masks drawn in both variants' steps
            r = time_steps(step, det_batches if name == "detector" else batches, ctx.device, warmup, steps)
        except Exception as e:
            failed(ctx, info, name, e)
            continue
        finally:
            step = None
        ctx.result["runs"].append(dict(info, variant=name, **r))
        ctx.save()
        print(f"motifs {sizes:7s} {name:20s} {r['ms']:8.1f} ms/step  {r['it_per_s']:6.2f} it/s  "
              f"peak {r['peak_mib']:8.0f} MiB", flush=True)


def part_steps(ctx):
    res = ctx.result
    res["runs"] = []
    warmup, steps = (1, 2) if ctx.rehearse else (3, 8)
    for sizes in ("default", "vg"):
        sgtr_variants(ctx, sizes, warmup, steps)
        motifs_variants(ctx, sizes, warmup, steps)
    res["ratios"] = step_ratios(res["runs"])
    res["projection"] = projection(res["runs"])
    for line in res["ratios"] + res["projection"]:
        print(line["text"])
    res["ok"] = not any(r.get("skipped") or r.get("error") for r in res["runs"])
    return res


def step_ratios(runs):
    """aligned / baseline for each model and sizes (and TF32), and SDPA-with-mask / fused for SGTR."""
    by = {(r["model"], r["sizes"], r["variant"]): r for r in runs if "ms" in r}
    out = []
    for (model, sizes, variant), r in by.items():
        for num, den, what in (("aligned", "baseline", "aligned / baseline step"),
                               ("aligned_sdpa_mask", "baseline", "aligned with SDPA + mask / baseline step"),
                               ("aligned_sdpa_mask", "aligned", "SDPA + mask / fused kernel, aligned step")):
            for suffix in ("", "_tf32"):
                if variant == num + suffix and (model, sizes, den + suffix) in by:
                    ratio = r["ms"] / by[(model, sizes, den + suffix)]["ms"]
                    out.append(dict(model=model, sizes=sizes + suffix, what=what, ratio=ratio,
                                    text=f"{model} {sizes + suffix}: {what} = {ratio:.2f}"))
    return out


def projection(runs):
    """Wall time of the --preset vg schedules on this GPU: det_iters detector steps + iters relation
    steps, from the median step times (no evaluation, data loading assumed hidden by the workers)."""
    by = {(r["model"], r["variant"]): r for r in runs if r["sizes"] == "vg" and "ms" in r}
    out = []
    for model in ("sgtr", "motifs"):
        for arm in ("baseline", "aligned"):
            det, rel = by.get((model, "detector")), by.get((model, arm))
            if det is None or rel is None:
                continue
            hours = (det["det_iters"] * det["ms"] + rel["iters"] * rel["ms"]) / 3.6e6
            out.append(dict(model=model, arm=arm, det_iters=det["det_iters"], iters=rel["iters"],
                            det_ms=det["ms"], ms=rel["ms"], hours=hours, load_s_per_batch=rel["load_s_per_batch"],
                            text=f"{model} --preset vg, {arm}: {det['det_iters']} detector iterations x "
                                 f"{det['ms']:.0f} ms + {rel['iters']} iterations x {rel['ms']:.0f} ms = "
                                 f"{hours:.1f} h on this GPU (training steps only)"))
    return out


# ----------------------------------------------------------------------------------------------
# The two model scripts end to end, short budgets

# the script and its mode, then a short budget (--rehearse: a toy one, as the tests' smoke runs)
E2E = {"motifs": ["motifs_align.py", "--predcls"], "sgtr": ["sgtr_align.py"]}
E2E_BUDGET = {
    "motifs": ["--det-iters", "100", "--iters", "100", "--eval-every", "50", "--max-eval-images", "100",
               "--log-every", "25"],
    "sgtr": ["--det-iters", "100", "--iters", "100", "--eval-every", "50", "--val-images", "50",
             "--max-eval-images", "100", "--log-every", "25"]}
E2E_REHEARSAL = ["--det-iters", "2", "--iters", "2", "--eval-every", "2", "--max-eval-images", "6",
                 "--batch-size", "4", "--det-batch", "4", "--log-every", "1"]


def part_e2e(ctx, name):
    """One model script, end to end on this device: it must exit 0 and write metrics.json."""
    tmp = tempfile.mkdtemp(prefix=f"gpu_check_{name}_")
    run_dir = os.path.join(tmp, "run")
    cmd = [sys.executable] + E2E[name] + (E2E_REHEARSAL if ctx.rehearse else E2E_BUDGET[name]) + [
        "--device", ctx.device.type, "--out", run_dir]
    print(" ".join(cmd[1:]), flush=True)
    t0 = time.time()
    rc, lines = run_echo(cmd)
    res = dict(command=" ".join(cmd[1:]), returncode=rc, seconds=time.time() - t0)
    path = os.path.join(run_dir, "metrics.json")
    if os.path.exists(path):
        with open(path) as f:
            m = json.load(f)
        res["metrics"] = {k: m.get(k) for k in ("num_images", "R@50", "mR@50", "R@100", "mR@100", "det_mAP@0.5")}
    shutil.rmtree(tmp, ignore_errors=True)     # checkpoints and pictures: not wanted back
    # the relation model's training speed: the last progress line's it/s (not the detector's "det it")
    speeds = [float(s) for l in lines if not l.lstrip().startswith("det")
              for s in re.findall(r"\| ([\d.]+) it/s", l)]
    res["last_it_per_s"] = speeds[-1] if speeds else None
    res["ok"] = rc == 0 and "metrics" in res
    print(f"{name}: exit {rc}, metrics.json {'written' if 'metrics' in res else 'MISSING'}, "
          f"{res['seconds']:.0f} s" + (f", test {res['metrics']}" if "metrics" in res else ""))
    return res


PART_FUNCS = {"mirror": part_mirror, "tests": part_tests, "kernels": part_kernels, "data": part_data,
              "steps": part_steps, "motifs": lambda ctx: part_e2e(ctx, "motifs"),
              "sgtr": lambda ctx: part_e2e(ctx, "sgtr")}


# ----------------------------------------------------------------------------------------------
# Running the parts: one subprocess each, a cap each, everything into one log

class Log:
    def __init__(self, path):
        self.f = open(path, "a")

    def __call__(self, line):
        print(line, flush=True)
        self.f.write(line + "\n")
        self.f.flush()


class Context:
    """What a part (in its subprocess) knows: the device, the output folder, its own deadline, and
    its result so far (saved after each measurement, so a part killed at its cap keeps what it did)."""

    def __init__(self, args):
        self.cuda = torch.cuda.is_available()
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.rehearse, self.out, self.path = args.rehearse, args.out, args.result
        self.end = time.time() + args.cap
        self.result = {}

    def time_left(self):
        return self.end - time.time()

    def save(self):
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.result, f, indent=1, default=str)
        os.replace(tmp, self.path)


def run_part(name, cap, args, log):
    """Run one part in a subprocess under its cap -> {status, seconds, cap, result}."""
    fd, result_path = tempfile.mkstemp(prefix=f"gpu_check_{name}_", suffix=".json")
    os.close(fd)
    os.remove(result_path)
    cmd = [sys.executable, os.path.abspath(__file__), "--part", name, "--cap", f"{cap:.0f}",
           "--result", result_path, "--out", args.out] + (["--rehearse"] if args.rehearse else [])
    t0 = time.time()
    # a session of its own: on a timeout the whole group goes (the model scripts a part started too)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    reader = threading.Thread(target=lambda: [log(f"[{name}] {l.rstrip()}") for l in proc.stdout], daemon=True)
    reader.start()
    timed_out = False
    try:
        rc = proc.wait(timeout=cap)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait()
    reader.join(timeout=10)
    seconds = time.time() - t0
    result = {}
    if os.path.exists(result_path):
        with open(result_path) as f:
            result = json.load(f)
        os.remove(result_path)
    status = "timeout" if timed_out else "ok" if rc == 0 and result.get("ok", False) else "failed"
    log(f"[{name}] {status} in {seconds:.0f} s (cap {cap:.0f} s)"
        + (f", exit status {rc}" if status == "failed" else ""))
    return dict(status=status, seconds=round(seconds, 1), cap=round(cap), returncode=rc, result=result)


def environment(cuda):
    from kernels.bench import gpu_driver
    import triton
    env = dict(date=f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC", host=platform.node(),
               python=platform.python_version(), torch=torch.__version__, triton=triton.__version__,
               cpus=os.cpu_count(), cuda_available=cuda)
    if cuda:
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=torch.cuda.get_device_name(0), driver=gpu_driver(), cuda=torch.version.cuda,
                   capability=f"{p.major}.{p.minor}", gpu_memory_gib=round(p.total_memory / 2**30, 1))
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                       text=True, timeout=10).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        env["commit"] = "?"
    return env


# ----------------------------------------------------------------------------------------------
# The report: gpu_check.md

def targets(res):
    """One line per target: what was measured against it, or why nothing was."""
    get = lambda n: res["parts"].get(n, {}).get("result") or {}
    status = lambda n: res["parts"].get(n, {}).get("status", "not run")
    lines = [] if res["env"]["cuda_available"] else ["no CUDA GPU here: nothing below is a GPU measurement"]
    t = get("tests")
    lines.append(f"CUDA tests (kernel vs reference, fwd + bwd, fp32/fp16/bf16): {status('tests')}"
                 + (f", {t['summary']}" if t.get("summary") else ""))
    for label, k in get("kernels").get("targets", {}).items():
        lines.append(f"kernel {label}: >= 2x faster than SDPA + materialised mask on "
                     f"{k['faster_2x_than_sdpa_mask']}/{k['timed']} shapes, <= 1.3x plain SDPA on "
                     f"{k['within_1_3x_of_sdpa']}/{k['timed']}, no mask-sized memory on {k['no_mask_sized_memory']}/"
                     f"{k['timed']} (sdpa_mask / ours: {min(k['sdpa_mask_over_ours'], default=0):.2f}.."
                     f"{max(k['sdpa_mask_over_ours'], default=0):.2f}x, ours / sdpa: "
                     f"{min(k['ours_over_sdpa'], default=0):.2f}..{max(k['ours_over_sdpa'], default=0):.2f}x)")
    if not get("kernels").get("targets"):
        lines.append(f"kernel timings: {status('kernels')}")
    if "errors_ok" in get("kernels"):
        lines.append(f"kernel outputs and gradients equal to float64 SDPA with the same mask, within "
                     f"tolerance at every timed shape: {get('kernels')['errors_ok']}")
    ratios = [r for r in get("steps").get("ratios", [])
              if r["model"] == "sgtr" and r["what"] == "aligned / baseline step"]
    for r in ratios:
        lines.append(f"aligned SGTR step <= 1.6x baseline ({r['sizes']} sizes): {r['ratio']:.2f}x, "
                     f"{'met' if r['ratio'] <= 1.6 else 'NOT met'}")
    if not ratios:
        lines.append(f"training steps: {status('steps')}")
    m = get("mirror")
    if m:
        lines.append(f"mirror with the fused kernel == with SDPA + the same materialised masks ({m['path']}): "
                     f"{'yes' if m.get('ok') else 'NO'} (relative difference "
                     f"{max(m['max_rel_err_out'], m['max_rel_err_grad']):.1e})")
    for name in ("motifs", "sgtr"):
        e = get(name)
        lines.append(f"{name} end to end: {status(name)}" + (
            f", exit {e['returncode']}, metrics.json {'written' if e.get('metrics') else 'missing'}" if e else ""))
    return lines


def fmt_metrics(m):
    return ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in (m or {}).items())


def report(res):
    env, parts = res["env"], res["parts"]
    lines = ["# GPU check (`python gpu_check.py`)", ""]
    if env["cuda_available"]:
        lines.append(f"{env['gpu']} ({env['gpu_memory_gib']} GiB, sm_{env['capability'].replace('.', '')}), "
                     f"driver {env['driver']}, CUDA {env['cuda']}, torch {env['torch']}, Triton {env['triton']}, "
                     f"{env['cpus']} CPUs; {env['date']}; commit {env['commit']}.")
    else:
        lines.append(f"**No GPU was available** (torch.cuda.is_available() is False): nothing was measured on "
                     f"a GPU{'; a CPU rehearsal at toy sizes, its numbers mean nothing' if res['rehearse'] else ''}. "
                     f"torch {env['torch']}, Triton {env['triton']}, {env['cpus']} CPUs; {env['date']}.")
    lines += ["", f"Command: `{res['command']}`, {res['seconds']:.0f} s in all.", "", "## Targets", ""]
    lines += [f"- {t}" for t in targets(res)]
    lines += ["", "## Parts", "", "| part | status | seconds | cap |", "|---|---|---|---|"]
    lines += [f"| {n} | {p['status']} | {p.get('seconds', '')} | {p.get('cap', '')} |" for n, p in parts.items()]
    get = lambda n: parts.get(n, {}).get("result") or {}
    if get("mirror"):
        m = get("mirror")
        lines += ["", f"**Mirror, fused vs SDPA + materialised mask** ({m['path']}): {m['masked_calls']} masked calls, "
                  f"same seeds {m['same_seeds']}, relative difference of outputs {m['max_rel_err_out']:.1e}, "
                  f"gradients {m['max_rel_err_grad']:.1e} (tolerance {m['tolerance']:g})."]
    if get("tests"):
        lines += ["", f"**CUDA tests**: {get('tests').get('summary', '?')}"]
    if get("kernels").get("rows"):
        from kernels.bench import table
        k = get("kernels")
        lines += ["", "## Kernel, forward + backward (p = 0.1)", "",
                  f"Errors against float64 SDPA given the same mask, all within tolerance: {k.get('errors_ok')}."]
        for label, rows in k["rows"].items():
            if rows:
                t = k.get("targets", {}).get(label, {})
                lines += ["", f"**{label}**: >= 2x faster than sdpa_mask on {t.get('faster_2x_than_sdpa_mask')}/"
                          f"{t.get('timed')} shapes, <= 1.3x sdpa on {t.get('within_1_3x_of_sdpa')}/{t.get('timed')}, "
                          f"no mask-sized memory on {t.get('no_mask_sized_memory')}/{t.get('timed')}; max relative "
                          "errors " + ", ".join(f"{r['max_rel_err']:.1e}" for r in rows), "",
                          table(rows, k["methods"][label], with_memory=True)]
        if k.get("skipped"):
            lines += ["", "Not timed (cap): " + "; ".join(k["skipped"])]
    if get("steps").get("runs"):
        s = get("steps")
        lines += ["", "## Training steps (median ms; peak GPU memory of model, optimizer and activations)", "",
                  "| model | sizes | variant | batch | image H x W | ms / step | it/s | peak MiB |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in s["runs"]:
            if "ms" not in r:
                why = r.get("error", "not run (cap)")
                lines.append(f"| {r['model']} | {r['sizes']} | {r['variant']} | | | {why} | | |")
            else:
                batch = r["det_batch"] if r["variant"] == "detector" else r["batch"]
                lines.append(f"| {r['model']} | {r['sizes']} | {r['variant']} | {batch} | "
                             f"{r['image_hw'][0]} x {r['image_hw'][1]} | {r['ms']:.1f} | {r['it_per_s']:.2f} | "
                             f"{r['peak_mib']:.0f} |")
        lines += [""] + [f"- {x['text']}" for x in s.get("ratios", [])]
        lines += ["", "Target: aligned SGTR step <= 1.6x the baseline's (sizes vg).", "",
                  "Projected (--preset vg schedules, training steps only: no validation, data loading hidden by "
                  "the workers; the synthetic images are upscaled to VG's size but hold ~6 objects, VG ~12):"]
        lines += [f"- {x['text']}" for x in s.get("projection", [])]
    for name in ("motifs", "sgtr"):
        e = get(name)
        if e:
            lines += ["", f"**{name} end to end** (`{e.get('command')}`): exit {e.get('returncode')}, "
                      f"{e.get('seconds', 0):.0f} s, last it/s {e.get('last_it_per_s')}, "
                      f"test: {fmt_metrics(e.get('metrics'))}"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "gpu_check"), help="output folder (default: runs/gpu_check)")
    ap.add_argument("--budget", type=float, default=BUDGET, help=f"seconds; no part starts after it (default: {BUDGET})")
    ap.add_argument("--parts", default=",".join(n for n, _, _ in PARTS), help="comma-separated subset (default: all, in order)")
    ap.add_argument("--rehearse", action="store_true", help="run the CUDA parts on the CPU at toy sizes")
    ap.add_argument("--part", help=argparse.SUPPRESS)      # internal: run one part in this process
    ap.add_argument("--cap", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.part:                                          # the subprocess of one part
        if not torch.cuda.is_available():
            torch.set_num_threads(1)
        ctx = Context(args)
        ctx.result = PART_FUNCS[args.part](ctx)
        ctx.save()
        return 0

    chosen = args.parts.split(",")
    unknown = [p for p in chosen if p not in PART_FUNCS]
    if unknown:
        raise SystemExit(f"error: --parts: unknown part(s) {unknown}; choose from {list(PART_FUNCS)}")
    os.makedirs(args.out, exist_ok=True)
    for name in ("gpu_check.log", "gpu_check.json", "gpu_check.md", "BENCH.md", "bench.png"):
        if os.path.exists(os.path.join(args.out, name)):   # an earlier run's, not this one's
            os.remove(os.path.join(args.out, name))
    log = Log(os.path.join(args.out, "gpu_check.log"))
    cuda = torch.cuda.is_available()
    scale = REHEARSAL_SCALE if args.rehearse and not cuda else 1
    env = environment(cuda)
    command = " ".join(["python gpu_check.py"] + sys.argv[1:] if argv is None else ["python gpu_check.py"] + argv)
    log(f"gpu_check: {env.get('gpu', 'no CUDA GPU')} | torch {env['torch']}, Triton {env['triton']} | "
        f"budget {args.budget * scale:.0f} s | out {args.out}")
    t0 = time.time()
    res = dict(env=env, command=command, rehearse=args.rehearse, parts={})
    for name, cap, needs_cuda in PARTS:
        if name not in chosen:
            continue
        if needs_cuda and not cuda and not args.rehearse:
            log(f"[{name}] skipped: needs a CUDA GPU (torch.cuda.is_available() is False)")
            res["parts"][name] = dict(status="skipped", why="no CUDA GPU")
            continue
        left = t0 + args.budget * scale - time.time()
        if left < 15:
            log(f"[{name}] skipped: the budget of {args.budget * scale:.0f} s is spent")
            res["parts"][name] = dict(status="skipped", why="budget spent")
            continue
        res["parts"][name] = run_part(name, min(cap * scale, left), args, log)
    res["seconds"] = time.time() - t0
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write(report(res))
    for line in targets(res):      # last, so that the end of the output says it all
        log("  " + line)
    log(f"gpu_check: done in {res['seconds']:.0f} s: " + ", ".join(
        f"{n} {p['status']}" for n, p in res["parts"].items()) + f" -> {args.out}")
    return 1 if any(p["status"] in ("failed", "timeout") for p in res["parts"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
