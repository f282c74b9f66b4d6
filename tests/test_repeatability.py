"""What makes the numbers repeat: the instruction-set pin, and the frozen detector's feature cache.

The pin (top of both model files and study.py): torch, oneDNN and MKL use AVX2 kernels unless the user
says otherwise, so that an AVX-512 machine prints the README's digits; a run folder records what it used.
The feature cache (FeatureCache in both files): the frozen detector's outputs are computed once per image,
alone and unpadded, so that a run gives the same numbers whether an image's entry was computed now or
earlier. Here: cached outputs against a recomputation, a cold cache against a warm one, and a batch of one
image (no padding) cached and uncached, which must agree exactly.
"""
import json
import os
import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import data
import metrics
import motifs_align as M
import sgtr_align as S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIN_VARS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
X86 = platform.machine().lower() in ("x86_64", "amd64")


# ----------------------------------------------------------------------------------------------
# The instruction-set pin

def isa_in_subprocess(module, **env):
    """Import `module` in a fresh interpreter (with the pin variables unset, then `env` applied) -> what torch
    uses and the three variables as the process sees them."""
    base = {k: v for k, v in os.environ.items() if k not in PIN_VARS + ("SGG_ALIGN_ISA",)}
    code = (f"import os, {module}, torch; print(torch.backends.cpu.get_cpu_capability()); "
            f"print(*[os.environ.get(v, '-') for v in {PIN_VARS!r}])")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**base, **env}, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    capability, variables = r.stdout.split("\n")[:2]
    return capability, variables.split()


@pytest.mark.skipif(not X86, reason="the pin is for x86-64 CPUs")
@pytest.mark.parametrize("module", ["motifs_align", "sgtr_align", "study"])
def test_the_pin_is_in_effect_and_a_users_setting_wins(module):
    capability, variables = isa_in_subprocess(module)
    assert variables == ["avx2", "AVX2", "AVX2"]
    assert capability == "AVX2"   # x86-64 CPUs of the last decade have AVX2; unpinned, an AVX-512 one says AVX512
    if module != "motifs_align":
        return   # the same lines in each file; the other cases once
    capability, variables = isa_in_subprocess(module, ATEN_CPU_CAPABILITY="default")
    assert capability == "DEFAULT" and variables == ["default", "AVX2", "AVX2"]   # the user's own value stays
    capability, variables = isa_in_subprocess(module, SGG_ALIGN_ISA="native")
    assert variables == ["-", "-", "-"]   # the pin turned off: torch picks the CPU's best kernels


# ----------------------------------------------------------------------------------------------
# Motifs: FeatureCache

@pytest.fixture(scope="module")
def synthetic():
    cfg = M.parse_config(["--predcls"])
    _, ds = M.load_datasets(cfg, 0)
    return ds


def a_batch(ds, n=3):
    """n test images, the first of them the largest in both height and width (so it has no batch padding)."""
    sizes = [ds.get_groundtruth(i)["size"] for i in range(60)]
    big = max(range(60), key=lambda i: sizes[i][0] * sizes[i][1])
    rest = [i for i in range(60) if i != big and sizes[i][0] < sizes[big][0] and sizes[i][1] < sizes[big][1]]
    return data.collate([ds[i] for i in [big] + rest[:n - 1]])


