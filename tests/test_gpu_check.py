"""Tests of gpu_check.py without a GPU: the CPU dry run, the time caps, and the SDPA + materialised
mask swap that its `steps` part compares the fused kernel with (it must draw the very same masks)."""
import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import gpu_check  # noqa: E402
from kernels import masked_attention  # noqa: E402

CUDA_PARTS = [name for name, _, needs_cuda in gpu_check.PARTS if needs_cuda]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is what a machine without a GPU does")
def test_cpu_dry_run_skips_each_cuda_part_in_one_line_and_runs_the_rest(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "gpu_check.py", "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    for name in CUDA_PARTS:
        mine = [l for l in lines if l.startswith(f"[{name}]")]
        assert len(mine) == 1, f"{name}: {mine}"
        assert "skipped" in mine[0] and "CUDA" in mine[0]
    assert sorted(os.listdir(out)) == ["gpu_check.json", "gpu_check.log", "gpu_check.md"]
    assert open(out / "gpu_check.log").read().splitlines() == lines   # the log is what was printed
    res = json.load(open(out / "gpu_check.json"))
    assert [n for n, p in res["parts"].items() if p["status"] == "skipped"] == CUDA_PARTS
    # the part that needs no GPU ran: the mirror with the kernel's path and with SDPA + mask agree
    mirror = res["parts"]["mirror"]
    assert mirror["status"] == "ok" and mirror["seconds"] < mirror["cap"]
    m = mirror["result"]
    assert m["masked_calls"] == 9 and m["same_seeds"]       # 3 decoder layers x 3 cross-attention blocks
    assert m["max_rel_err_out"] < 1e-5 and m["max_rel_err_grad"] < 1e-5
    assert "No GPU was available" in open(out / "gpu_check.md").read()


def test_a_part_past_its_cap_is_killed_and_recorded(tmp_path, monkeypatch):
    # `data` into an empty cache generates the dataset (about 10 s): with a 3 s cap it must be stopped
    monkeypatch.setenv("SGG_ALIGN_CACHE", str(tmp_path / "cache"))
    log = gpu_check.Log(str(tmp_path / "log.txt"))
    args = argparse.Namespace(out=str(tmp_path), rehearse=True)
    r = gpu_check.run_part("data", 3, args, log)
    assert r["status"] == "timeout" and r["seconds"] < 8
    assert "[data] timeout in" in open(tmp_path / "log.txt").read()


def test_sdpa_swap_applies_the_kernels_mask():
    g = torch.Generator().manual_seed(0)
    B, H, Lq, Lk, D, p, seed = 2, 4, 30, 70, 16, 0.3, 99
    q, k, v = (torch.randn(B, H, L, D, generator=g) for L in (Lq, Lk, Lk))
    kpm = torch.zeros(B, Lk, dtype=torch.bool)
    kpm[1, 50:] = True
    fused = masked_attention(q, k, v, p, seed, kpm)
    swap = gpu_check.sdpa_with_materialised_mask(q, k, v, kpm, p, seed)
    torch.testing.assert_close(swap, fused, atol=1e-5, rtol=1e-5)
    # another seed is another mask: the comparison above could fail
    other = gpu_check.sdpa_with_materialised_mask(q, k, v, kpm, p, seed + 1)
    assert (other - fused).abs().max() > 0.05
    # a row with every key padded or dropped gives zeros, as the kernel defines it
    kpm[0] = True
    assert (gpu_check.sdpa_with_materialised_mask(q, k, v, kpm, p, seed)[0] == 0).all()


def test_projection_and_ratios_from_step_times():
    base = dict(model="sgtr", sizes="vg", det_iters=1000, iters=2000, load_s_per_batch=0.1)
    runs = [dict(base, variant="detector", ms=100.0), dict(base, variant="baseline", ms=200.0),
            dict(base, variant="aligned", ms=300.0), dict(base, variant="aligned_sdpa_mask", ms=450.0),
            dict(base, variant="aligned_tf32", skipped=True)]
    proj = {p["arm"]: p["hours"] for p in gpu_check.projection(runs)}
    assert proj == pytest.approx({"baseline": (1000 * 100 + 2000 * 200) / 3.6e6,
                                  "aligned": (1000 * 100 + 2000 * 300) / 3.6e6})
    ratios = {r["what"]: r["ratio"] for r in gpu_check.step_ratios(runs)}
    assert ratios == pytest.approx({"aligned / baseline step": 1.5,
                                    "aligned with SDPA + mask / baseline step": 2.25,
                                    "SDPA + mask / fused kernel, aligned step": 1.5})
