"""Tests of motifs_align.py: the box operations against naive references and smoke runs of every
entry point of the script with a tiny budget. The paper's method (section 3.3: the mirror, the
masking, L_align, lambda, the ablations) is tested in tests/test_motifs_method.py.
"""
import dataclasses
import glob
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import motifs_align as M

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------------
# Box operations

def naive_roi_align(fmap, box, S, scale, sr):
    """torchvision's roi_align (aligned=True, fixed sampling ratio), one sample at a time."""
    Fc, h, w = fmap.shape
    x1, y1, x2, y2 = [float(v) * scale - 0.5 for v in box]
    bw, bh = (x2 - x1) / S, (y2 - y1) / S
    out = torch.zeros(Fc, S, S, dtype=torch.float64)
    for i in range(S):
        for j in range(S):
            for a in range(sr):
                for b in range(sr):
                    y = y1 + i * bh + (a + 0.5) * bh / sr
                    x = x1 + j * bw + (b + 0.5) * bw / sr
                    if y < -1 or y > h or x < -1 or x > w:
                        continue
                    y, x = max(y, 0.0), max(x, 0.0)
                    yl, xl = int(math.floor(y)), int(math.floor(x))
                    if yl >= h - 1:
                        yl = yh = h - 1
                        y = float(yl)
                    else:
                        yh = yl + 1
                    if xl >= w - 1:
                        xl = xh = w - 1
                        x = float(xl)
                    else:
                        xh = xl + 1
                    ly, lx = y - yl, x - xl
                    v = ((1 - ly) * (1 - lx) * fmap[:, yl, xl] + (1 - ly) * lx * fmap[:, yl, xh]
                         + ly * (1 - lx) * fmap[:, yh, xl] + ly * lx * fmap[:, yh, xh])
                    out[:, i, j] += v.double() / (sr * sr)
    return out


def test_roi_align_matches_naive_reference():
    g = torch.Generator().manual_seed(0)
    fmap = torch.randn(3, 9, 11, generator=g, dtype=torch.float64)
    boxes = torch.tensor([[4.0, 6.0, 40.0, 30.0],      # inside
                          [-10.0, -6.0, 20.0, 12.0],   # sticks out top-left
                          [70.0, 50.0, 95.0, 80.0],    # sticks out bottom-right
                          [13.0, 13.0, 14.0, 15.0]],   # smaller than one cell
                         dtype=torch.float64)
    got = M.roi_align(fmap, boxes, 5, 0.25, sampling_ratio=2)           # (4, 3, 5, 5)
    for k, b in enumerate(boxes):
        torch.testing.assert_close(got[k], naive_roi_align(fmap, b, 5, 0.25, 2), atol=1e-9, rtol=1e-9)


def test_box_coder_round_trip_and_nms():
    ref = torch.tensor([[10.0, 10.0, 50.0, 30.0], [0.0, 5.0, 8.0, 40.0]])
    gt = torch.tensor([[12.0, 8.0, 60.0, 33.0], [1.0, 1.0, 5.0, 50.0]])
    for w in ((1, 1, 1, 1), (10, 10, 5, 5)):
        torch.testing.assert_close(M.decode_boxes(ref, M.encode_boxes(ref, gt, w), w), gt)
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 9]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    assert M.nms(boxes, scores, 0.5).tolist() == [3, 2]        # 0 and 1 overlap 3 by IoU > 0.5
    labels = torch.tensor([1, 2, 1, 1])                          # class-wise: box 1 is another class
    assert sorted(M.batched_nms(boxes, scores, labels, 0.5).tolist()) == [1, 2, 3]


def test_detection_map_perfect_and_missing():
    import numpy as np
    gt = [{"boxes": np.array([[0, 0, 10, 10], [20, 20, 30, 30]], dtype=np.float32), "labels": np.array([1, 2])}]
    perfect = [{"boxes": gt[0]["boxes"], "labels": gt[0]["labels"], "scores": np.array([0.9, 0.8])}]
    assert M.detection_map(perfect, gt, 3) == pytest.approx(1.0)
    half = [{"boxes": gt[0]["boxes"][:1], "labels": gt[0]["labels"][:1], "scores": np.array([0.9])}]
    assert M.detection_map(half, gt, 3) == pytest.approx(0.5)   # class 2 never detected: AP 0


# ----------------------------------------------------------------------------------------------
# Neural Motifs as SGB builds it: the label decoder, teacher forcing, SGDet pairs, the frequency bias

def highway_lstm_step(dec, x, h, c):
    """neural-motifs' / SGB's highway LSTM equations, written out for one object (x (D,), h, c (H,))."""
    Hd = dec.hidden
    pi, ps = dec.input_linearity(x), dec.state_linearity(h)
    gate = [pi[k * Hd:(k + 1) * Hd] + (ps[k * Hd:(k + 1) * Hd] if k < 5 else 0) for k in range(6)]
    c = torch.sigmoid(gate[0]) * torch.tanh(gate[2]) + torch.sigmoid(gate[1]) * c
    out = torch.sigmoid(gate[3]) * torch.tanh(c)
    hw = torch.sigmoid(gate[4])
    return hw * out + (1 - hw) * gate[5], c


