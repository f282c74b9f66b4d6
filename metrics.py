"""Scene graph generation metrics: R@K, mR@K, F@K, zsR@K, ngR@K, ngmR@K, head/body/tail mR@K.

This is the evaluation protocol behind every published Visual Genome (VG) scene-graph number, the
one in neural-motifs (`lib/evaluation/sg_eval.py`, Zellers et al. 2018) and its extension in
Scene-Graph-Benchmark.pytorch (`maskrcnn_benchmark/data/datasets/evaluation/vg/sgg_eval.py`,
Tang et al. 2020: SGRecall, SGNoGraphConstraintRecall, SGMeanRecall, SGZeroShotRecall),
rewritten here to be read, vectorised over pairs and GT triplets, and lifted alone into another
project (imports numpy and, only for tensors and DDP, torch; nothing from the rest of this
repository).

The paper (Sec. 4, "Evaluation Metrics") selects and reports models by mean recall mR@K, plus R@K
and mR@100 on the HEAD / BODY / TAIL predicate groups of [26] for SGTR.

Usage
-----
    ev = SGEvaluator('predcls', num_predicates=P, predicate_groups=vg_predicate_groups(names),
                     zeroshot_triplets=training_triplets(train_labels, train_relations))
    for gt, pred in ...:          # one image at a time, numpy arrays or torch tensors
        ev.add(gt, pred)
    ev.gather()                   # under DDP: every rank ends up with all images (no-op otherwise)
    print(format_summary(ev.summary()))

    python metrics.py --bench     # speed on 5,000 synthetic SGDet images (64 boxes, 4,032 pairs)

Symbols: G ground-truth objects, R ground-truth relations, N predicted objects, M candidate pairs,
P predicates (no background), T = max(ks) predictions kept per image, U predicates present in an
image's ground truth, nK = len(ks), I images with GT relations.

The protocol, one image at a time
---------------------------------
1. A GT triplet is (subject label, predicate, object label) with the two GT boxes.
2. Graph constraint (R@K, mR@K): every candidate pair predicts ONE predicate, its arg-max over the
   non-background columns; its triplet score is P(predicate) * subject score * object score. The
   evaluator ranks the pairs itself (the caller's order does not matter) and keeps the top K.
   No graph constraint (ngR@K, ngmR@K): every (pair, predicate) is a candidate with score
   P(predicate) * subject score * object score, and the top K of all of them are kept, so a pair
   can hit several GT triplets with different predicates.
3. A prediction hits a GT triplet when the three labels agree and the subject and object boxes
   each have IoU >= 0.5 with the GT ones. One prediction may hit several GT triplets and several
   predictions may hit the same one; a GT triplet counts once however often it is hit.
4. Image recall = (GT triplets hit in the top K) / (GT triplets). R@K = mean over images that
   have at least one GT relation; images without relations are skipped (the reference returns
   before evaluating them: recall is 0/0 there).
5. mR@K: per image, the recall of each predicate present in its GT; per predicate, the mean of
   those over the images that contain it; mR@K = sum over ALL P predicates / P, a predicate that
   never occurs in the evaluated GT counting 0 (the reference divides by num_rel - 1 = P). Every
   predicate occurs in VG's test set, so this only bites on small subsets (a quick evaluation on
   a few images): there the absent predicates pull mR down, so compare mR only between
   evaluations of the same images.
6. Group mR@K (HEAD/BODY/TAIL): the mean of the per-predicate recalls of the group's predicates,
   absent ones counting 0 as in 5 (BGNN / SGTR `longtail_part_eval`).
7. F@K = 2 R@K mR@K / (R@K + mR@K), 0 when both are 0: the harmonic mean recent SGG papers
   report, since R@K alone rewards predicting head predicates and mR@K alone rewards the opposite.
8. zsR@K (only when the evaluator is given the training triplets): the GT triplets whose
   (subject class, predicate, object class) never occurs in training are the image's zero-shot
   triplets; image zsR = (zero-shot GT triplets hit in the top K, graph constraint, matching as
   in 3) / (zero-shot GT triplets); zsR@K = mean over the images that have at least one
   (SGZeroShotRecall). Duplicated zero-shot GT triplets each count, as in 4.

Where the reference has a quirk, we keep it and say so:
- Duplicated GT triplets (VG's test split keeps them: `filter_duplicate_rels` only applies to
  train) each count in the denominator, and one prediction hits all copies at once.
- A GT pair annotated with two predicates can reach at most 1/2 under the graph constraint (its
  pair predicts one predicate); this is why ngR > R.
- Ties in the ranking: the reference takes R@K's order from the model's own sort (torch.sort in
  Scene-Graph-Benchmark's post-processor) and ngR@K's from np.argsort (quicksort, not stable), so
  tied predictions come out in an implementation-defined order. We break ties by (subject index,
  object index, predicate id), then by the caller's row index, which only separates identical
  predictions, so the result never depends on the caller's order. Ties are common (PredCls object
  scores are all 1, softmaxes saturate, a frequency baseline gives one score per class pair).
- ngR keeps the top 100 (pair, predicate) candidates in the reference; we keep the top max(ks),
  which is 100 for the default ks.
- zsR: the reference loads a fixed file of the test set's zero-shot triplets, in (subject class,
  object class, predicate) order; we derive them from the training triplets the caller passes,
  in (subject class, predicate, object class) order, which gives the same set on VG.
- IoU is pixel-inclusive: width = x2 - x1 + 1. VG boxes, the Fast R-CNN tooling and both
  reference evaluators treat coordinates as pixel indices, a box [0, 9] covering 10 pixels. The
  +1 moves IoU noticeably for small boxes ([0,0,9,9] vs [0,0,9,4] is 0.5 inclusive, 0.44 without),
  so it matters for matching the published numbers.
"""
import argparse
import math
import time
import warnings

