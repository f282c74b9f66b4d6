"""Tests of kernels/masked_attention.py on CPU: the PyTorch path in this process, the Triton kernels
under the Triton interpreter in one subprocess.

Why a subprocess: Triton reads TRITON_INTERPRET when `@triton.jit` decorates a function, i.e. when
kernels is imported, and CI must not set it for the whole session (the model scripts' CPU training
would then crawl through the interpreter). So one child process with TRITON_INTERPRET=1 runs every
interpreter case on inputs written by this process and sends back its outputs; the tests here
compare them with the naive PyTorch version. The child exercises the real dispatch rule
(CPU tensor + TRITON_INTERPRET=1 -> Triton kernel).

Sizes are odd on purpose (Lq = 37, Lk = 53: not multiples of any tile or of the 8-key Philox group).
"""
import importlib
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from kernels import bernoulli_mask, masked_attention  # noqa: E402

MA = importlib.import_module("kernels.masked_attention")  # the module (its name is also the function's)

B, H, LQ, LK = 2, 2, 37, 53
P = 0.3
SEED = 20230203


def make_inputs(D, dtype, seed=0, noncontiguous=False):
    g = torch.Generator().manual_seed(seed)
    if noncontiguous:  # (B, L, H, D) transposed to (B, H, L, D), as a model's projection gives it
        q, k, v = (torch.randn(B, L, H, D, generator=g).to(dtype).transpose(1, 2) for L in (LQ, LK, LK))
    else:
        q, k, v = (torch.randn(B, H, L, D, generator=g).to(dtype) for L in (LQ, LK, LK))
    w = torch.randn(B, H, LQ, D, generator=g)  # loss = sum(out * w): every output element matters
    kpm = torch.zeros(B, LK, dtype=torch.bool)
    kpm[0, 45:] = True                         # a partially padded image
    kpm[1, 20:] = True
    return q, k, v, w, kpm


def reference_with_grads(q, k, v, w, p, seed, kpm):
    """Naive PyTorch version in fp32 (whatever the input dtype) and its gradients."""
    q, k, v = (t.detach().float().requires_grad_() for t in (q, k, v))
    out = MA.masked_attention_reference(q, k, v, p, seed, kpm)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    return (out.detach(),) + grads


# ---------------------------------------------------------------------------------------------------
# The interpreter cases (run in the child) and the fixture that runs them

# name -> (D, dtype, p, padding, noncontiguous, backward, blocks)
CASES = {
    "d16_fp32": (16, torch.float32, P, True, False, True, None),
    "d16_fp16": (16, torch.float16, P, True, False, True, None),
    "d32_fp32_noncontig": (32, torch.float32, P, True, True, True, None),
    "d32_fp16": (32, torch.float16, P, True, False, True, None),
    # other tiles than the defaults, forward and both backward kernels: still equal to the untiled
    # naive version, so the masks regenerated in the backward do not depend on tiles either
    "d32_fp32_small_tiles": (32, torch.float32, P, True, False, True,
                             ((16, 16, 4), (16, 32, 4), (32, 16, 4))),
    "d32_fp32_p0": (32, torch.float32, 0.0, True, False, True, None),
    "d32_fp32_p1": (32, torch.float32, 1.0, True, False, True, None),
    "d64_fp32_fwd": (64, torch.float32, P, True, False, False, None),
    "d128_fp32_fwd": (128, torch.float32, P, False, False, False, None),
}
# Reading the mask back out of the fused kernel: with q = 0 every logit is 0, so the output is the
# mean of the kept rows of v; with v = the identity (Lk <= D) out[i, j] > 0 exactly where (i, j) is kept.
READOUT_BLOCKS = {"readout_64x64": ((64, 64, 4),) * 3, "readout_16x16": ((16, 16, 4),) * 3,
                  "readout_32x16": ((32, 16, 4),) * 3}
