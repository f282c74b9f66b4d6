"""Neural Motifs with self-supervised relation alignment, PredCls / SGCls / SGDet, end to end.

What this is
    A readable implementation of section 3.3 of "Self-Supervised Relation Alignment for Scene Graph
    Generation" (arXiv 2302.01403, sections 3.1, 3.3 and 4.2): the two-stage Neural Motifs model (Zellers
    et al., CVPR 2018) as Scene-Graph-Benchmark.pytorch (Tang et al. 2020) builds it in its MotifPredictor,
    the codebase the paper's Motifs runs on (the head/tail projection post_emb, post_cat, the product with
    the union feature, rel_compress and the frequency bias are that layout), and, on top of it, the paper's
    alignment: a mirrored relation predictor that shares every weight of the original one except an untied
    head, sees randomly masked inputs (Eq. 1), and is trained to match the original predictor's relation
    distribution with a KL loss (Eqs. 2-3). The mirror only runs in training; at test time the model is
    plain Neural Motifs, with the same cost and output. Lines that implement the paper's method are marked
    `# PAPER:`, all in the first section.

    image -> stage 1, the frozen detector: feature map, boxes (GT, or detected in SGDet), RoI features,
             class distributions
          -> stage 2, Motifs: object context (biLSTM over the boxes, left to right) -> object labels
             (a decoder LSTM that feeds back the previous label)
             -> edge context (biLSTM over [label embedding, object context, RoI feature] = edge_in)
             -> head/tail pair features x union-box feature `union` -> predicate logits + frequency prior
          -> triplets (subject, predicate, object), scored predicate x subject x object
    training only: the mirror re-runs the edge context and the pairing on masked, detached copies of
    edge_in and union and classifies with an untied MLP head; L = L_sup + lambda KL(P_original || P_masked).

Read it top to bottom: the paper's method (random_mask, Mirror, alignment_loss, train_step), the config,
the model from its parts to the whole (boxes, stage 1: the detector, stage 2: the relation model), training
targets, training, evaluation, pictures, inference on your own images, plumbing, main.

How to run (the built-in synthetic data is generated on first use; everything runs on a laptop CPU; each run
writes its folder runs/motifs_align-<mode>-<align|noalign>-seed<s>/ (or --out), never over another run):
    python motifs_align.py --predcls                  # aligned Motifs, PredCls (the default mode)
    python motifs_align.py --predcls --no-align       # the Motifs baseline
    python motifs_align.py --sgcls    /  --sgdet      # the other two protocols
    python motifs_align.py --predcls --freq-baseline  # the frequency-prior-only predictor (FREQ)
    python motifs_align.py --predcls --resume         # continue a killed run where it stopped
    python motifs_align.py --infer a.jpg b.jpg --ckpt runs/<run>/ckpt_best.pt   # your own images
    torchrun --nproc_per_node=2 motifs_align.py --predcls                        # data parallel
Real Visual Genome (the standard VG-SGG.h5 files) on a GPU:
    python motifs_align.py --predcls --preset vg --data /path/to/vg [--vgg-weights vgg16.pth]
Experiments (several seeds, baseline vs aligned, the step-time benchmark): see study.py.

Where this follows Scene-Graph-Benchmark (SGB) and where it differs (each also noted where the code does it):
  as SGB's MotifPredictor: the object context (biLSTM, 'leftright' order, over [RoI feature, embedding of
    the class distribution, box position]); the label decoder (DecoderRNN: a highway LSTM that feeds back the
    previous label, teacher-forced with the GT labels in training, per-class NMS on its distributions at
    SGDet test time); the edge context on the committed labels, so in training on the GT labels (sgdet: the
    matched GT box's class), like the frequency bias; the pair layout and the frequency statistics
    (get_VG_statistics); SGDet's training pairs (detect_relsample) and test pairs (all ordered pairs);
  differs, for a CPU budget or brevity:
  - stage 1 is a compact VGG-style Faster R-CNN with BatchNorm trained from scratch with AdamW for 300
    iterations on the synthetic data (paper: VGG-16 Faster R-CNN, ImageNet-initialised, trained on VG);
    `--preset vg` restores the VGG-16 layout, SGD and the paper's solver for stage 2;
  - stage 2 on a CPU: 1K iterations of batch 8 at lr 0.05 (paper: 100K of batch 24 at lr 0.01), the
    cosine schedule updated 100 times in both;
  - training pairs: at most 64 per image, at most 3 unrelated per related one (SGB: up to 1024 per image,
    at most a quarter related, i.e. nearly every pair of a VG image);
  - the RoI features are the frozen detector's and the union feature has a new, trained fc layer (SGB: both
    from trainable copies of the detector's box head); the two-box spatial mask is rasterised at 7 x 7
    directly (Motifs: 27 x 27 and convolutions); the contexts stay 2H wide (SGB maps them to H with
    lin_obj_h / lin_edge_h); the position embedding has no BatchNorm; embeddings start random (SGB: GloVe);
  - SGDet: the relation model works on the detector's final detections (at most det_max_per_image, each
    keeping the box regressed for its detector class), SGB on the box head's NMS-ed proposals (up to 80,
    unregressed boxes, re-regressed for the refined label at the end); IoUs are not pixel-inclusive
    throughout (SGB's are);
  - the mirror's MLP reads [pair features, masked union feature] concatenated (the paper does not say
    how the two are combined); masking only zeroes, without dropout's 1/(1-p) rescaling (Eq. 1).

Symbols used in shape comments:
    B images in a batch, N objects (boxes) in a batch, R relation pairs in a batch,
    C object classes + 1 (background at 0), P predicates + 1 (no-relation at 0),
    A anchors, K RoIs, F backbone channels, S RoIAlign output side, D feature widths,
    H LSTM hidden size per direction, E class embedding width.
"""
import argparse
import copy
import dataclasses
import hashlib
import inspect
import json
import math
import os
import platform
import random
import re
import textwrap
import sys
import time
from dataclasses import dataclass, field
from typing import List

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
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_sequence, pad_packed_sequence

import data
import metrics


# ----------------------------------------------------------------------------------------------
# The paper's method: the mirrored relation predictor and the alignment loss (paper sections 3.1 and 3.3, Eqs. 1-3)
#
# The original relation predictor (in MotifsRelationModel, below) reads per object edge_in = [label embedding,
# object context, RoI feature] and per pair the union-box feature `union`; it runs the edge-context LSTM
# (model.edge_ctx_rnn), pairs head and tail projections of its output (model.pair_features) and classifies
# rel_compress(post_cat(pair) * union) + the frequency prior. The mirror is that predictor again, the same
# modules, on masked and detached copies of edge_in and union, with an untied MLP head and no prior.

def random_mask(x, p):
    """Random masking of the mirror's inputs; x of any shape, same shape out."""
    # PAPER: Eq. (1): each element is independently zeroed with probability p, kept otherwise.
    # Unlike dropout there is no 1/(1-p) rescaling: Eq. (1) only zeroes.
    return x * (torch.rand_like(x) >= p).to(x.dtype)


class Mirror(nn.Module):
    """The mirrored relation predictor (section 3.3). It owns only its untied head (none when tied);
    everything else it runs is the original predictor's own modules, passed in as `model`."""

    def __init__(self, cfg, pair_dim, union_dim, num_predicates):
        super().__init__()
        self.mask_p, self.tied = cfg.mask_p, cfg.tied_head
        self.head = None
        if not self.tied:
            # PAPER: the mirror's untied head, a three-layer MLP with ReLU replacing post_cat and
            # rel_compress. It reads the pair features concatenated with the masked union feature
            # (the paper says both are fed to the MLP, not how; concatenation is our choice).
            self.head = nn.Sequential(
                nn.Linear(pair_dim + union_dim, cfg.mirror_dim), nn.ReLU(),
                nn.Linear(cfg.mirror_dim, cfg.mirror_dim), nn.ReLU(),
                nn.Linear(cfg.mirror_dim, num_predicates))

    def forward(self, model, edge_in, union, pairs_g, counts, orders):
        """model: the MotifsRelationModel; edge_in (N, E+2H+roi) the edge-context LSTM's input and
        union (R, Du) the relation feature of the original's forward -> P_masked logits (R, P)."""
        # PAPER: stop the alignment gradient at the mirror's input features (.detach()), so that
        # L_align only trains the relation predictor's message passing and refinement.
        # PAPER: Eq. (1) random masking on the input of the edge-context LSTM and on the relation feature.
        edge_in_m = random_mask(edge_in.detach(), self.mask_p)          # (N, E+2H+roi)
        union_m = random_mask(union.detach(), self.mask_p)              # (R, Du)
        # PAPER: shared weights: the original's own edge-context LSTM and head/tail projection.
        edge_ctx_m = bilstm(model.edge_ctx_rnn, edge_in_m, counts, orders)   # (N, 2H)
        pair_m = model.pair_features(edge_ctx_m, pairs_g)               # (R, 4H)
        if self.tied:  # the ablation: the original's last two layers, shared
            return model.rel_compress(model.post_cat(pair_m) * union_m)
        # PAPER: untied three-layer MLP head; the predicate prior (freq_bias) is not used in the mirror.
        return self.head(torch.cat([pair_m, union_m], dim=1))


def alignment_loss(target_logits, mirror_logits, kind, labels=None):
    """The alignment loss on R pairs: target_logits = the original's, mirror_logits (R, P) each."""
    if kind == "supervised":
        # The paper's ablation (section 4.3): the mirror is trained on the ground truth instead.
        return F.cross_entropy(mirror_logits, labels)
    # PAPER: Eq. (2): L_align = KL(P_original || P_masked). P_original is fixed as the target
    # (detached: no gradient flows into the original branch through the target).
    target = F.log_softmax(target_logits.detach(), dim=-1)               # log P_original (R, P)
    log_masked = F.log_softmax(mirror_logits, dim=-1)                    # log P_masked (R, P)
    # the KL summed over the P predicates, averaged over the R pairs (sgtr_align spells the same mean KL with
    # probabilities, for its runs' sake; a test checks the two agree)
    return F.kl_div(log_masked, target, log_target=True, reduction="batchmean")


def train_step(model, detector, images, targets, cfg):
    """The losses of one training batch -> dict(total, sup, align); align is 0 for the baseline.
    model: a MotifsRelationModel, or its DistributedDataParallel wrapper."""
    net = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    sizes = [t["size"] for t in targets]
    s1 = stage1_outputs(detector, images, sizes, cfg.mode, [t["boxes"] for t in targets],
                        [t["labels"] for t in targets])
    pairs, rel_labels, obj_targets = training_targets(s1, targets, cfg)   # B x (R_b, 2), (R,), (N,)
    # Teacher forcing (SGB): the object targets (GT labels; in sgdet the matched GT box's class) are
    # the labels the label decoder feeds back and commits, for the edge context and the frequency bias.
    out = model(s1["fmap"], s1["boxes"], sizes, s1["obj_feats"], s1["obj_dists"], pairs, labels=obj_targets)
    mirror_logits = None
    if net.mirror is not None:
        # PAPER: the mirror runs only here, in training; evaluation and inference use the original alone.
        mirror_logits = net.mirror(net, out["edge_in"], out["union"], out["rel_pairs"], out["counts"],
                                   out["orders"])                       # (R, P)
    zero = out["rel_logits"].sum() * 0   # keeps the graph (and DDP) whole when a batch has no pairs
    rel_loss = F.cross_entropy(out["rel_logits"], rel_labels) if len(rel_labels) else zero
    obj_loss = F.cross_entropy(out["obj_logits"], obj_targets) if out["obj_logits"] is not None and len(obj_targets) else zero
    sup = rel_loss + obj_loss                                             # L_original
    if mirror_logits is None:
        return dict(total=sup, sup=sup, align=torch.zeros((), device=sup.device))
    align = alignment_loss(out["rel_logits"], mirror_logits, cfg.align_loss, rel_labels) \
        if len(rel_labels) else mirror_logits.sum() * 0
    # PAPER: Eq. (3): L_final = L_original + lambda * L_align (the alignment only on relations).
    return dict(total=sup + cfg.align_weight * align, sup=sup, align=align)


# ----------------------------------------------------------------------------------------------
# Config: one dataclass that is also the command line (`--help` lists every field and default)

@dataclass
class Config:
    mode: str = "predcls"
    """predcls (GT boxes and labels), sgcls (GT boxes) or sgdet (detected boxes)"""
    data: str = "synthetic"
    """built-in data, generated on first use: 'synthetic' (small) or 'vgshape' (VG150's shape); else a VG folder"""
    out: str = ""
    """run folder; default runs/motifs_align-<mode>-<align|noalign>-seed<s>"""
    preset: str = ""
    """named overrides: 'vg' = the paper's settings for real Visual Genome on a GPU"""
    device: str = "auto"
    """auto, cpu or cuda"""
    seed: int = 0
    """random seed of the relation model (the detector has its own fixed det_seed)"""
    resume: bool = False
    """continue from <out>/ckpt_last.pt (the same command plus --resume ends where the uninterrupted run ends)"""
    threads: int = 1
    """torch CPU threads; 1 by default: a second thread buys little here and spins against other jobs"""
    max_eval_images: int = 0
    """smoke runs: cap every evaluation (detector, validation, test) at this many images (0 = all)"""
    num_val_im: int = 0
    """the val split's size, carved from train (0 = 500 synthetic, 1500 vgshape, 5000 VG); not --val-images"""
    # -- the paper's alignment (section 3.3)
    no_align: bool = False
    """train the plain Motifs baseline (no mirror, no alignment loss)"""
    mask_p: float = 0.1
    """p of Eq. (1): probability that each input element of the mirror is zeroed"""
    align_weight: float = 10.0
    """lambda of Eq. (3)"""
    align_loss: str = "kl"
    """kl (Eq. 2) or supervised (the paper's ablation: cross-entropy on the mirror instead)"""
    tied_head: bool = False
    """the paper's ablation: the mirror reuses the original head instead of an untied MLP"""
    # -- stage 1: detector
    backbone: str = "small"
    """small (narrow VGG-style, stride 8, for ~128 px images) or vgg16 (VGG-16 layout, stride 16)"""
    vgg_weights: str = ""
    """optional torchvision-format VGG-16 state dict to initialise the vgg16 backbone"""
    detector_ckpt: str = ""
    """a trained detector (a file written by this script) to use instead of training one"""
    det_iters: int = 300
    """detector training iterations (a cached detector trained with the same settings is reused)"""
    det_batch: int = 8
    """detector images per iteration (per process)"""
    det_optimizer: str = "adamw"
    """adamw (from scratch on a CPU budget) or sgd (momentum 0.9, as Detectron; the vg preset)"""
    det_lr: float = 1e-3
    """detector learning rate (cosine to 0 after a linear warm-up)"""
    det_seed: int = 0
    """detector seed; fixed so that all relation seeds share one cached detector, as in the paper"""
    anchor_sizes: str = "8,16,32,64,128"
    """anchor sides in pixels (three aspect ratios 0.5, 1, 2 each)"""
    det_max_per_image: int = 20
    """detections kept per image (SGDet boxes)"""
    feature_cache_gb: float = 4.0
    """keep the frozen detector's outputs per image in memory if they fit in this many GB (0: rerun it every step)"""
    max_size: int = 0
    """resize images so the longest side is this many pixels (0 = as stored; --infer: as in training)"""
    # -- stage 2: the Motifs relation model
    roi_dim: int = 256
    """box head width = object RoI feature width (VGG: 4096)"""
    embed_dim: int = 64
    """object class embedding width (Motifs: 200)"""
    hidden: int = 128
    """LSTM hidden size per direction (Motifs: 512)"""
    union_dim: int = 256
    """union-box (relation) feature width (Motifs: 4096)"""
    mirror_dim: int = 256
    """hidden width of the mirror's untied three-layer MLP head"""
    context_dropout: float = 0.2
    """recurrent dropout of the label decoder LSTM in training (SGB's CONTEXT_DROPOUT_RATE)"""
    later_nms: float = 0.5
    """SGDet test: IoU of the label decoder's per-class NMS (SGB's Motifs config, LATER_NMS_PREDICTION_THRES)"""
    iters: int = 1000
    """relation model training iterations (paper: 100K)"""
    batch_size: int = 8
    """images per iteration per process (paper: 24)"""
    lr: float = 0.05
    """SGD learning rate (paper: 0.01 for 100K iterations; 1K iterations need more, see README)"""
    momentum: float = 0.9
    """SGD momentum"""
    weight_decay: float = 1e-4
    """SGD weight decay"""
    lr_steps: int = 100
    """the cosine learning rate is updated this many times (paper: every 1K of 100K iterations)"""
    grad_clip: float = 5.0
    """gradient norm clip (as in the Motifs codebases)"""
    max_pairs_per_image: int = 64
    """training pairs sampled per image (positives first)"""
    neg_per_pos: int = 3
    """at most this many unrelated pairs per related pair in training"""
    val_images: int = 0
    """val images each validation evaluates, for model selection (0 = all); the split's size: --num-val-im"""
    eval_batch: int = 8
    """images per evaluation batch"""
    num_workers: int = 0
    """DataLoader worker processes"""
    log_every: int = 50
    """print a progress line every this many iterations"""
    eval_every: int = 250
    """validate (mR@50) and save the best checkpoint every this many iterations"""
    ckpt_every: int = 50
    """write <out>/ckpt_last.pt every this many iterations (a kill loses at most this many)"""
    # -- other entry points
    freq_baseline: bool = False
    """do not train: evaluate the frequency-prior-only predictor (FREQ of Neural Motifs)"""
    infer: List[str] = field(default_factory=list)
    """run a trained model (--ckpt) on these image files and draw their top triplets"""
    ckpt: str = ""
    """checkpoint for --infer (a ckpt_best.pt written by a training run)"""
    boxes: str = ""
    """--infer in predcls/sgcls: JSON {image file name: {"boxes": [[x1,y1,x2,y2],...], "labels": [...]}}"""