import numpy as np

MODES = ('predcls', 'sgcls', 'sgdet')

# ----------------------------------------------------------------------------------------------
# Predicate groups (HEAD / BODY / TAIL)
# The 50 predicates of the standard VG split (VG-SGG-dicts.json, ids 1..50 in this order).
VG_PREDICATES = [
    'above', 'across', 'against', 'along', 'and', 'at', 'attached to', 'behind', 'belonging to',
    'between', 'carrying', 'covered in', 'covering', 'eating', 'flying in', 'for', 'from',
    'growing on', 'hanging from', 'has', 'holding', 'in', 'in front of', 'laying on', 'looking at',
    'lying on', 'made of', 'mounted on', 'near', 'of', 'on', 'on back of', 'over', 'painted on',
    'parked on', 'part of', 'playing', 'riding', 'says', 'sitting on', 'standing on', 'to',
    'under', 'using', 'walking in', 'walking on', 'watching', 'wearing', 'wears', 'with',
]
# The split by training frequency used by BGNN (Li et al. 2021, [26] in the paper) and SGTR:
# 7 head, 21 body, 22 tail predicates (their `longtail_part_dict`).
_VG_HEAD = ['behind', 'has', 'in', 'near', 'of', 'on', 'wearing']
_VG_TAIL = ['across', 'against', 'along', 'between', 'covered in', 'covering', 'eating',
            'flying in', 'from', 'growing on', 'laying on', 'lying on', 'made of', 'mounted on',
            'on back of', 'painted on', 'part of', 'playing', 'says', 'to', 'using', 'walking in']
VG_HEAD_BODY_TAIL = {
    'head': _VG_HEAD,
    'body': [p for p in VG_PREDICATES if p not in _VG_HEAD and p not in _VG_TAIL],
    'tail': _VG_TAIL,
}


def vg_predicate_groups(idx_to_predicate):
    """{'head': [ids], 'body': [...], 'tail': [...]} for a dataset whose predicates are VG's 50.

    idx_to_predicate: list of P+1 names, '__background__' at 0 (as data.VGSGGDataset exposes it).
    """
    name_to_id = {name: i for i, name in enumerate(idx_to_predicate) if i > 0}
    missing = [p for p in VG_PREDICATES if p not in name_to_id]
    if missing:
        raise ValueError(f"vg_predicate_groups: the dataset lacks the VG predicates {missing}; "
                         "use frequency_predicate_groups(train_counts) for other datasets")
    return {g: sorted(name_to_id[p] for p in names) for g, names in VG_HEAD_BODY_TAIL.items()}


def frequency_predicate_groups(counts, num_predicates=None):
    """HEAD / BODY / TAIL for any dataset, split by training frequency in VG's 7/21/22 proportions.

    counts: training-set count of each predicate, either length P+1 with index 0 the background
    (what np.bincount(relations[:, 2], minlength=P+1) gives; its entry 0 is ignored) or length P
    (index i = predicate i+1). The two are told apart by num_predicates when given; without it a
    length-(P+1) array is recognised by its background entry being 0 (background is never a GT
    predicate), and anything else is refused rather than guessed.
    The most frequent 7/50 of the predicates are head, the least frequent 22/50 tail, the rest
    body (rounded; each group non-empty); equal counts are ordered by predicate id.
    """
    counts = np.asarray(counts, dtype=np.float64).reshape(-1)
    if num_predicates is not None:
        if counts.size not in (num_predicates, num_predicates + 1):
            raise ValueError(f"frequency_predicate_groups: counts has {counts.size} entries, "
                             f"expected P = {num_predicates} or P + 1 = {num_predicates + 1}")
        fg = counts[1:] if counts.size == num_predicates + 1 else counts
    elif counts.size and counts[0] == 0:
        fg = counts[1:]
    else:
        raise ValueError("frequency_predicate_groups: counts[0] is not 0, so it is not a "
                         "background slot; pass num_predicates=P to say which layout it is")
    P = fg.size
    if P < 3:
        raise ValueError(f"frequency_predicate_groups: need at least 3 predicates, got {P}")
    n_head = max(1, int(math.floor(P * 7 / 50 + 0.5)))
    n_tail = min(max(1, int(math.floor(P * 22 / 50 + 0.5))), P - n_head - 1)  # body non-empty
    order = np.lexsort((np.arange(P), -fg)) + 1  # predicate ids, most frequent first
    return {'head': sorted(order[:n_head].tolist()),
            'body': sorted(order[n_head:P - n_tail].tolist()),
            'tail': sorted(order[P - n_tail:].tolist())}


