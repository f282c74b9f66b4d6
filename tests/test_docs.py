"""The README and docs/ against the code and the committed results: what a newcomer reads first must not go
stale (a newcomer's trial found a log line that no log held, errors that the scripts do not print, a wrong class count,
two costs of the alignment, one copy-paste block for two machines' torch, and a README of 4,035 words)."""
import glob
import json
import os
import re

import numpy as np
import pytest

import motifs_align as M
import scenes
import sgtr_align as S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def test_the_readme_reads_in_ten_minutes():
    assert len(read("README.md").split()) < 2000


def test_the_readmes_log_line_is_in_a_committed_log():
    line = re.search(r"`(it \d+/\d+ \| loss [^`]+)`", read("README.md")).group(1)
    logs = glob.glob(os.path.join(ROOT, "results", "*", "*", "log.txt")) + [os.path.join(ROOT, "docs", "quickstart", "log.txt")]
    assert any(line in read(p) for p in logs), line


def test_the_quick_start_numbers_are_its_committed_runs_and_the_spread_the_studys():
    """The README's quick-start numbers are docs/quickstart/metrics.json's (that command's run); the spread over
    seeds is that of the study's runs of the same command, results/synthetic/motifs-predcls-align-seed*."""
    readme = read("README.md")
    quick = json.loads(read("docs/quickstart/metrics.json"))
    runs = [json.loads(read(f"results/synthetic/motifs-predcls-align-seed{s}/metrics.json")) for s in range(4)]
    said = re.search(r"\*\*PredCls R@20 ([\d.]+), R@50 ([\d.]+), R@100 ([\d.]+), mR@20 ([\d.]+), mR@50 ([\d.]+), "
                     r"mR@100 ([\d.]+), zsR@50 ([\d.]+)", " ".join(readme.split()))
    keys = ("R@20", "R@50", "R@100", "mR@20", "mR@50", "mR@100", "zsR@50")
    assert [float(v) for v in said.groups()] == [round(100 * quick[k], 2) for k in keys]
    assert f"mAP@0.5 **{quick['det_mAP@0.5']:.3f}**" in readme
    # the log is the quick start's: its default run folder, the default method and length
    assert read("docs/quickstart/log.txt").startswith(
        "run runs/motifs_align-predcls-align-seed0 | predcls | aligned (p 0.1, λ 10, kl), 1000 iterations | seed 0 |")
    spread = re.search(r"standard deviations of ([\d.]+) points R@50 \(mean ([\d.]+)\), ([\d.]+) mR@50 "
                       r"\(mean ([\d.]+)\), ([\d.]+) zsR@50 and ([\d.]+) tail mR@100; the quick start's ([\d.]+) and "
                       r"([\d.]+) lie ([\d.]+) and ([\d.]+) of them from those means", " ".join(readme.split()))
    said = [float(x) for x in spread.groups()]
    got = []
    for k in ("R@50", "mR@50"):
        v = np.array([100 * r[k] for r in runs])
        got += [round(v.std(ddof=1), 1), round(v.mean(), 2)]
    got += [round(np.std([100 * r[k] for r in runs], ddof=1), 1) for k in ("zsR@50", "tail_mR@100")]
    got += [round(100 * quick[k], 2) for k in ("R@50", "mR@50")]
    got += [round(abs(100 * quick[k] - np.mean([100 * r[k] for r in runs])) / np.std([100 * r[k] for r in runs], ddof=1), 1)
            for k in ("R@50", "mR@50")]
    assert said == got, (said, got)
    # docs/running.md says the same of the quick start beside the seeds
    running = " ".join(read("docs/running.md").split())
    assert (f"R@50 {got[6]:.2f} and mR@50 {got[7]:.2f} lie {got[8]} and {got[9]} standard deviations from these seeds' "
            f"means ({got[1]:.2f}, {got[3]:.2f})") in running


def test_install_gives_each_machine_its_own_block():
    blocks = re.findall(r"```bash\n(.*?)```", read("README.md"), re.S)
    torch_lines = [[line for line in b.splitlines() if line.startswith("pip install torch")] for b in blocks]
    assert sorted(len(t) for t in torch_lines if t) == [1, 1]   # one torch line per block, two machines


def test_the_docs_count_the_synthetic_classes_right():
    n = len(scenes.SYNTHETIC_CLASSES)   # the small default data's classes
    assert f"its {n} drawn classes" in read("docs/running.md")
    assert f"synthetic scenes have {n} object classes" in read("docs/motifs.md")
    assert f"**{n} object classes**" in read("docs/data.md")