# The paper's solver and Motifs' widths for Visual Genome (section 4.2; Zellers et al. 2018).
PRESETS = {
    "vg": dict(backbone="vgg16", anchor_sizes="32,64,128,256,512", max_size=592, det_iters=60000,
               det_batch=8, det_optimizer="sgd", det_lr=0.01, det_max_per_image=64, roi_dim=4096, embed_dim=200,
               hidden=512, union_dim=4096, mirror_dim=1024, iters=100000, batch_size=24,
               lr=0.01, lr_steps=100, val_images=5000, eval_batch=8, num_workers=4,
               log_every=100, eval_every=2000, feature_cache_gb=0),
}


def fail(msg):
    """A user's mistake ends here: one line `error: ...` on stderr, exit status 1, no traceback
    (tracebacks are for bugs)."""
    raise SystemExit("error: " + " ".join(str(msg).split()))  # always one line


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors (unknown flag, bad int) in the same one line
        fail(message)


def parse_config(argv=None) -> Config:
    """argparse generated from the dataclass: `--help` lists every field with its default and docstring.
    `--preset NAME` applies a dict of overrides first; flags given on the command line win."""
    docs = dict(re.findall(r'^    (\w+): .*\n    """(.*?)"""', inspect.getsource(Config), re.M))
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool or f.type == "bool":
            parser.add_argument(flag, action="store_true", default=None, help=docs[f.name])
        elif f.name == "infer":
            parser.add_argument(flag, nargs="+", metavar="IMG", default=None, help=docs[f.name])
        else:
            parser.add_argument(flag, type=type(f.default), default=None,
                                help=f"{docs[f.name]} (default: {f.default!r})")
    for mode in ("predcls", "sgcls", "sgdet"):   # the one shortcut outside the dataclass: they set `mode`
        parser.add_argument("--" + mode, dest="mode", action="store_const", const=mode, help=f"--mode {mode}")
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    preset = given.get("preset", "")
    if preset and preset not in PRESETS:
        fail(f"unknown --preset {preset!r}; choose from {sorted(PRESETS)}")
    cfg = Config(**{**PRESETS.get(preset, {}), **given})
    check_config(cfg)
    return cfg


def check_config(cfg: Config):
    """Every flag's value, checked before anything runs (one error line for a bad one)."""
    if cfg.mode not in ("predcls", "sgcls", "sgdet"):
        fail(f"--mode must be predcls, sgcls or sgdet, not {cfg.mode!r}")
    if cfg.det_optimizer not in ("adamw", "sgd"):
        fail(f"--det-optimizer must be adamw or sgd, not {cfg.det_optimizer!r}")
    if cfg.align_loss not in ("kl", "supervised"):
        fail(f"--align-loss must be kl or supervised, not {cfg.align_loss!r}")
    if not 0.0 <= cfg.mask_p < 1.0:
        fail(f"--mask-p must be in [0, 1), got {cfg.mask_p}")
    for name in ("iters", "det_iters", "batch_size", "det_batch", "eval_batch", "threads", "log_every",
                 "eval_every", "ckpt_every", "lr_steps", "max_pairs_per_image", "det_max_per_image"):
        if getattr(cfg, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if not 0.0 <= cfg.context_dropout < 1.0:
        fail(f"--context-dropout must be in [0, 1), got {cfg.context_dropout}")
    for name in ("val_images", "max_eval_images", "max_size", "num_workers", "neg_per_pos", "num_val_im",
                 "feature_cache_gb"):
        if getattr(cfg, name) < 0:
            fail(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(cfg, name)}")
    if cfg.infer and not cfg.ckpt:
        fail("--infer needs --ckpt PATH (a ckpt_best.pt written by a training run)")


def run_name(cfg):
    return f"runs/motifs_align-{cfg.mode}-{'noalign' if cfg.no_align else 'align'}-seed{cfg.seed}"


# ----------------------------------------------------------------------------------------------
# Boxes (xyxy pixel boxes; width = x2 - x1, the Detectron2/torchvision convention, not the "+1"
# pixel-inclusive one of Detectron1 and the original Motifs code)

def box_area(b):
    return (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)


def box_iou(a, b):
    """a (K1, 4), b (K2, 4) -> IoU (K1, K2)."""
    lt = torch.max(a[:, None, :2], b[None, :, :2])                      # (K1, K2, 2)
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])                      # (K1, K2, 2)
    inter = (rb - lt).clamp(min=0).prod(-1)                             # (K1, K2)
    return inter / (box_area(a)[:, None] + box_area(b)[None, :] - inter).clamp(min=1e-6)


# The Faster R-CNN box parametrisation (Ren et al. 2015, Eq. 2): centre offsets in units of the
# reference box size and log size ratios, divided by per-coordinate weights (Detectron: RPN
# (1, 1, 1, 1), box head (10, 10, 5, 5)) so that the targets have roughly unit variance.
BBOX_CLIP = math.log(1000.0 / 16)  # Detectron's cap on dw, dh so exp() cannot overflow


def encode_boxes(ref, gt, weights):
    """ref, gt (K, 4) -> regression targets (K, 4)."""
    wr, hr = ref[:, 2] - ref[:, 0], ref[:, 3] - ref[:, 1]
    wg, hg = gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]
    dx = ((gt[:, 0] + gt[:, 2]) - (ref[:, 0] + ref[:, 2])) / 2 / wr
    dy = ((gt[:, 1] + gt[:, 3]) - (ref[:, 1] + ref[:, 3])) / 2 / hr
    d = torch.stack([dx, dy, torch.log(wg / wr), torch.log(hg / hr)], dim=1)
    return d * d.new_tensor(weights)


def decode_boxes(ref, deltas, weights):
    """ref (K, 4), deltas (K, 4) -> boxes (K, 4); the inverse of encode_boxes."""
    d = deltas / deltas.new_tensor(weights)
    w, h = ref[:, 2] - ref[:, 0], ref[:, 3] - ref[:, 1]
    cx, cy = ref[:, 0] + 0.5 * w + d[:, 0] * w, ref[:, 1] + 0.5 * h + d[:, 1] * h
    w, h = w * d[:, 2].clamp(max=BBOX_CLIP).exp(), h * d[:, 3].clamp(max=BBOX_CLIP).exp()
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=1)


def clip_boxes(b, size):
    h, w = size
    return torch.stack([b[:, 0].clamp(0, w), b[:, 1].clamp(0, h), b[:, 2].clamp(0, w), b[:, 3].clamp(0, h)], 1)


def nms(boxes, scores, iou_threshold):
    """Greedy non-maximum suppression: indices of the kept boxes, best first."""
    order = scores.argsort(descending=True)
    overlap = (box_iou(boxes[order], boxes[order]) > iou_threshold).cpu().numpy()   # (K, K)
    suppressed, keep = np.zeros(len(order), dtype=bool), []
    for i in range(len(order)):  # a box survives if no better kept box overlaps it
        if not suppressed[i]:
            keep.append(i)
            suppressed |= overlap[i]
    return order[torch.as_tensor(keep, dtype=torch.long, device=order.device)]