def decoder_by_hand(dec, x, order, labels=None):
    """One image: visit the objects in `order`, feed back the previous label's embedding ('start' first):
    the teacher-forced label in training (own best class where it is 0), the own best class at test."""
    h = c = torch.zeros(dec.hidden)
    prev = dec.obj_embed.weight[0]
    logits, commits = {}, {}
    for i in order.tolist():
        h, c = highway_lstm_step(dec, torch.cat([x[i], prev]), h, c)
        logits[i] = dec.out_obj(h)
        best = int(logits[i][1:].argmax()) + 1
        commits[i] = int(labels[i]) if labels is not None and labels[i] > 0 else best
        prev = dec.obj_embed.weight[commits[i] + 1]
    return torch.stack([logits[i] for i in range(len(x))]), [commits[i] for i in range(len(x))]


def tiny_decoder(seed=0):
    torch.manual_seed(seed)
    dec = M.DecoderRNN(in_dim=5, num_classes=4, embed_dim=3, hidden=6, dropout=0.2)
    with torch.no_grad():   # large weights: the fed-back label visibly changes the next step
        for prm in dec.parameters():
            prm.normal_(0, 1.0)
    return dec


def test_label_decoder_feeds_back_the_previous_label_by_hand():
    dec = tiny_decoder()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 5, generator=g)                 # two images, 4 and 3 objects
    counts, orders = [4, 3], [torch.tensor([2, 0, 3, 1]), torch.tensor([1, 2, 0])]
    labels = torch.tensor([3, 1, 2, 0, 1, 3, 2])       # object 3 is an unmatched (background) box
    dec.eval()
    logits, commits = dec(x, counts, orders)
    for b, (lo, n) in enumerate(((0, 4), (4, 3))):
        ref_logits, ref_commits = decoder_by_hand(dec, x[lo:lo + n], orders[b])
        torch.testing.assert_close(logits[lo:lo + n], ref_logits)
        assert commits[lo:lo + n].tolist() == ref_commits
    dec.train()
    dec.dropout = 0.0   # (the mask is checked below)
    logits_tf, commits_tf = dec(x, counts, orders, labels)
    for b, (lo, n) in enumerate(((0, 4), (4, 3))):
        ref_logits, ref_commits = decoder_by_hand(dec, x[lo:lo + n], orders[b], labels[lo:lo + n])
        torch.testing.assert_close(logits_tf[lo:lo + n], ref_logits)
        assert commits_tf[lo:lo + n].tolist() == ref_commits
    # teacher forcing commits the GT labels, and the unmatched box its own best class
    assert commits_tf[[0, 1, 2, 4, 5, 6]].tolist() == [3, 1, 2, 1, 3, 2]
    assert commits_tf[3] == logits_tf[3, 1:].argmax() + 1
    # the previous label matters: changing the label of the first object (2, left-most) changes the
    # next one's logits (0), and never an earlier object's or another image's
    other = labels.clone()
    other[2] = 1
    changed = (dec(x, counts, orders, other)[0] - logits_tf).abs().sum(1) > 1e-6
    assert changed[0] and not changed[2] and not changed[4:].any()
    # recurrent dropout: one mask per sequence in training, none at test
    dec.dropout = 0.5
    torch.manual_seed(0)
    a = dec(x, counts, orders, labels)[0]
    assert not torch.allclose(a, logits_tf)
    dec.eval()
    torch.testing.assert_close(dec(x, counts, orders)[0], logits)


def test_label_nms_commits_classes_greedily_as_the_reference():
    # Objects 0 and 1 sit on the same box; 2 is far away. Class 1 is the best for 0 and 1.
    box = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60]])
    per_cls = box[:, None].expand(3, 4, 4).clone()                      # (N, C, 4)
    probs = torch.tensor([[0.1, 0.8, 0.05, 0.05],
                          [0.1, 0.7, 0.15, 0.05],
                          [0.1, 0.6, 0.2, 0.1]])
    # 0 takes class 1 (0.8) and suppresses class 1 on 1; then 2 takes class 1 (0.6, far away);
    # then 1 takes its best class left, 2.
    assert M.label_nms(probs, per_cls, 0.5).tolist() == [1, 2, 1]
    assert M.label_nms(probs, per_cls, 1.01).tolist() == [1, 1, 1]      # nothing overlaps that much
    # the class boxes decide: on class 1 the two objects do not overlap, so no suppression
    per_cls[1, 1] = torch.tensor([20.0, 20, 30, 30])
    assert M.label_nms(probs, per_cls, 0.5).tolist() == [1, 1, 1]
    # every class of object 1 suppressed: the reference's fallback, background (score 0)
    two = torch.tensor([[0.0, 0.9, 0.1], [0.0, 0.8, 0.2]])
    same = torch.tensor([[0.0, 0, 10, 10]]).expand(2, 3, 4)
    probs2 = torch.tensor([[0.0, 0.9, 0.1], [0.0, 0.8, 0.0]])
    assert M.label_nms(two, same, 0.5).tolist() == [1, 2]
    assert M.label_nms(probs2, same, 0.5).tolist() == [1, 0]


