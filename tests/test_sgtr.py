"""Tests of sgtr_align.py: the matcher, graph assembling, smoke runs. The paper's alignment (sections
3.1, 3.2, 4.1, 4.3, 7) is tested in tests/test_sgtr_method.py.

The smoke runs launch the script on the synthetic data from the test session's private cache
(conftest.py); the first one pretrains the entity detector (2 iterations) into that cache, and the
later ones with the same detector settings load it from there.
"""
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import metrics
import sgtr_align as S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
C1, P1 = 8, 6  # C + 1 object classes, P + 1 predicates


def tiny_cfg(**kw):
    base = dict(d_model=32, nheads=2, ffn_dim=64, backbone_width=8, backbone_stride=8, enc_layers=1,
                ent_dec_layers=2, rel_enc_layers=1, pred_dec_layers=2, num_ent_queries=5,
                num_pred_queries=7, dropout=0.1)
    base.update(kw)
    return S.Config(**base)


# ----------------------------------------------------------------------------------------------
# Matcher and graph assembling

def test_matcher_no_gt_and_more_gt_than_queries():
    qi, gi = S.hungarian_match(torch.rand(5, 0))
    assert len(qi) == len(gi) == 0
    cost = torch.tensor([[4.0, 1.0, 3.0, 9.0], [2.0, 0.0, 5.0, 9.0]])  # 2 queries, 4 GT
    qi, gi = S.hungarian_match(cost)
    assert len(qi) == 2 and len(set(gi.tolist())) == 2
    # optimum: query 0 -> GT 1 costs 1, query 1 -> GT 0 costs 2 (total 3 < 0 + 4 or 0 + 3)
    assert dict(zip(qi.tolist(), gi.tolist())) == {0: 1, 1: 0}
    with pytest.raises(ValueError, match="NaN"):
        S.hungarian_match(torch.tensor([[float("nan")]]))


def test_box_ops():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [4.0, 4.0, 5.0, 5.0]])
    iou, _ = S.box_iou(a, b)
    torch.testing.assert_close(iou, torch.tensor([[1 / 7, 0.0]]))
    giou = S.generalized_box_iou(a, b)
    torch.testing.assert_close(giou, torch.tensor([[1 / 7 - 2 / 9, -(25 - 5) / 25]]))
    x = torch.tensor([[0.5, 0.5, 0.2, 0.4]])
    torch.testing.assert_close(S.box_xyxy_to_cxcywh(S.box_cxcywh_to_xyxy(x)), x)


def onehot_logits(n, idx, strength=12.0):
    out = torch.zeros(len(idx), n)
    out[torch.arange(len(idx)), torch.tensor(idx)] = strength
    return out


def test_graph_assembling_hand_made():
    """3 confident entities, 2 predicate queries whose indicators point at (0 -> 1) and (2 -> 0)."""
    # entities: cat (label 1) left, dog (2) right, ball (3) bottom; a 4th query is background
    ent_boxes = torch.tensor([[0.25, 0.25, 0.3, 0.3], [0.75, 0.25, 0.3, 0.3], [0.5, 0.8, 0.2, 0.2],
                              [0.5, 0.5, 0.1, 0.1]])
    out = dict(ent_logits=onehot_logits(C1, [1, 2, 3, 0]), ent_boxes=ent_boxes,
               pred_probs=onehot_logits(P1, [2, 4]).softmax(-1),
               sub_logits=onehot_logits(C1, [1, 3]), sub_boxes=ent_boxes[[0, 2]] + 0.01,
               obj_logits=onehot_logits(C1, [2, 1]), obj_boxes=ent_boxes[[1, 0]] - 0.01,
               rel_vec=torch.cat([ent_boxes[[0, 2], :2], ent_boxes[[1, 0], :2]], 1) + 0.01)  # the centres
    g = S.assemble_graph(out, size=(100, 200), topk=2, max_pairs=100)
    torch.testing.assert_close(g["boxes"][0], torch.tensor([20.0, 10.0, 80.0, 40.0]))  # pixels
    assert g["labels"][:3].tolist() == [1, 2, 3]
    pairs = [tuple(p) for p in g["rel_pairs"].tolist()]
    assert (pairs[0], pairs[1]) in (((0, 1), (2, 0)), ((2, 0), (0, 1)))  # the two intended, ranked first
    assert all(a != b for a, b in pairs)  # never an entity with itself
    assert len(set(pairs)) == len(pairs)  # each pair once
    best = {pairs[i]: int(g["rel_scores"][i, 1:].argmax()) + 1 for i in range(2)}
    assert best == {(0, 1): 2, (2, 0): 4}
    assert g["rel_scores"].shape == (len(pairs), P1) and g["rel_scores"].max() <= 1