MASK_SHAPES = {"mask_small": (2, 3, 37, 53), "mask_wide": (1, 2, 9, 1003)}


def _child_main(path_in, path_out):
    """Runs under TRITON_INTERPRET=1: every case through masked_attention's real dispatch."""
    assert MA._interpreting(), "the child must run the Triton kernels under the interpreter"
    inputs = torch.load(path_in, weights_only=True)
    res = {}
    for name, (D, dtype, p, padding, noncontig, backward, blocks) in CASES.items():
        q, k, v, w = (inputs[name][x] for x in ("q", "k", "v", "w"))
        if noncontig:
            q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
        q, k, v = (t.requires_grad_(backward) for t in (q, k, v))
        out = masked_attention(q, k, v, p, SEED, inputs["kpm"] if padding else None, _blocks=blocks)
        res[name] = {"out": out.detach()}
        if backward:
            res[name]["grads"] = torch.autograd.grad((out.float() * w).sum(), (q, k, v))
    for name, blocks in READOUT_BLOCKS.items():
        q = torch.zeros(B, H, LQ, 64)
        v = torch.eye(LK, 64).expand(B, H, LK, 64).contiguous()
        res[name] = masked_attention(q, torch.randn(B, H, LK, 64), v, P, SEED, _blocks=blocks)
    for name, shape in MASK_SHAPES.items():
        res[name] = bernoulli_mask(SEED, shape, P)
    res["mask_tiles_16x16"] = MA._bernoulli_mask_triton(
        *MA._check_seed_p(SEED, P), MASK_SHAPES["mask_small"], torch.device("cpu"), blocks=(16, 16))
    for name, D, dtype in (("bad_head_dim_error", 24, torch.float32),
                           ("bf16_error", 32, torch.bfloat16)):
        x = torch.zeros(1, 1, 4, D, dtype=dtype)
        try:
            masked_attention(x, x, x, P, SEED)
            res[name] = ""
        except (ValueError, TypeError) as e:
            res[name] = str(e)
    torch.save(res, path_out)


@pytest.fixture(scope="module")
def interp(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("interp")
    kpm = make_inputs(16, torch.float32)[4]
    inputs = {"kpm": kpm}
    for i, (name, (D, dtype, *_)) in enumerate(CASES.items()):
        q, k, v, w, _ = make_inputs(D, dtype, seed=i)
        inputs[name] = {"q": q, "k": k, "v": v, "w": w}
    torch.save(inputs, tmp / "in.pt")
    pythonpath = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONPATH=pythonpath)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(tmp / "in.pt"),
                           str(tmp / "out.pt")], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"interpreter child failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return inputs, torch.load(tmp / "out.pt", weights_only=True)


# tolerances against the fp32 reference: fp32 kernels agree to rounding; fp16 inputs round P
# and dS to 16 bits before the second matmuls (as FlashAttention does)
TOL = {torch.float32: 2e-5, torch.float16: 5e-3}


@pytest.mark.parametrize("name", [n for n in CASES if CASES[n][2] == P])
def test_interpreter_matches_naive_attention(interp, name):
    inputs, res = interp
    D, dtype, p, padding, _, backward, _ = CASES[name]
    x = inputs[name]
    ref = reference_with_grads(x["q"], x["k"], x["v"], x["w"], p, SEED, inputs["kpm"] if padding else None)
    got = (res[name]["out"],) + (tuple(res[name]["grads"]) if backward else ())
    assert got[0].dtype == dtype and got[0].shape == (B, H, LQ, D)
    for what, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
        err = (g.float() - r).abs().max().item()
        assert err < TOL[dtype], f"{name}: {what} differs from the naive version by {err:.2e}"
        assert torch.isfinite(g).all()