def default_predicate_groups(idx_to_predicate, train_counts=None):
    """VG's standard groups when the predicates are VG's 50, else groups from training frequency."""
    names = list(idx_to_predicate)[1:]
    if sorted(names) == sorted(VG_PREDICATES):
        return vg_predicate_groups(idx_to_predicate)
    if train_counts is None:
        raise ValueError("default_predicate_groups: the predicates are not VG's 50, so the groups "
                         "come from training frequencies; pass train_counts (length P+1)")
    counts = np.asarray(train_counts, dtype=np.float64).reshape(-1)
    if counts.size != len(idx_to_predicate):
        raise ValueError(f"default_predicate_groups: train_counts has {counts.size} entries, "
                         f"expected {len(idx_to_predicate)} (P+1, background at 0)")
    return frequency_predicate_groups(counts, num_predicates=len(idx_to_predicate) - 1)


# ----------------------------------------------------------------------------------------------
# Boxes and ranking
def box_iou_inclusive(a, b):
    """IoU of every box in a (N, 4) with every box in b (G, 4), xyxy, pixel-inclusive -> (N, G).

    Pixel-inclusive as neural-motifs' `bbox_overlaps` (Fast R-CNN's Cython) and maskrcnn-benchmark's
    `boxlist_iou` (TO_REMOVE = 1) compute it: a box [x1, x2] spans x2 - x1 + 1 pixels.
    """
    lt = np.maximum(a[:, None, :2], b[None, :, :2])  # (N, G, 2)
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])  # (N, G, 2)
    wh = np.clip(rb - lt + 1, 0, None)  # (N, G, 2)
    inter = wh[..., 0] * wh[..., 1]  # (N, G)
    area_a = (a[:, 2] - a[:, 0] + 1) * (a[:, 3] - a[:, 1] + 1)  # (N,)
    area_b = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)  # (G,)
    union = area_a[:, None] + area_b[None, :] - inter
    return inter / np.maximum(union, np.finfo(np.float64).tiny)


def _top_candidates(score, T):
    """Indices of every candidate that can be among the T best: those scoring >= the T-th largest
    score (T of them plus any ties at that score). A linear-time partition, so ranking 4,032 pairs
    costs little more than reading their scores; only these few are then sorted in full."""
    M = score.shape[0]
    if M <= T:
        return np.arange(M)
    tau = np.partition(score, M - T)[M - T]
    return np.flatnonzero(score >= tau)


def _rank(score, tie_keys):
    """Order of the candidates, best first: score descending, ties by tie_keys (int arrays, most
    significant first) ascending, remaining ties by position (np.lexsort is stable)."""
    return np.lexsort(tuple(reversed(tie_keys)) + (-score,))  # lexsort: LAST key is primary


# ----------------------------------------------------------------------------------------------
# The evaluator
def training_triplets(labels_list, relations_list):
    """{(subject class, predicate, object class)} of a split: what zeroshot_triplets expects.

    labels_list: per image its object labels (G,); relations_list: per image its relations (R, 3)
    as (subject index, object index, predicate). numpy arrays or torch tensors.
    """
    seen = set()
    for i, (labels, rels) in enumerate(zip(labels_list, relations_list)):
        labels = _to_numpy(labels, f'training_triplets: labels of image {i}').reshape(-1)
        rels = _to_numpy(rels, f'training_triplets: relations of image {i}')
        rels = _check_int(rels.reshape(0, 3) if rels.size == 0 else rels,
                          f'training_triplets: relations of image {i}')  # (R, 3)
        _check_shape(rels, f'training_triplets: relations of image {i}', (None, 3))
        trip = np.stack([labels[rels[:, 0]], rels[:, 2], labels[rels[:, 1]]], 1)  # (R, 3)
        seen.update(map(tuple, trip.astype(np.int64).tolist()))
    return seen


def _to_numpy(x, name):
    if x is None:
        return None
    if hasattr(x, 'detach'):  # a torch tensor, on any device; converted once here
        x = x.detach()
        if str(x.dtype) == 'torch.bfloat16':
            x = x.float()  # numpy has no bfloat16
        return x.cpu().numpy()
    try:
        return np.asarray(x)
    except Exception as e:  # pragma: no cover - message only
        raise TypeError(f"{name}: expected a numpy array or a torch tensor, got {type(x)}") from e


def _check_shape(x, name, shape):
    """shape: tuple with ints (exact) or None (any); raises naming the field and both shapes."""
    ok = x.ndim == len(shape) and all(s is None or s == d for s, d in zip(shape, x.shape))
    if not ok:
        want = '(' + ', '.join('*' if s is None else str(s) for s in shape) + ')'
        raise ValueError(f"{name}: expected shape {want}, got {tuple(x.shape)}")


def _check_int(x, name):
    if x.size and not (np.issubdtype(x.dtype, np.integer) or np.all(np.mod(x, 1) == 0)):
        raise ValueError(f"{name}: expected integer values, got dtype {x.dtype} with fractions")
    return x.astype(np.int64, copy=False)