def tiny_model(mode, seed=0, C=6, P=5):
    cfg = M.Config(mode=mode, roi_dim=8, embed_dim=4, hidden=6, union_dim=10, no_align=True, context_dropout=0.0)
    torch.manual_seed(seed)
    model = M.MotifsRelationModel(cfg, C, P, 3, 4, torch.randn(C, C, P))
    with torch.no_grad():
        for prm in model.parameters():
            prm.add_(0.5 * torch.randn_like(prm))
    g = torch.Generator().manual_seed(seed + 1)
    xy = torch.rand(5, 2, generator=g) * 20
    boxes = [torch.cat([xy, xy + 4 + torch.rand(5, 2, generator=g) * 10], 1)]
    inp = dict(fmap=torch.randn(1, 3, 8, 8, generator=g), boxes=boxes, sizes=[(32, 32)],
               obj_feats=torch.randn(5, 8, generator=g), obj_dists=torch.softmax(torch.randn(5, C, generator=g), -1),
               pairs=[M.all_pairs(5, "cpu")])
    return model, inp


def run_model(model, inp, labels, per_cls=None):
    return model(inp["fmap"], inp["boxes"], inp["sizes"], inp["obj_feats"], inp["obj_dists"], inp["pairs"],
                 labels, per_cls)


@pytest.mark.parametrize("mode", ["sgcls", "sgdet"])
def test_teacher_forcing_commits_gt_labels_in_training_and_predictions_at_test(mode):
    model, inp = tiny_model(mode)
    gt = torch.tensor([2, 5, 1, 3, 4]) if mode == "sgcls" else torch.tensor([2, 0, 1, 3, 0])  # 0: unmatched
    model.train()
    out = run_model(model, inp, gt)
    fg = gt > 0
    assert torch.equal(out["obj_labels"][fg], gt[fg])
    own = out["obj_logits"][:, 1:].argmax(1) + 1
    assert torch.equal(out["obj_labels"][~fg], own[~fg])      # sgdet: an unmatched box, its own prediction
    # the edge context's input and the frequency bias read the committed (GT) labels
    E = model.obj_embed_edge.embedding_dim
    torch.testing.assert_close(out["edge_in"][:, :E], model.obj_embed_edge(out["obj_labels"]))
    pg, lab = out["rel_pairs"], out["obj_labels"]
    model.freq_bias.weight.data.add_(1.0)   # a constant shift of the prior moves every logit by 1 ...
    out2 = run_model(model, inp, gt)
    torch.testing.assert_close(out2["rel_logits"], out["rel_logits"] + 1)
    model.freq_bias.weight.data[lab[pg[0, 0]] * 6 + lab[pg[0, 1]]] += 5.0   # ... the GT pair's entry, pair 0 only
    out3 = run_model(model, inp, gt)
    assert (out3["rel_logits"][0] - out2["rel_logits"][0] - 5).abs().max() < 1e-4
    # at test time the given labels are ignored: the decoder's own predictions are committed
    model.eval()
    with torch.no_grad():
        a, b = run_model(model, inp, gt), run_model(model, inp, torch.tensor([1, 1, 1, 1, 1]))
    assert torch.equal(a["obj_labels"], b["obj_labels"]) and torch.equal(a["rel_logits"], b["rel_logits"])
    assert torch.equal(a["obj_labels"], a["obj_logits"][:, 1:].argmax(1) + 1)
    torch.testing.assert_close(a["obj_scores"], a["obj_logits"].softmax(-1)[:, 1:].max(1).values)


def test_sgdet_test_labels_go_through_the_decoders_nms():
    model, inp = tiny_model("sgdet", seed=3)
    model.eval()
    same = inp["boxes"][0][:1].expand(5, 4)                              # every object on one box
    per_cls = same[:, None].expand(5, 6, 4).contiguous()                 # (N, C, 4)
    with torch.no_grad():
        plain = run_model(model, inp, None)
        nms = run_model(model, inp, None, per_cls)
    expected = M.label_nms(plain["obj_logits"].softmax(-1), per_cls, model.later_nms)
    assert torch.equal(nms["obj_labels"], expected)
    assert len(set(expected.tolist())) == 5   # all on one box: NMS makes every label different
    probs = plain["obj_logits"].softmax(-1)
    torch.testing.assert_close(nms["obj_scores"], probs[torch.arange(5), expected])
    # the edge context and the prior use the NMS labels: the relation scores change with them
    assert not torch.equal(nms["obj_labels"], plain["obj_labels"]) and not torch.allclose(nms["rel_logits"],
                                                                                      plain["rel_logits"])


def test_detector_boxes_per_cls_hold_each_detection_for_its_class():
    cfg = M.Config()
    torch.manual_seed(0)
    det = M.Detector(cfg, 5).eval()
    with torch.no_grad():
        det.cls_score.weight.normal_(0, 0.5)   # spread the class scores so that several survive
        det.bbox_pred.weight.normal_(0, 0.05)
        images = torch.rand(2, 3, 64, 80)
        out = det.detect(det.features(images, [(64, 80), (64, 80)]), [(64, 80), (64, 80)])
    for d in out:
        K = len(d["boxes"])
        assert K > 0 and d["boxes_per_cls"].shape == (K, 5, 4)
        torch.testing.assert_close(d["boxes_per_cls"][torch.arange(K), d["labels"]], d["boxes"])