def batched_nms(boxes, scores, labels, iou_threshold):
    """Class-wise NMS in one call: shift each class to its own far-away region (torchvision's trick)."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    shifted = boxes + (labels.to(boxes) * (boxes.max() + 1))[:, None]
    return nms(shifted, scores, iou_threshold)


def roi_align(fmap, boxes, output_size, spatial_scale, sampling_ratio=2):
    """RoIAlign (He et al., Mask R-CNN 2017) of one image, vectorised over RoIs, in plain torch.

    fmap (F, h, w); boxes (K, 4) in image pixels -> (K, F, S, S) with S = output_size.
    Convention `aligned=True` (Detectron2, torchvision): pixel index j of the feature map is the
    centre of the cell [j, j+1) / spatial_scale, so a box coordinate x maps to x * scale - 0.5.
    Each of the S x S bins averages sampling_ratio^2 bilinear samples placed at sub-bin centres;
    samples more than one cell outside the map read 0, samples in the border cell are clamped
    (torchvision's rules). Bilinear sampling on a grid is separable, and so is the bin average, so
    the whole operation is two small matrix products with per-RoI interpolation matrices
    Wy (K, S, h) and Wx (K, S, w): out[k] = Wy[k] @ fmap @ Wx[k]^T, fast forward and backward.
    """
    Fc, h, w = fmap.shape
    S, sr = output_size, sampling_ratio
    b = boxes * spatial_scale - 0.5                                     # (K, 4) in index space
    t = (torch.arange(S * sr, device=fmap.device, dtype=fmap.dtype) + 0.5) / sr   # (S*sr,) in bins
    ys = b[:, 1:2] + t[None] * ((b[:, 3] - b[:, 1]) / S)[:, None]       # (K, S*sr) sample rows
    xs = b[:, 0:1] + t[None] * ((b[:, 2] - b[:, 0]) / S)[:, None]       # (K, S*sr) sample columns

    def weights(coord, size):  # (K, S*sr) sample positions -> (K, S, size) interpolation matrix
        valid = ((coord >= -1.0) & (coord <= size)).to(fmap.dtype)
        coord = coord.clamp(min=0)
        lo = coord.floor().clamp(max=size - 1)
        coord = torch.where(lo >= size - 1, lo, coord)
        hi = (lo + 1).clamp(max=size - 1)
        frac = coord - lo
        m = (F.one_hot(lo.long(), size) * (1 - frac)[..., None]
             + F.one_hot(hi.long(), size) * frac[..., None]) * valid[..., None]   # (K, S*sr, size)
        return m.view(m.shape[0], S, sr, size).mean(2)                  # bin average -> (K, S, size)

    wy, wx = weights(ys, h), weights(xs, w)                             # (K, S, h), (K, S, w)
    tmp = torch.einsum("fyx,kjx->kfyj", fmap, wx)                       # (K, F, h, S)
    return torch.einsum("kiy,kfyj->kfij", wy, tmp)                      # (K, F, S, S)


def roi_align_batch(fmap, boxes_list, output_size, spatial_scale):
    """fmap (B, F, h, w), boxes_list B x (K_b, 4) -> (sum K_b, F, S, S) in the same order."""
    outs = [roi_align(fmap[i], b, output_size, spatial_scale) for i, b in enumerate(boxes_list) if len(b)]
    if not outs:
        return fmap.new_zeros(0, fmap.shape[1], output_size, output_size)
    return torch.cat(outs)


# ----------------------------------------------------------------------------------------------
# Stage 1: the detector, a compact Faster R-CNN (Ren et al. 2015) in plain torch, trained once and frozen

# 'M' = 2x2 max-pool. 'vgg16' is VGG-16's conv1_1..conv5_3 (torchvision's `features` indices 0-29,
# the last pool dropped: stride 16, as the Faster R-CNN VGG-16 detector that Motifs builds on).
VGG_LAYOUTS = {
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
    "small": [16, "M", 32, "M", 64, 64, "M", 128],   # narrow VGG-style, stride 8, for ~128 px images
}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torchvision's VGG inputs


class Backbone(nn.Module):
    """VGG-style: 3x3 convolutions + ReLU, 2x2 max-pools. The small layout, trained from scratch,
    adds BatchNorm after each convolution (torchvision's vgg*_bn): without it the detector barely
    learns in the few hundred iterations a CPU budget allows (mAP 0.06 vs 0.27 after 300-400
    iterations in our runs). The vgg16 layout stays plain so that torchvision's VGG-16 file loads."""

    def __init__(self, layout):
        super().__init__()
        layers, c = [], 3
        for v in VGG_LAYOUTS[layout]:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            layers.append(nn.Conv2d(c, v, 3, padding=1))
            layers += [nn.BatchNorm2d(v)] if layout != "vgg16" else []
            layers.append(nn.ReLU(inplace=True))
            c = v
        self.features = nn.Sequential(*layers)   # vgg16: the same module indices as torchvision's
        self.out_channels = c
        self.stride = 2 ** VGG_LAYOUTS[layout].count("M")

    def forward(self, x):
        return self.features(x)


class Detector(nn.Module):
    """Backbone -> RPN (objectness + box deltas per anchor, NMS-ed proposals) -> RoIAlign -> box head.

    forward(images, sizes, targets) returns the four losses in training; detect() returns boxes.
    """

    def __init__(self, cfg, num_classes):
        super().__init__()
        self.backbone = Backbone(cfg.backbone)
        Fc, self.stride = self.backbone.out_channels, self.backbone.stride
        sizes = [float(s) for s in cfg.anchor_sizes.split(",")]
        # Anchor shapes (A, 4) centred at 0: each size at aspect ratios h/w = 0.5, 1, 2 (equal area).
        cell = [[-s / math.sqrt(r) / 2, -s * math.sqrt(r) / 2, s / math.sqrt(r) / 2, s * math.sqrt(r) / 2]
                for s in sizes for r in (0.5, 1.0, 2.0)]
        self.register_buffer("cell_anchors", torch.tensor(cell), persistent=False)
        A = len(cell)
        self.rpn_conv = nn.Conv2d(Fc, Fc, 3, padding=1)
        self.rpn_cls = nn.Conv2d(Fc, A, 1)          # objectness logit per anchor
        self.rpn_box = nn.Conv2d(Fc, 4 * A, 1)      # box deltas per anchor
        self.pool = 7                                # RoIAlign output side S
        self.fc6 = nn.Linear(Fc * self.pool ** 2, cfg.roi_dim)   # VGG-16's classifier.0 when vgg16
        self.fc7 = nn.Linear(cfg.roi_dim, cfg.roi_dim)           # VGG-16's classifier.3 when vgg16
        self.cls_score = nn.Linear(cfg.roi_dim, num_classes)     # C logits (background at 0)
        self.bbox_pred = nn.Linear(cfg.roi_dim, 4 * num_classes)  # class-specific deltas
        for m in (self.rpn_conv, self.rpn_cls, self.rpn_box):
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        self.num_classes = num_classes
        self.max_det = cfg.det_max_per_image
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.feature_cache = None   # a FeatureCache once the detector is frozen (get_detector)

    def features(self, images, sizes):
        """images (B, 3, H, W) in [0, 1], zero-padded -> feature map (B, F, H/stride, W/stride)."""
        x = (images - self.mean) / self.std
        for i, (h, w) in enumerate(sizes):   # keep the padding at 0 after normalising (Detectron pads last)
            x[i, :, h:, :] = 0
            x[i, :, :, w:] = 0
        return self.backbone(x)

    def anchors(self, fmap):
        """All anchors (h*w*A, 4) of a feature map, in the same order as the RPN outputs."""
        h, w = fmap.shape[-2:]
        ys = (torch.arange(h, device=fmap.device, dtype=torch.float32) + 0.5) * self.stride
        xs = (torch.arange(w, device=fmap.device, dtype=torch.float32) + 0.5) * self.stride
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        centres = torch.stack([cx, cy, cx, cy], dim=-1).view(h * w, 1, 4)   # (h*w, 1, 4)
        return (centres + self.cell_anchors[None]).view(-1, 4)                 # (h*w*A, 4)

    def rpn(self, fmap, sizes):
        """-> objectness (B, h*w*A), deltas (B, h*w*A, 4), anchors (h*w*A, 4), proposals B x (K, 4)."""
        t = F.relu(self.rpn_conv(fmap))
        B = fmap.shape[0]
        logits = self.rpn_cls(t).permute(0, 2, 3, 1).reshape(B, -1)           # (B, h*w*A)
        deltas = self.rpn_box(t).permute(0, 2, 3, 1).reshape(B, -1, 4)        # (B, h*w*A, 4)
        anchors = self.anchors(fmap)
        pre, post = (600, 100) if self.training else (300, 50)   # Detectron's 12000/2000, scaled down
        proposals = []
        with torch.no_grad():  # proposals are constants for the box head (approximate joint training)
            for i in range(B):
                top = logits[i].topk(min(pre, logits.shape[1])).indices
                boxes = clip_boxes(decode_boxes(anchors[top], deltas[i, top], (1, 1, 1, 1)), sizes[i])
                ok = ((boxes[:, 2] - boxes[:, 0]) > 1) & ((boxes[:, 3] - boxes[:, 1]) > 1)
                boxes, scores = boxes[ok], logits[i, top][ok]
                proposals.append(boxes[nms(boxes, scores, 0.7)[:post]])
        return logits, deltas, anchors, proposals

    def box_head(self, fmap, boxes_list):
        """-> fc7 features (K, roi_dim), class logits (K, C), class-specific deltas (K, C, 4)."""
        x = roi_align_batch(fmap, boxes_list, self.pool, 1.0 / self.stride).flatten(1)   # (K, F*S*S)
        x = F.relu(self.fc7(F.relu(self.fc6(x))))
        return x, self.cls_score(x), self.bbox_pred(x).view(-1, self.num_classes, 4)

    def forward(self, images, sizes, targets):
        fmap = self.features(images, sizes)
        logits, deltas, anchors, proposals = self.rpn(fmap, sizes)
        # RPN targets: anchors with IoU >= 0.7 to a GT box (or the best anchor of a GT box) are
        # positive, IoU < 0.3 negative; 256 sampled per image, at most half positive (Faster R-CNN).
        rpn_cls, rpn_box, rois, roi_labels, roi_targets = 0.0, 0.0, [], [], []
        for i, t in enumerate(targets):
            gt = t["boxes"]
            iou = box_iou(anchors, gt)                                           # (h*w*A, G)
            best, match = iou.max(1)
            lab = torch.full_like(best, -1.0)
            lab[best < 0.3] = 0.0
            best_for_gt = (iou == iou.max(0).values[None]) & (iou > 0)         # (h*w*A, G)
            lab[best_for_gt.any(1)] = 1.0
            lab[best >= 0.7] = 1.0
            pos, neg = _sample(lab == 1, lab == 0, 256, 0.5)
            idx = torch.cat([pos, neg])
            rpn_cls = rpn_cls + F.binary_cross_entropy_with_logits(logits[i, idx], lab[idx], reduction="sum") / 256
            target = encode_boxes(anchors[pos], gt[match[pos]], (1, 1, 1, 1))
            rpn_box = rpn_box + F.smooth_l1_loss(deltas[i, pos], target, beta=1 / 9, reduction="sum") / 256
            # Box head targets: proposals + GT boxes; IoU >= 0.5 is the GT's class, < 0.5 background;
            # 64 RoIs per image, at most a quarter foreground (Detectron's 512 / 0.25, scaled down).
            cand = torch.cat([proposals[i], gt])
            iou = box_iou(cand, gt)
            best, match = iou.max(1)
            pos, neg = _sample(best >= 0.5, best < 0.5, 64, 0.25)
            rois.append(cand[torch.cat([pos, neg])])
            labels = torch.cat([t["labels"][match[pos]], torch.zeros_like(neg)])
            roi_labels.append(labels)
            roi_targets.append(encode_boxes(cand[pos], gt[match[pos]], (10, 10, 5, 5)))
        _, cls_logits, box_deltas = self.box_head(fmap, rois)
        labels = torch.cat(roi_labels)
        fg = (labels > 0).nonzero().squeeze(1)
        det_cls = F.cross_entropy(cls_logits, labels)
        det_box = F.smooth_l1_loss(box_deltas[fg, labels[fg]], torch.cat(roi_targets), beta=1.0,
                                   reduction="sum") / max(1, len(labels))
        B = len(targets)
        return {"rpn_cls": rpn_cls / B, "rpn_box": rpn_box / B, "det_cls": det_cls, "det_box": det_box}

    @torch.no_grad()
    def detect(self, fmap, sizes):
        """-> per image dict boxes (K, 4), labels (K,), scores (K,): class-wise NMS at 0.5, score > 0.05;
        and boxes_per_cls (K, C, 4): each detection's proposal regressed for every class (SGB's box head
        keeps this field in relation mode; the label decoder's NMS at SGDet test time reads it)."""
        _, _, _, proposals = self.rpn(fmap, sizes)
        _, cls_logits, box_deltas = self.box_head(fmap, proposals)
        probs = cls_logits.softmax(-1)
        out, start = [], 0
        for i, props in enumerate(proposals):
            K, C = len(props), self.num_classes
            p, d = probs[start:start + K, 1:], box_deltas[start:start + K]       # (K, C-1), (K, C, 4)
            start += K
            per_cls = decode_boxes(props[:, None].expand(K, C, 4).reshape(-1, 4), d.reshape(-1, 4), (10, 10, 5, 5))
            per_cls = clip_boxes(per_cls, sizes[i]).view(K, C, 4)                    # (K, C, 4)
            boxes = per_cls[:, 1:].reshape(-1, 4)                                    # (K*(C-1), 4)
            scores, labels = p.reshape(-1), torch.arange(1, C, device=p.device).repeat(K)
            source = torch.arange(K, device=p.device).repeat_interleave(C - 1)       # (K*(C-1),) proposal
            ok = scores > 0.05
            boxes, scores, labels, source = boxes[ok], scores[ok], labels[ok], source[ok]
            keep = batched_nms(boxes, scores, labels, 0.5)[: self.max_det]
            out.append({"boxes": boxes[keep], "labels": labels[keep], "scores": scores[keep],
                        "boxes_per_cls": per_cls[source[keep]]})
        return out


def _sample(pos_mask, neg_mask, total, pos_fraction):
    """Random positive and negative indices: at most total * pos_fraction positives, rest negatives."""
    pos = pos_mask.nonzero().squeeze(1)
    neg = neg_mask.nonzero().squeeze(1)
    pos = pos[torch.randperm(len(pos), device=pos.device)[: int(total * pos_fraction)]]
    neg = neg[torch.randperm(len(neg), device=neg.device)[: total - len(pos)]]
    return pos, neg


def load_vgg16_weights(detector, path):
    """Initialise a vgg16 backbone (and fc6/fc7 when the widths match) from torchvision's VGG-16 file."""
    sd = torch.load(path, map_location="cpu", weights_only=True)
    feats = {k[len("features."):]: v for k, v in sd.items() if k.startswith("features.")}
    missing = detector.backbone.features.load_state_dict(
        {k: v for k, v in feats.items() if int(k.split(".")[0]) < len(detector.backbone.features)}, strict=False)
    if missing.missing_keys:
        raise ValueError(f"{path} is not a torchvision VGG-16 state dict; missing {missing.missing_keys[:4]}")
    for ours, theirs in (("fc6", "classifier.0"), ("fc7", "classifier.3")):
        layer = getattr(detector, ours)
        if sd.get(theirs + ".weight") is not None and sd[theirs + ".weight"].shape == layer.weight.shape:
            layer.load_state_dict({"weight": sd[theirs + ".weight"], "bias": sd[theirs + ".bias"]})


@torch.no_grad()
def stage1_outputs(detector, images, sizes, mode, gt_boxes=None, gt_labels=None, cached=True):
    """The frozen detector's part: feature map, the boxes the relation model works on, their RoI
    features and initial class distributions. -> dict fmap (B, F, h, w), boxes B x (N_b, 4),
    obj_feats (N, roi_dim), obj_dists (N, C), det (B dicts, sgdet only). With a FeatureCache on the
    detector, each image's outputs are computed once and fmap is a list B x (F, h_b, w_b)."""
    if cached and detector.feature_cache is not None:
        return detector.feature_cache(detector, images, sizes, mode, gt_boxes, gt_labels)
    fmap = detector.features(images, sizes)
    dets = detector.detect(fmap, sizes) if mode == "sgdet" else None
    boxes = [d["boxes"] for d in dets] if mode == "sgdet" else gt_boxes
    obj_feats, cls_logits, _ = detector.box_head(fmap, boxes)
    if mode == "predcls":
        obj_dists = F.one_hot(torch.cat(gt_labels), detector.num_classes).float()
    else:
        obj_dists = cls_logits.softmax(-1)
    return {"fmap": fmap, "boxes": boxes, "obj_feats": obj_feats, "obj_dists": obj_dists, "det": dets}


class FeatureCache:
    """The frozen stage 1, computed once per image (plumbing: not the paper's method, and off in --preset vg).

    Once trained, the detector is frozen and the images are never augmented, so what it hands the relation
    model for an image (feature map, RoI features, class distributions, SGDet detections) never changes; yet
    computing it again at every step was half of a training step. The first time an image is met (training,
    validation or test), its outputs are computed and kept in memory, keyed by its pixels and its GT boxes
    and labels (the RoI features' inputs). Each image is computed alone, without the batch's zero padding,
    so its outputs do not depend on which images share its batch: a run gives the same numbers whether an
    image was computed now or earlier (a resumed run starts with an empty cache and still ends as the
    uninterrupted one). The relation model then reads each image's own feature map, a list, instead of a
    padded batch tensor. (Unpadded costs little here: the backbone's BatchNorm has no per-image statistics,
    and the detector's test mAP@0.5 is 0.574 alone against 0.581 in padded batches of 8, on 300 images; SGTR,
    whose GroupNorm has, pads each image to a fixed canvas.) docs/running.md gives its memory here and on
    Visual Genome."""

    def __init__(self):
        self.store = {}

    def __call__(self, detector, images, sizes, mode, gt_boxes, gt_labels):
        outs = []
        for i, (h, w) in enumerate(sizes):
            image = images[i:i + 1, :, :h, :w]                                 # (1, 3, h, w) unpadded
            given = [] if mode == "sgdet" else [gt_boxes[i], gt_labels[i]]
            key = hashlib.sha1(b"".join(x.cpu().numpy().tobytes() for x in [image] + given)).hexdigest()
            if key not in self.store:
                s = stage1_outputs(detector, image, [(h, w)], mode, given[:1], given[1:], cached=False)
                self.store[key] = {"fmap": s["fmap"][0], "boxes": s["boxes"][0], "obj_feats": s["obj_feats"],
                                   "obj_dists": s["obj_dists"], "det": s["det"] and s["det"][0]}
            outs.append(self.store[key])
        return {"fmap": [o["fmap"] for o in outs], "boxes": [o["boxes"] for o in outs],   # B x (F, h_b, w_b), ..
                "obj_feats": torch.cat([o["obj_feats"] for o in outs]),                    # (N, roi_dim)
                "obj_dists": torch.cat([o["obj_dists"] for o in outs]),                    # (N, C)
                "det": [o["det"] for o in outs] if mode == "sgdet" else None}

    @staticmethod
    def size_gb(cfg, datasets, feat_channels, stride):
        """The memory it would take for these splits, in GB (float32): each image's feature map, and the
        RoI features and class distributions of its objects (SGDet: of det_max_per_image detections)."""
        total = 0
        for ds in datasets:
            for i in range(len(ds)):
                t = ds.get_groundtruth(i)
                h, w = t["size"]
                n = cfg.det_max_per_image if cfg.mode == "sgdet" else len(t["labels"])
                total += feat_channels * (h // stride) * (w // stride) + n * (cfg.roi_dim + 5 * ds.num_classes)
        return 4 * total / 1e9


# ----------------------------------------------------------------------------------------------
# Stage 2: the relation model, Neural Motifs (Zellers et al. 2018): the original relation predictor

def box_info(boxes, size):
    """Motifs' box position features: (N, 4) boxes in an image of `size` -> (N, 9) in [0, 1]:
    centre, width/height, corners, relative area."""
    h, w = size
    scale = boxes.new_tensor([w, h])
    wh = boxes[:, 2:] - boxes[:, :2]
    centre = boxes[:, :2] + 0.5 * wh
    area = (wh[:, 0] * wh[:, 1] / (w * h))[:, None]
    return torch.cat([centre / scale, wh / scale, boxes[:, :2] / scale, boxes[:, 2:] / scale, area], dim=1)


def pair_geometry(boxes, pairs, S):
    """boxes (N, 4), pairs (R, 2) -> union boxes (R, 4) and the two-box spatial masks (R, 2, S, S).

    The mask has a 1 where the centre of a cell of the union box's S x S grid lies inside the subject
    (channel 0) or the object (channel 1). Motifs rasterises at 27 x 27 and convolves down; we
    rasterise directly at the RoIAlign resolution, which is what that convolution produces."""
    s, o = boxes[pairs[:, 0]], boxes[pairs[:, 1]]                        # (R, 4) each
    union = torch.cat([torch.min(s[:, :2], o[:, :2]), torch.max(s[:, 2:], o[:, 2:])], dim=1)
    t = (torch.arange(S, device=boxes.device, dtype=boxes.dtype) + 0.5) / S
    xs = union[:, 0:1] + t[None] * (union[:, 2] - union[:, 0])[:, None]  # (R, S) cell centres
    ys = union[:, 1:2] + t[None] * (union[:, 3] - union[:, 1])[:, None]

    def inside(b):  # (R, S, S), rows = y, columns = x
        in_x = (xs >= b[:, 0:1]) & (xs <= b[:, 2:3])
        in_y = (ys >= b[:, 1:2]) & (ys <= b[:, 3:4])
        return in_y[:, :, None] & in_x[:, None, :]
    return union, torch.stack([inside(s), inside(o)], dim=1).to(boxes.dtype)


def bilstm(lstm, x, counts, orders):
    """Run a bidirectional LSTM over the objects of each image in the given order.

    x (N, D) objects of all images concatenated; counts: objects per image; orders: per image a
    permutation (left to right) -> (N, 2H) in the input order."""
    seqs = [xi[o] for xi, o in zip(x.split(counts), orders) if len(o)]   # B' x (N_b, D), sorted
    out = x.new_zeros(x.shape[0], 2 * lstm.hidden_size)
    if not seqs:
        return out
    y, _ = lstm(pack_sequence(seqs, enforce_sorted=False))
    y, _ = pad_packed_sequence(y, batch_first=True)                       # (B', N_max, 2H)
    parts, k = [], 0
    for n, o in zip(counts, orders):
        if n:
            back = torch.empty_like(o)
            back[o] = torch.arange(n, device=o.device)                     # inverse permutation
            parts.append(y[k, :n][back])                                   # (N_b, 2H) in input order
            k += 1
    return torch.cat(parts)


def class_overlaps(boxes_per_cls):
    """boxes_per_cls (N, C, 4) -> IoU (N, N, C) of the class-c boxes of every two objects."""
    b = boxes_per_cls.transpose(0, 1)                                   # (C, N, 4)
    lt = torch.max(b[:, :, None, :2], b[:, None, :, :2])                # (C, N, N, 2)
    rb = torch.min(b[:, :, None, 2:], b[:, None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)                             # (C, N, N)
    area = (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)   # (C, N)
    iou = inter / (area[:, :, None] + area[:, None, :] - inter).clamp(min=1e-6)
    return iou.permute(1, 2, 0)                                         # (N, N, C)


def label_nms(probs, boxes_per_cls, thresh):
    """The label decoder's NMS at SGDet test time, as SGB's DecoderRNN (and neural-motifs') post-processing:
    repeatedly take the most probable (object, class) left, commit that class to the object, zero the class
    for the objects whose class box overlaps it by IoU >= thresh, and retire the object.
    probs (N, C) one image's decoder distributions, boxes_per_cls (N, C, 4) -> labels (N,).
    As in the reference, an object whose every class was zeroed gets the first zero left, the background
    column of the first such object (score 0): it then ranks last."""
    N, C = probs.shape
    overlap = class_overlaps(boxes_per_cls) >= thresh                     # (N, N, C)
    p = probs.clone()
    p[:, 0] = 0                                                          # never commit background by choice
    labels = torch.zeros(N, dtype=torch.long, device=probs.device)
    for _ in range(N):
        flat = int(p.argmax())                                           # the first maximum, as np.argmax
        box, cls = flat // C, flat % C
        labels[box] = cls
        p[overlap[box, :, cls], cls] = 0.0
        p[box] = -1.0                                                    # retired: never taken again
    return labels


class DecoderRNN(nn.Module):
    """Motifs' label refinement: an LSTM that reads the objects in the 'leftright' order and, at each step,
    classifies the object from [its decoder input, the embedding of the previous object's label].
    SGB's DecoderRNN (model_motifs.py), whose cell is neural-motifs' highway LSTM: one input projection
    (6H: input, forget, memory, output and highway gates and the highway input) and one state projection
    (5H); a recurrent dropout mask drawn once per sequence, applied to the output in training.
    Training: teacher forcing, the previous GT label is fed back (where the label is background, an
    unmatched SGDet box, the decoder's own best non-background class instead); those labels are also the
    commitments. Test: the decoder's own best non-background class is fed back and committed."""

    def __init__(self, in_dim, num_classes, embed_dim, hidden, dropout):
        super().__init__()
        self.hidden, self.dropout = hidden, dropout
        self.obj_embed = nn.Embedding(num_classes + 1, embed_dim)   # row 0 = 'start', row c + 1 = class c (SGB)
        self.input_linearity = nn.Linear(in_dim + embed_dim, 6 * hidden)
        self.state_linearity = nn.Linear(hidden, 5 * hidden)
        self.out_obj = nn.Linear(hidden, num_classes)
        nn.init.zeros_(self.input_linearity.bias)                  # SGB's init_parameters
        nn.init.zeros_(self.state_linearity.bias)

    def cell(self, x, h, c, mask):
        """One step of the highway LSTM: x (B', in+E), h, c (B', H) -> new h, c."""
        H = self.hidden
        xi, hs = self.input_linearity(x), self.state_linearity(h)          # (B', 6H), (B', 5H)
        i = torch.sigmoid(xi[:, :H] + hs[:, :H])
        f = torch.sigmoid(xi[:, H:2 * H] + hs[:, H:2 * H])
        g = torch.tanh(xi[:, 2 * H:3 * H] + hs[:, 2 * H:3 * H])
        o = torch.sigmoid(xi[:, 3 * H:4 * H] + hs[:, 3 * H:4 * H])
        c = i * g + f * c
        h = o * torch.tanh(c)
        highway = torch.sigmoid(xi[:, 4 * H:5 * H] + hs[:, 4 * H:5 * H])
        h = highway * h + (1 - highway) * xi[:, 5 * H:]
        return (h * mask if mask is not None else h), c

    def forward(self, x, counts, orders, labels=None):
        """x (N, D) decoder inputs in input order; counts, orders as bilstm; labels (N,) the teacher-forced
        labels in training (0 = background). -> logits (N, C), commitments (N,), both in input order."""
        seqs = [xi[o] for xi, o in zip(x.split(counts), orders) if len(o)]   # B' x (N_b, D), left to right
        N = x.shape[0]
        logits_out = x.new_zeros(N, self.out_obj.out_features)
        commit_out = torch.zeros(N, dtype=torch.long, device=x.device)
        if not seqs:
            return logits_out, commit_out
        X = nn.utils.rnn.pad_sequence(seqs, batch_first=True)            # (B', T, D)
        starts = np.cumsum([0] + list(counts[:-1]))
        idx = nn.utils.rnn.pad_sequence([o + int(s) for o, s in zip(orders, starts) if len(o)],
                                        batch_first=True, padding_value=-1)   # (B', T) input row, -1 = pad
        Bp, T = idx.shape
        h = c = x.new_zeros(Bp, self.hidden)
        mask = None
        if self.training and self.dropout > 0:   # SGB's get_dropout_mask: fixed over the steps, scaled
            mask = (torch.rand(Bp, self.hidden, device=x.device) > self.dropout).to(x.dtype) / (1 - self.dropout)
        prev = self.obj_embed.weight[0].expand(Bp, -1)                    # (B', E): the 'start' embedding
        for t in range(T):
            # Padded steps of shorter images run too; their outputs are dropped and never feed a real step.
            h, c = self.cell(torch.cat([X[:, t], prev], 1), h, c, mask)
            logits = self.out_obj(h)                                     # (B', C)
            best = logits[:, 1:].argmax(1) + 1                          # best non-background class
            rows = idx[:, t].clamp(min=0)
            if self.training:
                committed = labels[rows]
                committed = torch.where(committed > 0, committed, best)  # background -> own prediction
            else:
                committed = best
            real = idx[:, t] >= 0
            logits_out[idx[real, t]] = logits[real]
            commit_out[idx[real, t]] = committed[real]
            prev = self.obj_embed(committed + 1)                         # (B', E) fed back at t + 1
        return logits_out, commit_out


class MotifsRelationModel(nn.Module):
    """Object context -> (label refinement) -> edge context -> pairwise relation classifier.

    With alignment, `self.mirror` is the mirrored predictor (Mirror); only train_step runs it, on the
    edge_in, union and pairs that forward returns.
    """

    def __init__(self, cfg, num_classes, num_predicates, feat_channels, stride, freq_log_probs):
        super().__init__()
        C, P, E, H, Du = num_classes, num_predicates, cfg.embed_dim, cfg.hidden, cfg.union_dim
        self.mode, self.num_classes = cfg.mode, C
        self.S, self.spatial_scale = 7, 1.0 / stride
        # Object context: biLSTM over [RoI feature, class embedding, box position embedding].
        self.obj_embed_ctx = nn.Embedding(C, E)
        self.pos_embed = nn.Sequential(nn.Linear(9, 32), nn.ReLU(), nn.Linear(32, 64), nn.ReLU())
        self.obj_ctx_rnn = nn.LSTM(cfg.roi_dim + E + 64, H, batch_first=True, bidirectional=True)
        self.later_nms = cfg.later_nms
        if cfg.mode != "predcls":
            # Label refinement: the decoder LSTM reads [object context input, object context] (SGB:
            # [obj_pre_rep, lin_obj_h(obj_ctx)]; we keep the 2H-wide context, there is no lin_obj_h).
            self.decoder_rnn = DecoderRNN(cfg.roi_dim + E + 64 + 2 * H, C, E, H, cfg.context_dropout)
        # Edge context: biLSTM over [label embedding, object context, RoI feature].
        self.obj_embed_edge = nn.Embedding(C, E)
        self.edge_ctx_rnn = nn.LSTM(E + 2 * H + cfg.roi_dim, H, batch_first=True, bidirectional=True)
        self.post_emb = nn.Linear(2 * H, 4 * H)      # head (2H) and tail (2H) representation per object
        # Relation (union-box) feature: RoIAlign on the union box + the two-box spatial mask.
        self.rect_conv = nn.Conv2d(2, feat_channels, 3, padding=1)
        self.union_fc = nn.Linear(feat_channels * self.S ** 2, Du)
        # The last two linear layers of the original predictor, and the frequency bias.
        self.post_cat = nn.Linear(4 * H, Du)
        self.rel_compress = nn.Linear(Du, P)
        self.freq_bias = nn.Embedding(C * C, P)
        with torch.no_grad():
            self.freq_bias.weight.copy_(freq_log_probs.reshape(C * C, P))
        # Created last, as the untied head always was: the same initial weights and parameter order.
        self.mirror = None if cfg.no_align else Mirror(cfg, 4 * H, Du, P)

    # -- pieces shared by the original and the mirrored predictor
    def union_rois(self, fmap, boxes, pairs):
        """The union feature's part without parameters: per image, RoIAlign over each pair's union box and
        the two-box masks -> B x ((R_b, F, S, S), (R_b, 2, S, S)), None for an image without pairs. It reads
        the frozen feature map and the boxes alone, so evaluation computes it once for two checkpoints, and
        keeps it between validations when it fits (evaluate's roi_cache)."""
        rois = []
        for i, (b, pr) in enumerate(zip(boxes, pairs)):
            if len(pr) == 0:
                rois.append(None)
                continue
            union, masks = pair_geometry(b, pr, self.S)                  # (R_b, 4), (R_b, 2, S, S)
            rois.append((roi_align(fmap[i], union, self.S, self.spatial_scale), masks))   # (R_b, F, S, S), ..
        return rois

    def union_features(self, fmap, boxes, pairs, rois=None):
        """-> relation features (R, Du) of the pairs (local indices per image); rois: union_rois', if known."""
        rois = self.union_rois(fmap, boxes, pairs) if rois is None else rois
        feats = [(x + F.relu(self.rect_conv(masks))).flatten(1) for x, masks in filter(None, rois)]  # (R_b, F*S*S)
        if not feats:
            return self.union_fc.weight.new_zeros(0, self.union_fc.out_features)
        return F.relu(self.union_fc(torch.cat(feats)))                   # (R, Du)

    def pair_features(self, edge_ctx, pairs_g):
        """edge_ctx (N, 2H), pairs_g (R, 2) global indices -> [head(subject), tail(object)] (R, 4H)."""
        head, tail = self.post_emb(edge_ctx).chunk(2, dim=1)             # (N, 2H) each
        return torch.cat([head[pairs_g[:, 0]], tail[pairs_g[:, 1]]], dim=1)

    def forward(self, fmap, boxes, sizes, obj_feats, obj_dists, pairs, labels=None, boxes_per_cls=None, rois=None):
        """fmap (B, F, h, w) frozen features, or a list B x (F, h_b, w_b) (FeatureCache); boxes B x (N_b, 4);
        sizes B x (H, W);
        obj_feats (N, roi_dim) frozen RoI features; obj_dists (N, C) initial class distribution
        (one-hot GT labels in predcls, the detector's in sgcls/sgdet); pairs B x (R_b, 2) local
        indices; labels (N,): the GT labels in predcls, and in training the teacher-forced labels of
        sgcls (GT) and sgdet (the matched GT box's class, 0 = unmatched); boxes_per_cls (N, C, 4): sgdet
        at test time, the detections' class boxes for the decoder's NMS; rois: union_rois(fmap, boxes, pairs)
        if already computed.
        -> dict obj_logits (N, C) or None, obj_labels (N,), obj_scores (N,), rel_logits (R, P),
           rel_pairs (R, 2) global indices, and the mirror's inputs edge_in, union, counts, orders."""
        counts = [len(b) for b in boxes]
        # Motifs' 'leftright' order: objects sorted by box centre x, per image.
        orders = [((b[:, 0] + b[:, 2]) / 2).argsort() for b in boxes]
        offsets = np.cumsum([0] + counts[:-1])
        pairs_g = torch.cat([p + int(o) for p, o in zip(pairs, offsets)]) if pairs else \
            torch.zeros(0, 2, dtype=torch.long, device=obj_feats.device)  # (R, 2) global indices
        pos = torch.cat([box_info(b, s) for b, s in zip(boxes, sizes)])  # (N, 9)

        # Object context and label refinement (SGB's LSTMContext.obj_ctx).
        ctx_in = torch.cat([obj_feats, obj_dists @ self.obj_embed_ctx.weight, self.pos_embed(pos)], 1)
        obj_ctx = bilstm(self.obj_ctx_rnn, ctx_in, counts, orders)       # (N, 2H)
        if self.mode == "predcls":
            obj_logits, obj_labels = None, labels
            obj_scores = torch.ones_like(labels, dtype=obj_feats.dtype)
        else:
            # Training: the committed labels are the teacher-forced ones (GT; an unmatched sgdet box its
            # own prediction), so the edge context and the frequency bias below see GT labels, as in SGB.
            obj_logits, obj_labels = self.decoder_rnn(torch.cat([ctx_in, obj_ctx], 1), counts, orders,
                                                      labels if self.training else None)   # (N, C), (N,)
            probs = obj_logits.softmax(-1)
            if boxes_per_cls is not None and not self.training:   # sgdet test: per-class NMS (SGB)
                obj_labels = torch.cat([label_nms(p, b, self.later_nms) for p, b in
                                        zip(probs.split(counts), boxes_per_cls.split(counts))])
            # SGB's post-processor: the score is the committed class's probability, background zeroed.
            obj_scores = probs.gather(1, obj_labels[:, None]).squeeze(1) * (obj_labels > 0)

        # The relation predictor: edge context -> pair features x union feature -> classifier.
        edge_in = torch.cat([self.obj_embed_edge(obj_labels), obj_ctx, obj_feats], dim=1)  # (N, E+2H+roi)
        edge_ctx = bilstm(self.edge_ctx_rnn, edge_in, counts, orders)    # (N, 2H)
        union = self.union_features(fmap, boxes, pairs, rois)            # (R, Du)
        pair = self.pair_features(edge_ctx, pairs_g)                     # (R, 4H)
        freq = self.freq_bias(obj_labels[pairs_g[:, 0]] * self.num_classes + obj_labels[pairs_g[:, 1]])
        rel_logits = self.rel_compress(self.post_cat(pair) * union) + freq   # (R, P)
        return {"obj_logits": obj_logits, "obj_labels": obj_labels, "obj_scores": obj_scores,
                "rel_logits": rel_logits, "rel_pairs": pairs_g,
                # what the mirror reads (train_step runs it; evaluation and inference never do)
                "edge_in": edge_in, "union": union, "counts": counts, "orders": orders}


# ----------------------------------------------------------------------------------------------
# Training targets: which pairs a training step sees, and with which predicate

def gt_label_matrix(n, rels):
    """(n, n) predicate of each ordered GT pair (0 = none); a pair with several predicates keeps a
    random one (rels are shuffled first), as in the Motifs training code."""
    label = torch.zeros(n, n, dtype=torch.long, device=rels.device)
    if len(rels):
        r = rels[torch.randperm(len(rels), device=rels.device)]
        label[r[:, 0], r[:, 1]] = r[:, 2]
    return label


def sgdet_pairs(det_boxes, gt, max_pairs, neg_per_pos, per_gt_rel=4):
    """SGDet training targets, as SGB's RelationSampling.detect_relsample / motif_rel_fg_bg_sampling (itself
    neural-motifs' rel_assignments). det_boxes (n, 4) the detections; gt the image's target.
    A detection's object target is the class of the GT box it overlaps most when that IoU >= 0.5, else
    background (SGB's assign_label_to_proposals). It matches GT box g when IoU > 0.5 and its object target is
    g's class (`is_match`). Each GT relation (g, h, p) gives the pairs of distinct detections matching g and h,
    at most per_gt_rel of them (drawn with probability proportional to IoU(g) x IoU(h), SGB's
    NUM_SAMPLE_PER_GT_REL = 4); the candidates for 'no relation' are the other ordered pairs of distinct
    foreground detections (SGB's Motifs config: REQUIRE_BOX_OVERLAP False). The counts are ours, the same as
    sample_pairs' in predcls/sgcls: at most max_pairs related pairs, then at most neg_per_pos unrelated ones
    per related one within max_pairs (SGB: up to 1024 pairs an image, at most a quarter related). A pair
    that two GT relations reach is kept once per relation, as in SGB.
    -> object targets (n,), pairs (R, 2), predicates (R,)."""
    n, dev = len(det_boxes), det_boxes.device
    empty = torch.zeros(0, 2, dtype=torch.long, device=dev), torch.zeros(0, dtype=torch.long, device=dev)
    if n == 0 or len(gt["boxes"]) == 0:
        return torch.zeros(n, dtype=torch.long, device=dev), *empty
    iou = box_iou(gt["boxes"], det_boxes)                                 # (G, n)
    best, match = iou.max(0)                                              # (n,)
    obj_target = torch.where(best >= 0.5, gt["labels"][match], torch.zeros_like(match))
    is_match = (gt["labels"][:, None] == obj_target[None]) & (iou > 0.5)  # (G, n)
    fg_det = obj_target > 0
    candidate = fg_det[:, None] & fg_det[None, :] & ~torch.eye(n, dtype=torch.bool, device=dev)   # (n, n)
    fg = []
    for g, h, p in gt["relations"].tolist():
        heads, tails = is_match[g].nonzero().squeeze(1), is_match[h].nonzero().squeeze(1)
        hh, tt = heads.repeat_interleave(len(tails)), tails.repeat(len(heads))   # every combination
        ok = hh != tt
        hh, tt = hh[ok], tt[ok]
        if len(hh) == 0:
            continue
        candidate[hh, tt] = False
        if len(hh) > per_gt_rel:
            weight = iou[g, hh] * iou[h, tt]
            pick = torch.multinomial(weight / weight.sum(), per_gt_rel, replacement=False)
            hh, tt = hh[pick], tt[pick]
        fg.append(torch.stack([hh, tt, torch.full_like(hh, p)], 1))      # (<= per_gt_rel, 3)
    fg = torch.cat(fg) if fg else torch.zeros(0, 3, dtype=torch.long, device=dev)
    fg = fg[torch.randperm(len(fg), device=dev)[:max_pairs]]
    neg = candidate.nonzero()                                              # (bg candidates, 2)
    n_neg = min(neg_per_pos * max(1, len(fg)), max_pairs - len(fg))
    neg = neg[torch.randperm(len(neg), device=dev)[:n_neg]]
    # (SGB adds a placeholder pair (0, 0) when an image has neither; we train on no pair there.)
    pairs = torch.cat([fg[:, :2], neg])                                    # (R, 2)
    return obj_target, pairs, torch.cat([fg[:, 2], torch.zeros(len(neg), dtype=torch.long, device=dev)])


def sample_pairs(label, max_pairs, neg_per_pos):
    """label (n, n) -> training pairs (R, 2) and their predicates (R,): the related pairs (at most
    max_pairs) then at most neg_per_pos unrelated pairs per related one, within max_pairs. (SGB's
    gtbox_relsample: the same split into related and unrelated pairs, other counts, see the docstring.)"""
    n = label.shape[0]
    off_diag = ~torch.eye(n, dtype=torch.bool, device=label.device)
    pos = (label > 0).nonzero()
    neg = ((label == 0) & off_diag).nonzero()
    pos = pos[torch.randperm(len(pos), device=label.device)[:max_pairs]]
    n_neg = min(neg_per_pos * max(1, len(pos)), max_pairs - len(pos))
    neg = neg[torch.randperm(len(neg), device=label.device)[:n_neg]]
    pairs = torch.cat([pos, neg])                                           # (R, 2)
    return pairs, label[pairs[:, 0], pairs[:, 1]]


def training_targets(s1, targets, cfg):
    """The pairs a training step sees and their targets: s1 = stage1_outputs(...), targets the batch's
    ground truth -> pairs B x (R_b, 2) local indices, predicates (R,), object targets (N,)."""
    pairs, rel_labels, obj_targets = [], [], []
    for i, t in enumerate(targets):
        if cfg.mode == "sgdet":
            obj_t, pr, lab = sgdet_pairs(s1["boxes"][i], t, cfg.max_pairs_per_image, cfg.neg_per_pos)
        else:
            obj_t, label = t["labels"], gt_label_matrix(len(t["boxes"]), t["relations"])
            pr, lab = sample_pairs(label, cfg.max_pairs_per_image, cfg.neg_per_pos)   # (R_b, 2), (R_b,)
        pairs.append(pr)
        rel_labels.append(lab)
        obj_targets.append(obj_t)
    return pairs, torch.cat(rel_labels), torch.cat(obj_targets)


def predicate_statistics(stats_ds, C, P):
    """The frequency bias, counted as SGB's get_VG_statistics (neural-motifs' get_counts): over the train
    split built with filter_duplicate_rels=False and filter_non_overlap=True (load_datasets' 'statistics'),
    fg[s, o, p] counts every annotated relation, duplicates included; the 'no relation' column counts every
    ordered pair of distinct boxes that overlap (intersection > 0, not pixel-inclusive, as SGB's box_filter),
    related or not, or every pair when no two boxes of the image overlap (must_overlap=True), plus one.
    -> log(fg / fg.sum(p) + 1e-3) (C, C, P), SGB's pred_dist."""
    fg = np.zeros((C, C, P), dtype=np.int64)
    bg = np.zeros((C, C), dtype=np.int64)
    for boxes, labels, rels in zip(stats_ds.gt_boxes, stats_ds.gt_labels, stats_ds.gt_relations):
        np.add.at(fg, (labels[rels[:, 0]], labels[rels[:, 1]], rels[:, 2]), 1)          # (R,) each
        b = torch.as_tensor(boxes, dtype=torch.float64)
        lt, rb = torch.max(b[:, None, :2], b[None, :, :2]), torch.min(b[:, None, 2:], b[None, :, 2:])
        cand = ((rb - lt).clamp(min=0).prod(-1) > 0).numpy()                           # (G, G)
        np.fill_diagonal(cand, False)
        if not cand.any():
            cand = ~np.eye(len(labels), dtype=bool)
        s_idx, o_idx = cand.nonzero()
        np.add.at(bg, (labels[s_idx], labels[o_idx]), 1)
    fg[:, :, 0] = bg + 1
    return torch.tensor(np.log(fg / fg.sum(2, keepdims=True) + 1e-3), dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# Training: train() (stage 1 once, cached; stage 2 the loop; model selection on validation mR@50)

def train(cfg, out_dir, rank, world, device):
    """Stage 1 + stage 2 + test of the best checkpoint. -> the test metrics dict."""
    t_run = (time.time(), time.process_time())
    root, ds, log = open_run(cfg, out_dir, rank)
    C, P = ds["train"].num_classes, ds["train"].num_predicates
    det_path, det_cached = detector_path(cfg, root, world, device)
    log(f"run {out_dir} | {cfg.mode} | {describe(cfg)} | seed {cfg.seed} | detector: "
        f"{'reused from ' + det_path if det_cached else f'trained for {cfg.det_iters} iterations, cached as {det_path}'} "
        f"| {world} process(es) on {device}, {torch.get_num_threads()} thread(s)")
    log(f"data {root}: {len(ds['train'])} train / {len(ds['val'])} val / {len(ds['test'])} test images, "
        f"{C - 1} classes, {P - 1} predicates ({clock(t_run)})")
    log_probs = predicate_statistics(ds["statistics"], C, P)
    # zsR@K: a test triplet is zero-shot if it is never annotated in the train split (duplicates included).
    seen = metrics.training_triplets(ds["train"].gt_labels, ds["train"].gt_relations)
    counts = data.predicate_counts(ds["train"])
    groups = metrics.default_predicate_groups(ds["train"].idx_to_predicate, counts)
    t_stage = (time.time(), time.process_time())
    detector, det_map = get_detector(cfg, ds, det_path, det_cached, device, rank, world, log)
    cache_gb = use_feature_cache(cfg, detector, [ds["train"], ds["val"], ds["test"]], log)
    log(f"stage 1 done ({clock(t_stage)})")
    if cfg.freq_baseline:
        summary = evaluate(None, detector, first(ds["test"], cfg.max_eval_images), cfg, device, groups,
                           freq_log_probs=log_probs.to(device), seen_triplets=seen)
        summary["det_mAP@0.5"] = det_map
        finish(cfg, out_dir, summary, None, ds, counts, groups, log, rank)
        return summary

    # Stage 2: the relation model on the frozen detector's outputs.
    torch.manual_seed(cfg.seed)
    model = MotifsRelationModel(cfg, C, P, detector.backbone.out_channels, detector.stride, log_probs).to(device)
    ddp = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_lambda(cfg.iters, cfg.lr_steps))
    last_path, best_path = os.path.join(out_dir, "ckpt_last.pt"), os.path.join(out_dir, "ckpt_best.pt")
    ck = resume(cfg, last_path, model, opt, sched, device, log) if cfg.resume else None
    state = ck["state"] if ck else new_train_state()
    for_infer = what_infer_needs(cfg, detector, ds["train"], log_probs)   # goes into ckpt_best.pt
    # The sampler continues where the interrupted run stopped: position step x batch of this rank's stream.
    # The loader gets a generator of its own: its iterator draws a seed at creation, which must not come from
    # the global stream that the masks and pair sampling use.
    sampler = data.TrainingSampler(len(ds["train"]), seed=cfg.seed, start=state["step"] * cfg.batch_size)
    loader = torch.utils.data.DataLoader(ds["train"], batch_size=cfg.batch_size, sampler=sampler,
                                         collate_fn=data.collate, num_workers=cfg.num_workers,
                                         generator=torch.Generator().manual_seed(cfg.seed))
    val = first(ds["val"], min([n for n in (cfg.val_images, cfg.max_eval_images) if n] or [len(ds["val"])]))
    val_rois = use_roi_cache(cfg, model, detector, val, cache_gb, log)   # {} or None: evaluate's roi_cache
    log(f"stage 2: training the relation model for {cfg.iters} iterations (batch {cfg.batch_size} x {world}, "
        f"validation mR@50 on {len(val)} images every {cfg.eval_every}, ckpt_last.pt every {cfg.ckpt_every})")
    t_stage = (time.time() - state["elapsed"], time.process_time())
    it, t_last, acc = iter(loader), time.time(), state["acc"]
    if ck:   # this rank's own random streams, where the killed run left them
        set_rng_states(ck["rng"], rank)
    model.train()
    for step in range(state["step"], cfg.iters):
        images, targets = next(it)
        losses = train_step(ddp, detector, images.to(device), to_device(targets, device), cfg)
        check_finite(step + 1, losses)
        opt.zero_grad(set_to_none=True)
        losses["total"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        for k, term in (("loss", "total"), ("sup", "sup"), ("align", "align")):
            acc[k] += losses[term].item()
        acc["n"] += 1
        done = state["step"] = step + 1
        if done % cfg.log_every == 0 or done == cfg.iters:
            log_interval(cfg, state, time.time() - t_last, time.time() - t_stage[0], log)
            t_last = time.time()
        if done % cfg.eval_every == 0 or done == cfg.iters:
            improved = validate(model, detector, val, cfg, device, groups, state, log, val_rois)
            state["elapsed"] = time.time() - t_stage[0]
            if improved:
                save_checkpoint(best_path, cfg, model, opt, sched, state, rank, world, for_infer)
            t_last = time.time()   # validation time is not counted in it/s
        if done % cfg.ckpt_every == 0 or done % cfg.eval_every == 0 or done == cfg.iters:
            state["elapsed"] = time.time() - t_stage[0]
            save_checkpoint(last_path, cfg, model, opt, sched, state, rank, world)
    log(f"training done ({clock(t_stage)}, validation included{'; CPU since the resume' if cfg.resume else ''})")

    # Test the checkpoint with the best validation mR@50 (the paper's model selection), and the last
    # iteration's weights too (metrics.json's "final"): docs/variance.md compares the two ways of choosing.
    # When the best checkpoint is the last iteration's, they are the same weights, tested once; otherwise both
    # in one pass over the test images, sharing the frozen stage 1 and the union RoIAlign.
    test = first(ds["test"], cfg.max_eval_images)
    ck = load_checkpoint(best_path, device)
    t_stage = (time.time(), time.process_time())
    models = [model] if ck["step"] == state["step"] else [copy.deepcopy(model), model]   # [best, last]
    models[0].load_state_dict(ck["model"])
    log(f"testing the best checkpoint (iteration {ck['step']}, val mR@50 {ck['state']['best_val_mR@50']:.4f})"
        + ("" if len(models) == 1 else f", and the last iteration's weights ({state['step']}) in the same pass"))
    results = evaluate(models, detector, test, cfg, device, groups, keep_examples=4, seen_triplets=seen)
    (summary, examples), (final, _) = results[0], results[-1]
    # the last iteration's, with its validation mR@50
    final = {**final, "val_mR@50": state["history"]["val_mR@50"][-1]}
    summary.update({"det_mAP@0.5": det_map, "best_step": ck["step"], "val_mR@50": ck["state"]["best_val_mR@50"],
                    "final": final})
    log(f"test done ({clock(t_stage)})")
    finish(cfg, out_dir, summary, state["history"], ds, counts, groups, log, rank, examples)
    log(f"total time {clock(t_run)}")
    return summary


def open_run(cfg, out_dir, rank):
    """Check every input before anything is written (the data, the detector file, the run folder), then
    start the run folder: args.json and log.txt. -> (data root, the three splits, log)."""
    claim_run_dir(cfg, out_dir)   # first: a refused run (e.g. --resume of nothing) does not generate the data
    root, ds = load_datasets(cfg, rank)
    if cfg.detector_ckpt and not os.path.isfile(cfg.detector_ckpt):
        fail(f"--detector-ckpt {cfg.detector_ckpt}: no such file")
    barrier()   # every rank has looked at the folder before rank 0 writes into it
    if rank == 0 and not cfg.resume:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "args.json"), "w") as f:
            json.dump({**dataclasses.asdict(cfg), "machine": machine()}, f, indent=1)
    log = Log(os.path.join(out_dir, "log.txt"), rank)
    if cfg.resume:
        check_machine(out_dir, log)
    return root, ds, log


def describe(cfg):
    """The run's method in words, for the log's first line."""
    if cfg.freq_baseline:
        return "FREQ (frequency prior only)"
    if cfg.no_align:
        return f"baseline (no alignment), {cfg.iters} iterations"
    return (f"aligned (p {cfg.mask_p}, λ {cfg.align_weight:g}, {cfg.align_loss}"
            f"{', tied head' if cfg.tied_head else ''}), {cfg.iters} iterations")


def detector_path(cfg, root, world, device):
    """Where the detector for these data and settings is cached -> (path, whether it exists). The key holds
    everything that changes the trained weights, thread count and instruction set included (float sums differ
    across them)."""
    if cfg.detector_ckpt:
        return cfg.detector_ckpt, True
    settings = {k: getattr(cfg, k) for k in ("backbone", "vgg_weights", "det_iters", "det_batch", "det_optimizer",
                                             "det_lr", "det_seed", "anchor_sizes", "roi_dim", "max_size",
                                             "det_max_per_image")}
    if cfg.num_val_im:   # only when set, so that the default's key (and its cached detectors) stay as they were
        settings["num_val_im"] = cfg.num_val_im
    key_src = json.dumps({"root": os.path.abspath(root), "world": world, "threads": torch.get_num_threads(),
                          "isa": torch.backends.cpu.get_cpu_capability(), "device": device.type, **settings},
                         sort_keys=True)
    key = hashlib.sha1(key_src.encode()).hexdigest()[:12]
    path = os.path.join(cache_dir(), "detectors", f"detector-{key}.pt")
    return path, os.path.exists(path)


def get_detector(cfg, ds, path, cached, device, rank, world, log):
    """Load the cached detector for these data and settings, or train and cache it. -> (detector, test mAP)."""
    torch.manual_seed(cfg.det_seed)   # the initial weights too: one detector per setting, as in the paper
    detector = Detector(cfg, ds["train"].num_classes).to(device)
    if cached:
        blob = load_checkpoint(path, device)
        try:
            detector.load_state_dict(blob["detector"])
        except (KeyError, RuntimeError) as e:
            fail(f"{path} does not hold a detector with these settings ({str(e).splitlines()[0]})")
        log(f"stage 1: detector loaded from {path}")
    else:
        log(f"stage 1: training the detector ({cfg.det_iters} iterations), cached as {path}")
        train_detector(cfg, detector, ds["train"], cfg.det_iters, device, rank, world, log)
        blob = {"detector": detector.state_dict()}
        if rank == 0:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            save_atomic(blob, path)
        barrier()
    detector.eval()
    for p in detector.parameters():
        p.requires_grad_(False)   # frozen for stage 2, as in the two-stage protocol
    # Detection mAP@0.5 on test, cached with the weights per number of evaluated images.
    n_eval = min(cfg.max_eval_images or len(ds["test"]), len(ds["test"]))
    cached_map = blob.get(f"map50_test{n_eval}")
    if cached_map is None:
        cached_map = evaluate_detector(detector, first(ds["test"], cfg.max_eval_images), cfg, device)
        if rank == 0 and not cfg.detector_ckpt:
            blob[f"map50_test{n_eval}"] = cached_map
            save_atomic(blob, path)
    log(f"stage 1: detector mAP@0.5 on {n_eval} test images = {cached_map:.4f}")
    return detector, float(cached_map)


def use_feature_cache(cfg, detector, splits, log):
    """Give the frozen detector a FeatureCache when the splits' outputs fit in --feature-cache-gb (one line
    says which; --preset vg: off, a VGG-16 feature map per Visual Genome image would take about 300 GB).
    -> the GB it may hold (what use_roi_cache counts beside it), or None when it is off."""
    if cfg.feature_cache_gb <= 0:
        log("feature cache: off (--feature-cache-gb 0): the frozen detector runs again at every step")
        return None
    need = FeatureCache.size_gb(cfg, splits, detector.backbone.out_channels, detector.stride)
    if need > cfg.feature_cache_gb:
        log(f"feature cache: off: the frozen detector's outputs would take {need:.1f} GB, more than "
            f"--feature-cache-gb {cfg.feature_cache_gb:g}; the detector runs again at every step")
        return None
    detector.feature_cache = FeatureCache()
    log(f"feature cache: on: the frozen detector's outputs are computed once per image and kept in memory "
        f"(at most {need:.2f} GB; --feature-cache-gb 0 turns it off)")
    return need


def use_roi_cache(cfg, model, detector, val, cache_gb, log):
    """-> {} (evaluate's roi_cache) when the validation images' union RoIAlign, every ordered pair's, fits in
    --feature-cache-gb beside the feature cache, else None. A validation then computes only the model's part of
    the union feature (rect_conv, union_fc) and the rest of the model: about half its time on the VG-shaped data
    (docs/running.md). Plumbing, as the feature cache: the numbers are those computed again each time."""
    if cache_gb is None:
        return None
    base, idx = (val.dataset, val.indices) if isinstance(val, torch.utils.data.Subset) else (val, range(len(val)))
    S, Fc = model.S, detector.backbone.out_channels
    n = [cfg.det_max_per_image if cfg.mode == "sgdet" else len(base.get_groundtruth(i)["labels"]) for i in idx]
    need = 4 * sum(k * (k - 1) for k in n) * (Fc + 2) * S * S / 1e9      # float32 (R, F, S, S) + masks (R, 2, S, S)
    if cache_gb + need > cfg.feature_cache_gb:
        log(f"union RoIAlign of the validation images: computed at every validation ({need:.1f} GB more would "
            f"not fit in --feature-cache-gb {cfg.feature_cache_gb:g})")
        return None
    log(f"union RoIAlign of the validation images: computed at the first validation and kept ({need:.2f} GB)")
    return {}


def train_detector(cfg, detector, train_ds, iters, device, rank, world, log):
    if cfg.vgg_weights:
        load_vgg16_weights(detector, cfg.vgg_weights)
    model = nn.parallel.DistributedDataParallel(detector) if world > 1 else detector
    params = [p for p in detector.parameters() if p.requires_grad]
    if cfg.det_optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.det_lr, momentum=0.9, weight_decay=1e-4)
    else:  # from scratch in ~300 iterations AdamW reaches test mAP 0.60 where SGD reaches 0.27 (our runs)
        opt = torch.optim.AdamW(params, lr=cfg.det_lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_lambda(iters, iters, warmup=min(100, iters // 5)))
    loader = torch.utils.data.DataLoader(train_ds, batch_size=cfg.det_batch, collate_fn=data.collate,
                                         sampler=data.TrainingSampler(len(train_ds), seed=cfg.det_seed),
                                         num_workers=cfg.num_workers, generator=torch.Generator().manual_seed(cfg.det_seed))
    detector.train()
    it, t0 = iter(loader), time.time()
    for step in range(iters):
        images, targets = next(it)
        images, targets = images.to(device), to_device(targets, device)
        losses = model(images, [t["size"] for t in targets], targets)
        check_finite(step + 1, losses)
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        opt.step()
        sched.step()
        if (step + 1) % cfg.log_every == 0 or step + 1 == iters:
            rate = (step + 1) / (time.time() - t0)
            log(f"det it {step + 1}/{iters} | loss {loss.item():.3f} (rpn {losses['rpn_cls'].item() + losses['rpn_box'].item():.3f}, "
                f"head {losses['det_cls'].item() + losses['det_box'].item():.3f}) | {rate:.1f} it/s | "
                f"eta {fmt_time((iters - step - 1) / rate)}")


def resume(cfg, last_path, model, opt, sched, device, log):
    """Load ckpt_last.pt into the model, optimizer and schedule -> the checkpoint (its training state, its
    random states)."""
    ck = load_checkpoint(last_path, device)
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as e:
        fail(f"--resume: {last_path} does not fit this model ({str(e).splitlines()[0]})")
    opt.load_state_dict(ck["optimizer"])
    sched.load_state_dict(ck["scheduler"])
    log(f"resumed from {last_path} at iteration {ck['state']['step']}")
    return ck


def new_train_state():
    """What a training run carries from step to step, and what ckpt_last.pt saves of it."""
    return {"step": 0, "best_val_mR@50": -1.0, "best_step": 0, "elapsed": 0.0,
            "history": {"step": [], "loss": [], "sup": [], "align": [], "val_step": [], "val_mR@50": [], "val_R@50": []},
            "acc": {"loss": 0.0, "sup": 0.0, "align": 0.0, "n": 0}}   # running sums of the current log interval


def what_infer_needs(cfg, detector, train_ds, log_probs):
    """What makes ckpt_best.pt self-contained for --infer: the detector, the vocabulary, the prior, and the
    training images' longest side (--infer resizes the user's photos to it, as sgtr_align.py)."""
    return {"detector": detector.state_dict(), "freq_log_probs": log_probs,
            "vocab": {"idx_to_label": list(train_ds.idx_to_label), "idx_to_predicate": list(train_ds.idx_to_predicate)},
            "image_side": cfg.max_size or max(max(im["width"], im["height"]) for im in train_ds.img_info)}


def cosine_lambda(total, steps, warmup=0):
    """lr factor: linear warm-up, then cosine from 1 to 0 updated `steps` times (the paper: every 1K of
    100K iterations)."""
    every = max(1, total // steps)

    def f(it):
        if it < warmup:
            return 1 / 3 + (2 / 3) * it / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (it // every) * every / total)))
    return f


def check_finite(step, losses):
    bad = [f"{name} = {v.item()}" for name, v in losses.items() if not torch.isfinite(v)]
    if bad:
        raise FloatingPointError(f"non-finite loss at iteration {step}: {', '.join(bad)}")


def log_interval(cfg, state, seconds, seconds_so_far, log):
    """The progress line: the losses' means over the interval (sup = L_original, align = L_align, loss =
    their Eq. 3 total); they go into the history that curves.png plots, and the sums start again."""
    acc, history, done = state["acc"], state["history"], state["step"]
    rate = acc["n"] / max(seconds, 1e-9)
    m = {k: acc[k] / acc["n"] for k in ("loss", "sup", "align")}
    log(f"it {done}/{cfg.iters} | loss {m['loss']:.3f} (sup {m['sup']:.3f}, align {m['align']:.3f}, "
        f"λ {0 if cfg.no_align else cfg.align_weight:g}) | {rate:.1f} it/s | "
        f"eta {fmt_time((cfg.iters - done) / rate)} | time so far {fmt_time(seconds_so_far)}")
    for k in ("loss", "sup", "align"):
        history[k].append(m[k])
    history["step"].append(done)
    acc.update(loss=0.0, sup=0.0, align=0.0, n=0)


def validate(model, detector, val, cfg, device, groups, state, log, roi_cache=None):
    """Validation mR@50 (model selection) -> whether it is the best so far (then state holds it)."""
    done = state["step"]
    summary = evaluate(model, detector, val, cfg, device, groups, roi_cache=roi_cache)
    mr50 = summary["mR@50"]
    model.train()
    state["history"]["val_step"].append(done)
    state["history"]["val_mR@50"].append(mr50)
    state["history"].setdefault("val_R@50", []).append(summary["R@50"])   # (absent from older checkpoints)
    improved = mr50 > state["best_val_mR@50"]
    if improved:
        state["best_val_mR@50"], state["best_step"] = mr50, done
    log(f"val it {done} | mR@50 {mr50:.4f} | R@50 {summary['R@50']:.4f} | best {state['best_val_mR@50']:.4f}"
        f"{' (saved)' if improved else ''}")
    return improved


def save_checkpoint(path, cfg, model, opt, sched, state, rank, world, extra=None):
    """Rank 0 writes {model, optimizer, scheduler, step, args, rng, state} (+ extra); every rank's random
    state goes in (gathered, a collective: every rank calls this), so a resume is exact."""
    rng = gather_rng_states(world)
    if rank == 0:
        save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                     "step": state["step"], "args": dataclasses.asdict(cfg), "rng": rng, "state": state,
                     **(extra or {})}, path)
    barrier()   # nobody reads a checkpoint before rank 0 has written it


MODE_NAMES = {"predcls": "PredCls", "sgcls": "SGCls", "sgdet": "SGDet"}   # as the papers write them


def finish(cfg, out_dir, summary, history, ds, counts, groups, log, rank, examples=None):
    """The test lines (the best checkpoint's, then the last iteration's, as sgtr_align.py words them), then
    (rank 0) metrics.json and the pictures."""
    keys = [f"{m}@{k}" for m in ("R", "mR", "zsR") for k in (20, 50, 100)]
    test = f"test {MODE_NAMES[cfg.mode]}"
    log(f"{test} | " + " | ".join(f"{k} {100 * summary[k]:.2f}" for k in keys if k in summary)
        + "".join(f" | {g}_mR@100 {100 * summary[f'{g}_mR@100']:.2f}" for g in groups if f"{g}_mR@100" in summary))
    if "final" in summary:   # the last iteration's weights (what the study compares, docs/variance.md)
        log(f"{test}, last iteration | " + " | ".join(f"{k} {100 * summary['final'][k]:.2f}" for k in keys
                                                      if k in summary["final"]))
    if rank != 0:
        return
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(summary, f, indent=1)
    if history is not None:
        plot_curves(history, os.path.join(out_dir, "curves.png"), 0 if cfg.no_align else cfg.align_weight)
    which = ("the frequency prior alone (FREQ)" if cfg.freq_baseline else
             f"ckpt_best.pt, the best validation checkpoint (iteration {summary['best_step']} of {cfg.iters})")
    plot_per_predicate(summary, counts, groups, ds["train"].idx_to_predicate, os.path.join(out_dir, "per_predicate.png"),
                       f"{cfg.mode} test R@100 per predicate: {which}\n{out_dir}")
    if examples:
        plot_examples(examples, ds["test"], cfg.mode, os.path.join(out_dir, "examples.png"))
    log(f"wrote {out_dir}/metrics.json and pictures")


# ----------------------------------------------------------------------------------------------
# Evaluation: evaluate() (every ordered pair of the test boxes is a candidate; metrics.SGEvaluator ranks
# them) and the detector's mAP

def all_pairs(n, device):
    """Every ordered pair of distinct objects (n*(n-1), 2): the test-time candidates in every mode, as SGB's
    RelationSampling.prepare_test_pairs with its Motifs config (TEST.RELATION.REQUIRE_OVERLAP False)."""
    i, j = torch.meshgrid(torch.arange(n, device=device), torch.arange(n, device=device), indexing="ij")
    keep = i != j
    return torch.stack([i[keep], j[keep]], dim=1)


@torch.no_grad()
def evaluate(model, detector, ds, cfg, device, groups, freq_log_probs=None, keep_examples=0, seen_triplets=None,
             ev=None, roi_cache=None):
    """-> metrics.SGEvaluator summary (and the first keep_examples predictions of rank 0).
    model: one model, or a list of models tested in one pass over the images (they share the frozen stage 1
    and the union RoIAlign, the larger half of the work; the numbers are those of one model at a time),
    then a list of what one model would give. With freq_log_probs instead of a model: the frequency-prior-only
    predictor (Motifs' FREQ). seen_triplets: the training split's triplets (metrics.training_triplets), for
    zsR@K. ev: an empty SGEvaluator to fill instead of a new one (its per-image records stay with the caller).
    roi_cache: a dict kept by the caller between evaluations of the same images in the same order (the
    validations): each image's union_rois, computed at the first and read at the next (the same numbers)."""
    base = ds.dataset if isinstance(ds, torch.utils.data.Subset) else ds
    models = model if isinstance(model, list) else [model]
    assert ev is None or len(models) == 1, "ev: one evaluator, for one model"
    for m in models:
        if m is not None:
            m.eval()
    evs = [ev] if ev is not None else [metrics.SGEvaluator(cfg.mode, base.num_predicates - 1, predicate_groups=groups,
                                                           zeroshot_triplets=seen_triplets) for _ in models]
    examples, seen = [], 0
    for images, targets in eval_loader(ds, cfg):
        images, targets = images.to(device), to_device(targets, device)
        sizes = [t["size"] for t in targets]
        s1 = stage1_outputs(detector, images, sizes, cfg.mode, [t["boxes"] for t in targets],
                            [t["labels"] for t in targets])
        pairs = [all_pairs(len(b), device) for b in s1["boxes"]]         # B x (n_b*(n_b-1), 2)
        gt_labels = torch.cat([t["labels"] for t in targets])
        if models[0] is None:   # FREQ: labels from GT (predcls) or the detector, predicates from the prior
            if cfg.mode == "predcls":
                labels, scores = gt_labels, torch.ones(len(gt_labels), device=device)
            else:
                scores, labels = s1["obj_dists"][:, 1:].max(1)
                labels = labels + 1
            offsets = np.cumsum([0] + [len(b) for b in s1["boxes"]][:-1])
            pg = torch.cat([p + int(o) for p, o in zip(pairs, offsets)])  # (R, 2) global
            outs = [(labels, scores, freq_log_probs[labels[pg[:, 0]], labels[pg[:, 1]]])]   # rel_logits (R, P)
        else:
            per_cls = torch.cat([d["boxes_per_cls"] for d in s1["det"]]) if cfg.mode == "sgdet" else None
            if roi_cache is None:   # the union RoIAlign, once for all the models (union_rois works image by image)
                rois = models[0].union_rois(s1["fmap"], s1["boxes"], pairs)
            else:
                for i in range(len(targets)):
                    if seen + i not in roi_cache:
                        roi_cache[seen + i] = models[0].union_rois(s1["fmap"][i:i + 1], s1["boxes"][i:i + 1],
                                                                   pairs[i:i + 1])[0]
                rois = [roi_cache[seen + i] for i in range(len(targets))]
            outs = []
            for m in models:
                out = m(s1["fmap"], s1["boxes"], sizes, s1["obj_feats"], s1["obj_dists"], pairs, gt_labels, per_cls,
                        rois)
                outs.append((out["obj_labels"], out["obj_scores"], out["rel_logits"]))
        for j, (labels, scores, rel_logits) in enumerate(outs):
            rel_probs = rel_logits.softmax(-1)                            # (R, P), column 0 = no relation
            n_start, r_start = 0, 0
            for i, t in enumerate(targets):
                n, r = len(s1["boxes"][i]), len(pairs[i])
                pred = {"boxes": s1["boxes"][i], "labels": labels[n_start:n_start + n],
                        "scores": scores[n_start:n_start + n], "rel_pairs": pairs[i],
                        "rel_scores": rel_probs[r_start:r_start + r]}
                pred = {k: v.cpu() for k, v in pred.items()}
                evs[j].add({k: t[k].cpu() for k in ("boxes", "labels", "relations")}, pred)
                if j == 0 and len(examples) < keep_examples and (not dist.is_initialized() or dist.get_rank() == 0):
                    examples.append((seen + i, pred))   # rank 0's shard starts at image 0 (InferenceSampler)
                n_start, r_start = n_start + n, r_start + r
        seen += len(targets)
    results = []
    for e in evs:
        if dist.is_initialized():
            e.gather()
        results.append(e.summary())
    if keep_examples:
        results = [(summary, examples) for summary in results]
    return results if isinstance(model, list) else results[0]


def eval_loader(ds, cfg):
    return torch.utils.data.DataLoader(ds, batch_size=cfg.eval_batch, collate_fn=data.collate,
                                       sampler=data.InferenceSampler(len(ds)), num_workers=cfg.num_workers,
                                       generator=torch.Generator())   # leaves the global random stream alone


def top_triplets(pred, k):
    """The k best (subject, object, predicate, score) of one image's prediction; triplet score =
    predicate probability x subject score x object score (the usual SGG ranking)."""
    if len(pred["rel_pairs"]) == 0:
        return []
    p, pidx = pred["rel_scores"][:, 1:].max(1)
    s = p * pred["scores"][pred["rel_pairs"][:, 0]] * pred["scores"][pred["rel_pairs"][:, 1]]
    order = s.argsort(descending=True)[:k]
    return [(int(pred["rel_pairs"][j, 0]), int(pred["rel_pairs"][j, 1]), int(pidx[j]) + 1, float(s[j]))
            for j in order]


@torch.no_grad()
def evaluate_detector(detector, ds, cfg, device):
    dets, gts = [], []
    for images, targets in eval_loader(ds, cfg):
        sizes = [t["size"] for t in targets]
        for d, t in zip(detector.detect(detector.features(images.to(device), sizes), sizes), targets):
            dets.append({k: v.cpu().numpy() for k, v in d.items()})
            gts.append({"boxes": t["boxes"].numpy(), "labels": t["labels"].numpy()})
    if dist.is_initialized():   # each rank evaluated its shard; AP needs all images at once
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (dets, gts))
        dets, gts = [d for p in parts for d in p[0]], [g for p in parts for g in p[1]]
    return detection_map(dets, gts, detector.num_classes)


def detection_map(dets, gts, num_classes, iou_threshold=0.5):
    """VOC-style mAP@0.5: per class, all-point interpolated AP over the ranked detections; mean over
    classes that have test boxes. dets/gts: lists (one per image) of dicts of numpy arrays."""
    aps = []
    for c in range(1, num_classes):
        n_gt = sum(int((g["labels"] == c).sum()) for g in gts)
        if n_gt == 0:
            continue
        scored = []   # (score, image, box)
        for i, d in enumerate(dets):
            for b, s in zip(d["boxes"][d["labels"] == c], d["scores"][d["labels"] == c]):
                scored.append((float(s), i, b))
        scored.sort(key=lambda x: -x[0])
        used = [np.zeros(int((g["labels"] == c).sum()), dtype=bool) for g in gts]
        tp = np.zeros(len(scored))
        for k, (_, i, b) in enumerate(scored):
            g = gts[i]["boxes"][gts[i]["labels"] == c]
            if len(g):
                iou = box_iou(torch.as_tensor(b[None]), torch.as_tensor(g))[0].numpy()
                j = int(iou.argmax())
                if iou[j] >= iou_threshold and not used[i][j]:
                    used[i][j], tp[k] = True, 1.0
        tp_c = np.cumsum(tp)
        recall = tp_c / n_gt
        precision = tp_c / np.arange(1, len(tp) + 1)
        # area under the monotone (right-to-left max) precision envelope
        mrec = np.concatenate([[0.0], recall, [1.0]])
        mpre = np.concatenate([[0.0], precision, [0.0]])
        mpre = np.maximum.accumulate(mpre[::-1])[::-1]
        steps = np.where(mrec[1:] != mrec[:-1])[0]
        aps.append(float(((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]).sum()))
    return float(np.mean(aps)) if aps else 0.0


# ----------------------------------------------------------------------------------------------
# Pictures

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, tight=True):
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=100)
    _plt().close(fig)


GROUP_COLOURS = {"head": "tab:blue", "body": "tab:orange", "tail": "tab:green"}
BOX_COLOURS = ["tab:red", "tab:blue", "tab:green", "tab:orange", "tab:purple", "tab:cyan", "tab:pink", "tab:olive",
               "tab:brown", "gold"]


def plot_curves(history, path, align_weight):
    """The log's names: sup = L_original, align = L_align, loss = sup + λ·align (Eq. 3)."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    names = {"loss": f"loss = sup + λ·align (λ = {align_weight:g})", "sup": "sup (L_original)",
             "align": "align (L_align)"}
    for k in ("loss", "sup", "align"):
        if any(history[k]):
            a.plot(history["step"], history[k], label=names[k])
    a.set(xlabel="iteration", ylabel="mean over the log interval", title="training losses (as in the log)")
    a.legend()
    b.plot(history["val_step"], [100 * v for v in history["val_mR@50"]], marker="o", label="mR@50 (model selection)")
    if len(history.get("val_R@50", [])) == len(history["val_step"]):   # (older runs logged mR@50 only)
        b.plot(history["val_step"], [100 * v for v in history["val_R@50"]], marker="s", label="R@50")
    b.set(xlabel="iteration", ylabel="%", title="validation")
    b.legend()
    save_figure(fig, path)


def plot_per_predicate(summary, counts, groups, names, path, title):
    """Test R@100 per predicate, coloured by the head / body / tail group; the title names the weights tested."""
    order = data.frequency_order(counts)   # the order `python data.py` prints
    colour = {p: GROUP_COLOURS.get(g, "gray") for g, ids in groups.items() for p in ids}
    fig, ax = _plt().subplots(figsize=(max(8, 0.3 * len(order)), 4.5))
    ax.bar(range(len(order)), [100 * np.nan_to_num(summary["per_predicate_R@100"][p - 1]) for p in order],
           color=[colour.get(p, "gray") for p in order])
    ax.set_xticks(range(len(order)))
    ax.set_xticklabels([names[p] for p in order], rotation=90, fontsize=8)
    for g, c in GROUP_COLOURS.items():
        ax.bar([0], [0], color=c, label=g)
    ax.legend()
    ax.set(ylabel="test R@100 (%)", xlabel="predicate, most frequent in training first (data.frequency_order)")
    # a long title is wrapped, so that it stays within the figure
    ax.set_title("\n".join(textwrap.fill(line, 90) for line in title.split("\n")), fontsize=10)
    save_figure(fig, path)


def tag_spot(box, w, h, W, H, placed, others):
    """Where a w x h tag (image pixels, y down) goes so that it touches its own box -> (anchor (x, y), ha, va,
    the tag's rectangle). Candidates, most preferred first: inside the box's top-left corner, just above it,
    just below it, inside its bottom-left corner, the same four on the right, then beside its top corners.
    The first wins that covers no tag already placed, stays in the image and overlaps the fewest other
    boxes (one that encloses this box does not count: a head's tag may sit in the person's box). The tag is
    anchored to the box's corner, so it touches the box whatever the figure's final scale."""
    x1, y1, x2, y2 = box
    spots = []
    for x, ha, tx in ((x1, "left", x1), (x2, "right", x2 - w)):
        for y, va, ty in ((y1, "top", y1), (y1, "bottom", y1 - h), (y2, "top", y2), (y2, "bottom", y2 - h)):
            spots.append(((x, y), ha, va, (tx, ty, tx + w, ty + h)))
    spots += [((x1, y1), "right", "top", (x1 - w, y1, x1, y1 + h)), ((x2, y1), "left", "top", (x2, y1, x2 + w, y1 + h))]

    def overlap(a, b):
        return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))

    def cost(k):
        r = spots[k][3]
        hits = sum(overlap(r, p) for p in placed)
        out = r[0] < 0 or r[1] < 0 or r[2] > W or r[3] > H
        crossed = sum(overlap(r, o) > 0 for o in others
                      if not (o[0] <= x1 and o[1] <= y1 and o[2] >= x2 and o[3] >= y2))
        return hits > 0, out, crossed, hits, k

    return spots[min(range(len(spots)), key=cost)]


def draw_scene(ax, image, boxes, labels, shown, names):
    """The image with the boxes `shown`, each in its own colour with an 'index:class' tag that touches it
    (tag_spot: inside its top-left corner where that is free, else on another corner, above or below it)."""
    ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
    ax.set(xticks=[], yticks=[])
    H, W = image.shape[1:]
    renderer = ax.figure.canvas.get_renderer()
    (ox, oy), (ex, ey) = ax.transData.transform([(0, 0), (1, 1)])
    sx, sy = abs(ex - ox), abs(ey - oy)    # screen pixels per image pixel, to size the tags in image pixels
    pad = 2 * 1 * ax.figure.dpi / 72      # the tag's bbox pad (1 pt), both sides, in screen pixels
    rects = {i: [float(v) for v in boxes[i]] for i in shown}
    placed = []
    for i in shown:
        x1, y1, x2, y2 = rects[i]
        c = BOX_COLOURS[i % len(BOX_COLOURS)]
        ax.add_patch(_plt().Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color=c, lw=2))
        t = ax.text(x1, y1, f"{i}:{names[int(labels[i])]}", color="white", fontsize=9,
                    bbox=dict(facecolor=c, alpha=0.8, pad=1, lw=0))
        e = t.get_window_extent(renderer)
        xy, ha, va, rect = tag_spot(rects[i], (e.width + pad) / sx, (e.height + pad) / sy, W, H, placed,
                                    [r for j, r in rects.items() if j != i])
        t.set(position=xy, ha=ha, va=va)
        placed.append(rect)


def triplet_lines(triplets, labels, names, predicates):
    """'3:man riding 1:horse  0.43' per triplet (score with two significant digits, or none for GT)."""
    return [f"{s}:{names[int(labels[s])]}  {predicates[p]}  {o}:{names[int(labels[o])]}"
            + (f"   {sc:.2g}" if sc is not None else "") for s, o, p, sc in triplets]


def found(triplets, pred, gt):
    """Per (subject, object, predicate, score) triplet of pred: whether the evaluator counts it as found, i.e. a
    ground-truth relation with that predicate whose subject and object each match a box of the triplet with the
    same class and IoU >= 0.5 (metrics.SGEvaluator; in PredCls and SGCls the boxes are the ground truth's)."""
    iou = metrics.box_iou_inclusive(pred["boxes"].numpy().astype(np.float64), gt["boxes"].numpy().astype(np.float64))
    hit = (iou >= 0.5) & (pred["labels"].numpy()[:, None] == gt["labels"].numpy()[None, :])   # (N, G)
    rels = gt["relations"].tolist()
    return [any(p == gp and hit[s, gs] and hit[o, go] for gs, go, gp in rels) for s, o, p, _ in triplets]


def plot_examples(examples, test_ds, mode, path, k=5):
    """Like the paper's Figure 3: ground truth (left) and the top-k predicted triplets (right), each marked
    '+' where the evaluator counts it as found, '-' where not (as sgtr_align.py marks them). In PredCls and
    SGCls both panels show the same (ground-truth) boxes with the same indices and colours."""
    plt = _plt()
    fig, axes = plt.subplots(len(examples), 2, figsize=(10, 6.2 * len(examples)), squeeze=False)
    for row, (idx, pred) in enumerate(examples):
        image, gt = test_ds[idx]
        gt_trip = [(int(s), int(o), int(p), None) for s, o, p in gt["relations"][:k]]
        pred_trip = top_triplets(pred, k)
        boxes_right = pred["boxes"] if mode == "sgdet" else gt["boxes"]
        used_gt = sorted({i for s, o, _, _ in gt_trip for i in (s, o)})
        used_pred = sorted({i for s, o, _, _ in pred_trip for i in (s, o)})
        same = range(len(gt["boxes"])) if mode != "sgdet" else None
        draw_scene(axes[row, 0], image, gt["boxes"], gt["labels"], same or used_gt, test_ds.idx_to_label)
        draw_scene(axes[row, 1], image, boxes_right, pred["labels"], same or used_pred, test_ds.idx_to_label)
        axes[row, 0].set_title(f"test image {gt['image_id']}: ground truth (first {k})", fontsize=11)
        axes[row, 1].set_title(f"predicted top-{k} ({mode}; score = predicate x subject x object)\n"
                               f"'+': the evaluator counts it as found", fontsize=11)
        names, predicates = test_ds.idx_to_label, test_ds.idx_to_predicate
        axes[row, 0].set_xlabel("\n".join(triplet_lines(gt_trip, gt["labels"], names, predicates)), fontsize=10,
                                loc="left")
        marks = ["+ " if ok else "- " for ok in found(pred_trip, pred, gt)]
        axes[row, 1].set_xlabel("\n".join(m + line for m, line in zip(marks, triplet_lines(
            pred_trip, pred["labels"], names, predicates))), fontsize=10, loc="left")
    save_figure(fig, path)


def plot_photo(image, pred, triplets, names, predicates, title, path):
    """A user's photo at its own aspect ratio, filling the figure's width, with the triplets' boxes and the
    triplets listed below it."""
    plt = _plt()
    H, W = image.shape[1:]
    lines = triplet_lines(triplets, pred["labels"], names, predicates) or ["(no triplet)"]
    width = 8.0
    img_h, text_h = width * H / W, 0.3 + 0.22 * (len(lines) + 1)
    fig = plt.figure(figsize=(width, img_h + text_h))
    ax = fig.add_axes([0, text_h / (img_h + text_h), 1, img_h / (img_h + text_h)])
    used = sorted({i for s, o, _, _ in triplets for i in (s, o)})
    draw_scene(ax, image, pred["boxes"], pred["labels"], used, names)
    fig.text(0.01, text_h / (img_h + text_h) - 0.01, "\n".join([title] + lines), fontsize=10, va="top",
             family="monospace")
    save_figure(fig, path, tight=False)   # the axes are placed by hand


# ----------------------------------------------------------------------------------------------
# Inference on your own images: infer()

def box_json(box):
    """A box for the json file: the photo's pixels, to 0.1 (finer than the model sees: it ran on the resized photo)."""
    return [round(v, 1) for v in box.tolist()]


def strip_mirror(state_dict):
    """The mirror's head is only needed in training: drop it to get a plain Motifs state dict."""
    return {k: v for k, v in state_dict.items() if k.split(".")[0] not in ("mirror", "mirror_head")}


def infer(cfg):
    """Scene graphs of the user's images with a trained run's ckpt_best.pt; writes, per image,
    <out>/<name>_sg.png and <out>/<name>_sg.json (out defaults to <checkpoint folder>/infer)."""
    from PIL import Image
    photos, stems = [], set()
    for path in cfg.infer:   # every image is read before anything is written (as sgtr_align.py, same words)
        if not os.path.isfile(path):
            fail(f"--infer {path}: no such file")
        try:
            with Image.open(path) as im:
                photos.append((path, im.convert("RGB")))
        except OSError as e:
            fail(f"--infer {path}: not an image file ({e})")
        stem = os.path.splitext(os.path.basename(path))[0]
        if stem in stems:
            fail(f"two images named {stem}.*: their {stem}_sg.png would overwrite each other; rename one")
        stems.add(stem)
    ck = load_checkpoint(cfg.ckpt, "cpu")
    if not {"args", "vocab", "detector", "model"} <= set(ck):
        fail(f"--ckpt {cfg.ckpt} is not a ckpt_best.pt of motifs_align.py (use the run's "
             f"ckpt_best.pt: ckpt_last.pt holds no detector)")
    known = {f.name for f in dataclasses.fields(Config)}   # (older runs' args hold flags since moved to study.py)
    args = Config(**{**{k: v for k, v in ck["args"].items() if k in known}, "no_align": True})   # never the mirror
    names, predicates = ck["vocab"]["idx_to_label"], ck["vocab"]["idx_to_predicate"]
    C, P = len(names), len(predicates)
    device = torch.device("cuda" if cfg.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    detector = Detector(args, C).to(device).eval()
    detector.load_state_dict(ck["detector"])
    model = MotifsRelationModel(args, C, P, detector.backbone.out_channels, detector.stride,
                                torch.zeros(C, C, P)).to(device).eval()
    model.load_state_dict(strip_mirror(ck["model"]))
    given = {}
    if args.mode != "sgdet":
        if not cfg.boxes:
            fail(f"this checkpoint is {args.mode}: give the boxes with --boxes boxes.json")
        try:
            with open(cfg.boxes) as f:
                given = json.load(f)
        except (OSError, ValueError) as e:
            fail(f"--boxes {cfg.boxes}: {str(e).splitlines()[0]}")
    # Photos are resized so that their longest side is the training images' (the detector's anchors and the
    # model were trained at that scale), or --max-size when given; boxes go back to the photo's pixels.
    side = cfg.max_size or ck.get("image_side") or 0
    out_dir = cfg.out or os.path.join(os.path.dirname(os.path.abspath(cfg.ckpt)), "infer")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        fail(f"--out {out_dir} is a file; expected a folder for the pictures")
    os.makedirs(out_dir, exist_ok=True)
    for path, photo in photos:
        scale = side / max(photo.size) if side else 1.0
        img = photo.resize((max(1, round(photo.width * scale)), max(1, round(photo.height * scale))), Image.BILINEAR)
        image = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)   # (3, H, W)
        size = tuple(image.shape[1:])
        gt_boxes = gt_labels = None
        if args.mode != "sgdet":
            entry = given.get(os.path.basename(path))
            if entry is None or "boxes" not in entry:
                fail(f"--boxes {cfg.boxes} has no 'boxes' for {os.path.basename(path)}")
            if args.mode == "predcls" and "labels" not in entry:
                fail(f"predcls needs 'labels' for {os.path.basename(path)} in {cfg.boxes}")
            gt_boxes = [torch.tensor(entry["boxes"], dtype=torch.float32, device=device).view(-1, 4) * scale]
            try:
                labs = [names.index(x) if isinstance(x, str) else int(x)
                        for x in entry.get("labels", [1] * len(entry["boxes"]))]
            except ValueError as e:
                fail(f"--boxes {cfg.boxes}: unknown class ({e}); known: {', '.join(names[1:])}")
            gt_labels = [torch.tensor(labs, dtype=torch.long, device=device)]
        with torch.no_grad():
            s1 = stage1_outputs(detector, image[None].to(device), [size], args.mode, gt_boxes, gt_labels)
            pairs = [all_pairs(len(s1["boxes"][0]), device)]
            out = model(s1["fmap"], s1["boxes"], [size], s1["obj_feats"], s1["obj_dists"], pairs,
                        gt_labels[0] if gt_labels else None,
                        s1["det"][0]["boxes_per_cls"] if args.mode == "sgdet" else None)
        pred = {"boxes": s1["boxes"][0].cpu() / scale, "labels": out["obj_labels"].cpu(),
                "scores": out["obj_scores"].cpu(), "rel_pairs": pairs[0].cpu(),
                "rel_scores": out["rel_logits"].softmax(-1).cpu()}
        trip = top_triplets(pred, 10)
        stem = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0])
        with open(stem + "_sg.json", "w") as f:
            json.dump([{"subject": names[int(pred["labels"][s])], "subject_box": box_json(pred["boxes"][s]),
                        "predicate": predicates[p], "object": names[int(pred["labels"][o])],
                        "object_box": box_json(pred["boxes"][o]), "score": sc} for s, o, p, sc in trip], f, indent=1)
        shown = torch.from_numpy(np.asarray(photo, dtype=np.float32) / 255).permute(2, 0, 1)
        plot_photo(shown, pred, trip, names, predicates,
                   f"{os.path.basename(path)}: top {len(trip)} triplets ({args.mode}; score = predicate x subject x "
                   f"object)", stem + "_sg.png")
        print(f"{path}: {len(trip)} triplets -> {stem}_sg.png, {stem}_sg.json")


# ----------------------------------------------------------------------------------------------
# Plumbing: run folders, checkpoints, processes, logging

def setup_distributed(cfg):
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; gloo on CPU, NCCL on GPU. -> (rank, world, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if want_cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if want_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def barrier():
    if dist.is_initialized():
        dist.barrier()


class Log:
    """print + append to <out>/log.txt, on rank 0 only."""

    def __init__(self, path, rank):
        self.path, self.rank = path, rank

    def __call__(self, msg):
        if self.rank == 0:
            print(msg, flush=True)
            if self.path:
                with open(self.path, "a") as f:
                    f.write(msg + "\n")


def fmt_time(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# (when it ended, its CPU seconds) of each child process this one waited for: scenes.py, which generates the
# built-in data (data.ensure_synthetic runs it as a program), is one, and its CPU is not this process's
CHILD_CPU = []


def children_cpu():
    t = os.times()
    return t.children_user + t.children_system


def clock(start):
    """(wall, cpu) at a start -> 'wall 1m02s, CPU 1m01s' since then (CPU = this process, all threads, and the
    child processes that ended since then)."""
    cpu = time.process_time() - start[1] + sum(c for ended, c in CHILD_CPU if ended >= start[0])
    return f"wall {fmt_time(time.time() - start[0])}, CPU {fmt_time(cpu)}"


def cache_dir():
    return os.environ.get("SGG_ALIGN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sgg_align")


def load_datasets(cfg, rank):
    """-> (data root, the splits train, val, test, and 'statistics': the train split as the frequency
    bias counts it, see predicate_statistics)."""
    if cfg.data in data.BUILTIN:
        if rank == 0:          # generate once; the other ranks wait and then read the same files
            before = children_cpu()
            data.ensure_synthetic(name=cfg.data)
            CHILD_CPU.append((time.time(), children_cpu() - before))
        barrier()
        root, num_val = data.ensure_synthetic(name=cfg.data), data.BUILTIN[cfg.data]["num_val"]
    else:
        root, num_val = cfg.data, 5000   # the standard VG-SGG split: 5000 val images carved from train
        check_data_path(cfg)
    kw = dict(num_val_im=cfg.num_val_im or num_val, max_size=cfg.max_size or None)
    ds = {s: data.VGSGGDataset(root, s, **kw) for s in ("train", "val", "test")}
    # SGB's get_VG_statistics (and neural-motifs' get_counts) build the train split with
    # filter_duplicate_rels=False and the loader's default filter_non_overlap=True.
    ds["statistics"] = data.VGSGGDataset(root, "train", filter_duplicate_rels=False, filter_non_overlap=True, **kw)
    return root, ds


def first(ds, n):
    """The first n images of a dataset (n = 0: all)."""
    return torch.utils.data.Subset(ds, range(min(n, len(ds)))) if n else ds


def to_device(targets, device):
    return [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]


def save_atomic(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)   # a kill mid-write leaves the previous file intact


def load_checkpoint(path, device):
    """A checkpoint written by this script, or one line that says what the file is not."""
    if not os.path.isfile(path):
        fail(f"{path}: no such checkpoint file")
    with open(path, "rb") as f:
        head = f.read(8)
    # torch.save writes a zip archive ("PK\x03\x04"); torch before 1.6 wrote a pickle ("\x80" + protocol)
    if not head:
        fail(f"{path} is an empty file, not a checkpoint of motifs_align.py")
    if not head.startswith((b"PK\x03\x04", b"\x80")):
        fail(f"{path} is not a checkpoint of motifs_align.py: not a file written by torch.save "
             f"(it starts with {head!r})")
    try:
        ck = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:   # truncated, or objects that weights_only refuses: any failure here is the file's
        msg = (str(e).strip().splitlines() or [""])[0][:120]
        fail(f"{path} is not a checkpoint of motifs_align.py: a torch.save file that torch.load cannot read "
             f"({type(e).__name__}{': ' + msg if msg else ''})")
    if not isinstance(ck, dict):
        fail(f"{path} is not a checkpoint of motifs_align.py: it holds a {type(ck).__name__}, not a dict")
    return ck


# Settings that do not change a run's numbers; every other field must match for a folder to be resumed.
# (seeds, compare, bench_step: flags of earlier versions, now study.py's, still in older args.json files)
# ("machine" is args.json's record of the instruction set, torch and threads: see check_machine)
NOT_RESULT_FIELDS = {"out", "resume", "log_every", "num_workers", "infer", "ckpt", "boxes", "device",
                     "seeds", "compare", "bench_step", "machine"}


def existing_run(cfg, out_dir):
    """-> None if out_dir holds no run (it does not exist, or is an empty folder), else (the settings that
    differ from cfg's, whether it finished). Anything else there (a file, a folder of other things, an
    unreadable args.json) ends in one error line."""
    args_path = os.path.join(out_dir, "args.json")
    if not os.path.exists(args_path):
        if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
            fail(f"{out_dir} exists and is not a run folder (no args.json); pass --out NEW_FOLDER")
        return None
    try:
        with open(args_path) as f:
            old = json.load(f)
        assert isinstance(old, dict)
    except (OSError, ValueError, AssertionError):
        fail(f"{args_path} is not the JSON settings of a run; pass --out NEW_FOLDER")
    new = dataclasses.asdict(cfg)
    differ = sorted(k for k in set(old) | set(new) if k not in NOT_RESULT_FIELDS and old.get(k) != new.get(k))
    return differ, os.path.exists(os.path.join(out_dir, "metrics.json"))


def check_data_path(cfg):
    """--data names a built-in dataset or an existing folder: the cheapest check, made before the run folder's,
    so that a mistyped path is named as such (and not as a clash with an earlier run's settings)."""
    if cfg.data not in data.BUILTIN and not os.path.isdir(cfg.data):
        fail(f"--data {cfg.data}: no such folder (expected a folder with the VG-SGG files, "
             f"or --data {' / '.join(data.BUILTIN)})")


def claim_run_dir(cfg, out_dir):
    """Refuse, in one line, to write into a folder that holds another run, or a finished one. Called before
    anything is written (the data path alone is checked first), so a refused run leaves no trace."""
    check_data_path(cfg)
    found = existing_run(cfg, out_dir)
    if found is None:
        if cfg.resume:
            fail(f"--resume: {out_dir} holds no run (no args.json); start it without --resume")
        return
    differ, finished = found
    if differ:
        fail(f"{out_dir} holds a run with other settings (differs in: {', '.join(differ)}); "
             f"pass --out NEW_FOLDER")
    if cfg.resume:
        if not os.path.exists(os.path.join(out_dir, "ckpt_last.pt")):
            fail(f"--resume: {out_dir} has no ckpt_last.pt (the run stopped before its first checkpoint); "
                 f"pass --out NEW_FOLDER to start again")
    elif finished:
        fail(f"{out_dir} already holds a finished run with these settings; "
             f"pass --out NEW_FOLDER to run again")
    else:
        fail(f"{out_dir} holds an unfinished run with these settings; add --resume to "
             f"continue it, or pass --out NEW_FOLDER")


def machine():
    """What changes a run's exact numbers besides its settings (args.json records it): the CPU instruction set
    that torch uses (AVX2 unless SGG_ALIGN_ISA=native, see the top of the file), torch's version, its threads."""
    return {"isa": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def check_machine(out_dir, log):
    """--resume on another instruction set, torch or thread count: it runs, but says the numbers will differ."""
    with open(os.path.join(out_dir, "args.json")) as f:
        then = json.load(f).get("machine")
    if then and then != machine():
        log(f"note: {out_dir} was started with {then}, resumed with {machine()}: its numbers will not be "
            f"exactly those of an uninterrupted run")


def rng_states():
    """Every random stream a training step draws from (the masks of Eq. 1, pair sampling, ...)."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
            "python": random.getstate()}


def gather_rng_states(world):
    """-> a list of every rank's rng_states() (each rank has its own streams under DDP)."""
    if world == 1:
        return [rng_states()]
    parts = [None] * world
    dist.all_gather_object(parts, rng_states())
    return parts


def set_rng_states(states, rank):
    s = states[rank]
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    n = s["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    random.setstate(s["python"])


# ----------------------------------------------------------------------------------------------
# main

def main(argv=None):
    cfg = parse_config(argv)
    torch.set_num_threads(cfg.threads)
    if cfg.infer:
        infer(cfg)
        return
    rank, world, device = setup_distributed(cfg)
    try:
        train(cfg, cfg.out or run_name(cfg), rank, world, device)
    except FloatingPointError as e:
        print(f"stopping: {e}", file=sys.stderr)
        sys.exit(1)
    except data.DataError as e:   # the user's data files: one line that names the file, no traceback
        lines = str(e).strip().splitlines()   # from a DataLoader worker the message carries its traceback
        fail(lines[-1].split('DataError: ', 1)[-1])
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
