"""Tests of metrics.py: hand-computed cases for every metric, input checks, and parity with a slow,
obviously-correct per-triplet implementation of the reference protocol (neural-motifs /
Scene-Graph-Benchmark sgg_eval.py) on random inputs with many ties."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import metrics
from metrics import (SGEvaluator, box_iou_inclusive, default_predicate_groups, format_summary,
                     frequency_predicate_groups, training_triplets, vg_predicate_groups)


def box(x1, y1, x2, y2):
    return [float(x1), float(y1), float(x2), float(y2)]


# Three far-apart GT objects: labels 1, 2, 3.
GT_BOXES = np.array([box(0, 0, 9, 9), box(100, 100, 119, 119), box(200, 0, 229, 29)])
GT_LABELS = np.array([1, 2, 3])


def scores_row(P, probs):
    """A rel_scores row (P + 1,) with the given {predicate: prob}; the rest goes to background."""
    row = np.zeros(P + 1)
    for p, v in probs.items():
        row[p] = v
    row[0] = 1 - row.sum()
    return row


def predcls_pred(pairs, rows):
    return {'rel_pairs': np.array(pairs).reshape(-1, 2), 'rel_scores': np.array(rows)}


# ----------------------------------------------------------------------------------------------
# IoU
def test_iou_is_pixel_inclusive_and_exactly_half_counts_as_a_hit():
    # [0,0,9,9] spans 10x10 = 100 pixels, [0,0,9,4] 10x5 = 50 inside it: IoU exactly 0.5
    # (pixel-exclusive it would be 36/81 = 0.44 and the match below would fail).
    iou = box_iou_inclusive(np.array([box(0, 0, 9, 9)]), np.array([box(0, 0, 9, 4), box(0, 0, 9, 3)]))
    assert iou[0, 0] == 0.5
    assert iou[0, 1] == pytest.approx(0.4)
    P = 3
    gt = {'boxes': GT_BOXES, 'labels': GT_LABELS, 'relations': np.array([[0, 1, 2]])}
    for subj_box, expect in ((box(0, 0, 9, 4), 1.0), (box(0, 0, 9, 3), 0.0)):
        ev = SGEvaluator('sgdet', P, ks=(1,))
        pred = {'boxes': np.array([subj_box, GT_BOXES[1]]), 'labels': np.array([1, 2]),
                'scores': np.array([0.9, 0.8]), 'rel_pairs': np.array([[0, 1]]),
                'rel_scores': np.array([scores_row(P, {2: 0.7})])}
        assert ev.add(gt, pred)['R@1'] == expect


# ----------------------------------------------------------------------------------------------
# R@K: ranking, ties, order, swaps, duplicates, images without relations
def test_recall_ranks_by_triplet_score_with_object_scores():
    """SGDet, 3 GT triplets. The model's best predicate probability alone would rank (0,1) first,
    but its object scores are low, so the triplet score puts it last."""
    P = 4
    gt = {'boxes': GT_BOXES, 'labels': GT_LABELS,
          'relations': np.array([[0, 1, 1], [1, 2, 2], [2, 1, 3]])}
    pred = {'boxes': GT_BOXES.copy(), 'labels': GT_LABELS.copy(), 'scores': np.array([0.1, 1.0, 1.0]),
            'rel_pairs': np.array([[0, 1], [1, 2], [2, 1], [0, 2]]),
            'rel_scores': np.array([scores_row(P, {1: 0.9}),     # 0.9 * 0.1 * 1 = 0.09, correct
                                    scores_row(P, {2: 0.5}),     # 0.5, correct
                                    scores_row(P, {4: 0.4, 3: 0.3}),  # 0.4, wrong predicate
                                    scores_row(P, {3: 0.2})])}   # 0.2 * 0.1 = 0.02, not in GT
    ev = SGEvaluator('sgdet', P, ks=(1, 2, 3, 4))
    # graph constraint: (1,2) .5 hit, (2,1) .4 miss, (0,1) .09 hit, (0,2) .02 miss
    # (ranked by predicate probability alone, (0,1) would come first and R@2 would be 2/3)
    # no constraint: (1,2,2) .5 hit, (2,1,4) .4 miss, (2,1,3) .3 hit, (0,1,1) .09 hit
    assert ev.add(gt, pred) == {'R@1': 1 / 3, 'ngR@1': 1 / 3, 'R@2': 1 / 3, 'ngR@2': 1 / 3,
                                'R@3': 2 / 3, 'ngR@3': 2 / 3, 'R@4': 2 / 3, 'ngR@4': 1.0}


def test_ties_are_broken_by_subject_then_object_index_whatever_the_callers_order():
    P = 2
    gt = {'boxes': GT_BOXES, 'labels': GT_LABELS, 'relations': np.array([[1, 0, 1]])}
    rows = [scores_row(P, {1: 0.5}), scores_row(P, {1: 0.5})]
    for pairs in ([[0, 1], [1, 0]], [[1, 0], [0, 1]]):
        for ks, expect in (((1,), 0.0), ((2,), 1.0)):
            ev = SGEvaluator('predcls', P, ks=ks)
            # equal scores: (0, 1) ranks before (1, 0), so the correct (1, 0) is second
            assert ev.add(gt, predcls_pred(pairs, rows))[f'R@{ks[0]}'] == expect


def test_callers_order_of_pairs_does_not_matter():
    rng = np.random.default_rng(0)
    nontrivial = 0
    for _ in range(20):  # quantized scores: many ties, the case where order could leak in
        gt, pred = random_image(rng, 'sgdet', P=5, quantize=True)
        perm = rng.permutation(len(pred['rel_pairs']))
        shuffled = dict(pred, rel_pairs=pred['rel_pairs'][perm], rel_scores=pred['rel_scores'][perm])
        ra = SGEvaluator('sgdet', 5, ks=(1, 3, 7)).add(gt, pred)
        rb = SGEvaluator('sgdet', 5, ks=(1, 3, 7)).add(gt, shuffled)
        assert ra == rb
        nontrivial += ra is not None and 0 < ra['ngR@7'] and ra['R@1'] < 1
    assert nontrivial >= 3  # images where the ranking actually decides the result


def test_subject_object_swap_is_a_miss():
    P = 2
    gt = {'boxes': GT_BOXES, 'labels': np.array([1, 1, 3]), 'relations': np.array([[0, 1, 1]])}
    ev = SGEvaluator('predcls', P, ks=(5,))
    # same labels, same predicate, but subject and object exchanged: boxes no longer match
    assert ev.add(gt, predcls_pred([[1, 0]], [scores_row(P, {1: 0.9})]))['R@5'] == 0.0
    assert ev.add(gt, predcls_pred([[0, 1]], [scores_row(P, {1: 0.9})]))['R@5'] == 1.0


def test_duplicated_gt_triplets_count_twice_and_one_prediction_hits_both():
    P = 3
    gt = {'boxes': GT_BOXES, 'labels': GT_LABELS,
          'relations': np.array([[0, 1, 2], [0, 1, 2], [1, 2, 3]])}
    ev = SGEvaluator('predcls', P, ks=(1, 2))
    out = ev.add(gt, predcls_pred([[0, 1], [1, 2]], [scores_row(P, {2: 0.9}),
                                                     scores_row(P, {1: 0.8})]))
    assert out['R@1'] == 2 / 3 and out['R@2'] == 2 / 3
    s = ev.summary()
    # predicate 2: 2 of 2 hit; predicate 3: 0 of 1; predicate 1 absent
    assert s['per_predicate_R@1'] == [0.0, 1.0, 0.0]
    assert s['per_predicate_num_gt'] == [0, 2, 1]


def test_image_without_relations_is_skipped_by_recall_but_counted():
    P = 2
    with_rel = {'boxes': GT_BOXES, 'labels': GT_LABELS, 'relations': np.array([[0, 1, 1]])}
    no_rel = {'boxes': GT_BOXES, 'labels': GT_LABELS, 'relations': np.zeros((0, 3), np.int64)}
    pred = predcls_pred([[0, 1]], [scores_row(P, {1: 0.9})])
    ev = SGEvaluator('predcls', P, ks=(1,))
    assert ev.add(no_rel, pred) is None
    ev.add(with_rel, pred)
    s = ev.summary()
    assert s['R@1'] == 1.0 and s['mR@1'] == 0.5  # not 0.5 / 1.0 from averaging in a 0 image
    assert s['num_images'] == 2 and s['num_images_with_relations'] == 1


def test_no_candidate_pairs_gives_zero_recall():
    P = 2
    gt = {'boxes': GT_BOXES, 'labels': GT_LABELS, 'relations': np.array([[0, 1, 1]])}
    ev = SGEvaluator('predcls', P, ks=(5,))
    out = ev.add(gt, {'rel_pairs': np.zeros((0, 2), np.int64), 'rel_scores': np.zeros((0, P + 1))})
    assert out == {'R@5': 0.0, 'ngR@5': 0.0}


# ----------------------------------------------------------------------------------------------
# mR@K, ngR@K, groups
def two_image_evaluator(groups=None):
    """Image A: GT predicates 1, 1, 2; predictions hit one of the 1s and the 2.
    Image B: GT predicate 1, hit. P = 4, predicates 3 and 4 never occur."""
    P = 4
    ev = SGEvaluator('predcls', P, ks=(10,), predicate_groups=groups)
    gt_a = {'boxes': GT_BOXES, 'labels': GT_LABELS,
            'relations': np.array([[0, 1, 1], [1, 2, 1], [2, 0, 2]])}
    ev.add(gt_a, predcls_pred([[0, 1], [1, 2], [2, 0]], [scores_row(P, {1: 0.9}),
                                                         scores_row(P, {3: 0.9}),
                                                         scores_row(P, {2: 0.9})]))
    gt_b = {'boxes': GT_BOXES, 'labels': GT_LABELS, 'relations': np.array([[2, 1, 1]])}
    ev.add(gt_b, predcls_pred([[2, 1]], [scores_row(P, {1: 0.6})]))
    return ev


def test_mean_recall_averages_per_predicate_and_absent_predicates_count_zero():
    s = two_image_evaluator().summary()
    assert s['R@10'] == pytest.approx((2 / 3 + 1) / 2)
    # predicate 1: mean(1/2 in A, 1 in B) = 0.75; predicate 2: 1; 3 and 4 absent: 0
    assert s['per_predicate_R@10'] == pytest.approx([0.75, 1.0, 0.0, 0.0])
    assert s['mR@10'] == pytest.approx(1.75 / 4)  # divided by P = 4, not by the 2 present


def test_f_at_k_is_the_harmonic_mean_of_recall_and_mean_recall():
    s = two_image_evaluator().summary()
    # R = 5/6, mR = 7/16: F = 2 * (35/96) / (61/48) = 35/61 (not the arithmetic mean 0.635)
    assert s['R@10'] == pytest.approx(5 / 6) and s['mR@10'] == pytest.approx(7 / 16)
    assert s['F@10'] == pytest.approx(35 / 61)
    # nothing hit: R = mR = 0, and F is 0 rather than 0/0
    P = 2
    ev = SGEvaluator('predcls', P, ks=(1,))
    ev.add({'boxes': GT_BOXES, 'labels': GT_LABELS, 'relations': np.array([[0, 1, 1]])},
           predcls_pred([[0, 1]], [scores_row(P, {2: 0.9})]))
    s = ev.summary()
    assert s['R@1'] == 0.0 and s['mR@1'] == 0.0 and s['F@1'] == 0.0


def test_group_mean_recall():
    s = two_image_evaluator({'common': [1, 2], 'rare': [3, 4], 'mixed': [2, 3]}).summary()
    assert s['common_mR@10'] == pytest.approx(0.875)
    assert s['rare_mR@10'] == 0.0
    assert s['mixed_mR@10'] == pytest.approx(0.5)


def test_no_graph_constraint_recall_finds_the_second_best_predicate():
    P = 3
    # pair (0,1) carries two GT predicates; pair (1,2) has its GT predicate only second best
    gt = {'boxes': GT_BOXES, 'labels': GT_LABELS,
          'relations': np.array([[0, 1, 1], [0, 1, 2], [1, 2, 3]])}
    ev = SGEvaluator('predcls', P, ks=(3, 6))
    out = ev.add(gt, predcls_pred([[0, 1], [1, 2]], [scores_row(P, {1: 0.6, 2: 0.4}),
                                                     scores_row(P, {2: 0.5, 3: 0.3})]))
    # graph constraint: one predicate per pair -> only (0,1,1) can be hit
    assert out['R@3'] == 1 / 3 and out['R@6'] == 1 / 3
    # ng ranking: (0,1,1) .6, (1,2,2) .5, (0,1,2) .4, (1,2,3) .3 -> 2 of 3 in the top 3, all in 6
    assert out['ngR@3'] == 2 / 3 and out['ngR@6'] == 1.0
    s = ev.summary()
    assert s['ngmR@6'] == 1.0 and s['mR@6'] == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------------------------
# Modes and inputs
def test_predcls_uses_gt_boxes_labels_and_unit_scores():
    P = 2
    gt = {'boxes': GT_BOXES, 'labels': GT_LABELS, 'relations': np.array([[0, 1, 1], [1, 2, 2]])}
    # wrong boxes, labels and tiny scores in pred: predcls ignores them
    pred = dict(predcls_pred([[1, 2], [0, 1]], [scores_row(P, {2: 0.5}), scores_row(P, {1: 0.4})]),
                boxes=GT_BOXES + 500, labels=np.array([3, 3, 3]), scores=np.array([1e-3, 1, 1]))
    ev = SGEvaluator('predcls', P, ks=(1, 2))
    assert ev.add(gt, pred) == {'R@1': 0.5, 'ngR@1': 0.5, 'R@2': 1.0, 'ngR@2': 1.0}
    # sgdet on the same input uses them, and finds nothing
    ev = SGEvaluator('sgdet', P, ks=(2,))
    assert ev.add(gt, pred)['R@2'] == 0.0


def test_sgcls_uses_gt_boxes_with_predicted_labels():
    P = 2
    gt = {'boxes': GT_BOXES, 'labels': GT_LABELS, 'relations': np.array([[0, 1, 1], [1, 2, 2]])}
    pred = dict(predcls_pred([[0, 1], [1, 2]], [scores_row(P, {1: 0.5}), scores_row(P, {2: 0.5})]),
                labels=np.array([1, 2, 1]), scores=np.array([1.0, 1.0, 1.0]),  # object 2 wrong
                boxes=GT_BOXES + 500)  # ignored: SGCls is evaluated on the GT boxes
    ev = SGEvaluator('sgcls', P, ks=(2,))
    assert ev.add(gt, pred)['R@2'] == 0.5


def test_tensors_and_numpy_give_the_same_result():
    rng = np.random.default_rng(1)
    a, b = SGEvaluator('sgdet', 6, ks=(5, 20)), SGEvaluator('sgdet', 6, ks=(5, 20))
    for _ in range(4):
        gt, pred = random_image(rng, 'sgdet', P=6, quantize=False)
        a.add(gt, pred)
        b.add({k: torch.as_tensor(v) for k, v in gt.items()},
              {k: torch.as_tensor(v).float() if k == 'rel_scores' else torch.as_tensor(v)
               for k, v in pred.items()})
    assert a.summary() == b.summary()


@pytest.mark.parametrize('field, value, message', [
    ('rel_scores', np.full((1, 3), 0.3), r'P \+ 1 = 4'),
    ('rel_pairs', np.array([[0, 3]]), 'out of range'),
    ('relations', np.array([[0, 1, 0]]), 'predicate ids must be in 1..3'),
    ('rel_scores', np.array([[0.1, 2.5, -1.0, 0.3]]), 'logits'),
    ('relations', np.array([[0, 5, 1]]), 'subject/object index out of range'),
])
def test_bad_inputs_raise_errors_that_name_the_problem(field, value, message):
    P = 3
    gt = {'boxes': GT_BOXES, 'labels': GT_LABELS, 'relations': np.array([[0, 1, 1]])}
    pred = predcls_pred([[0, 1]], [scores_row(P, {1: 0.5})])
    (gt if field == 'relations' else pred)[field] = value
    with pytest.raises(ValueError, match=message):
        SGEvaluator('predcls', P).add(gt, pred)


def test_sgdet_requires_boxes():
    with pytest.raises(KeyError, match='boxes'):
        SGEvaluator('sgdet', 2).add({'boxes': GT_BOXES, 'labels': GT_LABELS,
                                     'relations': np.array([[0, 1, 1]])},
                                    dict(predcls_pred([[0, 1]], [scores_row(2, {1: .5})]),
                                         labels=GT_LABELS, scores=np.ones(3)))


# ----------------------------------------------------------------------------------------------
# zsR@K: recall on the GT triplets never seen in training
def zeroshot_image(first):
    """GT (label 1, pred 1, label 2), seen in training, and (label 2, pred 2, label 3), zero-shot.
    The model scores both right, `first` ('seen' or 'zeroshot') ranked above the other."""
    P = 2
    gt = {'boxes': GT_BOXES, 'labels': GT_LABELS, 'relations': np.array([[0, 1, 1], [1, 2, 2]])}
    hi, lo = (0.9, 0.6) if first == 'seen' else (0.6, 0.9)
    return gt, predcls_pred([[0, 1], [1, 2]], [scores_row(P, {1: hi}), scores_row(P, {2: lo})])


SEEN = {(1, 1, 2), (3, 1, 1)}  # (subject class, predicate, object class) seen in training


def test_zeroshot_recall_counts_only_the_unseen_triplets():
    for first, want_zs1 in (('seen', 0.0), ('zeroshot', 1.0)):
        ev = SGEvaluator('predcls', 2, ks=(1, 2), zeroshot_triplets=SEEN)
        out = ev.add(*zeroshot_image(first))
        # top 1 hits one of the two GT triplets either way; only the zero-shot one counts for zsR
        assert out['R@1'] == 0.5 and out['zsR@1'] == want_zs1 and out['zsR@2'] == 1.0
        s = ev.summary()
        assert s['zsR@1'] == want_zs1 and s['zsR@2'] == 1.0 and s['R@1'] == 0.5
        assert s['num_images_with_zeroshot'] == 1
        assert 'zsR@1' in format_summary(s)
    # without the training triplets there is no zsR, and the rest is unchanged
    ev = SGEvaluator('predcls', 2, ks=(1, 2))
    out = ev.add(*zeroshot_image('seen'))
    assert out == {'R@1': 0.5, 'ngR@1': 0.5, 'R@2': 1.0, 'ngR@2': 1.0}
    assert not any(key.startswith('zsR') for key in ev.summary())
    assert 'zsR' not in format_summary(ev.summary())


def test_zeroshot_recall_skips_images_without_zeroshot_triplets():
    P = 2
    ev = SGEvaluator('predcls', P, ks=(1,), zeroshot_triplets=np.array(sorted(SEEN)))
    ev.add(*zeroshot_image('zeroshot'))  # zsR@1 = 1
    # only seen triplets, nothing hit: R 0, but no zsR (0/0), so it must not pull zsR to 0.5
    only_seen = {'boxes': GT_BOXES, 'labels': GT_LABELS, 'relations': np.array([[0, 1, 1]])}
    assert 'zsR@1' not in ev.add(only_seen, predcls_pred([[0, 1]], [scores_row(P, {2: 0.9})]))
    # the zero-shot (label 3, pred 2, label 1) annotated twice: both copies count, both missed
    # (the pair predicts the seen predicate 1)
    dup = {'boxes': GT_BOXES, 'labels': GT_LABELS,
           'relations': np.array([[2, 0, 2], [2, 0, 2], [2, 0, 1]])}  # (3,1,1) is seen
    assert ev.add(dup, predcls_pred([[2, 0]], [scores_row(P, {1: 0.9})]))['zsR@1'] == 0.0
    s = ev.summary()
    assert s['num_images_with_relations'] == 3 and s['num_images_with_zeroshot'] == 2
    assert s['zsR@1'] == pytest.approx((1.0 + 0.0) / 2)
    # an evaluator whose images have no zero-shot triplet at all: zsR undefined, NaN
    ev = SGEvaluator('predcls', P, ks=(1,), zeroshot_triplets=SEEN)
    ev.add(only_seen, predcls_pred([[0, 1]], [scores_row(P, {1: 0.9})]))
    assert np.isnan(ev.summary()['zsR@1'])


def test_training_triplets_reads_classes_through_the_object_indices():
    labels = [np.array([1, 2, 3]), torch.tensor([3, 1])]
    rels = [np.array([[0, 1, 1], [1, 2, 2], [0, 1, 1]]), torch.tensor([[0, 1, 1]])]
    seen = training_triplets(labels + [np.array([5])], rels + [np.zeros((0, 3), np.int64)])
    assert seen == {(1, 1, 2), (2, 2, 3), (3, 1, 1)}
    assert all(type(v) is int for t in seen for v in t)
    # a set, a list of tuples, a (T, 3) array and a tensor give the same evaluator
    configs = {SGEvaluator('predcls', 2, zeroshot_triplets=z)._config()
               for z in (seen, sorted(seen), np.array(sorted(seen)), torch.tensor(sorted(seen)),
                         iter(seen))}
    assert len(configs) == 1
    with pytest.raises(ValueError, match=r'training_triplets: relations of image 0'):
        training_triplets([np.array([1, 2])], [np.array([[0, 1, 1, 1]])])
    with pytest.raises(ValueError, match='zeroshot_triplets'):
        SGEvaluator('predcls', 2, zeroshot_triplets=np.zeros((2, 4), np.int64))


# ----------------------------------------------------------------------------------------------
# Parity with a slow, per-triplet implementation of the reference protocol
def random_image(rng, mode, P, quantize):
    """A small random image where matches, near-misses and (with quantize) ties are common."""
    G = int(rng.integers(2, 7))
    xy = rng.integers(0, 60, (G, 2))
    gt_boxes = np.concatenate([xy, xy + rng.integers(3, 30, (G, 2))], 1).astype(float)
    gt_labels = rng.integers(1, 4, G)
    R = int(rng.integers(0, 8))
    rels = np.stack([rng.integers(0, G, R), rng.integers(0, G, R), rng.integers(1, P + 1, R)], 1)
    if mode == 'sgdet':
        N = int(rng.integers(2, 9))
        src = rng.integers(0, G, N)
        boxes = gt_boxes[src] + rng.integers(-4, 5, (N, 4))
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2])
        labels = np.where(rng.random(N) < 0.7, gt_labels[src], rng.integers(1, 4, N))
    else:
        N, boxes, labels = G, gt_boxes, gt_labels
    ii, jj = np.nonzero(~np.eye(N, dtype=bool))
    keep = rng.random(ii.size) < 0.8
    pairs = np.stack([ii[keep], jj[keep]], 1)
    pairs = np.concatenate([pairs, pairs[:2]])  # repeated pairs, as query-based models emit
    rel = rng.dirichlet(np.ones(P + 1), len(pairs))
    scores = rng.random(N)
    if quantize:  # many exact ties in predicate probabilities and object scores
        rel, scores = np.round(rel * 4) / 8, np.round(scores * 2) / 2
    pred = {'boxes': boxes, 'labels': labels, 'scores': scores, 'rel_pairs': pairs,
            'rel_scores': rel}
    return {'boxes': gt_boxes, 'labels': gt_labels, 'relations': rels}, pred


def ref_iou(a, b):
    iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
    ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
    if iw <= 0 or ih <= 0:
        return 0.0
    return iw * ih / ((a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1)
                      - iw * ih)


def ref_evaluate(images, mode, P, ks, groups, seen=None):
    """The reference protocol, one triplet at a time, with our documented tie rule."""
    per_img = {(g, k): [] for g in (True, False) for k in ks}
    zs_img = {k: [] for k in ks}
    per_pred = {(g, k): [[] for _ in range(P + 1)] for g in (True, False) for k in ks}
    for gt, pred in images:
        rels = gt['relations']
        if len(rels) == 0:
            continue
        if mode == 'predcls':
            boxes, labels, scores = gt['boxes'], gt['labels'], [1.0] * len(gt['labels'])
        elif mode == 'sgcls':
            boxes, labels, scores = gt['boxes'], pred['labels'], pred['scores']
        else:
            boxes, labels, scores = pred['boxes'], pred['labels'], pred['scores']
        for graph in (True, False):
            cands = []
            for m, (s, o) in enumerate(pred['rel_pairs']):
                row = pred['rel_scores'][m]
                preds = [1 + int(np.argmax(row[1:]))] if graph else range(1, P + 1)
                for p in preds:
                    score = float(row[p]) * (float(scores[s]) * float(scores[o]))
                    cands.append((-score, s, o, p, m))
            cands.sort()
            for k in ks:
                hit = set()
                for _, s, o, p, _ in cands[:k]:
                    for r, (gs, go, gp) in enumerate(rels):
                        if (labels[s] == gt['labels'][gs] and labels[o] == gt['labels'][go]
                                and p == gp and ref_iou(boxes[s], gt['boxes'][gs]) >= 0.5
                                and ref_iou(boxes[o], gt['boxes'][go]) >= 0.5):
                            hit.add(r)
                per_img[graph, k].append(len(hit) / len(rels))
                zs = [r for r, (gs, go, gp) in enumerate(rels)
                      if (gt['labels'][gs], gp, gt['labels'][go]) not in (seen or ())]
                if graph and seen is not None and zs:  # SGZeroShotRecall: graph constraint
                    zs_img[k].append(sum(r in hit for r in zs) / len(zs))
                for p in set(rels[:, 2].tolist()):
                    idx = [r for r in range(len(rels)) if rels[r, 2] == p]
                    per_pred[graph, k][p].append(sum(r in hit for r in idx) / len(idx))
    out = {}
    for k in ks:
        for graph, rk, mk in ((True, 'R', 'mR'), (False, 'ngR', 'ngmR')):
            out[f'{rk}@{k}'] = float(np.mean(per_img[graph, k]))
            pp = [float(np.mean(v)) if v else 0.0 for v in per_pred[graph, k][1:]]
            out[f'{mk}@{k}'] = sum(pp) / P
            out[f'per_predicate_{rk}@{k}'] = pp
            if graph:
                for g, ids in groups.items():
                    out[f'{g}_mR@{k}'] = float(np.mean([pp[i - 1] for i in ids]))
        r, mr = out[f'R@{k}'], out[f'mR@{k}']
        out[f'F@{k}'] = 2 * r * mr / (r + mr) if r + mr else 0.0
        if seen is not None:
            out[f'zsR@{k}'] = float(np.mean(zs_img[k]))
    return out


@pytest.mark.parametrize('mode, quantize', [('sgdet', True), ('sgdet', False), ('predcls', True),
                                            ('sgcls', True)])
def test_parity_with_slow_reference(mode, quantize):
    rng = np.random.default_rng({'sgdet': 3, 'predcls': 4, 'sgcls': 5}[mode] + 10 * quantize)
    P, ks = 4, (1, 3, 8)
    images = [random_image(rng, mode, P, quantize) for _ in range(200)]
    groups = {'a': [1, 2], 'b': [3, 4]}
    # about a third of the 3 x 4 x 3 possible triplets unseen in "training"
    seen = {(s, p, o) for s in range(1, 4) for p in range(1, P + 1) for o in range(1, 4)
            if (s + 2 * p + o) % 3}
    ev = SGEvaluator(mode, P, ks=ks, predicate_groups=groups, zeroshot_triplets=seen)
    for gt, pred in images:
        ev.add(gt, pred)
    got, want = ev.summary(), ref_evaluate(images, mode, P, ks, groups, seen)
    assert set(want) <= set(got)
    for key, value in want.items():
        assert np.allclose(got[key], value, rtol=0, atol=1e-12), key
    # the random images must exercise the metric: recall neither 0 nor 1 everywhere
    assert 0 < got['R@3'] < got['ngR@8'] < 1
    assert 0 < got['zsR@8'] < 1 and 0 < got['num_images_with_zeroshot'] < len(images)


# ----------------------------------------------------------------------------------------------
# Combining evaluators (DDP)
def test_merge_and_state_dict_equal_single_process():
    rng = np.random.default_rng(7)
    images = [random_image(rng, 'sgdet', 4, True) for _ in range(12)]
    seen = training_triplets([gt['labels'] for gt, _ in images[:6]],
                             [gt['relations'] for gt, _ in images[:6]])
    full, a, b = (SGEvaluator('sgdet', 4, ks=(2, 5), zeroshot_triplets=seen) for _ in range(3))
    for i, (gt, pred) in enumerate(images):
        full.add(gt, pred)
        (a if i < 5 else b).add(gt, pred)
    c = SGEvaluator('sgdet', 4, ks=(2, 5), zeroshot_triplets=seen)
    c.load_state_dict(b.state_dict())
    want = full.summary()
    assert want['num_images_with_zeroshot'] > 0 and not np.isnan(want['zsR@5'])
    assert a.merge(c).summary() == want
    with pytest.raises(ValueError, match='differ'):
        a.merge(SGEvaluator('sgdet', 4, ks=(2, 6), zeroshot_triplets=seen))
    for other in (None, set(seen) - {min(seen)}):  # different (or no) training triplets
        with pytest.raises(ValueError, match='differ'):
            a.merge(SGEvaluator('sgdet', 4, ks=(2, 5), zeroshot_triplets=other))
        with pytest.raises(ValueError, match='differs'):
            SGEvaluator('sgdet', 4, ks=(2, 5), zeroshot_triplets=other).load_state_dict(
                b.state_dict())


def test_gather_under_torch_distributed_equals_single_process(tmp_path):
    """Two gloo ranks, each evaluating a contiguous half; rank 0's summary after gather() equals
    the single-process summary exactly."""
    script = textwrap.dedent(f"""
        import sys, json
        sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})
        sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
        import numpy as np, torch.distributed as dist, torch.multiprocessing as mp
        from metrics import SGEvaluator, training_triplets
        from test_metrics import random_image

        def images():
            rng = np.random.default_rng(11)
            return [random_image(rng, 'sgdet', 4, True) for _ in range(10)]

        SEEN = training_triplets([g['labels'] for g, _ in images()[:4]],
                                 [g['relations'] for g, _ in images()[:4]])

        def worker(rank):
            dist.init_process_group('gloo', init_method='file://{tmp_path}/rdv', rank=rank,
                                    world_size=2)
            ev = SGEvaluator('sgdet', 4, ks=(2, 5), zeroshot_triplets=SEEN)
            for gt, pred in images()[rank * 5:(rank + 1) * 5]:
                ev.add(gt, pred)
            s = ev.gather().summary()
            if rank == 0:
                json.dump(s, open('{tmp_path}/ddp.json', 'w'))
            dist.destroy_process_group()

        if __name__ == '__main__':
            # fork: no torch re-import in the children (fast); macOS/Windows need spawn
            mp.start_processes(worker, nprocs=2,
                               start_method='fork' if sys.platform == 'linux' else 'spawn')
            ev = SGEvaluator('sgdet', 4, ks=(2, 5), zeroshot_triplets=SEEN)
            for gt, pred in images():
                ev.add(gt, pred)
            json.dump(ev.summary(), open('{tmp_path}/single.json', 'w'))
    """)
    (tmp_path / 'ddp.py').write_text(script)
    env = dict(os.environ, OMP_NUM_THREADS='1')
    r = subprocess.run([sys.executable, str(tmp_path / 'ddp.py')], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    import json
    ddp, single = (json.load(open(tmp_path / f)) for f in ('ddp.json', 'single.json'))
    assert ddp == single and ddp['num_images'] == 10
    assert ddp['num_images_with_zeroshot'] > 0 and 'F@5' in ddp


# ----------------------------------------------------------------------------------------------
# Predicate groups
def test_vg_groups_are_the_standard_7_21_22_split():
    names = ['__background__'] + metrics.VG_PREDICATES
    g = vg_predicate_groups(names)
    assert [len(g[k]) for k in ('head', 'body', 'tail')] == [7, 21, 22]
    assert sorted(g['head'] + g['body'] + g['tail']) == list(range(1, 51))
    # BGNN's / SGTR's `longtail_part_dict` over the VG ids 1..50, an independent encoding
    part = 'bttt bbbh btbt tttb ttbh bhbt bttt hhht btbt tbtb btbt tbbh bb'.replace(' ', '')
    assert g == {name: [i + 1 for i, c in enumerate(part) if c == name[0]]
                 for name in ('head', 'body', 'tail')}
    assert default_predicate_groups(names, None) == g


def test_frequency_groups_follow_training_counts():
    counts = np.zeros(51)
    counts[1:] = np.arange(50, 0, -1)  # predicate 1 most frequent ... 50 least
    g = frequency_predicate_groups(counts)
    assert g['head'] == list(range(1, 8)) and g['tail'] == list(range(29, 51))
    assert g == frequency_predicate_groups(counts[1:], num_predicates=50)
    small = np.concatenate([[0], [5, 900, 1, 40, 3, 70, 2, 8, 10, 600]])  # P = 10
    g = frequency_predicate_groups(small)
    assert g['head'] == [2] and g['tail'] == [1, 3, 5, 7]  # round(1.4)=1, round(4.4)=4
    names = ['__background__'] + [f'p{i}' for i in range(1, 11)]
    assert default_predicate_groups(names, small) == g
    with pytest.raises(ValueError, match='train_counts'):
        default_predicate_groups(names, None)
    with pytest.raises(ValueError, match='num_predicates'):
        frequency_predicate_groups(small[1:])  # first entry 5 is no background slot


def test_format_summary_is_one_line_with_every_metric():
    line = format_summary(two_image_evaluator({'head': [1], 'tail': [4]}).summary())
    assert line.startswith('R@10 ') and 'mR@10 43.8' in line and 'tail_mR@10 0.0' in line
    assert 'F@10 57.4' in line  # 35/61