def test_interpreter_p0_is_ordinary_attention(interp):
    inputs, res = interp
    x, kpm = inputs["d32_fp32_p0"], inputs["kpm"]
    q, k, v = (t.clone().requires_grad_() for t in (x["q"], x["k"], x["v"]))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=~kpm[:, None, None, :])
    ref_grads = torch.autograd.grad((ref * x["w"]).sum(), (q, k, v))
    for g, r in zip((res["d32_fp32_p0"]["out"],) + tuple(res["d32_fp32_p0"]["grads"]),
                    (ref,) + ref_grads):
        torch.testing.assert_close(g, r.detach(), atol=2e-5, rtol=1e-4)


def test_interpreter_p1_gives_zeros_and_zero_grads(interp):
    _, res = interp
    r = res["d32_fp32_p1"]
    for t in (r["out"],) + tuple(r["grads"]):
        assert torch.isfinite(t).all() and (t == 0).all()


def test_interpreter_mask_is_the_torch_mask_bit_for_bit(interp):
    _, res = interp
    for name, shape in MASK_SHAPES.items():
        assert torch.equal(res[name], bernoulli_mask(SEED, shape, P)), name
    assert torch.equal(res["mask_tiles_16x16"], res["mask_small"])  # mask kernel at other tiles


@pytest.mark.parametrize("name", list(READOUT_BLOCKS))
def test_attention_kernel_applies_exactly_this_mask_at_any_tile_size(interp, name):
    _, res = interp
    kept = res[name][..., :LK] > 0                                         # (B, H, Lq, Lk)
    assert torch.equal(kept, ~bernoulli_mask(SEED, (B, H, LQ, LK), P))
    assert (res[name][..., LK:] == 0).all()


def test_interpreter_rejects_what_it_cannot_run(interp):
    _, res = interp
    assert "head dims" in res["bad_head_dim_error"] and "24" in res["bad_head_dim_error"]
    # Triton's interpreter stores bf16 as uint16 and multiplies the integers: an error, not garbage
    assert "bfloat16" in res["bf16_error"]


# ---------------------------------------------------------------------------------------------------
# The generator and the mask (PyTorch path, this process)