def test_sgtr_post_process_hand_made():
    """SGTR's list: the image's Qp best (query, predicate) entries, K zipped pairs, near-duplicates dropped;
    a pair may carry two predicates, and the evaluator then counts both, as SGTR's published R@K does."""
    boxes = torch.tensor([[10.0, 10, 50, 50], [60, 10, 100, 50], [11, 11, 50, 51]])  # entity 2 ~ entity 0
    labels, conf = torch.tensor([1, 2, 1]), torch.tensor([0.9, 0.8, 0.7])
    prob = torch.tensor([[0.0, 0.9, 0.8, 0.0], [0.0, 0.0, 0.0, 0.5]])  # (Qp 2, P+1 4)
    s_idx, o_idx = torch.tensor([[0, 2], [1, 0]]), torch.tensor([[1, 1], [0, 0]])  # (Qp, K 2), zipped
    g = S.sgtr_post_process(prob, s_idx, o_idx, boxes, labels, conf, sigmoid=True)
    # query 0's two predicates are the image's 2 best entries; (2 -> 1) repeats (0 -> 1) with a look-alike
    # subject and is dropped; query 1's 0.5 is not among the 2 best
    assert g["rel_pairs"].tolist() == [[0, 1], [0, 1]]
    torch.testing.assert_close(g["rel_scores"], torch.tensor([[0.0, 0.9, 0.0, 0.0], [0.0, 0.0, 0.8, 0.0]]))
    three = S.sgtr_post_process(torch.cat([prob, prob[1:] * 0.2]), torch.cat([s_idx, s_idx[1:]]),
                                torch.cat([o_idx, o_idx[1:]]), boxes, labels, conf, sigmoid=True)
    # with 3 entries query 1's (1 -> 0) comes in; its zipped second pair (0 -> 0) is an entity with itself
    assert three["rel_pairs"].tolist() == [[0, 1], [0, 1], [1, 0]]
    # a softmax head: each query's best predicate, so query 1's (1 -> 0) comes in and query 0 gives one
    best = S.sgtr_post_process(prob, s_idx, o_idx, boxes, labels, conf, sigmoid=False)
    assert best["rel_pairs"].tolist() == [[0, 1], [1, 0]]
    torch.testing.assert_close(best["rel_scores"], torch.tensor([[0.0, 0.9, 0.0, 0.0], [0.0, 0.0, 0.0, 0.5]]))
    gt = dict(boxes=boxes[:2], labels=labels[:2], relations=torch.tensor([[0, 1, 1], [0, 1, 2]]))
    one_row = dict(g, rel_pairs=g["rel_pairs"][:1], rel_scores=g["rel_scores"][:1] + g["rel_scores"][1:])
    for pred, expected in ((g, 1.0), (one_row, 0.5)):   # one row per triplet: both count; one per pair: one
        assert metrics.SGEvaluator("sgdet", 3).add(gt, pred)["R@20"] == expected


# ----------------------------------------------------------------------------------------------
# Smoke runs of the script (synthetic data, a few iterations)

SMOKE = ["--d-model", "32", "--nheads", "2", "--ffn-dim", "64", "--backbone-width", "8",
         "--enc-layers", "1", "--ent-dec-layers", "1", "--rel-enc-layers", "1", "--pred-dec-layers", "1",
         "--batch-size", "4", "--eval-batch", "8", "--max-eval-images", "8", "--log-every", "2",
         "--det-iters", "2", "--det-batch", "4"]  # the detector: pretrained once, then found in the session's cache
# Aligned, 8 iterations, validation at 4 and 8, ckpt_last.pt every 2: long enough to be killed mid-run.
RUN = SMOKE + ["--iters", "8", "--eval-every", "4", "--ckpt-every", "2"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def script(args, **kw):
    cmd = [sys.executable, os.path.join(ROOT, "sgtr_align.py")] + args
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240, **kw)


