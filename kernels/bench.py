"""Benchmark of masked_attention at the shapes of the mirrored SGTR decoder's cross-attention.

Forward + backward time and peak extra memory of:
    ours          kernels.masked_attention: mask drawn inside the fused kernel (p = 0.1)
    ours_p0       the same kernel with the generator compiled out: the cost of the random numbers
    naive         plain PyTorch: torch.rand mask (B, H, Lq, Lk), masked_fill, softmax, matmul
    sdpa_mask     F.scaled_dot_product_attention with the materialised boolean mask
    flex_hash     FlexAttention with a hash-based score_mod (torch >= 2.5; compiled per shape)
    sdpa          F.scaled_dot_product_attention without any mask: the floor
Shapes: B in 2..32, H = 8, Lq 100..300 predicate queries, Lk 100..1500 entity/image tokens,
D = 32 and 64, fp16 (the default grid is a subset; --full runs all). No padding mask in any method.

Targets: >= 2x faster than sdpa_mask, within 1.3x of sdpa, no mask-sized allocation.

Run:
    python -m kernels.bench                 # CUDA GPU: table + plot into kernels/BENCH.md
    python -m kernels.bench --full          # every shape of the grid
    python -m kernels.bench --methods ours,ours_p0,sdpa_mask,sdpa   # a subset (FlexAttention
                                            # compiles once per shape: the slow part of a run)
    python -m kernels.bench --cpu           # no GPU: the CPU (plain-PyTorch) path, labelled as such
    python -m kernels.bench --compile-only  # any machine: compile the kernels for sm_90, print
                                            # registers / spills per kernel (ptxas ships with Triton)
"""
import argparse
import datetime
import importlib
import itertools
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # `python kernels/bench.py`: make the package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels import masked_attention  # noqa: E402

MA = importlib.import_module("kernels.masked_attention")
HERE = os.path.dirname(os.path.abspath(__file__))
P = 0.1  # the paper's masking probability (section 4.1)

# (B, Lq, Lk): the default grid spans the SGTR decoder's range; --full is the cross product
DEFAULT_SHAPES = [(2, 100, 100), (8, 200, 600), (8, 300, 1500), (32, 100, 600), (32, 300, 1500)]
FULL_SHAPES = list(itertools.product((2, 8, 32), (100, 200, 300), (100, 600, 1500)))


# ---------------------------------------------------------------------------------------------------
# The contenders: each takes (q, k, v, seed) and returns the (B, H, Lq, D) output

def ours(q, k, v, seed):
    return masked_attention(q, k, v, P, seed)


def ours_p0(q, k, v, seed):
    return masked_attention(q, k, v, 0.0, seed)


def naive(q, k, v, seed):
    drop = torch.rand(q.shape[:3] + (k.shape[2],), device=q.device) < P      # (B, H, Lq, Lk)
    s = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    return torch.softmax(s.masked_fill(drop, float("-inf")), dim=-1) @ v


def sdpa_mask(q, k, v, seed):
    keep = torch.rand(q.shape[:3] + (k.shape[2],), device=q.device) >= P     # (B, H, Lq, Lk)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)


def sdpa(q, k, v, seed):
    return F.scaled_dot_product_attention(q, k, v)


_flex = None
_flex_seed = {}


def flex_hash(q, k, v, seed):
    """FlexAttention: the mask as a score_mod of a cheap integer hash of (seed, b, h, i, j).

    A different generator than ours (a two-round multiply-xorshift), so its masks differ; it stands
    for "what torch.compile gives you without writing a kernel"."""
    global _flex
    if _flex is None:
        from torch.nn.attention.flex_attention import flex_attention
        _flex = torch.compile(flex_attention, dynamic=False)
    H, Lq, Lk = q.shape[1], q.shape[2], k.shape[2]
    threshold = round(P * 65536)
    # the seed goes in as a tensor: a Python int would be baked into the compiled kernel and every
    # new seed would recompile it
    if q.device not in _flex_seed:
        _flex_seed[q.device] = torch.zeros((), dtype=torch.int64, device=q.device)
    seed_t = _flex_seed[q.device].fill_(seed & 0xFFFFFFFF)   # a fill kernel, no host-device copy

    def score_mod(score, b, h, i, j):
        x = ((((b * H + h) * Lq + i) * Lk + j).to(torch.int64) ^ seed_t) & 0xFFFFFFFF
        x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
        x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
        return torch.where(((x >> 16) ^ x) & 0xFFFF < threshold, float("-inf"), score)

    return _flex(q, k, v, score_mod=score_mod)


METHODS = {"ours": ours, "ours_p0": ours_p0, "naive": naive, "sdpa_mask": sdpa_mask,
           "flex_hash": flex_hash, "sdpa": sdpa}