def test_sgdet_training_pairs_follow_detect_relsample():
    gt = {"boxes": torch.tensor([[0.0, 0, 20, 20], [30, 0, 50, 20], [0, 40, 20, 60]]),
          "labels": torch.tensor([1, 2, 3]),
          "relations": torch.tensor([[0, 1, 4], [1, 2, 2]])}
    det = torch.tensor([[0.0, 0, 20, 20],     # 0: GT 0
                        [1, 1, 20, 20],       # 1: GT 0 again
                        [30, 0, 50, 20],      # 2: GT 1
                        [30, 0, 49, 21],      # 3: GT 1 again
                        [80, 80, 90, 90],     # 4: nothing (background)
                        [0, 40, 20, 60]])     # 5: GT 2
    torch.manual_seed(0)
    obj_t, pairs, labels = M.sgdet_pairs(det, gt, max_pairs=64, neg_per_pos=10)
    assert obj_t.tolist() == [1, 1, 2, 2, 0, 3]
    rel = {tuple(p): int(l) for p, l in zip(pairs.tolist(), labels.tolist())}
    fg = {p: l for p, l in rel.items() if l > 0}
    # every pair of detections matching (GT 0, GT 1) -> 4, (GT 1, GT 2) -> 2
    assert fg == {(0, 2): 4, (0, 3): 4, (1, 2): 4, (1, 3): 4, (2, 5): 2, (3, 5): 2}
    bg = {p for p, l in rel.items() if l == 0}
    fgdet = {0, 1, 2, 3, 5}
    assert bg == {(a, b) for a in fgdet for b in fgdet if a != b} - set(fg)   # only between matched boxes
    # at most 4 detection pairs for one GT relation, chosen among the matching ones
    many = torch.cat([det[:1].repeat(3, 1) + torch.arange(3.0)[:, None] * 0.1, det[2:3].repeat(3, 1)])
    _, pairs, labels = M.sgdet_pairs(many, gt, max_pairs=64, neg_per_pos=10)
    fg_pairs = pairs[labels == 4]
    assert len(fg_pairs) == 4 and (fg_pairs[:, 0] < 3).all() and (fg_pairs[:, 1] >= 3).all()
    assert len({tuple(p) for p in fg_pairs.tolist()}) == 4
    # a detection matches a GT box only with that box's class: detection 0 sits on GT 1 (class 2) and
    # overlaps GT 0 (class 1) by IoU 0.82, detection 1 the other way round; only (1, 0) is related
    gt2 = {"boxes": torch.tensor([[0.0, 0, 20, 20], [2, 0, 22, 20]]), "labels": torch.tensor([1, 2]),
           "relations": torch.tensor([[0, 1, 3]])}
    obj_t, pairs, labels = M.sgdet_pairs(torch.tensor([[2.0, 0, 22, 20], [0, 0, 20, 20]]), gt2, 64, 3)
    assert obj_t.tolist() == [2, 1]
    assert {tuple(p): int(l) for p, l in zip(pairs.tolist(), labels.tolist())} == {(1, 0): 3, (0, 1): 0}
    # the counts: related pairs first, at most neg_per_pos unrelated per related one, max_pairs in all
    torch.manual_seed(0)
    _, pairs, labels = M.sgdet_pairs(det, gt, max_pairs=64, neg_per_pos=1)
    assert (labels > 0).sum() == 6 and (labels == 0).sum() == 6
    _, pairs, labels = M.sgdet_pairs(det, gt, max_pairs=5, neg_per_pos=1)
    assert len(pairs) == 5 and (labels > 0).all()


def test_frequency_statistics_count_as_get_vg_statistics(tmp_path):
    from test_data import write_vg_folder, ON, HAS, NEAR
    import data
    root = write_vg_folder(str(tmp_path / "vg"))
    # what load_datasets builds for the statistics: duplicates kept, relations between boxes that
    # do not overlap dropped (image 15 has no other: dropped), as SGB's get_VG_statistics
    cfg = M.parse_config(["--data", root, "--num-val-im", "1"])
    _, ds = M.load_datasets(cfg, 0)
    st = ds["statistics"]
    assert not st.filter_duplicate_rels and len(ds["train"]) == 3 and len(st) == 2   # 13 and 14
    st = data.VGSGGDataset(root, "train", num_val_im=0, filter_duplicate_rels=False, filter_non_overlap=True)
    assert st.image_ids == [10, 13, 14]
    # image 10: person-horse on + has (a duplicated pair: both count), horse-hat near (apart: dropped);
    # 13: person-horse on; 14: horse-hat on (overlapping), person-horse near (apart: dropped).
    # 'no relation' column: ordered overlapping pairs, related or not: person-horse 2, horse-person 2,
    # horse-hat 1, hat-horse 1; then + 1 everywhere.
    log_probs = M.predicate_statistics(st, 4, 4)
    counts = {(1, 2): [3, 1, 0, 2], (2, 1): [3, 0, 0, 0], (2, 3): [2, 0, 0, 1], (3, 2): [2, 0, 0, 0],
              (1, 3): [1, 0, 0, 0], (0, 0): [1, 0, 0, 0]}
    for (s, o), c in counts.items():
        c = torch.tensor(c, dtype=torch.float64)
        torch.testing.assert_close(log_probs[s, o], torch.log(c / c.sum() + 1e-3).float())
    assert (HAS, NEAR, ON) == (1, 2, 3)