def test_the_alignments_cost_is_one_number_in_each_place():
    """The README's cost of the alignment is the CPU-time ratio of the bench line each model's doc quotes."""
    readme = " ".join(read("README.md").split())
    motifs, sgtr = re.search(r"Motifs training step ([\d.]+)× slower and an SGTR step ([\d.]+)×", readme).groups()
    line = r"detector cached\s+\|[^|]+\|[^|]+\| alignment ratio [\d.]+ / ([\d.]+)"
    assert re.search(line, read("docs/motifs.md")).group(1) == motifs
    assert re.search(line, read("docs/sgtr.md")).group(1) == sgtr


def test_the_example_errors_are_what_the_scripts_print():
    text = read("docs/running.md")
    block = text[text.index("## Mistakes end in one line"):]
    lines = re.search(r"```\n(.*?)```", block, re.S).group(1).splitlines()
    assert lines and all(line.startswith("error: ") for line in lines)   # no prefix, no usage line
    for argv in (["--predcls", "--iters", "0"], ["--predcls", "--iters", "many"]):
        with pytest.raises(SystemExit) as e:
            M.parse_config(argv)
        assert str(e.value.code) in lines
    for argv in (["--iters", "0"], ["--iters", "many"]):   # SGTR words them alike
        with pytest.raises(SystemExit) as e:
            S.parse_config(argv)
        assert str(e.value.code) in lines


def test_the_readmes_results_tables_are_the_studies_paired_differences():
    """Each row of the README's two results tables (the VG-shaped study's, then the small data's) is the paired
    difference aligned − baseline that study.py computes from that study's committed run folders."""
    import study
    readme = read("README.md")
    names = {"Motifs PredCls": ("motifs", "predcls"), "Motifs SGCls": ("motifs", "sgcls"),
             "Motifs SGDet": ("motifs", "sgdet"), "SGTR SGDet": ("sgtr", "sgdet"),
             "SGTR SGDet (first)": ("sgtr600", "sgdet"),    # the record: the studies' first SGTR
             "Motifs PredCls, 16 epochs": ("motifs-long", "predcls")}   # the long schedule
    tables = re.findall(r"(\| comparison \| pairs \|[^\n]*\n\|[-|]+\n(?:\|[^\n]*\n)+)", readme)
    assert len(tables) == 2
    for table, data in zip(tables, ("vgshape", "synthetic")):
        res, _, _ = study.load_results(os.path.join(ROOT, "results", data))
        rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.strip().splitlines()]
        keys = rows[0][2:]
        for row in rows[2:]:
            model, mode = names[row[0]]
            base, align = res[(model, mode, "baseline")], res[(model, mode, "align")]
            for key, cell in zip(keys, row[2:]):
                if key.startswith("paper"):
                    continue
                want = study.paired(base, align, key)
                assert want.endswith(f"(n = {row[1]})"), (data, row[0], want)
                assert cell.replace("**", "").replace("−", "-") == want.rsplit(" (n =", 1)[0], (data, row[0], key)


def test_the_readme_opens_the_notebook_and_shows_infer():
    readme = read("README.md")
    assert "](docs/walkthrough.ipynb)" in readme and "jupyter notebook docs/walkthrough.ipynb" in readme
    assert "pip install -r requirements-notebook.txt" in readme and os.path.isfile(os.path.join(ROOT, "requirements-notebook.txt"))
    blocks = "".join(re.findall(r"```bash\n(.*?)```", readme, re.S))
    assert re.search(r"^python motifs_align.py --infer \S+ .*--ckpt runs/motifs_align-predcls-align-seed0/ckpt_best.pt",
                     blocks, re.M), "the README shows --infer on the quick start's checkpoint in one line"


def test_the_two_val_flags_name_each_other(capsys):
    """--val-images (how much of the val split a validation reads) and --num-val-im (the val split's size) were
    easy to confuse: each one's help names the other, in both scripts."""
    for parse in (M.parse_config, S.parse_config):
        with pytest.raises(SystemExit):
            parse(["--help"])
        text = " ".join(capsys.readouterr().out.split())
        help_of = lambda flag: text.rsplit(flag, 1)[1].split("(default:", 1)[0]   # its help, after the usage
        assert "--num-val-im" in help_of("--val-images VAL_IMAGES") and "--val-images" in help_of("--num-val-im NUM_VAL_IM")


def test_the_shape_tables_study_numbers_are_the_studys():
    """data.py --data vgshape prints, beside its own FREQ and the early Motifs baseline, the study's (data.py reads
    no results: data.STUDY_MEASURED holds them); they must be results/vgshape/'s."""
    import data
    import study
    last, _, _ = study.load_results(os.path.join(ROOT, "results", "vgshape"))
    for name, key in (("freq", ("motifs", "predcls", "FREQ")), ("predcls", ("motifs", "predcls", "baseline"))):
        runs = last[key].values()
        for k in ("R@50", "mR@50"):
            assert data.STUDY_MEASURED["vgshape"][name][k] == round(float(np.mean([r[k] for r in runs])), 4), (name, k)
    assert len(last[("motifs", "predcls", "baseline")]) == 4   # "the mean of 4 seeds", as the table says