# ---------------------------------------------------------------------------------------------------
# Timing and memory

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(fn, B, H, Lq, Lk, D, dtype, device, reps):
    """Median forward+backward milliseconds and peak extra MiB (above the inputs) of one method."""
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, device=device, dtype=dtype, generator=g).requires_grad_()
               for L in (Lq, Lk, Lk))
    dout = torch.randn(B, H, Lq, D, device=device, dtype=dtype, generator=g)
    seed = [0]

    def step():
        seed[0] += 1                               # a fresh mask every call, as in training
        out = fn(q, k, v, seed[0])
        torch.autograd.backward(out, dout)
        q.grad = k.grad = v.grad = None

    for _ in range(3):                             # compile / autotune / allocator warm-up
        step()
    _sync(device)
    peak = float("nan")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        _sync(device)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    times = []
    if device.type == "cuda":
        import triton.testing
        ms = triton.testing.do_bench(step, warmup=25, rep=200, return_mode="median")
        return ms, peak
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), peak


def run_grid(shapes, head_dims, dtype, device, reps, methods):
    rows = []
    for (B, Lq, Lk), D in itertools.product(shapes, head_dims):
        row = dict(B=B, H=8, Lq=Lq, Lk=Lk, D=D, mask_mib=B * 8 * Lq * Lk / 2**20)
        for name in methods:
            try:
                row[name] = measure(METHODS[name], B, 8, Lq, Lk, D, dtype, device, reps)
            except Exception as e:  # e.g. FlexAttention missing or failing to compile: say so
                row[name] = (float("nan"), float("nan"))
                row.setdefault("errors", []).append(f"{name}: {type(e).__name__}: {str(e)[:120]}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
        ratio_mask = row["sdpa_mask"][0] / row["ours"][0] if "sdpa_mask" in row else float("nan")
        ratio_floor = row["ours"][0] / row["sdpa"][0] if "sdpa" in row else float("nan")
        row["ratios"] = (ratio_mask, ratio_floor)
        print(f"B={B:2d} Lq={Lq:3d} Lk={Lk:4d} D={D:3d} | " + " | ".join(
            f"{n} {row[n][0]:.3f} ms" for n in methods) +
            f" | sdpa_mask/ours {ratio_mask:.2f}x, ours/sdpa {ratio_floor:.2f}x", flush=True)
        for e in row.get("errors", []):
            print("   ", e)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------
# Report: a markdown table (and a plot) written into one section of kernels/BENCH.md

def table(rows, methods, with_memory):
    head = "| B | Lq | Lk | D | " + " | ".join(f"{m} ms" for m in methods)
    head += " | sdpa_mask / ours | ours / sdpa |"
    if with_memory:
        head += " mask MiB | " + " | ".join(f"{m} MiB" for m in methods) + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        line = f"| {r['B']} | {r['Lq']} | {r['Lk']} | {r['D']} | " + " | ".join(
            f"{r[m][0]:.3f}" for m in methods) + f" | {r['ratios'][0]:.2f}x | {r['ratios'][1]:.2f}x |"
        if with_memory:
            line += f" {r['mask_mib']:.1f} | " + " | ".join(f"{r[m][1]:.1f}" for m in methods) + " |"
        lines.append(line)
    return "\n".join(lines)


def plot(rows, methods, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = [f"B{r['B']} {r['Lq']}x{r['Lk']} D{r['D']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows)), 4))
    width = 0.8 / len(methods)
    for n, m in enumerate(methods):
        ax.bar([i + n * width for i in range(len(rows))], [r[m][0] for r in rows], width, label=m)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))], labels, rotation=45, ha="right",
                  fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("forward + backward, ms (log)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_section(section, text, path=os.path.join(HERE, "BENCH.md")):
    """Replace the text between <!-- BEGIN section --> and <!-- END section --> in BENCH.md."""
    with open(path) as f:
        doc = f.read()
    begin, end = f"<!-- BEGIN {section} -->", f"<!-- END {section} -->"
    if begin not in doc or end not in doc:
        raise RuntimeError(f"{path} lacks the markers {begin} ... {end}")
    doc = doc[:doc.index(begin) + len(begin)] + "\n" + text.strip() + "\n" + doc[doc.index(end):]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(doc)
    os.replace(tmp, path)


def gpu_driver():
    """The NVIDIA driver's version as nvidia-smi reports it, or '?' (torch does not expose it)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.split()
        return out[0] if out else "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def environment(device):
    import triton
    if device.type == "cuda":
        name = (f"{torch.cuda.get_device_name(device)}, driver {gpu_driver()}, "
                f"CUDA {torch.version.cuda}")
    else:
        name = platform.processor() or "CPU"
        if os.path.exists("/proc/cpuinfo"):
            with open("/proc/cpuinfo") as f:
                models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
            name = f"{models[0]} ({len(models)} cores)" if models else name
        name += ", load average %.1f during the run" % os.getloadavg()[0]
    return (f"{name}; torch {torch.__version__}, Triton {triton.__version__}, "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")


def gpu_section(rows, methods, what, command, plot_file="bench.png"):
    """BENCH.md's GPU section for rows of run_grid: the three targets counted, then the table."""
    met_mask = sum(r["ratios"][0] >= 2.0 for r in rows)
    met_floor = sum(r["ratios"][1] <= 1.3 for r in rows)
    # out, lse and the three gradients are allocated by every method; what must not appear is
    # anything of the mask's size: ours may exceed the unmasked floor's peak by less than one mask
    no_mask_alloc = sum(r["ours"][1] - r["sdpa"][1] < r["mask_mib"] for r in rows)
    errors = sorted({e for r in rows for e in r.get("errors", [])})
    return (f"{what}, p = {P}, forward + backward, median of triton.testing.do_bench.\n"
            f"Command: `{command}`\n\n"
            f"Targets met on {met_mask}/{len(rows)} shapes (>= 2x faster than sdpa_mask), "
            f"{met_floor}/{len(rows)} (within 1.3x of sdpa), {no_mask_alloc}/{len(rows)} "
            f"(ours' peak memory exceeds unmasked sdpa's by less than one bool mask).\n"
            f"MiB columns: peak memory of one forward+backward above the inputs (the output and the "
            f"gradients included); `mask MiB` is the size of one (B, H, Lq, Lk) bool mask.\n\n"
            + table(rows, methods, with_memory=True)
            + (f"\n\n![forward+backward time]({plot_file})\n" if plot_file else "\n")
            + ("\nErrors:\n" + "\n".join(f"- {e}" for e in errors) + "\n" if errors else ""))


# ---------------------------------------------------------------------------------------------------
# Compile for a GPU without one

def compile_for_gpu(dtype="fp16", head_dim=64, arch=90, drop=True, precision="ieee"):
    """Compile the three attention kernels (default tiles, padding mask on) for sm_<arch> on any
    machine and return {kernel: {registers, stack_bytes, local_bytes, sass, tiles}}.

    The arguments are specialised as a launch on contiguous tensors would be (unit head-dim
    strides, 16-byte aligned pointers and strides), so the code is the one a GPU would run.
    `sass` counts the instructions of the whole kernel: compiling with drop=False shows how much
    code the in-kernel generator adds (a static measure, not a time). precision: tl.dot's
    input_precision for fp32 inputs, "ieee" (torch's default) or "tf32"."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    x = f"*{dtype}"
    jobs = {
        "_fwd_kernel": (dict(Q=x, K=x, V=x, O=x, LSE="*fp32", KPM="*i8"), MA.FWD_BLOCKS,
                        ("sqd", "skd", "svd", "sod")),
        "_bwd_dkdv_kernel": (dict(Q=x, K=x, V=x, DO=x, LSE="*fp32", DELTA="*fp32", DK=x, DV=x,
                                  KPM="*i8"), MA.BWD_DKDV_BLOCKS, ("sqd", "skd", "svd", "sdod")),
        "_bwd_dq_kernel": (dict(Q=x, K=x, V=x, DO=x, LSE="*fp32", DELTA="*fp32", DQ=x, KPM="*i8"),
                           MA.BWD_DQ_BLOCKS, ("sqd", "skd", "svd", "sdod")),
        "_bwd_delta_kernel": (dict(O=x, DO=x, DELTA="*fp32"), {head_dim: (64, None, 4)},
                              ("sod", "sdod")),
    }
    usage = {}
    for name, (pointers, blocks, unit_strides) in jobs.items():
        fn = getattr(MA, name)
        BM, BN, warps = blocks[head_dim]
        consts = dict(HAS_KPM=True, HAS_DROP=drop, D=head_dim, BLOCK_M=BM, BLOCK_N=BN,
                      PRECISION=precision, **{a: 1 for a in unit_strides})
        consts = {a: c for a, c in consts.items() if a in fn.arg_names}
        signature = {a: "constexpr" if a in consts else pointers.get(
            a, "fp32" if a in ("qk_scale", "sm_scale") else "i32") for a in fn.arg_names}
        aligned = [a for a in fn.arg_names if a not in consts and (a in pointers or a[0] == "s")
                   and not a.startswith("seed") and a != "skpm" and a != "KPM"]
        attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
        kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs),
                                target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps))
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "k.cubin")
            with open(path, "wb") as f:
                f.write(kernel.asm["cubin"])
            cuobjdump = os.path.join(bindir, "cuobjdump")
            res = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True,
                                 text=True, check=True).stdout
            sass = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True,
                                  check=True).stdout
        m = re.search(r"REG:(\d+).*?STACK:(\d+).*?LOCAL:(\d+)", res, re.S)
        usage[name] = dict(registers=int(m[1]), stack_bytes=int(m[2]), local_bytes=int(m[3]),
                           sass=len(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s", sass, re.M)),
                           tiles=(BM, BN or "-", warps))
    return usage


# ---------------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="every shape of the grid (slow)")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--reps", type=int, default=10, help="timing repetitions on CPU (GPU: 200 ms "
                    "of triton.testing.do_bench per method and shape)")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help="comma-separated subset of " + ", ".join(METHODS))
    ap.add_argument("--cpu", action="store_true", help="time the CPU path (no GPU needed)")
    ap.add_argument("--compile-only", action="store_true", help="compile for sm_90 and report")
    ap.add_argument("--no-write", action="store_true", help="print only, leave BENCH.md alone")
    args = ap.parse_args()

    if args.compile_only:
        import triton
        lines = ["| dtype (dot precision) | D | kernel | tiles (BM, BN, warps) | registers | spilled "
                 "(stack + local, B) | SASS instructions, p > 0 | SASS, p = 0 |",
                 "|---|---|---|---|---|---|---|---|"]
        configs = [("fp16", "ieee"), ("bf16", "ieee"), ("fp32", "tf32"), ("fp32", "ieee")]
        for (dtype, precision), D in itertools.product(configs, MA.HEAD_DIMS):
            with_gen = compile_for_gpu(dtype, D, precision=precision)
            without = compile_for_gpu(dtype, D, drop=False, precision=precision)
            for name, u in with_gen.items():
                spilled = u["stack_bytes"] + u["local_bytes"]
                label = dtype if dtype != "fp32" else f"fp32 ({precision})"
                print(f"sm_90 {label:12s} D={D:3d} {name:17s} tiles {u['tiles']}: {u['registers']} "
                      f"registers, {spilled} B spilled, {u['sass']} SASS instructions "
                      f"({without[name]['sass']} without the generator)", flush=True)
                lines.append(f"| {label} | {D} | {name} | {u['tiles']} | {u['registers']} | "
                             f"{spilled} | {u['sass']} | {without[name]['sass']} |")
        text = (f"Compiled on a machine without a GPU for sm_90 (H100) with Triton {triton.__version__}"
                f" (`python -m kernels.bench --compile-only`). Static counts, not timings.\n\n"
                + "\n".join(lines))
        if not args.no_write:
            write_section("compile", text)
        return

    if args.cpu:
        torch.set_num_threads(1)
        device = torch.device("cpu")
        shapes, dims = [(2, 100, 300)], [32]
        methods = ["ours", "ours_p0", "naive", "sdpa_mask", "sdpa"]
        print(f"CPU, 1 thread, {'Triton interpreter' if MA._interpreting() else 'plain-PyTorch path'}")
        rows = run_grid(shapes, dims, torch.float32, device, args.reps, methods)
        path = "Triton interpreter" if MA._interpreting() else "plain-PyTorch path (Philox in torch)"
        text = (f"CPU, one thread, float32, `ours` = the {path}. {environment(device)}.\n"
                f"Command: `OMP_NUM_THREADS=1 python -m kernels.bench --cpu`\n\n"
                + table(rows, methods, with_memory=False))
        if not args.no_write:
            write_section("cpu", text)
        return

    if not torch.cuda.is_available():
        sys.exit("kernels/bench.py: no CUDA GPU here (torch.cuda.is_available() is False); the "
                 "benchmark times the Triton kernels on a GPU. On this machine run "
                 "`python -m kernels.bench --cpu` (CPU path) or `--compile-only` (sm_90 compile check).")
    device = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    methods = args.methods.split(",")
    unknown = [m for m in methods + ["ours", "sdpa_mask", "sdpa"] if m not in METHODS]
    if unknown:
        sys.exit(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    methods = [m for m in METHODS if m in methods or m in ("ours", "sdpa_mask", "sdpa")]
    shapes = FULL_SHAPES if args.full else DEFAULT_SHAPES
    rows = run_grid(shapes, [32, 64], dtype, device, args.reps, methods)
    env = environment(device)
    if args.no_write:
        return
    plot(rows, methods, os.path.join(HERE, "bench.png"), f"masked cross-attention, {args.dtype}, {env}")
    text = gpu_section(rows, methods, f"{env}, {args.dtype}",
                       " ".join(["python -m kernels.bench"] + sys.argv[1:]))
    write_section("gpu", text)
    print("wrote kernels/BENCH.md and kernels/bench.png")


if __name__ == "__main__":
    main()