class SGEvaluator:
    """Accumulates per-image results of one mode; `summary()` turns them into the metrics.

    mode: 'predcls' (GT boxes and labels given: the evaluator uses the GT boxes, labels and scores
    1, ignoring any in pred), 'sgcls' (GT boxes given: uses the GT boxes with pred's labels and
    scores, N = G), 'sgdet' (everything predicted). num_predicates: P, without background.
    ks: the K of R@K. predicate_groups: {name: [predicate ids in 1..P]} for `{name}_mR@K`.
    zeroshot_triplets: the (subject class, predicate, object class) triplets seen in training, an
    iterable of 3-tuples or a (T, 3) array (see training_triplets()); zsR@K is reported only when
    it is given.
    """

    def __init__(self, mode, num_predicates, ks=(20, 50, 100), iou_threshold=0.5,
                 predicate_groups=None, zeroshot_triplets=None):
        if mode not in MODES:
            raise ValueError(f"SGEvaluator: mode must be one of {MODES}, got {mode!r}")
        if int(num_predicates) < 1:
            raise ValueError(f"SGEvaluator: num_predicates must be >= 1 (P, no background), "
                             f"got {num_predicates}")
        ks = tuple(int(k) for k in ks)
        if not ks or min(ks) < 1 or len(set(ks)) != len(ks):
            raise ValueError(f"SGEvaluator: ks must be distinct positive ints, got {ks}")
        if not 0 < iou_threshold <= 1:
            raise ValueError(f"SGEvaluator: iou_threshold must be in (0, 1], got {iou_threshold}")
        self.mode, self.num_predicates, self.ks = mode, int(num_predicates), ks
        self.iou_threshold = float(iou_threshold)
        self.predicate_groups = {}
        for name, ids in (predicate_groups or {}).items():
            ids = [int(i) for i in ids]
            bad = [i for i in ids if not 1 <= i <= self.num_predicates]
            if bad or not ids:
                raise ValueError(f"SGEvaluator: predicate group {name!r} must list predicate ids "
                                 f"in 1..{self.num_predicates}; bad: {bad or 'empty group'}")
            self.predicate_groups[name] = ids
        self.seen_triplets = None
        if zeroshot_triplets is not None:
            t = _to_numpy(zeroshot_triplets, 'zeroshot_triplets')
            if t.dtype == object:  # a set or a list of tuples
                t = np.array(list(zeroshot_triplets), dtype=np.int64)
            t = _check_int(t if t.size else t.reshape(0, 3), 'zeroshot_triplets')  # (T, 3)
            _check_shape(t, 'zeroshot_triplets', (None, 3))
            self.seen_triplets = frozenset(map(tuple, t.tolist()))
        self.reset()

    def _config(self):
        # The training triplets enter as (count, hash): int tuples hash the same in every process,
        # and all_gather_object then ships 2 ints per rank, not the ~30k VG training triplets.
        zs = None if self.seen_triplets is None else (len(self.seen_triplets),
                                                      hash(self.seen_triplets))
        return (self.mode, self.num_predicates, self.ks, self.iou_threshold, zs)

    def reset(self):
        # One record per image WITH GT relations: (predicate ids (U,), GT count per predicate (U,),
        # graph-constrained hits (nK, U), no-graph-constraint hits (nK, U), zero-shot GT triplets
        # (int, 0 without zeroshot_triplets), their graph-constrained hits (nK,)). Everything
        # summary() needs, small enough to all_gather across ranks.
        self._records = []
        self._num_images = 0
        self._gathered = False

    # ---- input checks ----------------------------------------------------------------------
    def _prepare(self, gt, pred):
        P = self.num_predicates
        for key in ('boxes', 'labels', 'relations'):
            if key not in gt:
                raise KeyError(f"add: gt lacks {key!r} (needs boxes, labels, relations)")
        for key in ('rel_pairs', 'rel_scores'):
            if key not in pred:
                raise KeyError(f"add: pred lacks {key!r} (needs rel_pairs, rel_scores, and "
                               "boxes/labels/scores as the mode requires)")
        gt_boxes = _to_numpy(gt['boxes'], 'gt boxes').astype(np.float64)
        if gt_boxes.size == 0:
            gt_boxes = gt_boxes.reshape(0, 4)
        _check_shape(gt_boxes, 'gt boxes', (None, 4))
        G = gt_boxes.shape[0]
        gt_labels = _check_int(_to_numpy(gt['labels'], 'gt labels').reshape(-1), 'gt labels')
        _check_shape(gt_labels, 'gt labels', (G,))
        gt_rels = _to_numpy(gt['relations'], 'gt relations')
        if gt_rels.size == 0:
            gt_rels = gt_rels.reshape(0, 3)
        gt_rels = _check_int(gt_rels, 'gt relations')
        _check_shape(gt_rels, 'gt relations', (None, 3))
        if gt_rels.size:
            if gt_rels[:, :2].min() < 0 or gt_rels[:, :2].max() >= G:
                raise ValueError(f"gt relations: subject/object index out of range [0, {G}) "
                                 f"(max {gt_rels[:, :2].max()}, min {gt_rels[:, :2].min()})")
            if gt_rels[:, 2].min() < 1 or gt_rels[:, 2].max() > P:
                raise ValueError(f"gt relations: predicate ids must be in 1..{P} (0 is the "
                                 f"background, not a relation); got min {gt_rels[:, 2].min()}, "
                                 f"max {gt_rels[:, 2].max()}")
        if not np.all(np.isfinite(gt_boxes)):
            raise ValueError("gt boxes: non-finite coordinates")

        if self.mode == 'predcls':  # the reference substitutes GT boxes, labels and scores 1
            boxes, labels, obj_scores = gt_boxes, gt_labels, np.ones(G)
        else:
            for key in ('labels', 'scores') + (('boxes',) if self.mode == 'sgdet' else ()):
                if key not in pred:
                    raise KeyError(f"add: pred lacks {key!r}, needed in {self.mode}")
            labels = _check_int(_to_numpy(pred['labels'], 'pred labels').reshape(-1),
                                'pred labels')
            N = labels.shape[0]
            obj_scores = _to_numpy(pred['scores'], 'pred scores').astype(np.float64).reshape(-1)
            _check_shape(obj_scores, 'pred scores', (N,))
            if not np.all(np.isfinite(obj_scores)) or (N and obj_scores.min() < 0):
                raise ValueError("pred scores: object scores must be finite and >= 0")
            if self.mode == 'sgcls':  # the reference evaluates SGCls on the GT boxes
                if N != G:
                    raise ValueError(f"sgcls: pred labels has {N} objects, expected one per GT "
                                     f"box ({G})")
                boxes = gt_boxes
            else:
                boxes = _to_numpy(pred['boxes'], 'pred boxes').astype(np.float64)
                if boxes.size == 0:
                    boxes = boxes.reshape(0, 4)
                _check_shape(boxes, 'pred boxes', (N, 4))
                if not np.all(np.isfinite(boxes)):
                    raise ValueError("pred boxes: non-finite coordinates")
        N = boxes.shape[0]

        pairs = _to_numpy(pred['rel_pairs'], 'rel_pairs')
        if pairs.size == 0:
            pairs = pairs.reshape(0, 2)
        pairs = _check_int(pairs, 'rel_pairs')
        _check_shape(pairs, 'rel_pairs', (None, 2))
        M = pairs.shape[0]
        rel_scores = _to_numpy(pred['rel_scores'], 'rel_scores')
        if rel_scores.size == 0:
            rel_scores = rel_scores.reshape(0, P + 1)
        if rel_scores.ndim == 2 and rel_scores.shape == (M, P):
            raise ValueError(f"rel_scores: has P = {P} columns, expected P + 1 = {P + 1} with "
                             "column 0 the no-relation class")
        _check_shape(rel_scores, 'rel_scores', (M, P + 1))
        if M:
            if pairs.min() < 0 or pairs.max() >= N:
                raise ValueError(f"rel_pairs: index out of range [0, {N}) of the "
                                 f"{'GT' if self.mode != 'sgdet' else 'predicted'} objects "
                                 f"(min {pairs.min()}, max {pairs.max()})")
            lo, hi = rel_scores.min(), rel_scores.max()
            if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0 or hi > 1 + 1e-5:
                raise ValueError(f"rel_scores: expected probabilities in [0, 1], got range "
                                 f"[{lo}, {hi}] (logits? apply softmax or sigmoid first)")
        return gt_boxes, gt_labels, gt_rels, boxes, labels, obj_scores, pairs, rel_scores

    # ---- one image -------------------------------------------------------------------------
    def add(self, gt, pred):
        """Evaluate one image; returns its {'R@K': ..., 'ngR@K': ...}, or None if it has no GT
        relations (skipped, as in the reference: its recall is 0/0)."""
        if self._gathered:
            raise RuntimeError("add: this evaluator was already gathered across ranks; create a "
                               "new one (or reset()) for another evaluation")
        (gt_boxes, gt_labels, gt_rels, boxes, labels, obj_scores,
         pairs, rel_scores) = self._prepare(gt, pred)
        self._num_images += 1
        R = gt_rels.shape[0]
        if R == 0:
            return None
        P, T = self.num_predicates, max(self.ks)
        ks = np.asarray(self.ks)  # (nK,)

        # Which predicted object can stand for which GT object: same label and IoU >= 0.5.
        # Computed once per object pair (N x G), then gathered per triplet pair (T x R) below.
        obj_ok = box_iou_inclusive(boxes, gt_boxes) >= self.iou_threshold  # (N, G)
        obj_ok &= labels[:, None] == gt_labels[None, :]  # (N, G)
        gs, go, gp = gt_rels[:, 0], gt_rels[:, 1], gt_rels[:, 2]  # (R,) each

        def first_hit_rank(ps, po, pp):
            # ps, po, pp: (T,) ranked predictions. hit[t, r]: prediction t hits GT triplet r.
            hit = obj_ok[ps[:, None], gs[None, :]] & obj_ok[po[:, None], go[None, :]]  # (T, R)
            hit &= pp[:, None] == gp[None, :]  # (T, R)
            # rank of the first prediction hitting each GT triplet; T (never < any K) if none
            if hit.shape[0] == 0:  # no candidate pairs at all
                return np.full(R, T)
            return np.where(hit.any(0), hit.argmax(0), T)  # (R,)

        M = pairs.shape[0]
        so = obj_scores[pairs[:, 0]] * obj_scores[pairs[:, 1]] if M else np.zeros(0)  # (M,)
        fg = rel_scores[:, 1:]  # (M, P) foreground predicate probabilities
        # Graph constraint: one predicate per pair, its arg-max (ties -> lowest id, as np.argmax
        # in the reference); triplet score = predicate prob * subject score * object score.
        best_s = fg.max(1).astype(np.float64) * so if M else np.zeros(0)  # (M,)
        cand = _top_candidates(best_s, T)  # (Mc,) Mc = T plus ties, or M if M < T
        best_p = fg[cand].argmax(1) + 1 if M else np.zeros(0, np.int64)  # (Mc,) in 1..P
        order = _rank(best_s[cand], [pairs[cand, 0], pairs[cand, 1], best_p])[:T]  # (<=T,)
        top = cand[order]  # (<=T,) ranked pair indices
        rank_gc = first_hit_rank(pairs[top, 0], pairs[top, 1], best_p[order])  # (R,)

        # No graph constraint: every (pair, predicate) competes. Only the `cand` pairs (best score
        # >= the T-th best pair score) can place an entry in the top T: any other pair's entries
        # are beaten by >= T entries (one per better pair), so we rank the Mc x P entries only,
        # exactly the same top T as ranking all M x P.
        if M:
            Mc = cand.shape[0]
            e_s = (fg[cand].astype(np.float64) * so[cand, None]).reshape(-1)  # (Mc*P,)
            e_pair = np.repeat(cand, P)  # (Mc*P,) pair of each entry
            e_pred = np.tile(np.arange(1, P + 1), Mc)  # (Mc*P,) predicate of each entry
            c = _top_candidates(e_s, T)  # (<=T plus ties,)
            top_e = c[_rank(e_s[c], [pairs[e_pair[c], 0], pairs[e_pair[c], 1], e_pred[c]])[:T]]
            rank_ng = first_hit_rank(pairs[e_pair[top_e], 0], pairs[e_pair[top_e], 1],
                                     e_pred[top_e])  # (R,)
        else:
            rank_ng = np.full(R, T)

        hit_gc = rank_gc[None, :] < ks[:, None]  # (nK, R): GT triplet r hit in the top K
        hit_ng = rank_ng[None, :] < ks[:, None]  # (nK, R)
        # Per predicate present in this image (duplicated GT triplets count each time, as the
        # reference's loop over gt_rels rows does).
        uniq, inv = np.unique(gp, return_inverse=True)  # (U,), (R,)
        onehot = np.zeros((R, uniq.shape[0]), np.int64)  # (R, U)
        onehot[np.arange(R), inv.reshape(-1)] = 1
        count = onehot.sum(0)  # (U,)
        # Zero-shot GT triplets: their (subject class, predicate, object class) never seen in
        # training. Labels are the GT's: whether a triplet is zero-shot is a fact of the data.
        if self.seen_triplets is not None:
            trip = zip(gt_labels[gs].tolist(), gp.tolist(), gt_labels[go].tolist())
            zs = np.array([t not in self.seen_triplets for t in trip], dtype=bool)  # (R,)
        else:
            zs = np.zeros(R, dtype=bool)
        self._records.append((uniq.astype(np.int32), count.astype(np.int32),
                              (hit_gc.astype(np.int64) @ onehot).astype(np.int32),
                              (hit_ng.astype(np.int64) @ onehot).astype(np.int32),
                              int(zs.sum()), hit_gc[:, zs].sum(1).astype(np.int32)))
        out = {}
        for i, k in enumerate(self.ks):
            out[f'R@{k}'] = float(hit_gc[i].sum()) / R
            out[f'ngR@{k}'] = float(hit_ng[i].sum()) / R
            if self.seen_triplets is not None and zs.any():
                out[f'zsR@{k}'] = float(hit_gc[i, zs].sum()) / zs.sum()
        return out

    # ---- combining evaluators -------------------------------------------------------------
    def _check_compatible(self, other):
        mine, theirs = self._config(), other._config()
        if mine != theirs or self.seen_triplets != other.seen_triplets:
            raise ValueError(f"merge: evaluators differ (mode, P, ks, iou, (number, hash) of "
                             f"training triplets): {mine} vs {theirs}")

    def merge(self, other):
        """Append another evaluator's images (same mode, P, ks, IoU threshold and training
        triplets) after ours."""
        self._check_compatible(other)
        self._records.extend(other._records)
        self._num_images += other._num_images
        return self

    def state_dict(self):
        return {'config': self._config(),
                'records': list(self._records), 'num_images': self._num_images}

    def load_state_dict(self, state):
        if tuple(state['config']) != self._config():
            raise ValueError(f"load_state_dict: config {state['config']} differs from this "
                             "evaluator's")
        self._records = list(state['records'])
        self._num_images = int(state['num_images'])

    def gather(self):
        """Under torch.distributed, give every rank the images of all ranks, in rank order.

        With a contiguous sharding of the test set (rank 0 the first images, as
        data.InferenceSampler does) the records then come in the single-process order, so
        summary() on any rank equals the single-process result exactly. A no-op when
        torch.distributed is not initialised. Call once, after the last add().
        """
        try:
            import torch.distributed as dist
        except ImportError:  # numpy-only use
            return self
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        if self._gathered:
            raise RuntimeError("gather: already gathered (a second gather would count every "
                               "image world_size times)")
        states = [None] * dist.get_world_size()
        dist.all_gather_object(states, self.state_dict())
        if any(tuple(s['config']) != self._config() for s in states):
            raise ValueError("gather: the ranks' evaluators differ (mode, P, ks, iou or training "
                             f"triplets): {[s['config'] for s in states]}")
        self._records, self._num_images = [], 0
        for s in states:
            self._records.extend(s['records'])
            self._num_images += s['num_images']
        self._gathered = True
        return self

    # ---- the metrics ----------------------------------------------------------------------
    def summary(self):
        """{'R@K', 'mR@K', 'F@K', 'ngR@K', 'ngmR@K', 'per_predicate_R@K', 'per_predicate_ngR@K',
        '{group}_mR@K', 'per_predicate_num_gt', 'num_images', 'num_images_with_relations'}, and
        with zeroshot_triplets 'zsR@K' and 'num_images_with_zeroshot'."""
        P, ks = self.num_predicates, self.ks
        out = {'num_images': self._num_images, 'num_images_with_relations': len(self._records)}
        if not self._records:
            warnings.warn("SGEvaluator.summary: no image with GT relations was added; every "
                          "recall is undefined (NaN)")
            for k in ks:
                for key in ('R', 'mR', 'F', 'ngR', 'ngmR') + \
                        (('zsR',) if self.seen_triplets is not None else ()):
                    out[f'{key}@{k}'] = float('nan')
                out[f'per_predicate_R@{k}'] = [float('nan')] * P
                out[f'per_predicate_ngR@{k}'] = [float('nan')] * P
                for g in self.predicate_groups:
                    out[f'{g}_mR@{k}'] = float('nan')
            out['per_predicate_num_gt'] = [0] * P
            if self.seen_triplets is not None:
                out['num_images_with_zeroshot'] = 0
            return out
        I = len(self._records)
        n_u = np.array([r[0].shape[0] for r in self._records])  # (I,)
        img = np.repeat(np.arange(I), n_u)  # (sum U,) image of each (image, predicate) entry
        pid = np.concatenate([r[0] for r in self._records]).astype(np.int64)  # (sum U,)
        cnt = np.concatenate([r[1] for r in self._records]).astype(np.float64)  # (sum U,)
        n_img_with = np.bincount(pid, minlength=P + 1)[1:]  # (P,) images containing each
        out['per_predicate_num_gt'] = np.bincount(pid, weights=cnt, minlength=P + 1)[1:] \
            .astype(np.int64).tolist()
        gt_per_img = np.bincount(img, weights=cnt, minlength=I)  # (I,)
        for col, (rkey, mkey) in ((2, ('R', 'mR')), (3, ('ngR', 'ngmR'))):
            hits = np.concatenate([r[col] for r in self._records], axis=1).astype(np.float64)
            for i, k in enumerate(ks):
                # Image recall, then the mean over images with GT relations (the reference's
                # np.mean of per-image recalls: big images do not weigh more).
                rec_img = np.bincount(img, weights=hits[i], minlength=I) / gt_per_img  # (I,)
                out[f'{rkey}@{k}'] = float(rec_img.mean())
                # Per predicate: mean over the images containing it of its per-image recall.
                rec_pi = hits[i] / cnt  # (sum U,)
                per_pred = np.bincount(pid, weights=rec_pi, minlength=P + 1)[1:] \
                    / np.maximum(n_img_with, 1)  # (P,), absent predicates 0
                # PAPER: Sec. 4 "Evaluation Metrics", mean recall, the model-selection metric.
                # mR divides by ALL P predicates (reference: sum / (num_rel - 1)).
                out[f'{mkey}@{k}'] = float(per_pred.sum() / P)
                out[f'per_predicate_{rkey}@{k}'] = per_pred.tolist()
                if col == 2:
                    for g, ids in self.predicate_groups.items():
                        out[f'{g}_mR@{k}'] = float(per_pred[np.asarray(ids) - 1].mean())
        for k in ks:
            # F@K: harmonic mean of R@K and mR@K; 0/0 (nothing hit) is 0, not NaN.
            r, mr = out[f'R@{k}'], out[f'mR@{k}']
            out[f'F@{k}'] = 2 * r * mr / (r + mr) if r + mr > 0 else 0.0
        if self.seen_triplets is not None:
            # zsR@K: mean over the images WITH zero-shot GT triplets of their zero-shot recall
            # (SGZeroShotRecall appends nothing for an image without any).
            n_zs = np.array([r[4] for r in self._records])  # (I,)
            zs_hits = np.stack([r[5] for r in self._records]).astype(np.float64)  # (I, nK)
            keep = n_zs > 0
            out['num_images_with_zeroshot'] = int(keep.sum())
            for i, k in enumerate(ks):
                out[f'zsR@{k}'] = float((zs_hits[keep, i] / n_zs[keep]).mean()) if keep.any() \
                    else float('nan')
        return out