def run(args):
    r = script(args)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout


def metrics_of(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)


def user_error(argv):
    """S.main(argv) in this process must stop with one `error: ...` line (SystemExit's message)."""
    with pytest.raises(SystemExit) as e:
        S.main(argv)
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    return msg


def folder_state(out):
    return {f: os.path.getmtime(os.path.join(out, f)) for f in sorted(os.listdir(out))}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One uninterrupted run of RUN, shared by the tests below: (its folder, its stdout)."""
    out = str(tmp_path_factory.mktemp("sgtr") / "a")
    return out, run(RUN + ["--out", out])


def test_smoke_run_outputs(finished):
    out, log = finished
    for f in ("args.json", "log.txt", "metrics.json", "timing.json", "ckpt_best.pt", "ckpt_last.pt",
              "curves.png", "per_predicate.png", "examples.png"):
        assert os.path.exists(os.path.join(out, f)), f
    with open(os.path.join(out, "args.json")) as f:   # the instruction set (AVX2 by the pin), torch, threads
        machine = json.load(f)["machine"]
    assert machine == {"isa": "AVX2" if platform.machine().lower() in ("x86_64", "amd64") else machine["isa"],
                       "torch": torch.__version__, "threads": 1}
    assert "feature cache: on" in log   # the frozen detector's outputs are cached on the built-in data
    # the progress lines in their documented format, one every --log-every iterations
    lines = re.findall(r"^it (\d+)/8 \| loss [\d.]+ \(sup [\d.]+, align [\d.]+, λ 10\) \| [\d.]+ it/s \| "
                       r"eta \d+m\d\ds$", log, re.M)
    assert lines == ["2", "4", "6", "8"], log
    # the detector was pretrained first (the first run of the session), with its progress lines
    assert re.findall(r"^det it (\d+)/2 \| loss [\d.]+ \| [\d.]+ it/s \| eta \d+m\d\ds$", log, re.M) == ["2"], log
    assert re.search(r"^detector: on 8 test images mAP@0.5 [\d.]+ \| ground-truth boxes found at IoU >= 0.5 "
                     r"among its 20 outputs: [\d.]+% \(with the right class: [\d.]+%\)$", log, re.M), log
    m = metrics_of(out)
    for k in ("R@20", "R@50", "R@100", "mR@50", "mR@100", "ngR@50", "head_mR@100", "tail_mR@100",
              "det_mAP@0.5", "det_recall@0.5", "det_recall@0.5_class"):
        assert 0.0 <= m[k] <= 1.0, k
    # zsR@K is there (NaN on these 8 images: none has a triplet unseen in training; see test_zero_shot_recall)
    assert {"zsR@20", "zsR@50", "zsR@100"} <= set(m)
    assert m["num_images"] == 8  # --max-eval-images
    losses = [h for h in m["history"] if "total" in h]
    assert [h["it"] for h in losses] == [2, 4, 6, 8]
    for h in losses:  # the logged terms add up as Eq. (3) says, and the alignment term is really there
        assert h["align"] > 0 and h["total"] == pytest.approx(h["sup"] + 10 * h["align"], rel=1e-5)
    assert [h["it"] for h in m["history"] if "val_mR@50" in h] == [4, 8]
    assert m["best_step"] in (4, 8)
    assert "train_seconds" not in m  # timings vary from run to run: they live in timing.json
    with open(os.path.join(out, "timing.json")) as f:
        assert set(json.load(f)) == {"train_seconds", "test_seconds"}
    assert f"test: ckpt_best.pt of iteration {m['best_step']} on rank 0" in log
    ck = torch.load(os.path.join(out, "ckpt_last.pt"), weights_only=True)
    assert ck["step"] == 8 and ck["best_step"] == m["best_step"] and ck["history"] == m["history"]
    assert {"model", "optimizer", "scheduler", "args", "vocab", "image_side", "train_seconds"} <= set(ck)
    assert len(ck["rng"]) == 1 and {"torch", "numpy", "python", "mask"} <= set(ck["rng"][0])
    assert ck["image_side"] == 160  # the synthetic images' longest side, for --infer
    assert torch.load(os.path.join(out, "ckpt_best.pt"), weights_only=True)["step"] == m["best_step"]
    # "final", the last iteration's test (what the study compares): the last validation's mR@50, and, where
    # the best checkpoint is the last iteration's (the same weights, tested once), that test exactly;
    # otherwise the last weights were tested first, and the log says so
    final = m["final"]
    assert final["val_mR@50"] == [h for h in m["history"] if "val_mR@50" in h][-1]["val_mR@50"]
    differ = [k for k in final if k != "val_mR@50" and json.dumps(final[k]) != json.dumps(m[k])]
    if m["best_step"] == 8:
        assert differ == [] and "after the last iteration's weights" not in log
    else:
        assert "after the last iteration's weights (8)" in log
    assert re.search(r"^test SGDet, last iteration \| R@20 [\d.]+ \| R@50 ", log, re.M), log
    # the lines both scripts write alike (docs/running.md): the end of training, the test of the best checkpoint
    assert re.search(r"^training done \(wall \d+m\d\ds, validation included\)$", log, re.M), log
    assert re.search(r"^test SGDet \| R@20 [\d.]+ \| R@50 [\d.]+ \| .* \| head_mR@100 [\d.]+ \| body_mR@100 [\d.]+ "
                     r"\| tail_mR@100 [\d.]+$", log, re.M), log
    # the lines docs/running.md promises of both scripts: what the run is, what it wrote, its total time
    assert re.search(rf"^run {re.escape(out)} \| sgdet \| aligned \(p = 0.1, λ = 10, kl\), 8 iterations \| seed 0 \| "
                     r"detector: pretrained for 2 iterations, cached as .*sgtr-detector-\w+\.pt \| 1 process\(es\) "
                     r"on cpu, \d+ thread\(s\)$", log, re.M), log
    assert f"wrote {out}/metrics.json, timing.json and pictures" in log
    assert re.search(r"^total time wall \d+m\d\ds, CPU \d+m\d\ds$", log, re.M), log


def test_same_command_twice_gives_identical_metrics(finished, tmp_path):
    """STYLE.md 11: the same command and seed on one machine and thread count repeat every number,
    the training losses of every progress line included (metrics.json holds them)."""
    out = str(tmp_path / "b")
    log = run(RUN + ["--out", out])
    assert "detector: loaded from " in log  # this time from the cache: the same numbers all the same
    assert metrics_of(out) == metrics_of(finished[0])


def cached_detector(log):
    path = re.search(r"^detector: (?:loaded from|pretraining .* cached as) (\S+)$", log, re.M).group(1)
    return path, torch.load(path, weights_only=True)["detector"]


def test_every_run_starts_from_the_one_cached_detector(finished, tmp_path):
    """The baseline, another seed and the aligned run all load the same cached detector (its own seed);
    by default it stays frozen, so the tested model holds exactly its weights."""
    path, det = cached_detector(finished[1])
    for extra in (["--no-align"], ["--seed", "1"]):
        log = run(SMOKE + ["--iters", "2", "--eval-every", "2", "--out", str(tmp_path / extra[-1])] + extra)
        assert f"detector: loaded from {path}" in log
        assert "(detector frozen, " in log
        best = torch.load(str(tmp_path / extra[-1] / "ckpt_best.pt"), weights_only=True)["model"]
        for name, w in det.items():
            assert torch.equal(best[name], w), name
    # an explicit --detector-ckpt is used as given
    log = run(SMOKE + ["--iters", "2", "--eval-every", "2", "--out", str(tmp_path / "explicit"),
                       "--detector-ckpt", path, "--lr-detector", "1e-4"])
    assert f"detector: loaded from {path}" in log and "(detector frozen, " not in log
    assert "no such file" in user_error(SMOKE + ["--detector-ckpt", str(tmp_path / "none.pt"),
                                                 "--out", str(tmp_path / "x")])


def test_zero_shot_recall(tmp_path):
    """evaluate() given the training triplets reports zsR@K: with none seen, every test triplet is zero-shot."""
    model = S.SGTR(tiny_cfg(no_align=True), C1, P1)
    g = torch.Generator().manual_seed(0)
    images = [(torch.rand(3, 40, 48, generator=g),
               dict(boxes=torch.tensor([[2.0, 3, 20, 30], [15, 5, 40, 35]]), labels=torch.tensor([1, 2]),
                    relations=torch.tensor([[0, 1, 3]]), size=(40, 48), image_id=i)) for i in range(3)]

    class Images(list):
        num_predicates = P1

    summary, _ = S.evaluate(model, Images(images), model.cfg, torch.device("cpu"), None, zeroshot=set())
    for k in ("zsR@20", "zsR@50", "zsR@100"):
        assert 0.0 <= summary[k] <= 1.0, k
    plain, _ = S.evaluate(model, Images(images), model.cfg, torch.device("cpu"), None)
    assert "zsR@50" not in plain and plain["R@50"] == summary["R@50"]


def test_vg_preset_trains_and_evaluates_on_a_vg_folder(tmp_path):
    """--preset vg builds SGTR's VG config (d 256, 6-layer DETR and decoders, 3-layer relation encoder, 100 / 180
    queries, the focal head and SGTR's post-processing) and runs
    on data in the Visual Genome format (a tiny folder, as tests/test_data.py writes it; small images)."""
    from test_data import write_vg_folder
    vg = write_vg_folder(str(tmp_path / "vg"))
    out = str(tmp_path / "run")
    log = run(["--preset", "vg", "--data", vg, "--num-val-im", "1", "--max-size", "64", "--iters", "1",
               "--det-iters", "1", "--batch-size", "2", "--det-batch", "2", "--eval-batch", "2",
               "--eval-every", "1", "--out", out])
    with open(os.path.join(out, "args.json")) as f:
        args = json.load(f)
    assert (args["d_model"], args["enc_layers"], args["ent_dec_layers"], args["rel_enc_layers"],
            args["pred_dec_layers"], args["num_ent_queries"], args["num_pred_queries"]) == (256, 6, 6, 3, 6, 100, 180)
    assert (args["pred_loss"], args["post_process"], args["lr"], args["ent_topk"]) == ("focal", "sgtr", 8e-5, 3)
    assert re.search(r"^model: \d+\.\d+M parameters", log, re.M) and "1 iterations x 2 images" in log
    ck = torch.load(os.path.join(out, "ckpt_best.pt"), weights_only=True)
    assert ck["model"]["pred_query.weight"].shape == (180, 3 * 256) and len(ck["vocab"]["idx_to_predicate"]) > 1
    m = metrics_of(out)
    assert m["num_images"] == 1 and 0.0 <= m["R@50"] <= 1.0 and 0.0 <= m["det_mAP@0.5"] <= 1.0


def test_killed_run_resumes_to_the_uninterrupted_end(finished, tmp_path):
    out = str(tmp_path / "c")
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "sgtr_align.py")] + RUN + ["--out", out], cwd=ROOT,
                         env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 200
        while not os.path.exists(os.path.join(out, "ckpt_last.pt")) and p.poll() is None and time.time() < deadline:
            time.sleep(0.02)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert not os.path.exists(os.path.join(out, "metrics.json")), "the run ended before it was killed"
    step = torch.load(os.path.join(out, "ckpt_last.pt"), weights_only=True)["step"]
    assert 2 <= step < 8
    # the same command again must not start over in the folder, and says how to continue
    assert "add --resume to continue it" in user_error(RUN + ["--out", out])
    log = run(RUN + ["--out", out, "--resume"])
    assert f"resumed from {out}/ckpt_last.pt at iteration {step}" in log
    # same batches (the sampler continues), same masks and dropout (every generator restored), same
    # schedule: the resumed run ends exactly where the uninterrupted one did
    assert metrics_of(out) == metrics_of(finished[0])


def test_infer_on_own_images(finished, tmp_path):
    from PIL import Image, ImageDraw
    paths = []
    for name, size in (("wide", (240, 150)), ("tall", (90, 200))):
        img = Image.new("RGB", size, (120, 180, 230))
        d = ImageDraw.Draw(img)
        d.rectangle([20, 40, 70, 120], fill=(30, 60, 200))
        d.ellipse([size[0] // 2, 20, size[0] - 10, 90], fill=(220, 120, 40))
        paths.append(str(tmp_path / f"{name}.png"))
        img.save(paths[-1])
    stdout = run(["--infer"] + paths + ["--ckpt", os.path.join(finished[0], "ckpt_best.pt")])
    out = os.path.join(finished[0], "infer")  # the default: next to the checkpoint
    assert len(stdout.strip().splitlines()) == 2
    for path, (W, H) in zip(paths, ((240, 150), (90, 200))):
        stem = os.path.join(out, os.path.splitext(os.path.basename(path))[0])
        assert f"{stem}_sg.png" in stdout
        with open(stem + "_sg.json") as f:
            triplets = json.load(f)
        assert 1 <= len(triplets) <= 10
        assert [t["score"] for t in triplets] == sorted((t["score"] for t in triplets), reverse=True)
        for t in triplets:
            assert {"subject", "subject_box", "predicate", "object", "object_box", "score"} == set(t)
            for x0, y0, x1, y1 in (t["subject_box"], t["object_box"]):  # the image's own pixels, to 0.1
                assert 0 <= x0 <= x1 <= W and 0 <= y0 <= y1 <= H
                assert all(v == round(v, 1) for v in (x0, y0, x1, y1))
        w, h = Image.open(stem + "_sg.png").size
        assert (w >= h) == (W >= H)  # the picture follows the image's aspect ratio


def test_user_mistakes_end_in_one_error_line(finished, tmp_path, monkeypatch):
    # in a subprocess: exit status, stderr, no traceback, nothing created
    bad = str(tmp_path / "no_such_data")
    r = script(SMOKE + ["--data", bad, "--out", str(tmp_path / "run")])
    err = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(err) == 1 and err[0].startswith("error: ") and bad in err[0], r.stderr
    assert not os.path.exists(tmp_path / "run")
    # in this process: the run folder of a finished run is refused and left untouched
    out = finished[0]
    before = folder_state(out)
    assert "already holds a finished run" in user_error(RUN + ["--out", out])
    msg = user_error(RUN + ["--out", out, "--iters", "10", "--lr", "1e-3"])
    assert "holds a run with other settings (differs in: iters, lr)" in msg
    assert "other settings" in user_error(RUN + ["--out", out, "--iters", "10", "--resume"])
    assert folder_state(out) == before
    with monkeypatch.context() as m:   # the run folder is checked first: nothing is generated for a refused run
        m.setenv("SGG_ALIGN_CACHE", str(tmp_path / "cache"))
        assert "holds no run" in user_error(RUN + ["--out", str(tmp_path / "new"), "--resume"])
    assert not os.path.exists(tmp_path / "new") and not os.path.exists(tmp_path / "cache")
    assert "--mask-p" in user_error(SMOKE + ["--mask-p", "1.5"])
    assert "--iters" in user_error(SMOKE + ["--iters", "ten"])
    not_ckpt = os.path.join(out, "args.json")
    from PIL import Image
    Image.new("RGB", (40, 30)).save(tmp_path / "x.png")
    assert not_ckpt in user_error(["--infer", str(tmp_path / "x.png"), "--ckpt", not_ckpt])
    assert "no_such.png" in user_error(["--infer", str(tmp_path / "no_such.png"), "--ckpt",
                                        os.path.join(out, "ckpt_best.pt")])


def test_load_checkpoint_says_in_one_line_what_a_file_is_not(tmp_path):
    torch.save({"model": {"w": torch.zeros(2)}}, tmp_path / "full.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "full.pt").read_bytes()[:100])   # a checkpoint cut short
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "notes.pt").write_text("hello: a text file\n")
    torch.save([1, 2], tmp_path / "list.pt")
    for name, says in (("empty.pt", "is an empty file, not a checkpoint of sgtr_align.py"),
                       ("notes.pt", "is not a checkpoint of sgtr_align.py: not a file written by torch.save"),
                       ("cut.pt", "a torch.save file that torch.load cannot read (RuntimeError: "),
                       ("list.pt", "it holds a list, not a dict"),
                       ("full.pt", "needed here: it has no args"),
                       ("none.pt", "no such checkpoint file")):
        with pytest.raises(SystemExit) as e:
            S.load_checkpoint(str(tmp_path / name), ("model", "args"))
        msg = str(e.value.code)
        assert msg.startswith(f"error: {tmp_path / name}") and says in msg and "\n" not in msg, msg
    assert S.load_checkpoint(str(tmp_path / "full.pt"), ("model",))["model"]["w"].shape == (2,)


def test_both_scripts_word_the_same_mistake_alike():
    import motifs_align as M
    for argv in (["--iters", "0"], ["--threads", "0"], ["--max-eval-images", "-1"], ["--mask-p", "1.5"],
                 ["--align-loss", "mse"]):
        said = []
        for parse in (M.parse_config, S.parse_config):
            with pytest.raises(SystemExit) as e:
                parse(["--predcls"] + argv if parse is M.parse_config else argv)
            said.append(str(e.value.code))
        assert said[0] == said[1], said


def test_both_scripts_word_the_run_folder_and_infer_mistakes_alike(tmp_path):
    """The same mistake, the same line from both scripts (each checks before anything is written)."""
    import dataclasses

    import motifs_align as M
    from PIL import Image
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "notes.jpg").write_text("a text file named like a photo")
    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    os.makedirs(tmp_path / "sub")
    Image.new("RGB", (40, 30)).save(tmp_path / "sub" / "a.jpg")
    other = tmp_path / "other"   # a run with other settings, where a mistyped --data must still be named first
    other.mkdir()
    (other / "args.json").write_text(json.dumps({"data": "synthetic", "seed": 7}))
    mistakes = {
        "--resume of nothing": ["--out", str(tmp_path / "none"), "--resume"],
        "--out is a file": ["--out", str(tmp_path / "file")],
        "--data mistyped": ["--data", str(tmp_path / "VGG"), "--out", str(other)],
        "--infer of a missing file": ["--infer", str(tmp_path / "missing.jpg"), "--ckpt", "none.pt"],
        "--infer of a non-image": ["--infer", str(tmp_path / "notes.jpg"), "--ckpt", "none.pt"],
        "--infer of two a.*": ["--infer", str(tmp_path / "a.png"), str(tmp_path / "sub" / "a.jpg"), "--ckpt", "none.pt"],
    }
    for model in ("motifs", "sgtr"):   # --resume of a run that stopped before its first checkpoint
        folder = tmp_path / f"started-{model}"
        folder.mkdir()
        script = M if model == "motifs" else S
        cfg = script.parse_config(["--out", str(folder)])
        (folder / "args.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    said = {}
    for name, argv in mistakes.items():
        for script in (M, S):
            with pytest.raises(SystemExit) as e:
                script.main(argv)
            said.setdefault(name, []).append(str(e.value.code))
    for model, script in (("motifs", M), ("sgtr", S)):
        with pytest.raises(SystemExit) as e:
            script.main(["--out", str(tmp_path / f"started-{model}"), "--resume"])
        said.setdefault("--resume before a checkpoint", []).append(
            str(e.value.code).replace(f"started-{model}", "started"))
    for name, (motifs, sgtr) in said.items():
        assert motifs == sgtr and motifs.startswith("error: ") and "\n" not in motifs, (name, motifs, sgtr)
    assert said["--data mistyped"][0].startswith(f"error: --data {tmp_path / 'VGG'}: no such folder")
    assert said["--infer of a missing file"][0] == f"error: --infer {tmp_path / 'missing.jpg'}: no such file"
    assert said["--infer of a non-image"][0].startswith(f"error: --infer {tmp_path / 'notes.jpg'}: not an image file")
    assert said["--out is a file"][0].endswith("exists and is not a run folder (no args.json); pass --out NEW_FOLDER")
    assert "has no ckpt_last.pt" in said["--resume before a checkpoint"][0]
    assert not os.path.exists(tmp_path / "none") and not os.listdir(tmp_path / "started-sgtr")[1:]   # nothing written


# A crowded scene like the one where a tag ended inside another object's box: a person, and near its top a
# head, a hat over the head, a small flower on the hat, ... (x1, y1, x2, y2)
CROWDED = [[20, 10, 140, 155], [60, 12, 100, 50], [55, 5, 105, 30], [40, 50, 130, 110], [30, 90, 50, 110],
           [62, 14, 80, 30], [0, 0, 10, 10], [150, 150, 159, 159]]


def test_every_tag_names_its_class_and_touches_its_own_box(tmp_path, monkeypatch):
    plt = S.pyplot()
    fig = plt.figure(figsize=(6, 6))
    ax = fig.add_axes([0, 0, 1, 1])
    tags = [f"{i}:{n}" for i, n in enumerate(["woman", "head", "hat", "shirt", "hand", "potted plant", "kite", "dog"])]
    S.draw_boxes(ax, torch.rand(3, 160, 160), [(t, torch.tensor(b), f"C{i}") for i, (t, b) in
                                                enumerate(zip(tags, CROWDED))])
    fig.canvas.draw()
    renderer, to_image = fig.canvas.get_renderer(), ax.transData.inverted()
    rects = {}
    for t in ax.texts:   # each tag's coloured patch as drawn, in the image's pixels
        e = t.get_bbox_patch().get_window_extent(renderer)
        (a, b), (c, d) = to_image.transform([(e.x0, e.y0), (e.x1, e.y1)])
        rects[t.get_text()] = (min(a, c), min(b, d), max(a, c), max(b, d))
    plt.close(fig)
    assert sorted(rects) == sorted(tags)
    for text, (x0, y0, x1, y1) in rects.items():
        bx0, by0, bx1, by1 = CROWDED[int(text.split(":")[0])]
        assert x0 <= bx1 + 0.5 and bx0 <= x1 + 0.5 and y0 <= by1 + 0.5 and by0 <= y1 + 0.5, (text, rects[text])
        for other, r in rects.items():   # there is room for every tag: none hides another
            assert other == text or min(x1, r[2]) - max(x0, r[0]) < 0.5 or min(y1, r[3]) - max(y0, r[1]) < 0.5
    # --infer's picture tags its boxes 'index:class', as Motifs does (they were bare numbers)
    seen = []
    monkeypatch.setattr(S, "draw_boxes", lambda ax, image, tagged: seen.extend(t for t, _, _ in tagged))
    pred = {"boxes": torch.tensor(CROWDED[:3], dtype=torch.float), "labels": torch.tensor([1, 2, 3])}
    S.plot_scene_graph(torch.rand(3, 160, 160), pred, [(1, 2, 1, 0.5), (0, 1, 2, 0.25)],
                       ["__background__", "woman", "head", "hat"], ["__background__", "wearing", "has"], "t",
                       str(tmp_path / "sg.png"))
    assert seen == ["0:head", "1:hat", "2:woman"]


def test_rng_states_survive_a_checkpoint(tmp_path):
    """Every generator --resume restores (torch, numpy, python, the mask generator) comes back from
    a weights_only checkpoint exactly."""
    import random

    import numpy as np
    model = S.SGTR(tiny_cfg(), C1, P1)

    def draw():
        return (torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)],
                model.mirror.draw_seeds())

    torch.save({"rng": [S.rng_states(model, torch.device("cpu"))]}, tmp_path / "ck.pt")
    first = draw()
    S.set_rng_states(torch.load(tmp_path / "ck.pt", weights_only=True)["rng"][0], model, torch.device("cpu"))
    assert draw() == first
    assert draw() != first  # (the generators do move on)


def test_ddp_two_processes_test_the_best_checkpoint(tmp_path):
    """Two processes (gloo), aligned, validations at 2 and 4; the last one replaces ckpt_best.pt (a tie
    goes to the later checkpoint, and the tiny run's recalls tie at 0). Rank 0 writes that file while
    the others go on to the test: every rank must test the checkpoint that metrics.json names."""
    out = str(tmp_path / "ddp")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        os.path.join(ROOT, "sgtr_align.py")] + SMOKE
                       + ["--iters", "4", "--eval-every", "2", "--ckpt-every", "2", "--out", out],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "2 process(es)" in r.stdout
    m = metrics_of(out)
    assert [h["it"] for h in m["history"] if "val_mR@50" in h] == [2, 4]
    assert m["best_step"] == 4, "the last validation must replace ckpt_best.pt, or this test tests nothing"
    assert re.search(r"^test: ckpt_best.pt of iteration 4 on rank 0, 4 on rank 1$", r.stdout, re.M), r.stdout
    assert m["num_images"] == 8  # each test image counted once across the two ranks
    # every rank's generators are in ckpt_last.pt, each its own (rank 1 resumes its own masks)
    rng = torch.load(os.path.join(out, "ckpt_last.pt"), weights_only=True)["rng"]
    assert len(rng) == 2
    assert not torch.equal(rng[0]["mask"], rng[1]["mask"]) and not torch.equal(rng[0]["torch"], rng[1]["torch"])