def test_philox_matches_random123_known_answers():
    # Random123's kat_vectors for philox4x32_10: (counter, key) -> output
    kat = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
           ((U := 0xFFFFFFFF, U, U, U), (U, U), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
           ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for ctr, key, expected in kat:
        out = MA.philox4x32_torch(*(torch.tensor([c]) for c in ctr), *key)
        assert tuple(int(o) for o in out) == expected


def test_mask_reproducible_and_seed_dependent():
    shape = (2, 3, 37, 53)
    m = bernoulli_mask(SEED, shape, P)
    assert m.shape == shape and m.dtype == torch.bool
    assert torch.equal(m, bernoulli_mask(SEED, shape, P))
    other = bernoulli_mask(SEED + 1, shape, P)
    disagree = (m != other).float().mean().item()      # independent masks: 2 p (1 - p) = 0.42
    assert abs(disagree - 2 * P * (1 - P)) < 0.02
    hi = bernoulli_mask(SEED + 2**32, shape, P)        # the seed's upper 32 bits matter too
    assert abs((m != hi).float().mean().item() - 2 * P * (1 - P)) < 0.02
    # a mask is a pure function of (seed, b, h, i, j): a sub-shape is the corner of a bigger one
    assert torch.equal(bernoulli_mask(SEED, (3, 4, 40, 61), P)[:2, :3, :37, :53], m)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_mask_drop_rate_and_independence(p):
    m = bernoulli_mask(7, (2, 4, 300, 1000), p).float()   # 2.4M decisions
    assert abs(m.mean().item() - p) < 0.002               # the issue asks for +-1%; 6 sigma is 0.002
    # each of the 8 decisions drawn from one Philox call (keys 64 a + 8 s + r, s = 0..7) has rate p,
    # and the decisions of one call, and neighbours, are independent draws
    calls = m[..., :960].reshape(2, 4, 300, 15, 8, 8)                    # (B, H, Lq, a, s, r)
    for s in range(8):
        assert abs(calls[..., s, :].mean().item() - p) < 0.005, f"decision slot {s}"
    both = (calls[..., 0, :] * calls[..., 1, :]).mean().item()          # two halves of one word
    assert abs(both - p * p) < 0.005
    for a, b in ((m[..., :-1], m[..., 1:]), (m[..., :-1, :], m[..., 1:, :]), (m[:, :-1], m[:, 1:])):
        assert abs((a * b).mean().item() - p * p) < 0.005


def test_mask_extremes_and_threshold_resolution():
    assert not bernoulli_mask(1, (1, 1, 30, 70), 0.0).any()
    assert bernoulli_mask(1, (1, 1, 30, 70), 1.0).all()
    # 16-bit numbers: p = 1/65536 is representable, p = 0.1 is 6554/65536
    assert MA._check_seed_p(0, 0.1)[2] == 6554


def test_bad_arguments_name_the_problem():
    q = torch.zeros(1, 2, 5, 16)
    k = torch.zeros(1, 2, 7, 16)
    with pytest.raises(ValueError, match="p must lie in"):
        masked_attention(q, k, k, 1.5, 0)
    with pytest.raises(ValueError, match="seed must lie in"):
        masked_attention(q, k, k, 0.1, -1)
    with pytest.raises(TypeError, match="seed must be"):
        masked_attention(q, k, k, 0.1, 0.5)
    with pytest.raises(ValueError, match="key_padding_mask"):
        masked_attention(q, k, k, 0.1, 0, key_padding_mask=torch.zeros(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="k and v must be"):
        masked_attention(q, torch.zeros(1, 2, 7, 8), k, 0.1, 0)


# ---------------------------------------------------------------------------------------------------
# The PyTorch path (what the model scripts run on CPU)

def test_torch_path_matches_sdpa_with_the_materialised_mask():
    """An independent check of the naive version's semantics: -inf before the softmax, the rest
    renormalised, i.e. SDPA with attn_mask = kept & not padded (on rows that keep a key)."""
    q, k, v, w, kpm = make_inputs(32, torch.float32)
    out = masked_attention(q, k, v, P, SEED, kpm)
    allowed = ~bernoulli_mask(SEED, (B, H, LQ, LK), P) & ~kpm[:, None, None, :]
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    rows = allowed.any(-1)                                                  # (B, H, Lq)
    assert rows.float().mean() > 0.9
    torch.testing.assert_close(out[rows], ref[rows], atol=1e-5, rtol=1e-5)
    # not dropout after the softmax: that would give a different result
    attn = torch.softmax((q @ k.transpose(-1, -2) / math.sqrt(32)).masked_fill(kpm[:, None, None], -math.inf), -1)
    dropout_like = (attn * allowed / (1 - P)) @ v
    assert (out - dropout_like).abs().max() > 0.1


def test_torch_path_empty_rows_give_zeros_and_zero_grads():
    q, k, v, w, kpm = make_inputs(16, torch.float32)
    kpm[1] = True                                                           # image 1: no keys at all
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = masked_attention(q, k, v, P, SEED, kpm)
    dq, dk, dv = torch.autograd.grad((out * w).sum(), (q, k, v))
    assert (out[1] == 0).all() and (dq[1] == 0).all() and (dk[1] == 0).all() and (dv[1] == 0).all()
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all()
    assert (out[0] != 0).any() and (dq[0] != 0).any()
    out = masked_attention(q, k, v, 1.0, SEED)                              # p = 1: all rows empty
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    assert all((t == 0).all() for t in (out,) + grads)


# Triton 3.9 warns here unless TRITON_DEFAULT_FP_FUSION is set, which conftest.py does (to Triton 3.9's default)
@pytest.mark.filterwarnings("error:TRITON_DEFAULT_FP_FUSION is unset")
def test_compiles_for_h100_without_a_gpu():
    """Triton compiles the CUDA kernels to sm_90 machine code on any machine (ptxas ships with it):
    catches errors that only the GPU compiler sees (shapes, types, register spills)."""
    if MA._interpreting():
        pytest.skip("TRITON_INTERPRET=1: the kernels are interpreter functions, not compilable")
    bench = importlib.import_module("kernels.bench")
    try:
        usage = bench.compile_for_gpu(dtype="fp16", head_dim=32)
    except ImportError as e:  # Triton internals moved
        pytest.skip(f"cannot reach Triton's compiler API: {e}")
    assert set(usage) == {"_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel", "_bwd_delta_kernel"}
    for name, u in usage.items():  # spilled registers show up as stack (or local) bytes
        assert u["stack_bytes"] + u["local_bytes"] == 0, f"{name} spills registers: {u}"


if __name__ == "__main__":
    _child_main(sys.argv[1], sys.argv[2])


# ---------------------------------------------------------------------------------------------------
# On a CUDA GPU only (skipped elsewhere, e.g. in CI): the compiled kernels themselves

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}


def cuda_inputs(Bc, Hc, Lq, Lk, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(Bc, Hc, L, D, generator=g).to("cuda", dtype) for L in (Lq, Lk, Lk))
    kpm = torch.zeros(Bc, Lk, dtype=torch.bool)
    kpm[0, Lk - 9:] = True
    kpm[-1, Lk // 3:] = True
    return q, k, v, kpm.cuda()


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [16, 32, 64, 128])
def test_cuda_kernel_matches_naive_attention(D, dtype):
    q, k, v, kpm = cuda_inputs(2, 3, 77, 301, D, dtype)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    w = torch.randn(2, 3, 77, D, device="cuda")
    out = masked_attention(q, k, v, P, SEED, kpm)
    got = (out,) + torch.autograd.grad((out.float() * w).sum(), (q, k, v))
    ref = reference_with_grads(q.cpu(), k.cpu(), v.cpu(), w.cpu(), P, SEED, kpm.cpu())
    for what, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
        err = (g.float().cpu() - r).abs().max().item()
        assert err < GPU_TOL[dtype], f"D={D} {dtype}: {what} off by {err:.2e}"


@cuda
def test_cuda_mask_is_the_cpu_mask_and_the_kernel_applies_it():
    shape = (2, 3, 77, 301)
    assert torch.equal(bernoulli_mask(SEED, shape, P, "cuda").cpu(), bernoulli_mask(SEED, shape, P))
    q = torch.zeros(2, 3, 77, 128, device="cuda")                    # readout: see READOUT_BLOCKS
    v = torch.eye(100, 128, device="cuda").expand(2, 3, 100, 128).contiguous()
    out = masked_attention(q, torch.randn_like(v), v, P, SEED)
    assert torch.equal((out[..., :100] > 0).cpu(), ~bernoulli_mask(SEED, (2, 3, 77, 100), P))


@cuda
def test_cuda_p1_zeros_determinism_and_no_mask_sized_allocation():
    q, k, v, _ = cuda_inputs(4, 8, 300, 1500, 64, torch.float16)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    dout = torch.randn_like(q)
    out = masked_attention(q, k, v, 1.0, SEED)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    assert all((t == 0).all() for t in (out,) + grads)
    runs = []
    for _ in range(2):  # no atomics anywhere: bitwise reproducible
        out = masked_attention(q, k, v, P, SEED)
        runs.append((out,) + torch.autograd.grad(out, (q, k, v), dout))
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    del out, runs
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = masked_attention(q, k, v, P, SEED)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    io = sum(t.numel() * t.element_size() for t in (out,) + grads) + 2 * 4 * 8 * 300 * 4  # + lse, delta
    mask_bytes = 4 * 8 * 300 * 1500                                   # one bool (B, H, Lq, Lk) mask
    assert extra < io + mask_bytes // 8, f"peak {extra / 2**20:.1f} MiB, outputs {io / 2**20:.1f} MiB"