def format_summary(s, ks=None):
    """One log line of a summary() in percent: 'R@20/50/100 51.2/60.1/63.3 | mR@20/50/100 ... |
    F@... | zsR@... (with training triplets) | ngR@... | ngmR@... | body_mR@... | head_mR@... |
    tail_mR@...'."""
    if ks is None:
        ks = sorted(int(key[2:]) for key in s if key.startswith('R@'))
    parts = []
    plain = ('R', 'mR', 'F', 'zsR', 'ngR', 'ngmR')
    # F and zsR only when present: zsR needs the training triplets, and summaries saved before
    # F@K existed still format.
    names = [n for n in plain if f'{n}@{ks[0]}' in s] + sorted(
        {key.split('_mR@')[0] for key in s if '_mR@' in key and not key.startswith('per_')})
    for name in names:
        key = name if name in plain else f'{name}_mR'
        vals = '/'.join(f"{100 * s[f'{key}@{k}']:.1f}" for k in ks)
        parts.append(f"{key}@{'/'.join(str(k) for k in ks)} {vals}")
    return ' | '.join(parts)


# ----------------------------------------------------------------------------------------------
# Benchmark: python metrics.py --bench
def _synthetic_sgdet_image(rng, num_boxes=64, num_gt=20, num_rels=25, P=50, C=30):
    """A random SGDet image: GT objects and relations, num_boxes detections (jittered copies of
    the GT boxes, 20% with a wrong label), every ordered pair (num_boxes*(num_boxes-1)) scored by
    a random softmax. Only for timing: its recalls are near 0."""
    xy = rng.uniform(0, 500, (num_gt, 2))
    wh = rng.uniform(10, 200, (num_gt, 2))
    gt_boxes = np.concatenate([xy, xy + wh], 1)
    gt_labels = rng.integers(1, C + 1, num_gt)
    s = rng.integers(0, num_gt, num_rels)
    o = (s + rng.integers(1, num_gt, num_rels)) % num_gt  # never s == o
    gt_rels = np.stack([s, o, rng.integers(1, P + 1, num_rels)], 1)
    src = rng.integers(0, num_gt, num_boxes)
    boxes = gt_boxes[src] + rng.normal(0, 8, (num_boxes, 4))
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
    labels = np.where(rng.random(num_boxes) < 0.8, gt_labels[src], rng.integers(1, C + 1, num_boxes))
    ii, jj = np.nonzero(~np.eye(num_boxes, dtype=bool))
    logits = rng.standard_normal((ii.size, P + 1), dtype=np.float32) * 2
    e = np.exp(logits - logits.max(1, keepdims=True))
    return ({'boxes': gt_boxes, 'labels': gt_labels, 'relations': gt_rels},
            {'boxes': boxes, 'labels': labels, 'scores': rng.random(num_boxes),
             'rel_pairs': np.stack([ii, jj], 1), 'rel_scores': e / e.sum(1, keepdims=True)})


