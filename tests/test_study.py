"""study.py: the run list, running and collecting runs, exact reruns, and the report's arithmetic."""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import study  # noqa: E402

TINY = "--iters 3 --det-iters 3 --max-eval-images 6 --eval-every 2 --log-every 1 --batch-size 2 --det-batch 2 --eval-batch 3"


def cli(*args, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "study.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=900, env={**os.environ, **(env or {})})


def test_the_study_names_every_table_with_paired_arms():
    runs = study.study_runs((0, 1))
    names = [r["name"] for r in runs]
    assert len(names) == len(set(names))
    for table in ("table1", "table2", "table3", "table4", "table5"):
        assert study.select(runs, [table])
    # every compared arm has the baseline on the same seeds, with the same flags but the arm's own
    for r in runs:
        if r["arm"] not in ("baseline", "FREQ"):
            base = next(b for b in runs if b["arm"] == "baseline" and b["model"] == r["model"]
                        and b["mode"] == r["mode"] and b["seed"] == r["seed"])
            assert "--no-align" in base["args"] and "--no-align" not in r["args"]
    align = next(r for r in runs if r["name"] == "motifs-sgcls-align-seed1")
    assert align["args"] == ["--sgcls", "--seed", "1"] and align["script"] == "motifs_align.py"
    lam = next(r for r in runs if r["name"] == "motifs-predcls-lambda5-seed0")
    assert lam["args"] == ["--predcls", "--align-weight", "5", "--seed", "0"] and lam["tables"] == ["table5"]
    assert [r["name"] for r in study.select(runs, ["sgtr-sgdet-*-seed1"])] == [
        "sgtr-sgdet-baseline-seed1", "sgtr-sgdet-align-seed1", "sgtr-sgdet-sa-seed1", "sgtr-sgdet-ph-seed1"]
    # the first SGTR, a record: the same four arms with the settings that were the defaults when it ran
    record = study.select(runs, ["record"])
    assert [r["name"] for r in record if r["seed"] == 1] == [
        "sgtr600-sgdet-baseline-seed1", "sgtr600-sgdet-align-seed1", "sgtr600-sgdet-sa-seed1", "sgtr600-sgdet-ph-seed1"]
    assert all(r["args"][-len(study.FIRST_SGTR) - 2:-2] == study.FIRST_SGTR for r in record)


def test_the_vg_shaped_study_is_the_same_runs_on_its_data_in_its_own_folders():
    small, vg = study.study_runs(study="synthetic"), study.study_runs(study="vgshape")
    # Tables 1-3 only (the p and lambda sweeps stay on the small data), each run the small study's run of the
    # same name with the VG-shaped data's flags added before the seed
    assert {t for r in vg for t in r["tables"]} == {"table1", "table2", "table3", "record", "long"}
    same = {r["name"]: r for r in small}
    # its own: Motifs PredCls at 16 epochs, whose flags replace the study's cache size (none given twice)
    long = [r for r in vg if r["model"] == "motifs-long"]
    assert [r["name"] for r in long if r["seed"] == 0] == ["motifs-predcls-long-baseline-seed0",
                                                           "motifs-predcls-long-align-seed0"]
    assert long[0]["args"] == ["--predcls", "--no-align", "--data", "vgshape", "--iters", "13900", "--eval-every",
                               "1000", "--feature-cache-gb", "10", "--seed", "0"]
    assert long[0]["script"] == "motifs_align.py" and long[0]["tables"] == ["long"]
    for r in vg:
        if r["model"] == "motifs-long":
            continue
        s, flags = same[r["name"]], study.STUDIES["vgshape"]["flags"] + study.STUDIES["vgshape"].get(
            f"{r['model']}_flags", [])
        assert r["args"] == s["args"][:-2] + flags + s["args"][-2:] or (
            r["arm"] == "FREQ" and r["args"] == s["args"] + flags)
    assert study.STUDIES["vgshape"]["flags"][:2] == ["--data", "vgshape"]
    assert len({s["results"] for s in study.STUDIES.values()}) == len({s["runs_dir"] for s in study.STUDIES.values()}) == 2


def test_figure5_bars_are_paired_means_with_their_standard_error_over_seeds():
    base = {0: {"per_predicate_R@100": [0.5, 0.2, float("nan")]}, 1: {"per_predicate_R@100": [0.4, 0.2, float("nan")]},
            2: {"per_predicate_R@100": [0.6, 0.1, float("nan")]}}
    arm = {0: {"per_predicate_R@100": [0.6, 0.2, float("nan")]}, 1: {"per_predicate_R@100": [0.4, 0.5, float("nan")]},
           2: {"per_predicate_R@100": [0.8, 0.1, float("nan")]}}
    mean, se = study.per_predicate_difference(base, arm, [0, 1, 2])
    d0 = np.array([0.1, 0.0, 0.2])   # predicate 1's paired differences; predicate 2's are 0, 0.3, 0
    np.testing.assert_allclose(mean[:2], [0.1, 0.1])
    np.testing.assert_allclose(se[:2], [d0.std(ddof=1) / np.sqrt(3), np.array([0, 0.3, 0]).std(ddof=1) / np.sqrt(3)])
    assert np.isnan(mean[2]) and np.isnan(se[2])   # absent from the test split: no bar
    assert study.per_predicate_difference(base, arm, [1])[1] is None


def test_spread_from_two_baselines_is_the_paired_difference_noise_and_the_seeds_it_needs(tmp_path):
    res = str(tmp_path)
    fake(res, "motifs-sgcls-baseline-seed0", "motifs", "sgcls", "baseline", 0, {"mR@50": 0.100, "R@50": 0.30})
    fake(res, "motifs-sgcls-baseline-seed1", "motifs", "sgcls", "baseline", 1, {"mR@50": 0.115, "R@50": 0.31})
    with open(os.path.join(res, "motifs-sgcls-baseline-seed1", "log.txt"), "w") as f:
        f.write("val it 250 | mR@50 0.0900 | best 0.0900 (saved)\nval it 500 | mR@50 0.1100 | best 0.1100 (saved)\n")
    text = study.spread(res, "motifs", "sgcls")
    # two seeds 1.5 points apart: SD 1.06, a paired difference's SD 1.5, (1.5 / 0.8)^2 = 3.5 -> 4 pairs
    assert "| mR@50 | 10.00, 11.50 | 1.06 | 1.50 | 4 |" in text
    assert "| 1 | 9.00 | 11.00 |" in text and "| 0 | - | - |" in text   # seed 0 has no log: no curve
    with pytest.raises(SystemExit, match="needs >= 2 seeds"):
        study.spread(res, "motifs", "predcls")


def test_a_name_that_matches_nothing_is_one_line_error():
    r = cli("list", "motifs-predcls-nothing")
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0
    assert "motifs-predcls-nothing names no run" in r.stderr


def test_options_may_come_before_the_names():
    # `study.py list --data synthetic table2`, as the docs write it, once failed: argparse had given the
    # names' slot its empty list at `list` and then refused `table2` as unrecognized
    before, after = cli("list", "--data", "synthetic", "table2"), cli("list", "table2", "--data", "synthetic")
    assert before.returncode == 0, before.stderr
    assert before.stdout == after.stdout and "motifs-sgcls-freq" in before.stdout


def fake(results, name, model, mode, arm, seed, values, per_predicate=None):
    os.makedirs(os.path.join(results, name))
    with open(os.path.join(results, name, "run.json"), "w") as f:
        json.dump({"model": model, "mode": mode, "arm": arm, "seed": seed, "tables": ["table2"],
                   "wall_seconds": 60.0, "cpu_seconds": 1800.0}, f)
    m = {**values, "per_predicate_R@100": per_predicate or [0.0] * 25}
    with open(os.path.join(results, name, "metrics.json"), "w") as f:   # the best checkpoint's, a worse one
        json.dump({**{k: v - 0.1 for k, v in values.items()}, "final": m}, f)


def test_the_effect_against_length_puts_each_schedule_at_its_epochs(tmp_path):
    """The long-schedule figure's points: epochs = iterations x batch / training images (from each baseline's
    args.json and log.txt), the paired mean difference of test mR@50 and its SE, in points."""
    res = str(tmp_path)
    for model, pattern, iters, base, align in (
            ("motifs", "motifs-predcls-{}-seed{}", 2000, [0.20, 0.22], [0.21, 0.22]),
            ("motifs-long", "motifs-predcls-long-{}-seed{}", 13900, [0.25, 0.27], [0.28, 0.31])):
        for s in (0, 1):
            for arm, v in (("baseline", base[s]), ("align", align[s])):
                name = pattern.format(arm, s)
                fake(res, name, model, "predcls", arm, s, {"mR@50": v})
                with open(os.path.join(res, name, "args.json"), "w") as f:
                    json.dump({"iters": iters, "batch_size": 8}, f)
                with open(os.path.join(res, name, "log.txt"), "w") as f:
                    f.write("data /x: 6945 train / 1500 val / 4275 test images, 94 classes, 50 predicates\n")
    last, _, _ = study.load_results(res)
    (e0, m0, se0, n0, i0), (e1, m1, se1, n1, i1) = study.length_points(last, res, "vgshape")
    assert (i0, n0, i1, n1) == (2000, 2, 13900, 2)
    assert e0 == pytest.approx(2000 * 8 / 6945) and e1 == pytest.approx(13900 * 8 / 6945)   # 2.3 and 16.0
    assert m0 == pytest.approx(0.5) and se0 == pytest.approx(0.5)      # differences +1, 0 points
    assert m1 == pytest.approx(3.5) and se1 == pytest.approx(0.5)      # +3, +4
    assert study.length_figure(last, res, "vgshape") == "figure_length_motifs_predcls.png"
    assert os.path.isfile(os.path.join(res, "figure_length_motifs_predcls.png"))


def test_log_curves_read_training_loss_and_validation_with_the_resumed_lines_winning(tmp_path):
    """The overfitting figure's data: a resumed run logs the steps after its last checkpoint again (the later
    line is the one its weights continue from); SGTR prints validation in percent, Motifs as fractions."""
    log = tmp_path / "log.txt"
    log.write_text("it 50/100 | loss 0.900 (sup 0.800, align 0.010, λ 10) | 4.0 it/s\n"
                   "val it 50 | mR@50 0.2000 | R@50 0.6000 | best 0.2000 (saved)\n"
                   "it 100/100 | loss 0.700 (sup 0.600, align 0.010, λ 10) | 4.0 it/s\n"
                   "resumed from ckpt_last.pt at iteration 50\n"
                   "it 100/100 | loss 0.650 (sup 0.550, align 0.010, λ 10) | 4.0 it/s\n"
                   "val it 100 | mR@50 2.50 | R@50 61.00 | mR@100 2.60 | R@100 62.00\n", encoding="utf-8")
    c = study.log_curves(str(log))
    assert c["sup"] == {50: 0.8, 100: 0.55}
    assert c["mR@50"] == pytest.approx({50: 0.2, 100: 0.025}) and c["R@50"] == pytest.approx({50: 0.6, 100: 0.61})
    assert study.val_curve(str(log)) == [(50, 0.2), (100, pytest.approx(0.025))]


def test_the_overfitting_figure_takes_the_lowest_seed_whose_two_arms_logged_validation_recall(tmp_path, monkeypatch):
    res = str(tmp_path)
    picked = {}
    for arm, seed, line in (("baseline", 0, "val it 1000 | mR@50 0.2370 | best 0.2370 (saved)"),  # before R@50 was logged
                            ("align", 0, "val it 1000 | mR@50 0.2380 | R@50 0.6600 | best 0.2380 (saved)"),
                            ("baseline", 1, "val it 1000 | mR@50 0.2360 | R@50 0.6752 | best 0.2360 (saved)"),
                            ("align", 1, "val it 1000 | mR@50 0.2400 | R@50 0.6700 | best 0.2400 (saved)")):
        name = f"motifs-predcls-long-{arm}-seed{seed}"
        fake(res, name, "motifs-long", "predcls", arm, seed, {"mR@50": 0.25})
        with open(os.path.join(res, name, "log.txt"), "w", encoding="utf-8") as f:
            f.write(f"it 1000/1000 | loss 0.5 (sup 0.5, align 0.000, λ 0) | 4 it/s\n{line}\n")
    last, _, _ = study.load_results(res)
    import matplotlib.axes
    real = matplotlib.axes.Axes.plot
    def spy(ax, x, y, *a, label=None, **k):
        picked.setdefault(label, []).append(list(y))
        return real(ax, x, y, *a, label=label, **k)
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    name = study.overfit_figure(last, res, "vgshape")
    monkeypatch.undo()
    assert name == "figure_overfit_motifs_long_predcls.png" and os.path.isfile(os.path.join(res, name))
    assert picked["baseline, seed 1"] == [[0.5], [pytest.approx(23.6)], [pytest.approx(67.52)]]
    assert set(picked) == {"baseline, seed 1", "align, seed 1"}
    os.remove(os.path.join(res, "motifs-predcls-long-align-seed1", "log.txt"))   # no aligned curve: no figure
    assert study.overfit_figure(last, res, "vgshape") is None


def test_the_report_says_which_runs_were_timed_from_a_resume_only(tmp_path):
    """A run resumed after a stop records the time of its last process only: the CPU hours undercount it."""
    res = str(tmp_path)
    for s, resumed in ((0, False), (1, True)):
        name = f"motifs-predcls-baseline-seed{s}"
        fake(res, name, "motifs", "predcls", "baseline", s, {"mR@50": 0.2})
        with open(os.path.join(res, name, "log.txt"), "w", encoding="utf-8") as f:
            f.write("it 50/100 | loss 0.5 (sup 0.5, align 0.000, λ 0)\n"
                    + ("resumed from runs/x/ckpt_last.pt at iteration 50 (1m00s of training so far)\n" if resumed else ""))
    _, _, records = study.load_results(res)
    assert [r["resumed"] for r in records] == [False, True]
    assert study.cost_line(records) == "2 runs, 1.0 CPU hours in all (1 of them resumed after a stop: timed from the resume only)."


def test_report_means_stds_and_paired_differences_by_hand(tmp_path):
    res = str(tmp_path)
    base, align = [0.40, 0.44, 0.42], [0.43, 0.45, 0.47]
    for s in range(3):
        fake(res, f"b{s}", "motifs", "predcls", "baseline", s, {"mR@50": base[s], "R@50": 0.6})
        fake(res, f"a{s}", "motifs", "predcls", "align", s, {"mR@50": align[s], "R@50": 0.6})
    fake(res, "a9", "motifs", "predcls", "align", 9, {"mR@50": 0.9, "R@50": 0.6})   # unpaired: not in the diff
    lines = []
    table, best, _ = study.load_results(res)
    study.arm_table(lines, table, "motifs", "predcls", ["baseline", "align"], ["mR@50"])
    text = "\n".join(lines)
    # baseline 42.00 ± 2.00 (sample std of 40, 44, 42); aligned 4 runs: 43, 45, 47, 90
    assert "| baseline (ours) | 3 | 42.00 ± 2.00 |" in text
    v = 100 * np.array(align + [0.9])
    assert f"| align (ours) | 4 | {v.mean():.2f} ± {v.std(ddof=1):.2f} |" in text
    # paired on seeds 0-2: differences 3, 1, 5 -> mean 3, SE = 2 / sqrt(3)
    assert f"+3.00 ± {2 / np.sqrt(3):.2f} (n = 3)" in text
    # a difference between two arms (Table 3's variants) is the first minus the second, on their shared seeds
    lines = []
    study.arm_table(lines, table, "motifs", "predcls", ["baseline", "align"], ["mR@50"],
                    between=[("baseline", "align")])
    assert f"| baseline − align, paired (points, ± SE) | | -3.00 ± {2 / np.sqrt(3):.2f} (n = 3) |" in lines
    # the best-validation checkpoints (metrics.json's top level, 10 points lower here) get their own row
    lines = []
    study.arm_table(lines, best, "motifs", "predcls", ["baseline"], ["mR@50"])
    assert "| baseline (ours) | 3 | 32.00 ± 2.00 |" in "\n".join(lines)


def test_report_prints_what_changed_and_where_it_wrote_not_the_file(tmp_path, capsys):
    res = str(tmp_path)
    for s in range(2):
        fake(res, f"b{s}", "motifs", "predcls", "baseline", s, {"mR@50": 0.40 + s / 100, "R@50": 0.6})
        fake(res, f"a{s}", "motifs", "predcls", "align", s, {"mR@50": 0.42, "R@50": 0.6})
    with open(os.path.join(res, "dataset.json"), "w") as f:   # the predicates, so no dataset is generated
        json.dump({"idx_to_predicate": ["__background__"] + [f"p{i}" for i in range(1, 26)],
                   "train_counts": [0] + list(range(25, 0, -1)), "order": list(range(1, 26)),
                   "groups": {"head": [1], "body": [2], "tail": list(range(3, 26))}}, f)
    readme = os.path.join(res, "README.md")
    study.report(res, "synthetic")
    first = capsys.readouterr().out
    study.report(res, "synthetic")
    again = capsys.readouterr().out
    fake(res, "a2", "motifs", "predcls", "align", 2, {"mR@50": 0.5, "R@50": 0.6})
    study.report(res, "synthetic")
    changed = capsys.readouterr().out
    for out in (first, again, changed):   # what changed and where it went, not the file's tables
        assert "| run |" not in out and out.splitlines()[-1].startswith(f"wrote {readme} and "), out
    assert first.startswith(f"{readme}: 4 runs, ") and "a new file" in first and len(first.splitlines()) == 2
    assert "; unchanged" in again and len(again.splitlines()) == 2
    with open(readme) as f:
        titles = {line[3:].strip() for line in f if line.startswith("## ")}
    lines = changed.splitlines()   # the run count and the tables of the new run's arm, each by its title
    assert "5 runs" in lines[0] and f"{len(lines) - 2} of {len(titles) + 1} sections changed:" in lines[0], changed
    assert {t.strip() for t in lines[1:-1]} <= titles | {"(the introduction)"}
    assert "  Table 2: Motifs vs Align-Motifs, predcls (test, %)" in lines


def test_reporting_one_study_rewrites_the_index_of_both(tmp_path, monkeypatch, capsys):
    """results/README.md counts each study's runs; reporting one study alone must not leave it stale."""
    monkeypatch.setattr(study, "ROOT", str(tmp_path))
    syn, vgs = (str(tmp_path / study.STUDIES[s]["results"]) for s in ("synthetic", "vgshape"))
    os.makedirs(vgs)
    for s in range(3):   # the other study: counted, not reported
        fake(vgs, f"v{s}", "motifs", "predcls", "baseline", s, {"mR@50": 0.3, "R@50": 0.6})
    for s in range(2):
        fake(syn, f"b{s}", "motifs", "predcls", "baseline", s, {"mR@50": 0.40 + s / 100, "R@50": 0.6})
    with open(os.path.join(syn, "dataset.json"), "w") as f:   # the predicates, so no dataset is generated
        json.dump({"idx_to_predicate": ["__background__"] + [f"p{i}" for i in range(1, 26)],
                   "train_counts": [0] + list(range(25, 0, -1)), "order": list(range(1, 26)),
                   "groups": {"head": [1], "body": [2], "tail": list(range(3, 26))}}, f)
    index = tmp_path / "results" / "README.md"
    study.main(["report", "--data", "synthetic"])
    text = index.read_text()
    assert "(--data synthetic), 2 runs" in text and "(--data vgshape), 3 runs" in text, text
    assert text.index("vgshape/") < text.index("synthetic/")   # the VG-shaped study first
    fake(syn, "a0", "motifs", "predcls", "align", 0, {"mR@50": 0.42, "R@50": 0.6})
    study.main(["report", "--data", "synthetic"])
    assert "(--data synthetic), 3 runs" in index.read_text()
    elsewhere = str(tmp_path / "mine")   # a study of the user's own, outside results/: the index is left
    fake(elsewhere, "a1", "motifs", "predcls", "align", 1, {"mR@50": 0.42, "R@50": 0.6})
    shutil.copy(os.path.join(syn, "dataset.json"), elsewhere)
    before = index.read_text()
    study.main(["report", "--data", "synthetic", "--results", elsewhere])
    assert index.read_text() == before and os.path.isfile(os.path.join(elsewhere, "README.md"))


def test_a_run_without_the_last_iterations_metrics_is_one_line_error(tmp_path):
    os.makedirs(tmp_path / "old")
    with open(tmp_path / "old" / "run.json", "w") as f:
        json.dump({"model": "motifs", "mode": "predcls", "arm": "align", "seed": 0, "tables": ["table2"],
                   "wall_seconds": 1.0, "cpu_seconds": 1.0}, f)
    with open(tmp_path / "old" / "metrics.json", "w") as f:
        json.dump({"mR@50": 0.4}, f)
    r = cli("report", "--results", str(tmp_path), "--data", "synthetic")
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0 and 'has no "final"' in r.stderr


def predcls_image(rng, P):
    """Five GT objects, four GT relations, every ordered pair scored; the right predicate is favoured on
    about half of the pairs, so that recalls are neither 0 nor 1."""
    xy = rng.uniform(0, 50, (5, 2))
    gt = {"boxes": np.concatenate([xy, xy + 10], 1), "labels": rng.integers(1, 4, 5)}
    ii, jj = np.nonzero(~np.eye(5, dtype=bool))
    pick = rng.choice(len(ii), 4, replace=False)
    gt["relations"] = np.stack([ii[pick], jj[pick], rng.integers(1, P + 1, 4)], 1)
    logits = rng.standard_normal((len(ii), P + 1))
    logits[pick[:2], gt["relations"][:2, 2]] += 3
    e = np.exp(logits)
    return gt, {"rel_pairs": np.stack([ii, jj], 1), "rel_scores": e / e.sum(1, keepdims=True)}


def test_reweighted_recalls_are_the_evaluators_with_images_repeated():
    """variance()'s bootstrap counts image i w[i] times: w = 1 must be SGEvaluator.summary() exactly, and
    w = (2, 1, 0, ...) the summary of the list with image 0 twice and image 2 left out."""
    import metrics
    rng, P = np.random.default_rng(0), 6
    images = [predcls_image(rng, P) for _ in range(10)]

    def summary(imgs):
        ev = metrics.SGEvaluator("predcls", P)
        for gt, pred in imgs:
            ev.add(gt, pred)
        return ev.summary(), ev.state_dict()["records"]

    s, records = summary(images)
    e = study.recall_entries(records, 1)   # K = 50
    w = np.ones((2, 10))
    w[1, 0], w[1, 2] = 2, 0
    r, mr = study.weighted_recalls(e, w, P)
    assert 0 < s["mR@50"] < 1 and 0 < s["R@50"] < 1
    assert abs(r[0] - s["R@50"]) < 1e-12 and abs(mr[0] - s["mR@50"]) < 1e-12
    s2, _ = summary([images[0]] + images[:2] + images[3:])
    assert abs(r[1] - s2["R@50"]) < 1e-12 and abs(mr[1] - s2["mR@50"]) < 1e-12
    assert abs(mr[1] - mr[0]) > 1e-6   # the weights did change something


def test_run_collect_skip_verify_and_report(tmp_path):
    results, runs = str(tmp_path / "results"), str(tmp_path / "runs")
    env = {"SGG_ALIGN_CACHE": str(tmp_path / "cache")}
    args = ["--data", "synthetic", "--seeds", "0", "--results", results, "--runs-dir", runs, "--extra", TINY]
    killed = os.path.join(runs, "motifs-predcls-align-seed0")   # as left by a run killed before its 1st checkpoint
    os.makedirs(killed)
    with open(os.path.join(killed, "args.json"), "w") as f:
        json.dump({"seed": 0}, f)
    r = cli("run", "motifs-predcls-baseline-seed0", "motifs-predcls-align-seed0", "--jobs", "2", *args, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    aside = [d for d in os.listdir(runs) if d.startswith("motifs-predcls-align-seed0.unfinished-")]
    assert len(aside) == 1 and os.listdir(os.path.join(runs, aside[0])) == ["args.json"], os.listdir(runs)
    for name, flags in (("motifs-predcls-baseline-seed0", "--predcls --no-align --seed 0"),
                        ("motifs-predcls-align-seed0", "--predcls --seed 0")):
        folder = os.path.join(results, name)
        assert sorted(os.listdir(folder)) == ["args.json", "command.txt", "log.txt", "metrics.json", "run.json"]
        with open(os.path.join(folder, "command.txt")) as f:
            assert f.read() == f"OMP_NUM_THREADS=1 python motifs_align.py {flags} {TINY} --out {runs}/{name}\n"
        with open(os.path.join(folder, "args.json")) as f:
            assert json.load(f)["no_align"] == ("no-align" in flags)
        assert os.path.isfile(os.path.join(runs, name, "ckpt_best.pt"))   # checkpoints stay out of results/
    before = os.path.getmtime(os.path.join(results, "motifs-predcls-align-seed0", "metrics.json"))
    r = cli("list", "motifs-predcls-baseline-seed0", "motifs-predcls-align-seed0", *args)
    assert r.stdout.splitlines()[-1] == "2 of 2 done"
    r = cli("run", "motifs-predcls-baseline-seed0", "motifs-predcls-align-seed0", *args, env=env)
    assert "2 of 2 already done; running 0" in r.stdout
    assert os.path.getmtime(os.path.join(results, "motifs-predcls-align-seed0", "metrics.json")) == before
    # the study stopped after a run had finished but before its results were kept: the next `run` keeps
    # them, without training again (a model file refuses to start in a finished folder)
    kept = os.path.join(results, "motifs-predcls-baseline-seed0")
    os.rename(kept, str(tmp_path / "moved"))
    r = cli("run", "motifs-predcls-baseline-seed0", *args, env=env)
    assert r.returncode == 0 and "its results are kept now" in r.stdout, r.stdout + r.stderr
    with open(os.path.join(kept, "metrics.json")) as f, open(tmp_path / "moved" / "metrics.json") as g:
        assert f.read() == g.read()
    with open(os.path.join(kept, "run.json")) as f:
        assert json.load(f)["cpu_seconds"] is None
    r = cli("verify", "motifs-predcls-align-seed0", *args, env=env)
    assert r.returncode == 0 and "metrics.json identical" in r.stdout, r.stdout + r.stderr
    r = cli("report", "--results", results, "--data", "synthetic")
    assert r.returncode == 0, r.stderr
    with open(os.path.join(results, "motifs-predcls-align-seed0", "metrics.json")) as f:
        m = json.load(f)
    with open(os.path.join(results, "README.md")) as f:
        text = f.read()
    m = m["final"]   # the report's numbers are the last iteration's (docs/variance.md)
    assert f"| align (ours) | 1 | {100 * m['mR@20']:.2f} | {100 * m['mR@50']:.2f} |" in text
    assert re.search(r"\n2 runs, [0-9.]+ CPU hours in all \(1 of them collected without a measured time\)\.", text)
    assert os.path.isfile(os.path.join(results, "figure5_motifs_predcls.png"))


def test_metrics_json_is_the_test_of_ckpt_best_and_final_that_of_ckpt_last(tmp_path):
    """A Motifs run whose best validation comes early (a large learning rate, validated at every iteration):
    metrics.json's top level must be the test of ckpt_best.pt, and its "final" (what the study compares)
    the test of ckpt_last.pt, both evaluated again here; two different tests in this run."""
    out = str(tmp_path / "motifs-run")   # study.test_records knows the model by the name
    args = ["--predcls", "--iters", "4", "--det-iters", "3", "--max-eval-images", "6", "--eval-every", "1",
            "--batch-size", "2", "--det-batch", "2", "--eval-batch", "3", "--lr", "0.5", "--out", out]
    r = subprocess.run([sys.executable, os.path.join(ROOT, "motifs_align.py"), *args], cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    with open(os.path.join(out, "metrics.json")) as f:
        m = json.load(f)
    assert m["best_step"] < 4 and "the last iteration's weights (4)" in r.stdout
    threads = torch.get_num_threads()
    got = {which: study.test_records("motifs-run", str(tmp_path), which)[1] for which in ("best", "last")}
    assert torch.get_num_threads() == threads   # test_records evaluates on one thread, then gives ours back
    keys = ("R@20", "R@50", "R@100", "mR@20", "mR@50", "mR@100")
    assert [got["best"][k] for k in keys] == [m[k] for k in keys]
    assert [got["last"][k] for k in keys] == [m["final"][k] for k in keys]
    assert [m[k] for k in keys] != [m["final"][k] for k in keys]


def test_figure4_shows_the_mirrors_masked_attention(tmp_path):
    """Figure 4 from a tiny SGTR run: the mirror's weights for the pictured query are zero exactly where
    the kernel's mask (bernoulli_mask of the block's seed) drops a logit, and both rows sum to one."""
    small = ["--d-model", "32", "--nheads", "2", "--ffn-dim", "64", "--backbone-width", "8", "--enc-layers", "1",
             "--ent-dec-layers", "1", "--rel-enc-layers", "1", "--pred-dec-layers", "2", "--batch-size", "4",
             "--eval-batch", "8", "--max-eval-images", "8", "--det-iters", "4", "--iters", "4", "--eval-every", "4",
             "--mask-p", "0.3"]
    out = str(tmp_path / "run")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "sgtr_align.py"), *small, "--out", out], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    # SGTR's "final" is the test of ckpt_last.pt (here also the best: one validation, at the last iteration)
    with open(os.path.join(out, "metrics.json")) as f:
        final = json.load(f)["final"]
    _, got = study.test_records("run", str(tmp_path), "last")
    keys = ("R@20", "R@50", "mR@20", "mR@50", "mR@100")
    assert [got[k] for k in keys] == [final[k] for k in keys]
    w_orig, w_mirror, drop = study.figure4(os.path.join(out, "ckpt_best.pt"), str(tmp_path / "f4.png"))
    assert os.path.isfile(tmp_path / "f4.png")
    assert drop.any() and not drop.all()
    assert (w_mirror[drop] == 0).all() and (w_mirror[~drop] > 0).all()
    assert (w_orig > 0).all()
    assert abs(float(w_orig.sum()) - 1) < 1e-5 and abs(float(w_mirror.sum()) - 1) < 1e-5
