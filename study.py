"""The reproduction study: every experiment of the paper's tables, run on the built-in data, one way.

The two model files train one model each. This script is the experiment tooling around them: which runs
make up the study (seeds, baseline vs aligned, ablations, the p and lambda sweeps), running them, and the
tables and figures made from their results. Each run is one ordinary command of a model file; this script
only launches it, keeps its results and writes down the command.

    python study.py list [WHAT ...]        # the study's runs and which are done
    python study.py run WHAT [WHAT ...]    # run those not done yet (--jobs 2: two at once, one core each)
    python study.py report                 # results/README.md and the figures, from results/ alone
    python study.py verify RUN             # rerun one finished run and check its metrics.json is identical
    python study.py bench motifs|sgtr      # a training step with and without the alignment and the feature cache
    python study.py bench motifs-eval      # Motifs' evaluation with and without its shared work (--data vgshape)
    python study.py variance motifs|sgtr   # docs/variance.md's tables: where the spread between seeds comes from
    python study.py spread motifs|sgtr     # before any aligned run: the noise a paired difference will have

WHAT is a table (table1 ... table5), a run name, or a pattern over run names ('motifs-predcls-*').

A run named N trains into runs/study/N/ (checkpoints live there, and a killed run resumes from there);
when it ends, results/N/ receives its args.json, metrics.json, log.txt, run.json (which table and arm,
seed, wall and CPU seconds) and command.txt (the one command that reproduces its metrics exactly on a
machine like ours). results/ holds no checkpoints, and a run whose results/N/ exists is never redone.
"""
import argparse
import dataclasses
import fnmatch
import inspect
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time

# Exact numbers depend on the CPU's instruction set. torch (ATen), oneDNN and MKL pick AVX-512 kernels where the
# CPU has them, whose float sums differ in the last bits from the AVX2 kernels; a trained model amplifies that
# (the quick start's mR@50 moved by 6.8 points). Every published number of this project was made with the AVX2
# kernels, which every x86-64 CPU of the last decade has, so they are pinned here, before torch is imported,
# unless the user has set these variables. SGG_ALIGN_ISA=native turns the pin off (faster on AVX-512, other
# digits). Each run records the instruction set it used (torch.backends.cpu.get_cpu_capability()).
if platform.machine().lower() in ("x86_64", "amd64") and os.environ.get("SGG_ALIGN_ISA", "avx2") != "native":
    for _var, _value in (("ATEN_CPU_CAPABILITY", "avx2"), ("ONEDNN_MAX_CPU_ISA", "AVX2"),
                         ("MKL_ENABLE_INSTRUCTIONS", "AVX2")):
        os.environ.setdefault(_var, _value)

import numpy as np

ROOT = os.path.dirname(os.path.abspath(__file__))
SEEDS = (0, 1, 2, 3)

# The two studies, one per built-in dataset (docs/data.md). Each keeps its finished runs in its own folder of
# results/ and trains in its own runs folder; every run of the VG-shaped study adds `--data vgshape` and the
# protocol flags of docs/variance.md to its model file's command.
STUDIES = {
    # its frozen detectors' outputs take 4.1 GB (Motifs PredCls), over the model files' default cap of 4;
    # SGTR's DETR pretrained for the default 750 iterations finds little on these crowded scenes (test
    # mAP@0.5 0.027, against 0.32 on the small data): docs/variance.md
    "vgshape": dict(results="results/vgshape", runs_dir="runs/study-vgshape",
                    flags=["--data", "vgshape", "--feature-cache-gb", "8"],
                    sgtr_flags=["--det-iters", "3000", "--iters", "2400"],   # the most an aligned run fits in 45 min
                    sgtr600_flags=["--det-iters", "3000"],
                    motifs_flags=["--iters", "2000"],   # its baseline's validation mR@50 still rose at 1000
                    # 16 epochs of the 6,945 training images at batch 8; --feature-cache-gb 10 also keeps the
                    # validation images' union RoIAlign (5.2 GB; docs/running.md), the same digits as with 8
                    **{"motifs-long_flags": ["--iters", "13900", "--eval-every", "1000", "--feature-cache-gb", "10"]},
                    note="Its protocol, fixed from baseline runs alone before the first aligned run: Motifs trains "
                         "2,000 iterations, SGTR 2,400 on a detector pretrained for 3,000, every run adds `--data "
                         "vgshape --feature-cache-gb 8` (the long schedule 10, and its own length), and each "
                         "comparison gets at least 4 paired seeds.",
                    title="the VG-shaped data (--data vgshape)",
                    tables=("table1", "table2", "table3", "record", "long")),
    "synthetic": dict(results="results/synthetic", runs_dir="runs/study", flags=[],
                      title="the small built-in data (--data synthetic)",
                      note="Its runs rerun the frozen detector at every step (`--feature-cache-gb 0`), as the "
                           "model files did before the feature cache.",
                      tables=("table1", "table2", "table3", "table4", "table5", "record")),
}

# ----------------------------------------------------------------------------------------------
# The paper's numbers (Visual Genome), for the tables' "paper" rows

PAPER = {
    # Table 1, SGDet, mean ± std over 4 runs.
    "table1": {"SGTR*": {"mR@50": "12.0 ± 0.4", "mR@100": "16.0 ± 0.5", "R@50": "23.7 ± 0.4", "R@100": "26.9 ± 0.4",
                         "head_mR@100": "26.4 ± 0.3", "body_mR@100": "20.0 ± 0.3", "tail_mR@100": "8.8 ± 0.8"},
               "Align-SGTR*": {"mR@50": "12.7 ± 0.3", "mR@100": "16.8 ± 0.2", "R@50": "24.6 ± 0.2",
                               "R@100": "27.8 ± 0.2", "head_mR@100": "27.3 ± 0.2", "body_mR@100": "20.8 ± 0.1",
                               "tail_mR@100": "9.8 ± 0.5"}},
    # Table 2, mR@20/50/100 per protocol, mean ± std over 4 runs (the paper gives no R@K there).
    "table2": {mode: {"Motifs*": dict(zip(("mR@20", "mR@50", "mR@100"), base)),
                      "Align-Motifs*": dict(zip(("mR@20", "mR@50", "mR@100"), align))}
               for mode, base, align in (
                   ("predcls", ("15.0 ± 0.8", "19.8 ± 0.9", "21.9 ± 0.9"), ("16.5 ± 0.4", "21.7 ± 0.5", "24.2 ± 0.5")),
                   ("sgcls", ("7.2 ± 0.3", "8.9 ± 0.4", "9.6 ± 0.4"), ("8.2 ± 0.2", "10.5 ± 0.2", "11.5 ± 0.3")),
                   ("sgdet", ("4.2 ± 0.4", "5.9 ± 0.5", "7.2 ± 0.3"), ("4.4 ± 0.2", "6.4 ± 0.3", "7.8 ± 0.3")))},
    # Table 3 (SGTR, validation, one run): mR@50, mR@100, R@50, R@100.
    "table3": {"SGTR": (14.9, 18.4, 24.0, 27.4), "SGTR + SA + UPH": (15.0, 18.6, 24.5, 27.8),
               "SGTR + SSA + PH": (15.9, 19.2, 24.6, 27.9), "SGTR + SSA + UPH": (16.0, 20.5, 24.8, 27.9)},
    # Tables 4 and 5 (Motifs PredCls, validation, one run): mR@50, mR@100.
    "table4": {"Motifs": (22.1, 24.2), "p = 0.05": (23.7, 25.9), "p = 0.1": (23.9, 26.2), "p = 0.2": (23.5, 25.8),
               "p = 0.4": (23.2, 25.4), "p = 0.6": (22.8, 24.8)},
    "table5": {"Motifs": (22.1, 24.2), "λ = 0.1": (22.0, 23.5), "λ = 1": (23.8, 25.9), "λ = 10": (23.9, 26.2),
               "λ = 50": (22.5, 24.2), "λ = 100": (21.7, 23.4)},
}

# ----------------------------------------------------------------------------------------------
# The study: every run, named


FIRST_SGTR = ["--pred-loss", "softmax", "--post-process", "ours", "--iters", "600"]