# ----------------------------------------------------------------------------------------------
# The command line

def test_help_lists_every_config_field_with_its_docstring_and_default(capsys):
    with pytest.raises(SystemExit):
        M.parse_config(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(M.Config):
        assert "--" + f.name.replace("_", "-") in text, f.name
    assert "p of Eq. (1): probability that each input element of the mirror is zeroed (default: 0.1)" in text
    cfg = M.parse_config(["--sgdet", "--preset", "vg", "--iters", "5"])   # the preset, then the flags given
    assert (cfg.mode, cfg.backbone, cfg.iters) == ("sgdet", "vgg16", 5)


# ----------------------------------------------------------------------------------------------
# Smoke runs of the script (subprocesses with a tiny budget; the detector is trained once, for 3
# iterations, and then found in the session's cache by every later run with the same settings)

TINY = ["--iters", "3", "--det-iters", "3", "--max-eval-images", "6", "--eval-every", "2", "--log-every", "1",
        "--batch-size", "2", "--det-batch", "2", "--eval-batch", "3"]


def script(*args, timeout=300, env=None, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, os.path.join(ROOT, "motifs_align.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, **kw)


def metrics_of(out_dir):
    with open(os.path.join(out_dir, "metrics.json")) as f:
        return json.load(f)


def check_run(out_dir, mode, iters=3):
    m = metrics_of(out_dir)
    for k in ("R@20", "R@50", "R@100", "mR@20", "mR@50", "mR@100", "head_mR@100", "tail_mR@100", "det_mAP@0.5"):
        assert k in m and 0.0 <= m[k] <= 1.0, k
    # zsR@K (the train split's triplets reach the evaluator): undefined (NaN) only when none of the
    # few evaluated images has a triplet unseen in training
    for k in ("zsR@20", "zsR@50", "zsR@100"):
        assert k in m and (0.0 <= m[k] <= 1.0 or (m["num_images_with_zeroshot"] == 0 and math.isnan(m[k]))), k
    for name in ("args.json", "log.txt", "curves.png", "per_predicate.png", "examples.png"):
        assert os.path.getsize(os.path.join(out_dir, name)) > 0, name
    # what changes exact numbers besides the settings: the instruction set (AVX2 by the pin), torch, threads
    with open(os.path.join(out_dir, "args.json")) as f:
        machine = json.load(f)["machine"]
    assert machine == {"isa": "AVX2" if platform.machine().lower() in ("x86_64", "amd64") else machine["isa"],
                       "torch": torch.__version__, "threads": 1}
    ck = torch.load(os.path.join(out_dir, "ckpt_last.pt"), weights_only=True)
    assert ck["step"] == iters and ck["args"]["mode"] == mode
    assert {"model", "optimizer", "scheduler", "step", "args", "rng"} <= set(ck)
    assert "detector" not in ck   # ckpt_last stays small: the detector lives in the cache and in ckpt_best
    return m


@pytest.fixture(scope="session")
def predcls_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("predcls") / "run")
    r = script("--predcls", *TINY, "--out", out)
    assert r.returncode == 0, r.stdout + r.stderr
    return out, r.stdout


def test_smoke_predcls(predcls_run):
    out, stdout = predcls_run
    check_run(out, "predcls")
    # the log's line names the terms that curves.png plots, and λ
    lines = [l for l in stdout.splitlines() if l.startswith("it 3/3 | loss")]
    assert len(lines) == 1 and "(sup " in lines[0] and ", align " in lines[0] and "λ 10" in lines[0], stdout
    loss, sup, align = (float(lines[0].split(k)[1].split()[0].strip(",)")) for k in ("loss ", "sup ", "align "))
    assert loss == pytest.approx(sup + 10 * align, abs=0.01)   # Eq. (3)'s total (the log rounds to 3 decimals)
    # "final", the last iteration's test (what the study compares): where the best checkpoint is the last
    # iteration's (the same weights, tested once), that test exactly; otherwise the last weights were
    # tested too, and the log says so
    m = metrics_of(out)
    differ = [k for k in m["final"] if k != "val_mR@50" and json.dumps(m["final"][k]) != json.dumps(m[k])]
    if m["best_step"] == 3:
        assert differ == [] and "the last iteration's weights" not in stdout
    else:
        assert "and the last iteration's weights (3) in the same pass" in stdout
    assert any(l.startswith("test PredCls, last iteration | R@20 ") for l in stdout.splitlines()), stdout
    # the lines both scripts write alike (docs/running.md): the end of training, the test of the best checkpoint
    assert re.search(r"^training done \(wall \d+m\d\ds, CPU \d+m\d\ds, validation included\)$", stdout, re.M), stdout
    assert re.search(r"^test PredCls \| R@20 [\d.]+ \| R@50 [\d.]+ \| .* \| head_mR@100 [\d.]+ \| body_mR@100 [\d.]+ "
                     r"\| tail_mR@100 [\d.]+$", stdout, re.M), stdout


@pytest.mark.parametrize("mode", ["sgcls", "sgdet"])
def test_smoke_sgcls_sgdet(mode, tmp_path, predcls_run):
    r = script(f"--{mode}", *TINY, "--no-align", "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "detector loaded from" in r.stdout   # the predcls run's cached detector is reused
    check_run(str(tmp_path / "run"), mode)


def test_preset_vg_trains_a_step_and_evaluates(tmp_path):
    """--preset vg builds the paper's model (VGG-16 Faster R-CNN, Motifs' widths: 4096-d RoI and union
    features, 200-d embeddings, 512-d LSTMs) and runs on a VG-format folder; here a tiny one (the
    synthetic generator writes the VG-SGG h5/json/jpg files), one step of each stage, small images."""
    import data
    root = str(tmp_path / "vg")
    data.generate_synthetic(root, seed=1, num_train=6, num_test=3, verbose=False)
    out = str(tmp_path / "run")
    r = script("--sgcls", "--preset", "vg", "--data", root, "--num-val-im", "2", "--iters", "1", "--det-iters", "1",
               "--max-size", "96", "--batch-size", "2", "--det-batch", "2", "--eval-batch", "2",
               "--max-eval-images", "2", "--num-workers", "0", "--log-every", "1", "--eval-every", "1",
               "--out", out, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    args = json.load(open(os.path.join(out, "args.json")))
    assert (args["backbone"], args["roi_dim"], args["union_dim"], args["embed_dim"], args["hidden"]) == \
        ("vgg16", 4096, 4096, 200, 512)
    ck = torch.load(os.path.join(out, "ckpt_last.pt"), weights_only=True)
    assert ck["step"] == 1 and ck["model"]["union_fc.weight"].shape == (4096, 512 * 7 * 7)
    assert ck["model"]["decoder_rnn.state_linearity.weight"].shape == (5 * 512, 512)
    m = metrics_of(out)
    # four training images: the test images do hold triplets never seen in training
    assert 0 < m["num_images_with_zeroshot"] <= m["num_images"]
    for k in ("R@50", "mR@50", "zsR@20", "zsR@50", "zsR@100"):
        assert 0.0 <= m[k] <= 1.0, k


def test_freq_baseline(tmp_path, predcls_run):
    r = script("--predcls", "--freq-baseline", *TINY, "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert 0.0 < metrics_of(tmp_path / "run")["R@50"] <= 1.0   # the prior alone finds some triplets


def test_same_command_same_numbers_detector_included(tmp_path, predcls_run):
    """The same command and seed, run again from an empty detector cache, gives identical numbers."""
    out, _ = predcls_run
    import data
    cache = tmp_path / "cache"
    cache.mkdir()
    src = data.ensure_synthetic()   # the session's data, shared through a link: the detector is trained anew
    os.symlink(src, cache / os.path.basename(src))
    r = script("--predcls", *TINY, "--out", str(tmp_path / "again"), env={"SGG_ALIGN_CACHE": str(cache)})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "training the detector" in r.stdout
    assert metrics_of(tmp_path / "again") == metrics_of(out)


def test_resume_after_a_kill_ends_where_the_uninterrupted_run_ends(tmp_path, predcls_run):
    common = ["--predcls", *TINY[2:], "--iters", "10", "--ckpt-every", "2", "--eval-every", "4"]
    whole = script(*common, "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stdout + whole.stderr
    out = str(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "motifs_align.py"), *common, "--out", out],
                            cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = os.path.join(out, "ckpt_last.pt")
    deadline = time.time() + 120
    while not os.path.exists(last) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)   # killed mid-training, possibly while writing a checkpoint
    proc.wait()
    step = torch.load(last, weights_only=True)["step"]
    assert 2 <= step < 10, f"the run was not killed mid-training (step {step})"
    assert not os.path.exists(os.path.join(out, "metrics.json"))
    again = script(*common, "--out", out)   # without --resume: refused, nothing touched
    assert again.returncode != 0 and "add --resume" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    r = script(*common, "--out", out, "--resume")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"resumed from {last} at iteration {step}" in r.stdout
    assert metrics_of(out) == metrics_of(tmp_path / "whole")
    a, b = (torch.load(os.path.join(d, "ckpt_last.pt"), weights_only=True) for d in (out, str(tmp_path / "whole")))
    assert a["state"]["history"] == b["state"]["history"]   # the curves too


def one_line_error(r):
    assert r.returncode != 0, r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def test_a_finished_run_is_never_overwritten(predcls_run):
    out, _ = predcls_run
    before = {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)}
    line = one_line_error(script("--predcls", *TINY, "--out", out))
    assert out in line and "finished run with these settings" in line and "--out" in line
    line = one_line_error(script("--predcls", *TINY, "--mask-p", "0.2", "--out", out))
    assert "other settings (differs in: mask_p)" in line
    line = one_line_error(script("--predcls", *TINY, "--mask-p", "0.2", "--out", out, "--resume"))
    assert "differs in: mask_p" in line
    assert {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)} == before


def test_user_mistakes_end_in_one_line_and_write_nothing(tmp_path):
    out = tmp_path / "run"
    line = one_line_error(script("--predcls", *TINY, "--data", str(tmp_path / "nowhere"), "--out", str(out)))
    assert str(tmp_path / "nowhere") in line
    vg = tmp_path / "vg"
    vg.mkdir()
    (vg / "VG-SGG-with-attri.h5").write_bytes(b"")   # an empty h5 beside a valid dicts json
    (vg / "VG-SGG-dicts-with-attri.json").write_text(json.dumps(
        {"label_to_idx": {"a": 1}, "idx_to_label": {"1": "a"}, "predicate_to_idx": {"on": 1},
         "idx_to_predicate": {"1": "on"}}))
    line = one_line_error(script("--predcls", *TINY, "--data", str(vg), "--out", str(out)))
    assert "VG-SGG-with-attri.h5" in line
    empty_cache = tmp_path / "cache"   # the run folder is checked first: nothing is generated for a refused run
    line = one_line_error(script("--predcls", *TINY, "--out", str(out), "--resume",
                                 env={"SGG_ALIGN_CACHE": str(empty_cache)}))
    assert "holds no run" in line and not empty_cache.exists()
    one_line_error(script("--predcls", "--detector-ckpt", str(tmp_path / "none.pt"), "--out", str(out)))
    assert "--iters must be at least 1" in one_line_error(script("--predcls", "--iters", "0"))
    assert "--iters" in one_line_error(script("--predcls", "--iters", "many"))   # argparse's own errors too
    assert not out.exists()


def test_torchrun_two_cpu_processes(tmp_path, predcls_run):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29731",
           os.path.join(ROOT, "motifs_align.py"), "--predcls", *TINY, "--out", str(tmp_path / "run")]
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 process(es)" in r.stdout
    check_run(str(tmp_path / "run"), "predcls")
    # torchrun leaves an empty torchelastic_* folder per run in the temporary folder: conftest.py makes that a
    # private one, removed at the end of the session
    assert glob.glob(os.path.join(os.environ["TMPDIR"], "torchelastic_*")), "torchrun's leftovers went elsewhere"
    ck = torch.load(tmp_path / "run" / "ckpt_last.pt", weights_only=True)
    assert len(ck["rng"]) == 2 and not torch.equal(ck["rng"][0]["torch"], ck["rng"][1]["torch"])  # own streams


def test_infer_on_an_image_file(tmp_path, predcls_run):
    from PIL import Image
    out, _ = predcls_run
    Image.new("RGB", (400, 300), (90, 140, 200)).save(tmp_path / "mine.png")
    import data
    names = data.VGSGGDataset(data.ensure_synthetic(), "test", num_val_im=data.SYNTHETIC_NUM_VAL).idx_to_label
    boxes = {"mine.png": {"boxes": [[30, 30, 150, 180], [120, 90, 330, 270], [0, 0, 90, 60]],
                          "labels": [names[1], names[2], 3]}}
    (tmp_path / "boxes.json").write_text(json.dumps(boxes))
    for extra, folder in (([], os.path.join(out, "infer")), (["--max-size", "64"], None)):
        folder = folder or str(tmp_path / "pred")
        r = script("--infer", str(tmp_path / "mine.png"), "--ckpt", os.path.join(out, "ckpt_best.pt"),
                   "--boxes", str(tmp_path / "boxes.json"), *extra, *(["--out", folder] if extra else []))
        assert r.returncode == 0, r.stdout + r.stderr
        assert os.path.join(folder, "mine_sg.png") in r.stdout
        triplets = json.loads(open(os.path.join(folder, "mine_sg.json")).read())
        assert len(triplets) == 6 and {"subject", "predicate", "object", "score"} <= set(triplets[0])
        assert min(abs(torch.tensor(triplets[0]["subject_box"]) - torch.tensor(b)).max() for b in
                   boxes["mine.png"]["boxes"]) < 1e-3   # back in the photo's own pixels
        # to 0.1 px: no float noise such as 14.999999046325684
        assert all(v == round(v, 1) for t in triplets for v in t["subject_box"] + t["object_box"])
        with Image.open(os.path.join(folder, "mine_sg.png")) as im:   # the photo's width and aspect, text below
            assert im.width == 800 and 800 * 300 / 400 < im.height < 800 * 300 / 400 + 300
    line = one_line_error(script("--infer", str(tmp_path / "missing.jpg"), "--ckpt", os.path.join(out, "ckpt_best.pt")))
    assert "missing.jpg" in line
    (tmp_path / "fake.pt").write_bytes(b"")   # the new user's `touch fake.pt`: one line, no IndexError traceback
    line = one_line_error(script("--predcls", "--infer", str(tmp_path / "mine.png"), "--ckpt", str(tmp_path / "fake.pt")))
    assert "fake.pt is an empty file, not a checkpoint of motifs_align.py" in line


def test_load_checkpoint_says_in_one_line_what_a_file_is_not(tmp_path):
    torch.save({"model": {"w": torch.zeros(2)}}, tmp_path / "full.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "full.pt").read_bytes()[:100])   # a checkpoint cut short
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "notes.pt").write_text("hello: a text file\n")
    torch.save([1, 2], tmp_path / "list.pt")
    for name, says in (("empty.pt", "is an empty file, not a checkpoint of motifs_align.py"),
                       ("notes.pt", "is not a checkpoint of motifs_align.py: not a file written by torch.save"),
                       ("cut.pt", "a torch.save file that torch.load cannot read (RuntimeError: "),
                       ("list.pt", "it holds a list, not a dict"),
                       ("none.pt", "no such checkpoint file")):
        with pytest.raises(SystemExit) as e:
            M.load_checkpoint(str(tmp_path / name), "cpu")
        msg = str(e.value.code)
        assert msg.startswith(f"error: {tmp_path / name}") and says in msg and "\n" not in msg, msg
    assert M.load_checkpoint(str(tmp_path / "full.pt"), "cpu")["model"]["w"].shape == (2,)


def tag_rects(ax):
    """{tag text: the rectangle of its coloured patch as drawn, in the image's pixels (x0, y0, x1, y1)}."""
    renderer, to_image = ax.figure.canvas.get_renderer(), ax.transData.inverted()
    out = {}
    for t in ax.texts:
        e = t.get_bbox_patch().get_window_extent(renderer)
        (a, b), (c, d) = to_image.transform([(e.x0, e.y0), (e.x1, e.y1)])
        out[t.get_text()] = (min(a, c), min(b, d), max(a, c), max(b, d))
    return out


# A crowded scene like the one where a tag ended 80 px below its box (the old tags moved down past each other):
# a person, and near its top a head, a hat over the head, a small flower on the hat, ... (x1, y1, x2, y2)
CROWDED = [[20, 10, 140, 155], [60, 12, 100, 50], [55, 5, 105, 30], [40, 50, 130, 110], [30, 90, 50, 110],
           [62, 14, 80, 30], [0, 0, 10, 10], [150, 150, 159, 159]]
CROWDED_NAMES = ["__background__", "woman", "head", "hat", "shirt", "hand", "potted plant", "kite"]


def test_every_tag_touches_its_own_box_and_no_other_tag():
    plt = M._plt()
    boxes, labels = torch.tensor(CROWDED, dtype=torch.float), torch.tensor([1, 2, 3, 4, 5, 6, 7, 2])
    fig, axes = plt.subplots(1, 2, figsize=(10, 6.2))
    M.draw_scene(axes[0], torch.rand(3, 160, 160), boxes, labels, range(len(boxes)), CROWDED_NAMES)
    M.draw_scene(axes[1], torch.rand(3, 120, 160), boxes * 0.75, labels, [1, 2, 5], CROWDED_NAMES)
    fig.tight_layout()   # as save_figure does: the tags must touch at the figure's final scale
    fig.canvas.draw()
    for ax, scale, n in ((axes[0], 1.0, 8), (axes[1], 0.75, 3)):
        rects = tag_rects(ax)
        assert len(rects) == n
        for text, (x0, y0, x1, y1) in rects.items():
            i = int(text.split(":")[0])
            assert text == f"{i}:{CROWDED_NAMES[int(labels[i])]}"
            bx0, by0, bx1, by1 = [scale * v for v in CROWDED[i]]
            assert x0 <= bx1 + 0.5 and bx0 <= x1 + 0.5 and y0 <= by1 + 0.5 and by0 <= y1 + 0.5, (text, rects[text])
        for a in rects:   # there is room for every tag: none hides another
            for b in rects:
                ra, rb = rects[a], rects[b]
                assert a == b or min(ra[2], rb[2]) - max(ra[0], rb[0]) < 0.5 or min(ra[3], rb[3]) - max(ra[1], rb[1]) < 0.5
    plt.close(fig)


def test_examples_mark_the_triplets_the_evaluator_counts_as_found(monkeypatch, tmp_path):
    """examples.png lists the top predicted triplets, '+' where the evaluator counts one as found (a GT
    relation with its predicate between boxes of the same class, IoU >= 0.5), '-' where not, as SGTR's does."""
    boxes = torch.tensor([[0.0, 0, 40, 40], [50, 50, 90, 90], [0, 50, 40, 90]])
    gt = {"boxes": boxes, "labels": torch.tensor([1, 2, 3]), "relations": torch.tensor([[0, 1, 2], [2, 1, 1]]),
          "image_id": 7, "size": (100, 100)}
    # predicted, best first: the right triplet; a related pair with its predicate, but box 2 of another class;
    # a pair the ground truth does not relate
    pred = {"boxes": boxes, "labels": torch.tensor([1, 2, 4]), "scores": torch.ones(3),
            "rel_pairs": torch.tensor([[0, 1], [2, 1], [1, 0]]),
            "rel_scores": torch.tensor([[0.0, 0.1, 0.9], [0.0, 0.8, 0.2], [0.0, 0.7, 0.3]])}
    trip = M.top_triplets(pred, 5)
    assert [t[:3] for t in trip] == [(0, 1, 2), (2, 1, 1), (1, 0, 1)]
    assert M.found(trip, pred, gt) == [True, False, False]

    class Test:   # the parts of a test split that plot_examples reads
        idx_to_label = ["__background__", "man", "horse", "hat", "dog"]
        idx_to_predicate = ["__no_relation__", "near", "riding"]

        def __getitem__(self, i):
            return torch.rand(3, 100, 100), gt
    figures = []
    monkeypatch.setattr(M, "save_figure", lambda fig, path, tight=True: figures.append(fig))
    M.plot_examples([(0, pred)], Test(), "predcls", str(tmp_path / "examples.png"))
    listed = figures[0].axes[1].get_xlabel().splitlines()
    assert [line[:2] for line in listed] == ["+ ", "- ", "- "], listed
    assert listed[0].startswith("+ 0:man  riding  1:horse")