@pytest.mark.parametrize("mode", ["predcls", "sgcls", "sgdet"])
def test_motifs_cached_outputs_equal_recomputed_ones(synthetic, mode):
    cfg = M.parse_config([f"--{mode}"])
    torch.manual_seed(0)
    det = M.Detector(cfg, synthetic["test"].num_classes).eval().requires_grad_(False)
    images, targets = a_batch(synthetic["test"])
    sizes, boxes, labels = [t["size"] for t in targets], [t["boxes"] for t in targets], [t["labels"] for t in targets]
    batched = M.stage1_outputs(det, images, sizes, mode, boxes, labels)          # as before: one padded batch
    det.feature_cache = M.FeatureCache()
    cached = M.stage1_outputs(det, images, sizes, mode, boxes, labels)
    again = M.stage1_outputs(det, images, sizes, mode, boxes, labels)            # warm: read, not recomputed
    assert len(det.feature_cache.store) == len(targets)
    for k in ("obj_feats", "obj_dists"):
        assert torch.equal(cached[k], again[k])
    start = 0
    for i, (h, w) in enumerate(sizes):
        alone = M.stage1_outputs(det, images[i:i + 1, :, :h, :w], [(h, w)], mode, boxes[i:i + 1], labels[i:i + 1],
                                 cached=False)
        n = len(cached["boxes"][i])
        assert torch.equal(cached["fmap"][i], alone["fmap"][0])                   # (F, h_i, w_i), the image alone
        assert torch.equal(cached["obj_feats"][start:start + n], alone["obj_feats"])
        assert torch.equal(cached["boxes"][i], alone["boxes"][0])
        start += n
    # the first image fills the batch (no padding): the batched computation agrees within float tolerance
    n0 = len(cached["boxes"][0])
    fh, fw = cached["fmap"][0].shape[1:]
    torch.testing.assert_close(cached["fmap"][0], batched["fmap"][0, :, :fh, :fw], rtol=1e-4, atol=1e-5)
    if mode != "sgdet":   # (sgdet: the NMS can break near-ties between float-close scores differently)
        torch.testing.assert_close(cached["obj_feats"][:n0], batched["obj_feats"][:n0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(cached["obj_dists"][:n0], batched["obj_dists"][:n0], rtol=1e-4, atol=1e-5)


def motifs_eval(model, det, ds, cfg):
    groups = metrics.default_predicate_groups(ds.dataset.idx_to_predicate, data.predicate_counts(ds.dataset))
    return json.dumps(M.evaluate(model, det, ds, cfg, "cpu", groups), sort_keys=True)


@pytest.mark.parametrize("mode", ["sgdet"])   # every part of the cache (sgdet: the detections too)
def test_motifs_cold_and_warm_cache_give_the_same_evaluation(synthetic, mode):
    """A cold cache (every image computed now) and a warm one (every image read) give identical metrics; with
    batches of one image (no padding) the uncached path agrees too, exactly."""
    cfg = M.parse_config([f"--{mode}", "--eval-batch", "3"])
    C, P = synthetic["test"].num_classes, synthetic["test"].num_predicates
    torch.manual_seed(0)
    det = M.Detector(cfg, C).eval().requires_grad_(False)
    model = M.MotifsRelationModel(cfg, C, P, det.backbone.out_channels, det.stride, torch.zeros(C, C, P)).eval()
    ds = M.first(synthetic["test"], 6)
    det.feature_cache = M.FeatureCache()
    cold = motifs_eval(model, det, ds, cfg)
    assert len(det.feature_cache.store) == 6
    warm = motifs_eval(model, det, ds, cfg)
    assert cold == warm and len(det.feature_cache.store) == 6
    one = M.parse_config([f"--{mode}", "--eval-batch", "1"])
    det.feature_cache = None
    uncached = motifs_eval(model, det, ds, one)
    det.feature_cache = M.FeatureCache()
    assert motifs_eval(model, det, ds, one) == uncached


def motifs_eval_many(models, det, ds, cfg, roi_cache=None):
    groups = metrics.default_predicate_groups(ds.dataset.idx_to_predicate, data.predicate_counts(ds.dataset))
    out = M.evaluate(models, det, ds, cfg, "cpu", groups, roi_cache=roi_cache)
    return [json.dumps(o, sort_keys=True) for o in out] if isinstance(models, list) else json.dumps(out, sort_keys=True)


@pytest.mark.parametrize("mode", ["predcls"])   # (with an untrained detector, SGCls/SGDet recall is all 0)
def test_motifs_shared_union_rois_change_no_number(synthetic, mode):
    """Two checkpoints tested in one pass (sharing stage 1 and the union RoIAlign) give each one's own metrics,
    exactly; and so do validations that read the union RoIAlign kept by an earlier one (evaluate's roi_cache,
    one entry per image, batches of 3 so that a per-batch key would collide)."""
    cfg = M.parse_config([f"--{mode}", "--eval-batch", "3"])
    C, P = synthetic["test"].num_classes, synthetic["test"].num_predicates
    torch.manual_seed(0)
    det = M.Detector(cfg, C).eval().requires_grad_(False)
    det.feature_cache = M.FeatureCache()
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(M.MotifsRelationModel(cfg, C, P, det.backbone.out_channels, det.stride,
                                            torch.randn(C, C, P)).eval())
    ds = M.first(synthetic["test"], 8)
    alone = [motifs_eval_many(m, det, ds, cfg) for m in models]
    assert alone[0] != alone[1]                                  # two models that the metrics tell apart
    assert motifs_eval_many(models, det, ds, cfg) == alone
    kept = {}
    assert motifs_eval_many(models[0], det, ds, cfg, kept) == alone[0] and len(kept) == 8   # cold: computed
    kept_ids = {k: id(v) for k, v in kept.items()}
    assert motifs_eval_many(models[1], det, ds, cfg, kept) == alone[1]                      # warm: read
    assert {k: id(v) for k, v in kept.items()} == kept_ids


def test_motifs_roi_cache_only_where_it_fits(synthetic):
    """The validation images' union RoIAlign is kept only within --feature-cache-gb, beside the feature cache."""
    C, P = synthetic["val"].num_classes, synthetic["val"].num_predicates
    sizes = {}
    for gb in ("0.8", "4"):   # the feature cache 0.50 GB, the validation union RoIAlign 0.43 GB
        lines = []
        cfg = M.parse_config(["--predcls", "--feature-cache-gb", gb])
        det = M.Detector(cfg, C)
        model = M.MotifsRelationModel(cfg, C, P, det.backbone.out_channels, det.stride, torch.zeros(C, C, P))
        fc = M.use_feature_cache(cfg, det, [synthetic["train"], synthetic["val"], synthetic["test"]], lines.append)
        sizes[gb] = M.use_roi_cache(cfg, model, det, synthetic["val"], fc, lines.append)
        assert len(lines) == 2, lines
    assert sizes["0.8"] is None and sizes["4"] == {}
    cfg = M.parse_config(["--predcls"])
    assert M.use_roi_cache(cfg, model, det, synthetic["val"], None, print) is None   # no feature cache: none


def test_motifs_cache_is_off_where_it_would_not_fit(synthetic):
    lines = []
    cfg = M.parse_config(["--predcls", "--feature-cache-gb", "0.01"])
    det = M.Detector(cfg, synthetic["test"].num_classes)
    M.use_feature_cache(cfg, det, [synthetic["train"], synthetic["val"], synthetic["test"]], lines.append)
    assert det.feature_cache is None and len(lines) == 1 and "more than --feature-cache-gb 0.01" in lines[0]
    assert M.parse_config(["--predcls", "--preset", "vg"]).feature_cache_gb == 0   # 300 GB on VG: off


# ----------------------------------------------------------------------------------------------
# SGTR: FeatureCache

def tiny_sgtr(C1, P1, **kw):
    cfg = S.Config(d_model=32, nheads=2, ffn_dim=64, backbone_width=8, backbone_stride=8, enc_layers=1,
                   ent_dec_layers=2, rel_enc_layers=1, pred_dec_layers=1, num_ent_queries=5, num_pred_queries=7,
                   eval_batch=4, **kw)
    torch.manual_seed(0)
    model = S.SGTR(cfg, C1, P1)
    model.freeze_detector()
    return model


def test_sgtr_cached_outputs_equal_recomputed_ones(synthetic):
    """Each image alone on the canvas: its tokens are those of detect() on that canvas; with the canvas the size
    a batch is padded to, they are the batched computation's, within float tolerance, for every image."""
    ds = synthetic["test"]
    model = tiny_sgtr(ds.num_classes, ds.num_predicates).eval()
    images, targets = a_batch(ds)
    mask = S.pad_mask_for(images, targets)
    H, W = images.shape[-2:]
    with torch.no_grad():
        batched_ent, batched_src, _, batched_kpm = model.detect(images, mask)
        model.feature_cache = S.FeatureCache(canvas=(H, W))
        ent, src, pos, kpm = model.feature_cache(model, images, mask)
        for i, t in enumerate(targets):
            h, w = t["size"]
            alone = F.pad(images[i:i + 1, :, :h, :w], (0, W - w, 0, H - h))
            e1, s1, p1, k1 = model.detect(alone, mask[i:i + 1])
            S_i = int((~k1).sum())
            assert torch.equal(src[i, :S_i], s1[0, ~k1[0]]) and torch.equal(pos[i, :S_i], p1[0, ~k1[0]])
            assert not kpm[i, :S_i].any() and kpm[i, S_i:].all() and not src[i, S_i:].any()
            for k in ("logits", "boxes", "feats"):
                assert torch.equal(ent[-1][k][i], e1[-1][k][0])
            # the batch pads image i to the same canvas: the batched computation agrees within float tolerance
            torch.testing.assert_close(src[i, :S_i], batched_src[i, ~batched_kpm[i]], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(ent[-1]["boxes"][i], batched_ent[-1]["boxes"][i], rtol=1e-4, atol=1e-4)


def test_sgtr_cache_filled_in_training_holds_the_dropout_free_detector(synthetic):
    """The cache is filled while the model trains (SGTR.training on, dropout 0.5 here): what it keeps must be the
    frozen detector without dropout, the eval-mode outputs, or one random dropout draw would be frozen into every
    later step. The model is left in training mode."""
    ds = synthetic["test"]
    model = tiny_sgtr(ds.num_classes, ds.num_predicates, dropout=0.5)
    images, targets = a_batch(ds)
    mask = S.pad_mask_for(images, targets)
    H, W = images.shape[-2:]
    model.train()
    with torch.no_grad():
        model.feature_cache = S.FeatureCache(canvas=(H, W))
        ent, src, _, _ = model.feature_cache(model, images, mask)
        assert model.training
        h, w = targets[0]["size"]
        alone = F.pad(images[:1, :, :h, :w], (0, W - w, 0, H - h))
        torch.manual_seed(1)
        noisy = model.detect(alone, mask[:1])   # training mode: dropout in the detector's transformer
        model.eval()
        clean = model.detect(alone, mask[:1])
    S_0 = int((~clean[3]).sum())
    assert not torch.equal(noisy[0][-1]["feats"], clean[0][-1]["feats"])   # (the test can fail: dropout is on)
    assert torch.equal(src[0, :S_0], clean[1][0, ~clean[3][0]])
    for k in ("logits", "boxes", "feats"):
        assert torch.equal(ent[-1][k][0], clean[0][-1][k][0])


def test_sgtr_pretrained_detector_does_not_depend_on_the_predicate_head(synthetic):
    """The detector is cached by its own settings alone, so every run must pretrain the very same one: the focal
    head (P outputs, not P + 1) must not shift the random numbers its pretraining draws."""
    small = dict(d_model=32, nheads=2, ffn_dim=64, backbone_width=8, backbone_stride=8, enc_layers=1, ent_dec_layers=1,
                 rel_enc_layers=1, pred_dec_layers=1, num_ent_queries=5, num_pred_queries=7, det_iters=2, det_batch=2)
    weights = [S.pretrain_detector(S.Config(**small, pred_loss=head), synthetic["train"], torch.device("cpu"),
                                   lambda msg: None).state_dict() for head in ("softmax", "focal", "softmax")]
    for name, w in weights[0].items():
        if name.startswith(S.DETECTOR_MODULES):
            assert torch.equal(w, weights[1][name]), name
            assert torch.equal(w, weights[2][name]), name


def test_sgtr_cold_and_warm_cache_give_the_same_evaluation(synthetic):
    """A cold cache and a warm one give identical metrics; with no canvas (each image its own size) and
    batches of one image, the cached and uncached evaluations are identical too."""
    ds = synthetic["test"]
    model = tiny_sgtr(ds.num_classes, ds.num_predicates)
    run = lambda cfg: json.dumps(S.evaluate(model, ds, cfg, torch.device("cpu"), None, max_images=5)[0],
                                 sort_keys=True)
    model.feature_cache = S.FeatureCache(canvas=(160, 160))
    cold = run(model.cfg)
    assert len(model.feature_cache.store) == 5
    assert run(model.cfg) == cold
    one = S.Config(**{**model.cfg.__dict__, "eval_batch": 1})   # batches of one image: no padding anywhere
    model.feature_cache = None
    uncached = run(one)
    model.feature_cache = S.FeatureCache(canvas=(0, 0))
    assert run(one) == uncached


def test_sgtr_cache_is_off_for_a_fine_tuned_detector():
    lines = []
    model = S.SGTR(S.Config(d_model=32, nheads=2, ffn_dim=64, backbone_width=8), 5, 4)   # not frozen
    S.use_feature_cache(model.cfg, model, [], lines.append)
    assert model.feature_cache is None and "fine-tuned" in lines[0]
    assert S.parse_config(["--preset", "vg"]).feature_cache_gb == 0