def study_runs(seeds=SEEDS, study="synthetic"):
    """-> list of run dicts: name, script, args (the model file's flags), tables, arm, mode, seed."""
    runs, tables_here = [], STUDIES[study]["tables"]

    def add(name, model, mode, arm, seed, args, tables):
        tables = [t for t in tables if t in tables_here]
        if not tables:
            return
        script = "motifs_align.py" if model.startswith("motifs") else "sgtr_align.py"
        flags = merge_flags(STUDIES[study]["flags"], STUDIES[study].get(f"{model}_flags", []))
        seed_args = [] if seed is None else ["--seed", str(seed)]
        runs.append(dict(name=name, model=model, script=script, args=args + flags + seed_args, tables=tables,
                         arm=arm, mode=mode, seed=seed))

    for mode in ("predcls", "sgcls", "sgdet"):   # Table 2, with the frequency prior alone as a floor
        add(f"motifs-{mode}-freq", "motifs", mode, "FREQ", None, [f"--{mode}", "--freq-baseline"], ["table2"])
    for s in seeds:
        add(f"sgtr-sgdet-baseline-seed{s}", "sgtr", "sgdet", "baseline", s, ["--no-align"], ["table1", "table3"])
        add(f"sgtr-sgdet-align-seed{s}", "sgtr", "sgdet", "align", s, [], ["table1", "table3"])
        for mode in ("predcls", "sgcls", "sgdet"):
            extra = ["table3", "table4", "table5"] if mode == "predcls" else []
            add(f"motifs-{mode}-baseline-seed{s}", "motifs", mode, "baseline", s, [f"--{mode}", "--no-align"],
                ["table2"] + extra)
            add(f"motifs-{mode}-align-seed{s}", "motifs", mode, "align", s, [f"--{mode}"], ["table2"] + extra)
        # Table 3: supervised alignment (SA) instead of KL, and the tied projection head (PH).
        for model, mode, flag in (("motifs", "predcls", ["--predcls"]), ("sgtr", "sgdet", [])):
            add(f"{model}-{mode}-sa-seed{s}", model, mode, "SA", s, flag + ["--align-loss", "supervised"], ["table3"])
            add(f"{model}-{mode}-ph-seed{s}", model, mode, "PH", s, flag + ["--tied-head"], ["table3"])
        # The studies' first SGTR, kept as a record (docs/variance.md says why SGTR changed): the softmax predicate
        # head, our post-processing, 600 iterations. Its folders were named sgtr-sgdet-* when they were made.
        for arm, flag in (("baseline", ["--no-align"]), ("align", []), ("SA", ["--align-loss", "supervised"]),
                          ("PH", ["--tied-head"])):
            add(f"sgtr600-sgdet-{arm.lower()}-seed{s}", "sgtr600", "sgdet", arm, s, flag + FIRST_SGTR, ["record"])
        # Tables 4 and 5 on Motifs PredCls (p = 0.1, lambda = 10 is the aligned run above).
        for p in ("0.05", "0.2", "0.3"):
            add(f"motifs-predcls-p{p}-seed{s}", "motifs", "predcls", f"p = {p}", s,
                ["--predcls", "--mask-p", p], ["table4"])
        for lam in ("1", "5", "20"):
            add(f"motifs-predcls-lambda{lam}-seed{s}", "motifs", "predcls", f"λ = {lam}", s,
                ["--predcls", "--align-weight", lam], ["table5"])
        # The long schedule (issue: the alignment at the paper's training length): Motifs PredCls, the same
        # cosine stretched to 16 epochs of the VG-shaped train split, validated every 1,000 iterations.
        for arm, flag in (("baseline", ["--no-align"]), ("align", [])):
            add(f"motifs-predcls-long-{arm}-seed{s}", "motifs-long", "predcls", arm, s, ["--predcls"] + flag,
                ["long"])
    return runs


def merge_flags(common, specific):
    """The study's flags, then the model's: a '--name value' pair of the model's replaces the study's."""
    names = set(specific[0::2])
    kept = [x for pair in zip(common[0::2], common[1::2]) if pair[0] not in names for x in pair]
    return kept + specific


def select(runs, what):
    """Runs named by a table, a run name or a pattern, in the study's order."""
    def named(r, w):
        return w in r["tables"] or fnmatch.fnmatch(r["name"], w)
    chosen = [r for r in runs if any(named(r, w) for w in what)]
    unmatched = [w for w in what if not any(named(r, w) for r in runs)]
    if unmatched:
        raise SystemExit(f"error: {', '.join(unmatched)} names no run of the study (see `python study.py list`)")
    return chosen


# ----------------------------------------------------------------------------------------------
# Running: one model-file command per run, results copied into results/<name>/


def command(run, runs_dir, extra):
    """The exact command of a run, as written to command.txt (one thread: the runs' timings and the
    metrics are those of `--threads 1`, the scripts' default)."""
    out = os.path.join(runs_dir, run["name"])
    return ["python", run["script"], *run["args"], *extra, "--out", out]


def run_one(run, runs_dir, extra, core=None):
    """Start (or resume) one run -> (Popen, its stdout file, the command for command.txt)."""
    cmd = command(run, runs_dir, extra)
    out = cmd[-1]
    argv = [sys.executable, *cmd[1:]]
    # (a finished folder never comes here: run_study keeps its results instead of starting it)
    if os.path.isfile(os.path.join(out, "ckpt_last.pt")):
        argv.append("--resume")   # a run killed earlier continues where it stopped (and ends the same)
    elif os.path.isfile(os.path.join(out, "args.json")):
        # killed before its first checkpoint: nothing to resume, and the model file rightly refuses to write
        # into it; kept (moved aside, never deleted), and the run starts afresh
        aside = f"{out}.unfinished-{time.strftime('%Y%m%d-%H%M%S')}"
        os.rename(out, aside)
        print(f"{run['name']}: {out} was killed before its first checkpoint; moved to {aside}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    os.makedirs(runs_dir, exist_ok=True)
    pin = (lambda: os.sched_setaffinity(0, {core})) if core is not None and hasattr(os, "sched_setaffinity") else None
    stdout = open(os.path.join(runs_dir, run["name"] + ".stdout"), "a")
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=stdout, stderr=subprocess.STDOUT, preexec_fn=pin)
    return proc, stdout, cmd


def collect(run, results, runs_dir, wall, cpu):
    """Copy a finished run's results into results/<name>/ (written under a temporary name, then renamed).
    wall, cpu: its seconds, or None where they were not measured (run.json then says so)."""
    out, dest = os.path.join(runs_dir, run["name"]), os.path.join(results, run["name"])
    tmp = dest + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)   # only ever our own unfinished copy
    os.makedirs(tmp)
    for f in ("args.json", "metrics.json", "log.txt"):
        shutil.copy(os.path.join(out, f), tmp)
    with open(os.path.join(tmp, "command.txt"), "w") as f:
        f.write("OMP_NUM_THREADS=1 " + " ".join(shlex.quote(c) for c in run["cmd"]) + "\n")
    with open(os.path.join(tmp, "run.json"), "w") as f:
        json.dump({k: run[k] for k in ("model", "mode", "arm", "seed", "tables")} |
                  {"wall_seconds": None if wall is None else round(wall, 1),
                   "cpu_seconds": None if cpu is None else round(cpu, 1)}, f, indent=1)
    os.rename(tmp, dest)


def run_study(todo, results, runs_dir, extra, jobs):
    """Run `todo` with at most `jobs` at once, each pinned to its own core. The first run of each model
    script runs alone: it trains the cached Faster R-CNN that the next ones reuse."""
    started, waiting, t0 = {}, list(todo), time.time()
    first_of = {r["script"] for r in todo}
    done = 0
    while waiting or started:
        alone = any(r["script"] in first_of for r in started.values())
        while waiting and len(started) < jobs and not alone:
            r = waiting.pop(0)
            if os.path.isfile(os.path.join(runs_dir, r["name"], "metrics.json")):
                # it finished, but the study stopped before keeping its results: keep them now (a model file
                # rightly refuses to start again in a finished folder); its time was not measured
                collect(dict(r, cmd=command(r, runs_dir, extra)), results, runs_dir, None, None)
                done += 1
                print(f"[{done}/{len(todo)}] {r['name']}: had finished in {runs_dir}; its results are kept now "
                      f"(its time was not measured)", flush=True)
                continue
            core = ({0, 1} - {c for c, _ in started}).pop() if jobs > 1 else None
            proc, log, cmd = run_one(r, runs_dir, extra, core)
            started[(core, proc.pid)] = dict(r, proc=proc, log=log, cmd=cmd, t=time.time())
            print(f"{r['name']}: started ({len(started)} running, {done} of {len(todo)} done)", flush=True)
            alone = r["script"] in first_of
        if not started:
            continue
        pid, status, usage = os.wait4(-1, 0)
        key = next(k for k in started if k[1] == pid)
        r = started.pop(key)
        r["log"].close()
        first_of.discard(r["script"])
        done += 1
        wall, cpu = time.time() - r["t"], usage.ru_utime + usage.ru_stime
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"error: {r['name']} failed (exit {os.waitstatus_to_exitcode(status)}); its output "
                             f"is in {os.path.join(runs_dir, r['name'] + '.stdout')}")
        collect(r, results, runs_dir, wall, cpu)
        m = read_json(os.path.join(results, r["name"], "metrics.json"))
        print(f"[{done}/{len(todo)}] {r['name']}: done in {wall / 60:.1f} min ({cpu / 60:.1f} CPU min) | "
              f"R@50 {100 * m['R@50']:.2f} | mR@50 {100 * m['mR@50']:.2f} | "
              f"study so far {(time.time() - t0) / 60:.0f} min", flush=True)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def saved_config(module, args):
    """A model file's Config from a checkpoint's saved args (fields the file no longer has are left out)."""
    known = {f.name for f in dataclasses.fields(module.Config)}
    # a run made before the feature cache existed ran its frozen detector at every step
    args = {"feature_cache_gb": 0, **args}
    if module.__name__ == "sgtr_align":   # an SGTR run made before these settings existed had what is now softmax / ours
        args = {"pred_loss": "softmax", "post_process": "ours", **args}
    return module.Config(**{k: v for k, v in args.items() if k in known})


# ----------------------------------------------------------------------------------------------
# The report: tables and figures from results/ alone