def bench(num_images=5000, num_boxes=64, P=50, seed=0, tensors=False):
    if tensors:  # what the model scripts pass: CPU torch tensors, float32 scores
        import torch
    rng = np.random.default_rng(seed)
    ev = SGEvaluator('sgdet', P, predicate_groups=frequency_predicate_groups(np.arange(P + 1)))
    t_add, t0 = 0.0, time.perf_counter()
    for i in range(num_images):
        gt, pred = _synthetic_sgdet_image(rng, num_boxes=num_boxes, P=P)
        if tensors:
            gt = {k: torch.from_numpy(v) for k, v in gt.items()}
            pred = {k: torch.from_numpy(v).float() if v.dtype == np.float64 else
                    torch.from_numpy(v) for k, v in pred.items()}
        t = time.perf_counter()
        ev.add(gt, pred)
        t_add += time.perf_counter() - t
        if (i + 1) % 1000 == 0 or i + 1 == num_images:
            print(f"  {i + 1}/{num_images} images | add {1000 * t_add / (i + 1):.2f} ms/image",
                  flush=True)
    t = time.perf_counter()
    s = ev.summary()
    t_sum = time.perf_counter() - t
    M = num_boxes * (num_boxes - 1)
    print(f"SGEvaluator sgdet: {num_images} images x {num_boxes} boxes x {M} pairs, P={P}, "
          f"inputs {'torch tensors' if tensors else 'numpy arrays'}")
    print(f"  add(): {1000 * t_add / num_images:.2f} ms/image, {t_add:.1f} s total | "
          f"summary(): {1000 * t_sum:.0f} ms | wall incl. data generation "
          f"{time.perf_counter() - t0:.1f} s")
    print('  ' + format_summary(s))  # random predictions: recalls near 0, a sanity print only
    return s


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--bench', action='store_true', help='time SGEvaluator on synthetic SGDet')
    ap.add_argument('--images', type=int, default=5000, help='benchmark images')
    ap.add_argument('--boxes', type=int, default=64, help='detections per image (all pairs)')
    ap.add_argument('--predicates', type=int, default=50, help='P')
    ap.add_argument('--tensors', action='store_true', help='pass torch tensors instead of numpy')
    args = ap.parse_args()
    if args.bench:
        bench(args.images, args.boxes, args.predicates, tensors=args.tensors)
    else:
        ap.print_help()