def pyplot():
    """matplotlib.pyplot, drawing to files only (Agg); imported when a figure is made, not at start-up."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def pct(values):
    """'mean ± std' in percent (sample std, ddof = 1; no ± for one value)."""
    v = 100 * np.asarray(values, dtype=float)
    if len(v) == 0:
        return "-"
    return f"{v.mean():.2f} ± {v.std(ddof=1):.2f}" if len(v) > 1 else f"{v.mean():.2f}"


def paired(base, arm, key):
    """The per-seed difference arm - baseline on the seeds both have -> 'mean ± SE (n)' in points."""
    seeds = sorted(set(base) & set(arm))
    d = np.array([100 * (arm[s][key] - base[s][key]) for s in seeds if key in arm[s] and key in base[s]])
    if len(d) < 2:
        return "-" if len(d) == 0 else f"{d.mean():+.2f} (n = 1)"
    return f"{d.mean():+.2f} ± {d.std(ddof=1) / np.sqrt(len(d)):.2f} (n = {len(d)})"


def val_mr50(m):
    return m.get("best_val_mR@50", m.get("val_mR@50"))


def load_results(results):
    """-> (last, best, records): last and best are {(model, mode, arm): {seed: metrics}}, records the list
    of run.json records. Each run's files are read once.

    last: what the study compares (docs/variance.md), the weights of the last iteration, metrics.json's
    "final", with "val_mR@50" their validation mR@50. best: the checkpoint with the best validation mR@50
    (the paper's model selection), metrics.json's top level. FREQ runs train nothing: both are their one
    evaluation."""
    last, best, records = {}, {}, []
    for name in sorted(os.listdir(results)):
        folder = os.path.join(results, name)
        if not os.path.isfile(os.path.join(folder, "run.json")):
            continue
        info, m = read_json(os.path.join(folder, "run.json")), read_json(os.path.join(folder, "metrics.json"))
        if info["arm"] != "FREQ" and "final" not in m:
            raise SystemExit(f"error: {folder}/metrics.json has no \"final\" (the last iteration's test "
                             f"metrics): the run predates them; move the folder away and run it again")
        if val_mr50(m) is not None:
            m["val_mR@50"] = val_mr50(m)
        key = (info["model"], info["mode"], info["arm"])
        last.setdefault(key, {})[info["seed"]] = m if info["arm"] == "FREQ" else m["final"]
        best.setdefault(key, {})[info["seed"]] = m
        # a run resumed after a stop was timed from its resume only (its run.json holds that process's time)
        log = os.path.join(folder, "log.txt")
        info["resumed"] = os.path.isfile(log) and any(line.startswith("resumed from ")
                                                      for line in open(log, encoding="utf-8"))
        records.append(info)
    return last, best, records


def arm_table(lines, res, model, mode, arms, keys, paper=None, best=None, between=()):
    """A markdown table: one row per arm (mean ± std), one per arm's paired difference to the baseline,
    then those of `between`, (arm, other arm) pairs, the same differences to the baseline for the
    best-validation checkpoints (from `best`, load_results' second table), then the paper's rows."""
    if not any(res.get((model, mode, arm)) for arm in arms):
        lines += [f"(no {model} {mode} runs in this folder yet)", ""]
    lines += ["| run | seeds | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    base = res.get((model, mode, "baseline"), {})
    for arm in arms:
        runs = res.get((model, mode, arm), {})
        if runs:
            lines.append(f"| {arm} (ours) | {len(runs)} | " + " | ".join(pct([m[k] for m in runs.values() if k in m])
                                                                      for k in keys) + " |")
    for arm in arms:
        if arm not in ("baseline", "FREQ") and res.get((model, mode, arm)) and base:
            lines.append(f"| **{arm} − baseline, paired** (points, ± SE) | | "
                         + " | ".join(paired(base, res[(model, mode, arm)], k) for k in keys) + " |")
    for arm, other in between:
        if res.get((model, mode, arm)) and res.get((model, mode, other)):
            lines.append(f"| {arm} − {other}, paired (points, ± SE) | | "
                         + " | ".join(paired(res[(model, mode, other)], res[(model, mode, arm)], k)
                                      for k in keys) + " |")
    for arm in arms:
        b = (best or {}).get((model, mode, "baseline"), {})
        if arm not in ("baseline", "FREQ") and (best or {}).get((model, mode, arm)) and b:
            lines.append(f"| {arm} − baseline, best-validation checkpoints | | "
                         + " | ".join(paired(b, best[(model, mode, arm)], k) for k in keys) + " |")
    for name, vals in (paper or {}).items():
        lines.append(f"| {name}, paper (Visual Genome) | 4 | " + " | ".join(vals.get(k, "-") for k in keys) + " |")
    lines.append("")


def report_all():
    """python study.py report: each study's README.md and figures, then the index above them."""
    for study, s in STUDIES.items():
        folder = os.path.join(ROOT, s["results"])
        if os.path.isdir(folder):
            report(folder, study)
    write_index()


def write_index():
    """results/README.md, which points to each study's folder (the VG-shaped study first) with its count of
    finished runs. Every report of a study in its own folder rewrites it, so the count cannot go stale."""
    lines = ["# The reproduction studies", "",
             "Two studies, the same runs of the paper's tables on two built-in datasets (docs/data.md), each in",
             "its own folder, written by `python study.py report`:", ""]
    for study, s in STUDIES.items():
        folder = os.path.join(ROOT, s["results"])
        if not os.path.isdir(folder):
            continue
        n = sum(os.path.isfile(os.path.join(folder, name, "run.json")) for name in os.listdir(folder))
        lines.append(f"- [{os.path.basename(folder)}/]({os.path.basename(folder)}/README.md): {s['title']}, "
                     f"{n} runs")
    lines += ["", "[docs/results.md](../docs/results.md) reads them; [docs/variance.md](../docs/variance.md) "
              "gives each study's protocol.", ""]
    with open(os.path.join(ROOT, "results", "README.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


def cpu_hours(records) -> float:
    """The CPU time the run folders record, in hours (runs without a measured time count 0)."""
    return sum(r["cpu_seconds"] or 0 for r in records) / 3600


def cost_line(records) -> str:
    """The runs' count and CPU hours, saying which runs' times are missing or partial."""
    untimed = sum(r["cpu_seconds"] is None for r in records)
    part = sum(r["resumed"] and r["cpu_seconds"] is not None for r in records)
    return (f"{len(records)} runs, {cpu_hours(records):.1f} CPU hours in all"
            + (f" ({untimed} of them collected without a measured time)" if untimed else "")
            + (f" ({part} of them resumed after a stop: timed from the resume only)" if part else "") + ".")


def report(results, study):
    res, best, records = load_results(results)
    if not records:
        raise SystemExit(f"error: {results} holds no finished run; run some first (python study.py run table2)")
    tables = STUDIES[study]["tables"]
    lines = [f"# The reproduction study on {STUDIES[study]['title']}", "",
             "Written by `python study.py report` from the run folders beside this file; each folder's",
             "`command.txt` is the command that reproduces its `metrics.json` exactly. Mean ± sample std over",
             "seeds; a paired difference is the mean over seeds of (arm − baseline) with its standard error.",
             "Every number is of the weights of the last training iteration, in both arms (the protocol that",
             "[docs/variance.md](../../docs/variance.md) chooses); the paper tests the checkpoint with the best",
             "validation mR@50, and the rows 'best-validation checkpoints' give that selection's differences.",
             STUDIES[study]["note"],
             cost_line(records), ""]
    t1 = ["R@50", "R@100", "mR@50", "mR@100", "head_mR@100", "body_mR@100", "tail_mR@100", "F@100",
          "zsR@50", "zsR@100"]
    lines += ["## Table 1: SGTR vs Align-SGTR, SGDet (test, %)", ""]
    arm_table(lines, res, "sgtr", "sgdet", ["baseline", "align"], t1, PAPER["table1"], best)
    t2 = ["mR@20", "mR@50", "mR@100", "R@20", "R@50", "R@100", "F@100", "zsR@50", "zsR@100"]
    for mode in ("predcls", "sgcls", "sgdet"):
        lines += [f"## Table 2: Motifs vs Align-Motifs, {mode} (test, %)", ""]
        arm_table(lines, res, "motifs", mode, ["FREQ", "baseline", "align"], t2, PAPER["table2"][mode], best)
    t3 = ["val_mR@50", "mR@50", "mR@100", "R@50", "R@100"]
    lines += ["## Table 3: ablations (validation mR@50, then test, %)", "",
              "SSA + UPH = the paper's alignment (`align`); SA = supervised alignment; PH = tied head.", ""]
    for model, mode in (("motifs", "predcls"), ("sgtr", "sgdet")):
        lines += [f"{model}, {mode}:", ""]
        arm_table(lines, res, model, mode, ["baseline", "SA", "PH", "align"], t3,
                  between=[("align", "SA"), ("align", "PH")])   # the paper's Table 3 compares the variants
    lines += ["Paper (SGTR, validation, one run): " + "; ".join(
        f"{k} {v[0]}/{v[1]} mR@50/100" for k, v in PAPER["table3"].items()), ""]
    if any(key[0] == "sgtr600" for key in res):
        lines += ["## A record: the first SGTR of this study (test, %)", "",
                  "Tables 1 and 3 as first made here, before SGTR was trained as its reference trains it "
                  "(docs/variance.md): the softmax predicate head, our post-processing (one predicate per pair, "
                  "graph-constrained R@K), 600 iterations.", ""]
        arm_table(lines, res, "sgtr600", "sgdet", ["baseline", "align"], t1, None, best)
        arm_table(lines, res, "sgtr600", "sgdet", ["baseline", "SA", "PH", "align"], t3,
                  between=[("align", "SA"), ("align", "PH")])
    if "long" in tables and any(key[0] == "motifs-long" for key in res):
        lines += ["## The long schedule: Motifs PredCls trained 16 epochs (test, %)", "",
                  "13,900 iterations of 8 images (Table 2's PredCls: 2,000, 2.3 epochs), the same cosine "
                  "stretched, validated every 1,000 iterations (docs/variance.md).", ""]
        arm_table(lines, res, "motifs-long", "predcls", ["baseline", "align"],
                  t2 + ["head_mR@100", "body_mR@100", "tail_mR@100"], PAPER["table2"]["predcls"], best)
        fig = length_figure(res, results, study)
        if fig:
            lines += [f"![the alignment's effect against training length]({fig})", ""]
        fig = overfit_figure(res, results, study)
        if fig:
            lines += ["Training loss against validation, both arms of one seed:", "",
                      f"![training loss against validation mR@50 and R@50]({fig})", ""]
    for tab, arms, what in (("table4", ["p = 0.05", "align", "p = 0.2", "p = 0.3"], "the masking ratio p"),
                            ("table5", ["λ = 1", "λ = 5", "align", "λ = 20"], "the loss weight λ")):
        if tab not in tables:
            continue
        lines += [f"## Table {tab[-1]}: {what}, Motifs PredCls (validation mR@50, then test, %)", "",
                  "`align` is p = 0.1, λ = 10.", ""]
        arm_table(lines, res, "motifs", "predcls", ["baseline"] + arms, t3)
        lines += ["Paper (validation, one run, mR@50/100): " + "; ".join(
            f"{k} {v[0]}/{v[1]}" for k, v in PAPER[tab].items()), ""]
    figures = per_predicate_figures(res, results, study)
    lines += ["## Figure 5: per-predicate test R@100, aligned − baseline, training-frequency order", ""]
    lines += [f"![{f}]({f})" for f in figures] + [""]
    if os.path.isfile(os.path.join(results, "figure4_masking.png")):   # python study.py figure4 --ckpt ...
        lines += ["## Figure 4: the mirror's masked cross-attention (SGTR, one predicate query)", "",
                  "![figure4_masking.png](figure4_masking.png)", ""]
    path = os.path.join(results, "README.md")
    old = open(path, encoding="utf-8").read() if os.path.isfile(path) else None
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    # What changed and where it went, not the file itself (it is long: open it, or read the diff)
    print(f"{path}: {len(records)} runs, {cpu_hours(records):.1f} CPU hours; " + report_changes(old, "\n".join(lines)))
    print(f"wrote {path}" + (f" and {', '.join(os.path.join(results, f) for f in figures)}" if figures else ""))
    return len(records)


def report_changes(old, new):
    """What differs between two versions of results/README.md, one title per changed '## ' section."""
    if old is None:
        return "a new file"

    def sections(text):   # title -> its lines (the text before the first title under "(the introduction)")
        out, title = {}, "(the introduction)"
        for line in text.splitlines():
            if line.startswith("## "):
                title = line[3:]
            out.setdefault(title, []).append(line)
        return out

    before, after = sections(old), sections(new)
    changed = [t for t in after if before.get(t) != after[t]] + [f"{t} (removed)" for t in before if t not in after]
    if not changed:
        return "unchanged"
    return f"{len(changed)} of {len(after)} sections changed:\n" + "\n".join(f"  {t}" for t in changed)


def dataset_info(results, study):
    """Predicate names and training counts of a study's built-in data (<results>/dataset.json, written once)."""
    path = os.path.join(results, "dataset.json")
    if not os.path.isfile(path):
        sys.path.insert(0, ROOT)
        import data
        import metrics
        root = data.ensure_synthetic(name=study)
        ds = data.VGSGGDataset(root, "train", num_val_im=data.BUILTIN[study]["num_val"])
        counts = data.predicate_counts(ds)
        groups = metrics.default_predicate_groups(ds.idx_to_predicate, counts)
        info = {"idx_to_predicate": list(ds.idx_to_predicate), "train_counts": counts.tolist(),
                "order": data.frequency_order(counts), "groups": {g: sorted(map(int, v)) for g, v in groups.items()}}
        os.makedirs(results, exist_ok=True)
        with open(path, "w") as f:
            json.dump(info, f, indent=1)
    return read_json(path)


def per_predicate_difference(base, arm, seeds, key="per_predicate_R@100"):
    """Figure 5's bars: each predicate's paired difference arm − baseline, mean over seeds (P,), and its
    standard error over seeds (P,), None for one seed. A predicate absent from the test split is NaN in
    every seed, and drawn as no bar."""
    per_seed = np.array([np.array(arm[s][key], dtype=float) - np.array(base[s][key], dtype=float)
                         for s in seeds])                                                   # (seeds, P)
    with np.errstate(invalid="ignore"):
        mean = per_seed.mean(axis=0)
        se = per_seed.std(axis=0, ddof=1) / np.sqrt(len(seeds)) if len(seeds) > 1 else None
    return mean, se


def per_predicate_figures(res, results, study):
    plt = pyplot()
    from matplotlib.patches import Patch   # legend handles: empty bars would lose their colour in the legend
    info, written = dataset_info(results, study), []
    colours = {"head": "tab:blue", "body": "tab:orange", "tail": "tab:green"}
    for model, mode, title in (("motifs", "predcls", "Align-Motifs − Motifs, PredCls"),
                               ("motifs", "sgcls", "Align-Motifs − Motifs, SGCls"),
                               ("motifs", "sgdet", "Align-Motifs − Motifs, SGDet"),
                               ("sgtr", "sgdet", "Align-SGTR − SGTR, SGDet"),
                               ("sgtr600", "sgdet", "the first SGTR (a record): Align-SGTR − SGTR, SGDet")):
        base, arm = res.get((model, mode, "baseline"), {}), res.get((model, mode, "align"), {})
        seeds = sorted(set(base) & set(arm))
        if not seeds:
            continue
        diff, se = per_predicate_difference(base, arm, seeds)
        order = info["order"]
        group_of = {p: g for g, ps in info["groups"].items() for p in ps}
        fig, ax = plt.subplots(figsize=(max(8, 0.32 * len(order)), 4))
        ax.bar(range(len(order)), [100 * np.nan_to_num(diff[p - 1]) for p in order],
               yerr=None if se is None else [100 * np.nan_to_num(se[p - 1]) for p in order],
               error_kw=dict(lw=0.8, capsize=2, ecolor="black"),
               color=[colours.get(group_of.get(p), "grey") for p in order])
        ax.set_xticks(range(len(order)), [info["idx_to_predicate"][p] for p in order], rotation=90, fontsize=8)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_ylabel("R@100 difference (points)")
        better = int(np.sum(diff > 0))
        ax.set_title(f"{title}: per-predicate test R@100, mean over {len(seeds)} paired seed(s)"
                     + ("" if se is None else " ± SE over seeds")
                     + f"\nbetter on {better} of {len(order)} predicates", fontsize=10)
        ax.legend(handles=[Patch(color=c, label=g) for g, c in colours.items()], fontsize=8)
        fig.tight_layout()
        name = f"figure5_{model}_{mode}.png"
        fig.savefig(os.path.join(results, name), dpi=100)
        plt.close(fig)
        written.append(name)
    return written


# ----------------------------------------------------------------------------------------------
# Figure 4 (supplementary section 7): what the mirror's masked cross-attention looks like

def figure4(ckpt, out, image_index=0, head=0):
    """For one test image and its most confident predicate query: the attention weights of the last
    structural-decoder layer's cross-attention to the image tokens, in the original decoder and in the
    mirror, whose attention logits are set to -inf where bernoulli_mask(seed) draws True (the mask the
    kernel applies, materialised here for the picture). One head; the mirror's queries differ from the
    original's too, because its earlier layers were masked as well."""
    import torch
    plt = pyplot()
    sys.path.insert(0, ROOT)
    import data
    import sgtr_align as m
    from kernels import bernoulli_mask
    ck = m.load_checkpoint(ckpt, ("model", "args", "vocab"))
    cfg = dataclasses.replace(saved_config(m, ck["args"]), no_align=False, device="cpu")
    test = m.load_datasets(cfg)[2]
    model = m.SGTR(cfg, len(ck["vocab"]["idx_to_label"]), len(ck["vocab"]["idx_to_predicate"])).eval()
    # the shared weights are the checkpoint's; a baseline checkpoint has no untied heads, and the picture
    # does not use them (it shows attention weights, which only the shared weights make)
    model.load_state_dict(ck["model"], strict=False)
    images, targets = data.collate([test[image_index]])
    calls, shape = [], {}
    model.input_proj.register_forward_hook(lambda mod, i, o: shape.update(hw=o.shape[-2:]))
    last = model.pred_decoder[-1]
    for block in last.modules():
        if isinstance(block, m.MultiheadAttention):
            block.register_forward_hook(lambda mod, args, kwargs, out: calls.append(
                (mod, inspect.signature(mod.forward).bind(*args, **kwargs).arguments)), with_kwargs=True)
    with torch.no_grad():
        ent_out, pred_out, inputs = model(images, m.pad_mask_for(images, targets))
        S = inputs["rel_mem"].shape[1] if "rel_mem" in inputs else None
        calls.clear()
        original = model.forward_decoder(inputs, use_dropout=False)[-1]
        orig_calls = list(calls)
        calls.clear()
        model.mirror(model, inputs)
        mirror_calls = list(calls)
    probs = original["pred_logits"][0].softmax(-1)[:, 1:]  # (Qp, P) without "no relation"
    query = int(probs.max(-1).values.argmax())
    predicate = ck["vocab"]["idx_to_predicate"][int(probs[query].argmax()) + 1]

    def weights(call):
        mod, a = call
        q, k, kpm, p, seed = a["q"], a["k"], a.get("key_padding_mask"), a.get("mask_p", 0.0), a.get("seed")
        B, Lq, D = q.shape
        Hd = mod.nheads
        qh = mod.q_proj(q).view(B, Lq, Hd, D // Hd).transpose(1, 2)
        kh = mod.k_proj(k).view(B, k.shape[1], Hd, D // Hd).transpose(1, 2)
        logits = qh @ kh.transpose(-2, -1) / np.sqrt(D // Hd)  # (B, Hd, Lq, Lk)
        if kpm is not None:
            logits = logits.masked_fill(kpm[:, None, None, :], float("-inf"))
        drop = torch.zeros_like(logits, dtype=torch.bool)
        if seed is not None and p > 0:
            drop = bernoulli_mask(seed, logits.shape, p)
            logits = logits.masked_fill(drop, float("-inf"))
        return logits.softmax(-1)[0, head, query], drop[0, head, query]  # (Lk,) each

    image_calls = [c for c in orig_calls if c[1]["k"].shape[1] == S]
    mirror_image_calls = [c for c in mirror_calls if c[1]["k"].shape[1] == S]
    with torch.no_grad():
        w_orig, _ = weights(image_calls[0])
        w_mirror, drop = weights(mirror_image_calls[0])
    h, w = shape["hw"]
    H, W = targets[0]["size"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.2))
    axes[0].imshow(images[0, :, :H, :W].permute(1, 2, 0).numpy())
    axes[0].set_title(f"test image {image_index}; predicate query {query} ('{predicate}')")
    top = float(max(w_orig.max(), w_mirror.max()))
    for ax, wts, title in ((axes[1], w_orig, "original: cross-attention weights"),
                           (axes[2], w_mirror, f"mirror: logits set to -inf with p = {cfg.mask_p:g} (black)")):
        ax.imshow(wts.view(h, w).numpy(), cmap="viridis", vmin=0.0, vmax=top)  # one colour scale for both
        ax.set_title(title, fontsize=10)
    dropped = drop.view(h, w).numpy()
    ys, xs = np.nonzero(dropped)
    axes[2].scatter(xs, ys, marker="s", s=14, c="black")
    for ax in axes:
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(f"Figure 4: the last structural-decoder layer's cross-attention to the image tokens ({h} x {w}), "
                 f"head {head}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    print(f"wrote {out}: {int(dropped.sum())} of {h * w} attention logits of this query and head masked")
    return w_orig, w_mirror, drop


# ----------------------------------------------------------------------------------------------
# main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("command", choices=["list", "run", "report", "verify", "bench", "figure4", "variance", "spread"])
    ap.add_argument("what", nargs="*", help="tables (table1..table5), run names or patterns; bench and "
                                            "variance: motifs|sgtr")
    ap.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="comma-separated seeds (default 0,1,2,3)")
    ap.add_argument("--data", choices=list(STUDIES), default=None,
                    help="which study: vgshape (the default) or synthetic; report without it writes both, "
                         "with it that study and the index results/README.md")
    ap.add_argument("--jobs", type=int, default=1, choices=[1, 2], help="runs at once, each on its own core")
    ap.add_argument("--results", default="", help="where finished runs are kept (default results/<data>)")
    ap.add_argument("--runs-dir", default="", help="where runs train (checkpoints), relative to the repo "
                                                   "(default runs/study-vgshape; runs/study for synthetic)")
    ap.add_argument("--extra", default="", help="flags appended to every run's command (e.g. a smoke budget)")
    ap.add_argument("--threads", type=int, default=1, help="bench: torch CPU threads")
    ap.add_argument("--mode", default="predcls", choices=["predcls", "sgcls", "sgdet"],
                    help="bench and spread motifs: the protocol")
    ap.add_argument("--detector", default="", help="bench motifs: a trained detector file (its cache) for sgdet")
    ap.add_argument("--ckpt", default="", help="figure4: an SGTR checkpoint (a run's ckpt_best.pt)")
    # intermixed: options may come before the names too (`run --data synthetic table1`), as the docs write it
    a = ap.parse_intermixed_args(argv)
    try:
        seeds = [int(s) for s in a.seeds.split(",")]
    except ValueError:
        raise SystemExit(f"error: --seeds must be comma-separated integers like 0,1,2, got {a.seeds!r}")
    extra = shlex.split(a.extra)
    if a.command == "report" and a.data is None and not a.results:
        return report_all()
    study = a.data or "vgshape"
    a.results = a.results or os.path.join(ROOT, STUDIES[study]["results"])
    a.runs_dir = a.runs_dir or STUDIES[study]["runs_dir"]
    runs = study_runs(seeds, study)
    if a.command == "report":
        report(a.results, study)
        if os.path.abspath(a.results) == os.path.abspath(os.path.join(ROOT, STUDIES[study]["results"])):
            write_index()   # its run count for this study changed too (a --results elsewhere leaves it)
        return
    if a.command == "figure4":
        if not a.ckpt:
            raise SystemExit("error: figure4 needs --ckpt PATH (an SGTR run's ckpt_best.pt)")
        os.makedirs(a.results, exist_ok=True)
        return figure4(a.ckpt, os.path.join(a.results, "figure4_masking.png"))
    if a.command == "spread":
        if len(a.what) != 1 or a.what[0] not in ("motifs", "motifs-long", "sgtr", "sgtr600"):
            raise SystemExit("error: spread takes one model: python study.py spread "
                             "motifs|motifs-long|sgtr|sgtr600 [--mode M]")
        return print(spread(a.results, a.what[0], a.mode if a.what[0].startswith("motifs") else "sgdet", study))
    if a.command == "variance":
        if len(a.what) != 1 or a.what[0] not in ("motifs", "sgtr", "sgtr600"):
            raise SystemExit("error: variance takes one model: python study.py variance motifs|sgtr|sgtr600")
        return print(variance(a.results, a.runs_dir, a.what[0], "predcls" if a.what[0] == "motifs" else "sgdet"))
    if a.command == "bench":
        import torch
        torch.set_num_threads(a.threads)
        if a.what == ["motifs-eval"]:
            return bench_eval(a.data)
        return bench(a.what, a.mode, a.detector)
    chosen = select(runs, a.what) if a.what else runs
    done = {r["name"] for r in chosen if os.path.isfile(os.path.join(a.results, r["name"], "run.json"))}
    if a.command == "list":
        for r in chosen:
            print(f"{'done ' if r['name'] in done else 'to do'}  {r['name']:34s}  "
                  f"{' '.join(command(r, a.runs_dir, extra))}")
        print(f"{len(done)} of {len(chosen)} done")
    elif a.command == "run":
        todo = [r for r in chosen if r["name"] not in done]
        print(f"{len(chosen) - len(todo)} of {len(chosen)} already done; running {len(todo)} "
              f"({a.jobs} at a time)", flush=True)
        run_study(todo, a.results, a.runs_dir, extra, a.jobs)
    elif a.command == "verify":
        verify(chosen, a.results, extra)


def verify(chosen, results, extra):
    """Rerun finished runs from their command.txt into a fresh folder; their metrics.json must be identical."""
    for r in chosen:
        folder = os.path.join(results, r["name"])
        if not os.path.isfile(os.path.join(folder, "command.txt")):
            raise SystemExit(f"error: {r['name']} has not finished (no {folder}/command.txt)")
        with open(os.path.join(folder, "command.txt")) as f:
            cmd = shlex.split(f.read())
        cmd = [c for c in cmd if not c.startswith("OMP_NUM_THREADS=")]
        say_machine(r["name"], read_json(os.path.join(folder, "args.json")).get("machine"))
        out = os.path.join("runs", "verify", f"{r['name']}-{time.strftime('%Y%m%d-%H%M%S')}")
        cmd[cmd.index("--out") + 1] = out
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, *cmd[1:]], cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
        with open(os.path.join(ROOT, out, "metrics.json")) as a, open(os.path.join(folder, "metrics.json")) as b:
            same = a.read() == b.read()   # as text: NaN (a predicate absent from the test split) != NaN
        print(f"{r['name']}: metrics.json {'identical' if same else 'DIFFERENT'} ({out})")
        if not same:
            raise SystemExit(1)


def say_machine(name, then):
    """Exact numbers need the run's instruction set, torch version and thread count: say whether this machine
    has them (runs before the record existed: the small-data study ran with AVX2, one thread)."""
    import torch
    sys.path.insert(0, ROOT)
    import motifs_align   # machine() is what every run folder records (sgtr_align's is the same)
    torch.set_num_threads(1)   # as command.txt runs it
    now = motifs_align.machine()
    if then is None:
        print(f"{name}: its args.json predates the machine record (the small-data study: AVX2, one thread); "
              f"this machine: {now}")
    elif then != now:
        print(f"{name}: made with {then}, this machine has {now}: metrics.json may differ in the last digits, "
              f"and more after training amplifies them (docs/running.md)")


# ----------------------------------------------------------------------------------------------
# The variance analysis: how much of the seed-to-seed spread is the test sample, and how much training

def test_records(name, runs_dir, which):
    """Evaluate a finished run's checkpoint (which = 'best' or 'last') on the test split again, as the run
    did (its first --max-eval-images images; all in the study) -> (the SGEvaluator's per-image records, its
    summary). Cached as <run>/test_records_<which>.json."""
    import torch
    folder = os.path.join(ROOT, runs_dir, name)
    cache = os.path.join(folder, f"test_records_{which}.json")
    if os.path.isfile(cache):
        blob = read_json(cache)
        return [tuple(np.asarray(x) for x in r) for r in blob["records"]], blob["summary"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as the runs: float sums depend on the thread count
    try:
        ev = evaluate_again(folder, name.startswith("motifs"), which)
    finally:
        torch.set_num_threads(threads)   # the caller's own setting, as it was
    summary = {k: v for k, v in ev.summary().items() if not k.startswith("per_")}
    records = ev.state_dict()["records"]
    with open(cache + ".tmp", "w") as f:
        json.dump({"summary": summary, "records": [[np.asarray(x).tolist() for x in r] for r in records]}, f)
    os.replace(cache + ".tmp", cache)
    return [tuple(np.asarray(x) for x in r) for r in records], summary


def evaluate_again(folder, motifs, which):
    """test_records' evaluation: the run's checkpoint rebuilt from its saved args, tested on the images the
    run tested -> the filled metrics.SGEvaluator."""
    import torch
    import data
    import metrics
    if motifs:
        import motifs_align as M
        best = M.load_checkpoint(os.path.join(folder, "ckpt_best.pt"), "cpu")   # the frozen detector is here
        ck = best if which == "best" else M.load_checkpoint(os.path.join(folder, "ckpt_last.pt"), "cpu")
        cfg = saved_config(M, ck["args"])
        _, ds = M.load_datasets(cfg, 0)
        train, test = ds["train"], ds["test"]
        C, P = train.num_classes, train.num_predicates
        detector = M.Detector(cfg, C).eval()
        detector.load_state_dict(best["detector"])
        model = M.MotifsRelationModel(cfg, C, P, detector.backbone.out_channels, detector.stride,
                                      torch.zeros(C, C, P))
        model.load_state_dict(ck["model"])
        M.use_feature_cache(cfg, detector, [train, ds["val"], test], lambda msg: None)   # as the run did
    else:
        import sgtr_align as S
        ck = S.load_checkpoint(os.path.join(folder, f"ckpt_{which}.pt"), ("model", "args"))
        cfg = saved_config(S, ck["args"])
        train, val, test = S.load_datasets(cfg)
        model = S.SGTR(cfg, train.num_classes, train.num_predicates)
        model.load_state_dict(ck["model"])
        if cfg.lr_detector == 0 and cfg.lr_backbone == 0:   # as the run did: frozen, with its feature cache
            model.freeze_detector()
        S.use_feature_cache(cfg, model, [train, val, test], lambda msg: None)
    counts = data.predicate_counts(train)
    groups = metrics.default_predicate_groups(train.idx_to_predicate, counts)
    seen = metrics.training_triplets(train.gt_labels, train.gt_relations)
    ev = metrics.SGEvaluator(cfg.mode if motifs else "sgdet", train.num_predicates - 1,
                             predicate_groups=groups, zeroshot_triplets=seen)
    if motifs:
        M.evaluate(model, detector, M.first(test, cfg.max_eval_images), cfg, "cpu", groups, seen_triplets=seen,
                   ev=ev)
    else:
        S.evaluate(model, test, cfg, "cpu", groups, cfg.max_eval_images, zeroshot=seen, ev=ev)
    return ev


def recall_entries(records, k_index):
    """Flatten per-image records for fast re-weighting: one entry per (image, predicate present)."""
    n_u = np.array([len(r[0]) for r in records])
    img = np.repeat(np.arange(len(records)), n_u)                       # (E,)
    pid = np.concatenate([r[0] for r in records]).astype(np.int64)       # (E,)
    cnt = np.concatenate([r[1] for r in records]).astype(np.float64)     # (E,)
    hit = np.concatenate([np.asarray(r[2])[k_index] for r in records]).astype(np.float64)   # (E,)
    img_recall = np.bincount(img, hit, len(records)) / np.bincount(img, cnt, len(records))   # (I,)
    return dict(img=img, pid=pid, rec=hit / cnt, img_recall=img_recall)


def weighted_recalls(e, w, num_predicates):
    """R@K and mR@K (as metrics.SGEvaluator.summary) with image i counted w[i] times (w = 1: the summary;
    w = bootstrap counts: one resample of the test split). w: (B, I) -> (R (B,), mR (B,))."""
    w = np.atleast_2d(w).astype(np.float64)
    P = num_predicates
    rows = np.arange(w.shape[0])[:, None]
    wi = w[:, e["img"]]                                                  # (B, E)
    num, den = np.zeros((w.shape[0], P + 1)), np.zeros((w.shape[0], P + 1))
    np.add.at(num, (rows, e["pid"][None, :]), wi * e["rec"][None, :])
    np.add.at(den, (rows, e["pid"][None, :]), wi)
    mr = (num[:, 1:] / np.maximum(den[:, 1:], 1e-12)).sum(1) / P       # absent predicates count 0, as summary
    r = (w * e["img_recall"][None, :]).sum(1) / w.sum(1)
    return r, mr


# Half the mR@50 gain the paper reports (Motifs PredCls 19.8 -> 21.7, SGCls 8.9 -> 10.5, SGDet 5.9 -> 6.4;
# SGTR SGDet 12.0 -> 12.7): the standard error a comparison needs to tell an effect of the paper's size from none.
TARGET_SE = {"motifs-predcls": 0.95, "motifs-sgcls": 0.8, "motifs-sgdet": 0.25, "sgtr-sgdet": 0.35, "sgtr600-sgdet": 0.35,
             "motifs-long-predcls": 0.4}   # the long schedule's issue: paired SE of mR@50 <= 0.4


def pairs_needed(sd, target):
    """Paired seeds for a standard error sd / √n of at most target (at least 2, for an SE at all)."""
    return max(2, int(np.ceil((sd / target) ** 2)))


def variance(results, runs_dir, model, mode, boot=2000, draws=200):
    """The numbers of docs/variance.md for one model and mode: the paired test differences (align − baseline)
    per seed for the best-validation checkpoint (the paper's choice) and for the last one; their spread over
    seeds; the part of the uncertainty that the test sample makes (a bootstrap over test images, the same
    resample for every run); and how the spread over seeds changes with the test split's size (random
    subsets of it). Re-evaluates each run's two checkpoints once (cached beside them). -> markdown text."""
    _, res, _ = load_results(results)
    base, align = res.get((model, mode, "baseline"), {}), res.get((model, mode, "align"), {})
    seeds = sorted(set(base) & set(align))
    if len(seeds) < 2:
        raise SystemExit(f"error: variance needs >= 2 seeds with both a {model} {mode} baseline and align run "
                         f"in {results}")
    P = len(base[seeds[0]]["per_predicate_num_gt"])
    ent, point = {}, {}   # (which, seed, arm) -> recall_entries at K = 50 (ks (20, 50, 100): index 1); its summary
    for which in ("best", "last"):
        for s in seeds:
            for arm, runs in (("baseline", base), ("align", align)):
                recs, summ = test_records(f"{model}-{mode}-{arm}-seed{s}", runs_dir, which)
                m = runs[s] if which == "best" else runs[s].get("final", {})
                for key in ("R@50", "mR@50"):   # the re-evaluation is the run's own test, to the last digit
                    if key in m and abs(m[key] - summ[key]) > 1e-12:
                        raise SystemExit(f"error: {model}-{mode}-{arm}-seed{s} {which}: re-evaluated {key} "
                                         f"{summ[key]} != metrics.json's {m[key]}")
                ent[(which, s, arm)], point[(which, s, arm)] = recall_entries(recs, 1), summ
    I = len(ent[("best", seeds[0], "baseline")]["img_recall"])
    rng = np.random.default_rng(0)

    def diffs(which, w):   # w (B, I) -> {"R@50", "mR@50"}: (B, n seeds) paired differences in points
        out = {}
        for i, key in enumerate(("R@50", "mR@50")):
            out[key] = np.stack([100 * (weighted_recalls(ent[(which, s, "align")], w, P)[i]
                                        - weighted_recalls(ent[(which, s, "baseline")], w, P)[i])
                                 for s in seeds], 1)
        return out

    full = {which: diffs(which, np.ones((1, I))) for which in ("best", "last")}
    w_boot = rng.multinomial(I, np.full(I, 1.0 / I), size=boot)   # (B, I): one resample for all runs
    booted = {which: diffs(which, w_boot) for which in ("best", "last")}
    sizes = [I // 4, I // 2, I]
    sub = {}   # (which, size) -> SD over seeds of the paired diff on random subsets of the test split
    for which in ("best", "last"):
        for size in sizes[:-1]:
            w = np.zeros((draws, I))
            for b in range(draws):
                w[b, rng.choice(I, size, replace=False)] = 1
            d = diffs(which, w)
            sub[(which, size)] = {k: np.sqrt(np.mean(v.var(1, ddof=1))) for k, v in d.items()}
        sub[(which, I)] = {k: v[0].std(ddof=1) for k, v in full[which].items()}

    n = len(seeds)
    lines = [f"{model} {mode}: {n} seed pairs; the test split has {I} images with relations; {boot} bootstrap "
             f"resamples; {draws} random subsets per size. All in points of %.", ""]
    for key in ("mR@50", "R@50"):
        lines += [f"Test {key} per seed (diff = align − baseline):", "",
                  "| seed | best: baseline | best: align | best: diff | last: baseline | last: align | last: diff |",
                  "|---" * 7 + "|"]
        for k, s in enumerate(seeds):
            cells = []
            for which in ("best", "last"):
                b = 100 * point[(which, s, "baseline")][key]
                cells += [f"{b:.2f}", f"{b + full[which][key][0, k]:.2f}", f"{full[which][key][0, k]:+.2f}"]
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        lines += ["", "| checkpoint | mean diff | SD over seeds | SE over seeds | SE from the test sample "
                  f"| SD over seeds, test split /4 | /2 | whole | x4 (fit) | pairs for SE over seeds <= "
                  f"{TARGET_SE[f'{model}-{mode}']} |",
                  "|---" * 10 + "|"]
        for which in ("best", "last"):
            d = full[which][key][0]
            sd = d.std(ddof=1)
            se_test = booted[which][key].mean(1).std(ddof=1)
            # SD^2 = a + b / size (a: what a bigger test split cannot remove), least squares on the 3 sizes
            a, b = np.linalg.lstsq(np.stack([np.ones(3), 1.0 / np.array(sizes)], 1),
                                   np.array([sub[(which, z)][key] ** 2 for z in sizes]), rcond=None)[0]
            lines.append(f"| {which} | {d.mean():+.2f} | {sd:.2f} | {sd / np.sqrt(n):.2f} | {se_test:.2f} | "
                         + " | ".join(f"{sub[(which, z)][key]:.2f}" for z in sizes)
                         + f" | {np.sqrt(max(a + b / (4 * I), 0)):.2f} | {pairs_needed(sd, TARGET_SE[f'{model}-{mode}'])} |")
        i = int(key == "mR@50")
        one = np.sqrt(np.mean([np.var(100 * weighted_recalls(e, w_boot, P)[i], ddof=1) for e in ent.values()]))
        lines += ["", f"One run's test {key}, bootstrap SD (root mean square over the runs): {one:.2f}", ""]
    return "\n".join(lines)


def log_curves(log_file):
    """A run's log.txt -> {"sup": {iteration: L_original, the mean over the log interval}, "mR@50" and "R@50":
    {iteration: validation value as a fraction (SGTR prints percent)}}. A resumed run logs the steps after
    its last checkpoint twice; the later line wins, as it is the one the run's weights continue from."""
    curves = {"sup": {}, "mR@50": {}, "R@50": {}}
    for line in open(log_file, encoding="utf-8") if os.path.isfile(log_file) else []:
        m = re.match(r"it (\d+)/\d+ \| loss [\d.]+ \(sup ([\d.]+)", line)
        if m:
            curves["sup"][int(m.group(1))] = float(m.group(2))
        if line.startswith("val it "):
            it = int(line.split()[2])
            for key in ("mR@50", "R@50"):
                v = re.search(rf"\| {key} ([\d.]+)", line)
                if v:
                    x = float(v.group(1))
                    curves[key][it] = x / 100 if x > 1 else x
    return curves


def val_curve(log_file):
    """[(iteration, validation mR@50 as a fraction)] from a run's log.txt."""
    return sorted(log_curves(log_file)["mR@50"].items())


def run_folder(study, model, mode, arm, seed):
    """The name of a study's run (its folder in results/) from what its run.json records."""
    return next(r["name"] for r in study_runs([seed], study) if (r["model"], r["mode"], r["arm"]) == (model, mode, arm))


def spread(results, model, mode, study="vgshape"):
    """A study's protocol before any aligned run exists (docs/variance.md): from baseline runs alone, the
    noise a paired difference will have, and each baseline's validation curve, for the schedule. Two
    baselines of different seeds differ by what an aligned run and its baseline differ by when the method
    does nothing: another seed's training, tested on the same images. So the SD of the paired difference is
    estimated by √2 times the SD of the baselines over seeds (with two seeds, by their difference; one
    degree of freedom, a rough estimate). -> markdown text."""
    res, _, _ = load_results(results)   # the last iteration's metrics
    base = res.get((model, mode, "baseline"), {})
    seeds = sorted(base)
    if len(seeds) < 2:
        raise SystemExit(f"error: spread needs >= 2 seeds of the {model} {mode} baseline in {results}")
    target = TARGET_SE[f"{model}-{mode}"]
    curves = {s: val_curve(os.path.join(results, run_folder(study, model, mode, "baseline", s), "log.txt"))
              for s in seeds}
    its = sorted({i for c in curves.values() for i, _ in c})
    lines = [f"{model} {mode}: {len(seeds)} baseline seeds. Points of %.", "",
             "Validation mR@50 (each run's log.txt):", "", "| seed | " + " | ".join(f"it {i}" for i in its) + " |",
             "|---" * (len(its) + 1) + "|"]
    for s in seeds:
        c = dict(curves[s])
        lines.append(f"| {s} | " + " | ".join(f"{100 * c[i]:.2f}" if i in c else "-" for i in its) + " |")
    lines += ["", "Last iteration's weights (the study's protocol):", "",
              f"| metric | per seed | SD over seeds | SD of a paired difference (√2 SD) | pairs for SE <= {target} |",
              "|---" * 5 + "|"]
    for key in ("mR@50", "R@50", "val_mR@50"):
        if not all(key in base[s] for s in seeds):
            continue
        v = np.array([100 * base[s][key] for s in seeds])
        sd = v.std(ddof=1)
        lines.append(f"| {key} | " + ", ".join(f"{x:.2f}" for x in v) + f" | {sd:.2f} | {np.sqrt(2) * sd:.2f} | "
                     + f"{pairs_needed(np.sqrt(2) * sd, target)} |")
    return "\n".join(lines + [""])


def length_points(res, results, study):
    """The alignment's effect on Motifs PredCls test mR@50 (last weights) at each training length: Table 2's
    runs and the long schedule's -> [(epochs of the train split, mean difference, its SE, pairs, iterations)]
    for the lengths with at least two pairs."""
    points = []
    for model in ("motifs", "motifs-long"):
        base, arm = res.get((model, "predcls", "baseline"), {}), res.get((model, "predcls", "align"), {})
        seeds = sorted(set(base) & set(arm))
        if len(seeds) < 2:
            continue
        name = run_folder(study, model, "predcls", "baseline", seeds[0])
        args = read_json(os.path.join(results, name, "args.json"))
        n_train = int(re.search(r"(\d+) train", open(os.path.join(results, name, "log.txt")).read()).group(1))
        d = np.array([100 * (arm[s]["mR@50"] - base[s]["mR@50"]) for s in seeds])
        points.append((args["iters"] * args["batch_size"] / n_train, d.mean(), d.std(ddof=1) / np.sqrt(len(d)),
                       len(d), args["iters"]))
    return points


def length_figure(res, results, study):
    """length_points drawn, with the paper's effect -> the file name, or None while fewer than two lengths."""
    points = length_points(res, results, study)
    if len(points) < 2:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    x, y, se = (np.array([p[i] for p in points]) for i in range(3))
    # points only, no line: nothing was measured between the lengths
    ax.errorbar(x, y, yerr=se, marker="o", ls="none", capsize=4,
                label="ours: aligned − baseline, mean ± SE over pairs")
    for e, m, _, n, iters in points:
        ax.annotate(f"{iters:,} it., {n} pairs", (e, m), textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.axhline(0, color="black", lw=0.8)
    ax.axhline(1.9, color="tab:red", ls="--", lw=1, label="the paper (VG150, about 42 epochs): +1.9")
    ax.set(xlabel="epochs of the training split", ylabel="test mR@50 difference (points)",
           title="Motifs PredCls: the alignment's effect against training length")
    ax.legend(fontsize=8, loc="center left")   # clear of the paper's line at the top and of both points
    fig.tight_layout()
    fig.savefig(os.path.join(results, "figure_length_motifs_predcls.png"), dpi=100)
    plt.close(fig)
    return "figure_length_motifs_predcls.png"


def overfit_figure(res, results, study, model="motifs-long", mode="predcls"):
    """Does the long schedule overfit? For one pair of seeds (the lowest seed whose logs in both arms have
    validation R@50: same data order and initial weights, so the two curves differ by the alignment alone),
    the training loss L_original against validation mR@50 and R@50, over iterations -> the file name, or
    None until both arms have such a run of one seed."""
    picked = {}
    for seed in sorted(set(res.get((model, mode, "baseline"), {})) & set(res.get((model, mode, "align"), {}))):
        curves = {arm: log_curves(os.path.join(results, run_folder(study, model, mode, arm, seed), "log.txt"))
                  for arm in ("baseline", "align")}
        if all(c["R@50"] for c in curves.values()):
            picked = {arm: (seed, c) for arm, c in curves.items()}
            break
    if not picked:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for arm, (seed, c) in picked.items():
        label = f"{arm}, seed {seed}"
        for ax, key in zip(axes, ("sup", "mR@50", "R@50")):
            its = sorted(c[key])
            ax.plot(its, [c[key][i] * (1 if key == "sup" else 100) for i in its],
                    marker=None if key == "sup" else "o", label=label)
    for ax, title, unit in zip(axes, ("training loss L_original (log-interval mean)", "validation mR@50",
                                      "validation R@50"), ("loss", "%", "%")):
        ax.set(xlabel="iteration", ylabel=unit, title=title)
        ax.legend(fontsize=8)
    fig.suptitle(f"{model} {mode}: does the long schedule overfit? (the training loss falls; does validation?)",
                 fontsize=10)
    fig.tight_layout()
    name = f"figure_overfit_{model.replace('-', '_')}_{mode}.png"
    fig.savefig(os.path.join(results, name), dpi=100)
    plt.close(fig)
    return name


# ----------------------------------------------------------------------------------------------
# The step-time benchmark: what the alignment costs in training (inference is unchanged by design)

def bench(what, mode="predcls", detector_file="", rounds=5, steps=6, n_batches=6):
    """Time training steps with and without the alignment, each with the frozen detector run at every step
    (--feature-cache-gb 0) and with its outputs cached (FeatureCache, warm: round 0 fills it), on the same
    batches, in one process, rounds alternating the order; the median of wall-clock and of process CPU time
    per step. CPU time is the robust one on a shared machine; on a GPU read the wall clock."""
    if len(what) != 1 or what[0] not in ("motifs", "sgtr"):
        raise SystemExit("error: bench takes one model: python study.py bench motifs|sgtr")
    import torch
    sys.path.insert(0, ROOT)
    import data
    torch.manual_seed(0)
    arms = [(a, c) for a in (False, True) for c in (False, True)]   # (aligned, cached)
    if what[0] == "motifs":
        import motifs_align as m
        cfg = m.parse_config([f"--{mode}"])
        _, ds = m.load_datasets(cfg, 0)
        train, C, P = ds["train"], ds["train"].num_classes, ds["train"].num_predicates
        # A random detector and a flat prior: in PredCls and SGCls the relation step costs the same with any
        # weights; SGDet's cost depends on how many boxes the detector finds: give it a trained one.
        detector = m.Detector(cfg, C).eval().requires_grad_(False)
        if detector_file:
            detector.load_state_dict(m.load_checkpoint(detector_file, "cpu")["detector"])
        caches = {c: m.FeatureCache() if c else None for c in (False, True)}
        cfgs = {a: dataclasses.replace(cfg, no_align=not a) for a in (False, True)}
        models = {a: m.MotifsRelationModel(cfgs[a], C, P, detector.backbone.out_channels, detector.stride,
                                           torch.zeros(C, C, P)) for a in (False, True)}

        def step(a, c, images, targets):
            detector.feature_cache = caches[c]
            return models[a], m.train_step(models[a], detector, images, targets, cfgs[a])
        what_ = f"Motifs {mode}, batch {cfg.batch_size}" + (f", detector {detector_file}" if detector_file else "")
    else:
        import sgtr_align as m
        cfg = m.parse_config([])
        train = m.load_datasets(cfg)[0]
        C, P = train.num_classes, train.num_predicates
        cfgs = {a: dataclasses.replace(cfg, no_align=not a) for a in (False, True)}
        models = {(a, c): m.SGTR(cfgs[a], C, P) for a, c in arms}
        sizes = m.FeatureCache.sizes([train])
        canvas = (max(h for h, _ in sizes), max(w for _, w in sizes))   # as use_feature_cache makes it
        for (a, c), model in models.items():   # as training runs it: the pretrained detector frozen (its
            model.freeze_detector()            # weights do not change the cost of a step)
            model.feature_cache = m.FeatureCache(canvas) if c else None

        def step(a, c, images, targets):
            return models[(a, c)], m.train_step(models[(a, c)], images, targets, cfgs[a])
        what_ = f"SGTR SGDet, batch {cfg.batch_size}"
    loader = torch.utils.data.DataLoader(train, batch_size=cfg.batch_size, collate_fn=data.collate,
                                         sampler=data.TrainingSampler(len(train), seed=0))
    it = iter(loader)
    batches = [next(it) for _ in range(n_batches)]
    for model in models.values():
        model.train()
    opts = {}
    wall, cpu = {k: [] for k in arms}, {k: [] for k in arms}
    for r in range(rounds + 1):   # round 0 warms up (and fills the caches)
        for a, c in (arms if r % 2 == 0 else arms[::-1]):
            t0, c0 = time.perf_counter(), time.process_time()
            for s in range(steps):
                images, targets = batches[s % n_batches]
                model, losses = step(a, c, images, targets)
                if model not in opts:
                    opts[model] = torch.optim.SGD(model.parameters(), lr=1e-5)
                opts[model].zero_grad(set_to_none=True)
                losses["total"].backward()
                opts[model].step()
            if r > 0:
                wall[(a, c)].append((time.perf_counter() - t0) / steps)
                cpu[(a, c)].append((time.process_time() - c0) / steps)
    med = {k: (float(np.median(wall[k])), float(np.median(cpu[k]))) for k in arms}
    print(f"bench ({what_}, torch threads {torch.get_num_threads()}, {torch.backends.cpu.get_cpu_capability()}), "
          f"ms per step, wall / CPU:")
    for c in (False, True):
        (w0, c0), (w1, c1) = med[(False, c)], med[(True, c)]
        print(f"  detector {'cached   ' if c else 'every step'} | without alignment {1000 * w0:.1f} / {1000 * c0:.1f} "
              f"| with alignment {1000 * w1:.1f} / {1000 * c1:.1f} | alignment ratio {w1 / w0:.2f} / {c1 / c0:.2f}")
    for a in (False, True):
        (w0, c0), (w1, c1) = med[(a, False)], med[(a, True)]
        print(f"  {'with' if a else 'without'} alignment: the cache makes a step {w0 / w1:.2f}x faster (wall), "
              f"{c0 / c1:.2f}x (CPU)")
    return med



def bench_eval(data_name, n_images=500, rounds=3):
    """Time Motifs PredCls evaluation with and without its shared work, on the first n_images of the test and
    of the val split, in one process, rounds alternating the order (round 0 fills the feature cache): the test
    of two checkpoints as two passes and as one (evaluate([best, last])), and a validation that computes
    the union RoIAlign again and one that reads it (evaluate's roi_cache, warm). Medians of process CPU time
    and wall clock. The digits are the same either way (tests/test_repeatability.py)."""
    import torch
    sys.path.insert(0, ROOT)
    import data
    import metrics
    import motifs_align as m
    cfg = m.parse_config(["--predcls"] + (["--data", data_name] if data_name else []))
    _, ds = m.load_datasets(cfg, 0)
    C, P = ds["train"].num_classes, ds["train"].num_predicates
    groups = metrics.default_predicate_groups(ds["train"].idx_to_predicate, data.predicate_counts(ds["train"]))
    torch.manual_seed(0)
    detector = m.Detector(cfg, C).eval().requires_grad_(False)   # PredCls: the cost does not depend on weights
    detector.feature_cache = m.FeatureCache()
    models = [m.MotifsRelationModel(cfg, C, P, detector.backbone.out_channels, detector.stride,
                                    torch.zeros(C, C, P)) for _ in range(2)]
    test, val = m.first(ds["test"], n_images), m.first(ds["val"], n_images)
    kept = {}
    m.evaluate(models[0], detector, val, cfg, "cpu", groups, roi_cache=kept)   # fills both caches
    arms = {"test, two passes": lambda: [m.evaluate(x, detector, test, cfg, "cpu", groups) for x in models],
            "test, one pass": lambda: m.evaluate(models, detector, test, cfg, "cpu", groups),
            "validation, RoIAlign again": lambda: m.evaluate(models[0], detector, val, cfg, "cpu", groups),
            "validation, RoIAlign kept": lambda: m.evaluate(models[0], detector, val, cfg, "cpu", groups,
                                                            roi_cache=kept)}
    times = {k: [] for k in arms}
    for r in range(rounds + 1):
        for k in (list(arms) if r % 2 == 0 else list(arms)[::-1]):
            t0, c0 = time.perf_counter(), time.process_time()
            arms[k]()
            if r > 0:
                times[k].append((time.process_time() - c0, time.perf_counter() - t0))
    med = {k: (float(np.median([c for c, _ in v])), float(np.median([w for _, w in v]))) for k, v in times.items()}
    print(f"bench eval (Motifs PredCls, {data_name or 'synthetic'}, {len(test)} test / {len(val)} val images, torch "
          f"threads {torch.get_num_threads()}, {torch.backends.cpu.get_cpu_capability()}), seconds, CPU / wall:")
    for k, (c, w) in med.items():
        print(f"  {k:28s} {c:7.1f} / {w:7.1f}")
    print(f"  test: one pass takes {med['test, one pass'][0] / med['test, two passes'][0]:.2f} of two (CPU); "
          f"validation: {med['validation, RoIAlign kept'][0] / med['validation, RoIAlign again'][0]:.2f} (CPU)")
    return med


if __name__ == "__main__":
    main()
