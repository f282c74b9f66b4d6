"""SGTR with self-supervised relation alignment: one-stage scene graph detection (SGDet), end to end.

What this is
    A readable re-implementation of SGTR (Li et al., "SGTR: End-to-end Scene Graph Generation with
    Transformer", CVPR 2022) and of the paper's self-supervised relation alignment on top of it
    ("Self-Supervised Relation Alignment for Scene Graph Generation", arXiv 2302.01403, sections
    3.1, 3.2, 4.1, 4.3 and supplementary section 7). Lines that implement the paper's method are
    marked `# PAPER:`, all in the first section; everything else is the SGTR model and the usual
    training plumbing.

    image -> CNN backbone -> transformer encoder ------------------> entity decoder -> entities
                                     |                                      | (features, boxes)
                                     +-> relation feature encoder --+       v
                                                                    +-> structural predicate decoder
                                                                        -> predicates with subject /
                                                                           object indicators
    graph assembling: each predicate's indicators are matched to the detected entities -> triplets.

    The alignment (training only): a mirrored structural predicate decoder that shares every weight
    with the original except untied class heads; its cross-attention matrices are randomly masked
    (each logit set to -inf with probability p, Eq. 1 as instantiated in section 3.2); its
    predicate / subject / object distributions at the last layer are pulled towards those of an
    extra dropout-free, gradient-free pass of the original decoder (Eq. 2); L = L_sup + lambda L_align
    (Eq. 3). At inference only the original model runs, so SGTR and Align-SGTR cost the same.

Read it top to bottom: the paper's method (masked_cross_attention, Mirror, alignment_loss,
train_step), the config, the model from its parts to the whole (boxes, attention blocks, the entity
detector, the structural predicate decoder, SGTR), matching and losses, graph assembling, training,
evaluation, pictures, inference on your own images, plumbing, main.

How to run
    python sgtr_align.py                      # aligned SGTR on the built-in synthetic data (CPU): the
                                              # entity detector pretrained (750 iterations, cached) and
                                              # 2000 iterations into runs/sgtr_align-sgdet-align-seed0
    python sgtr_align.py --resume             # continue that run after an interruption (same command
                                              # plus --resume; it ends exactly where it would have)
    python sgtr_align.py --no-align           # the SGTR baseline
    python sgtr_align.py --det-iters 50 --iters 50 --val-images 50 --out runs/quick   # a shorter run
    python sgtr_align.py --infer a.jpg b.png --ckpt runs/sgtr_align-sgdet-align-seed0/ckpt_best.pt
                                              # scene graphs of your own images: <ckpt folder>/infer/
    python sgtr_align.py --preset vg --data /path/to/vg   # SGTR's own VG config on Visual Genome (GPU)
    torchrun --nproc_per_node 2 sgtr_align.py # data parallel (gloo on CPU, nccl on GPU)
    Experiments (several seeds, baseline vs aligned, the step-time benchmark): see study.py.
    A run writes into its folder: args.json, log.txt, ckpt_last.pt (every --ckpt-every iterations),
    ckpt_best.pt (best validation mR@50), metrics.json (test metrics, best iteration, loss and
    validation history: the same command and seed repeat it exactly), timing.json, curves.png,
    per_predicate.png, examples.png. A folder holding another or a finished run is never overwritten.

Differences from SGTR (see also docs/sgtr.md)
    - The entity detector is pretrained here, on the training split, before SGTR trains (as SGTR
      starts from a DETR trained on the dataset), but from scratch: the backbone is a small CNN (no
      ImageNet ResNet-101: this project has no pretrained weights), and the entity decoder's queries
      start from the boxes of the most confident image tokens (query selection, as two-stage Deformable
      DETR and DINO) and are refined per layer (DAB-DETR style), rather than DETR's learned queries,
      because DETR converges too slowly for a CPU budget (300 pretraining iterations: 65% of the test
      boxes found at IoU >= 0.5 with selection, 26% with learned anchor boxes, --entity-queries
      anchors). The detector stays frozen while SGTR trains (SGTR's VG config freezes all of it but its
      input projection, queries and heads; --lr-detector / --lr-backbone > 0 fine-tune it).
    - The predicate node generator is SGTR's (query generation from the entities, predicate and entity
      indicator sub-decoders per layer, fusion, relation location, graph-assembling distance) except:
      post-norm layers (SGTR: pre-norm); the entity tokens carry an embedding of their boxes as keys in
      the indicators' cross-attention and in the query generator (SGTR: only the generator, with the
      box centre); one relation encoder layer by default (SGTR: 3); DETR's loss weights throughout
      (SGTR's VG config: smaller ones for the indicators and the relation location) and a matcher on the
      indicators' own outputs.
    - As in SGTR's VG config: the focal predicate head (P sigmoids) and SGTR's post-processing, whose
      list R@K counts with several predicates per pair, as SGTR's published numbers are counted
      (--pred-loss softmax --post-process ours: a softmax head, one predicate per pair).

Symbols used in the shape comments
    B images in a batch, H x W padded image size, h x w feature map, S = h * w image tokens,
    D model width, Hd attention heads, Qe entity queries, Qp predicate queries, G ground-truth
    boxes of one image, R ground-truth relations of one image, C object classes (+1 background),
    P predicate classes (+1 "no relation" in the scores; the focal head has P outputs), K entities kept per
    indicator, M relation pairs (or triplets, with SGTR's post-processing).
"""
import argparse
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
import time
from dataclasses import dataclass
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
from scipy.optimize import linear_sum_assignment

import data
import metrics
from kernels import masked_attention


# ----------------------------------------------------------------------------------------------
# The paper's method: the mirrored relation predictor and the alignment loss (paper sections 3.1, 3.2, 4.1, 4.3, 7, Eqs. 1-3)
#
# The original relation predictor is SGTR's structural predicate decoder (SGTR.forward_decoder, below):
# predicate, subject and object queries (B, Qp, D) attend to each other, cross-attend to the relation
# memory (image tokens) and to the entity decoder's outputs, layer by layer, and class heads read out the
# predicate distribution and the subject / object class distributions. The mirror is that decoder again,
# the same modules, on detached inputs, with randomly masked cross-attention, no dropout and untied class
# heads. Only train_step runs it.

def masked_cross_attention(q, k, v, key_padding_mask, mask_p, seed):
    """The mirror's cross-attention: q (B, Hd, Lq, Dh), k / v (B, Hd, Lk, Dh), key_padding_mask (B, Lk)
    -> (B, Hd, Lq, Dh). MultiheadAttention.forward calls it when given a seed: only the mirror does."""
    # PAPER: Eq. (1) as section 3.2 instantiates it for SGTR: not the decoder's inputs but each
    # element of the cross-attention matrix is set to -inf with probability p before the softmax.
    # The mask is a pure function of `seed` (kernels/masked_attention.py: a fused Triton kernel on
    # GPU, the same math in PyTorch on CPU).
    return masked_attention(q.contiguous(), k.contiguous(), v.contiguous(), mask_p, seed, key_padding_mask)


class Mirror(nn.Module):
    """The mirrored structural predicate decoder (sections 3.1, 3.2; supplementary Fig. 4).

    It owns only the untied class heads (none when tied) and the generator of its masks; the decoder
    it runs is the original's own (model.pred_decoder, pred_norms, sub_box, obj_box), called by
    reference, so every other weight is shared, not copied."""

    def __init__(self, cfg, num_classes, num_predicates):
        super().__init__()
        self.tied, self.mask_p, self.num_layers = cfg.tied_head, cfg.mask_p, cfg.pred_dec_layers
        if not self.tied:
            # PAPER: (sections 3.1.2, 3.2): untied projection heads for the mirror's relation, subject
            # and object distributions; --tied-head uses the original's (Table 3 "PH").
            self.pred_class = nn.Linear(cfg.d_model, predicate_outputs(cfg, num_predicates))  # (.., P + 1) or (.., P)
            self.sub_class = nn.Linear(cfg.d_model, num_classes)  # (.., C + 1)
            self.obj_class = nn.Linear(cfg.d_model, num_classes)  # (.., C + 1)
        # PAPER: (section 7): a fresh mask per cross-attention block, per layer and per step. The seeds
        # come from this generator (its state is saved in checkpoints), so that runs repeat.
        self.mask_rng = torch.Generator().manual_seed(cfg.seed)

    def draw_seeds(self):
        """One int seed per cross-attention block per layer: num_layers triples (relation, subject, object)."""
        n = self.num_layers * StructuralDecoderLayer.CROSS_BLOCKS
        s = torch.randint(0, 2 ** 31 - 1, (n,), generator=self.mask_rng).tolist()
        return [tuple(s[i:i + 3]) for i in range(0, n, 3)]

    def forward(self, model, inputs):
        """model: the SGTR whose decoder is mirrored; inputs: its decoder inputs (SGTR.forward) ->
        the mirror's predictions, one dict per layer (as SGTR.forward_decoder)."""
        # PAPER: (section 3.1): the decoder's inputs (relation/image features, entity features, the
        # entity-conditioned queries) enter the mirror with their gradient stopped, so that L_align
        # trains only the structural predicate decoder (and the untied heads).
        frozen = {k: v.detach() for k, v in inputs.items()}
        # PAPER: (section 7): masks drawn independently per cross-attention block, layer and step.
        seeds = self.draw_seeds()
        heads = (model.pred_class, model.sub_class, model.obj_class) if self.tied else \
            (self.pred_class, self.sub_class, self.obj_class)
        # PAPER: (section 4.1): no dropout at all in the mirror; masked cross-attention (Eq. 1).
        return model.forward_decoder(frozen, use_dropout=False, heads=heads, mask_p=self.mask_p, seeds=seeds)


def alignment_loss(target, mirror, kind, tg=None, cfg=None):
    """L_align from one decoder layer's predictions: `target` the original's, `mirror` the mirror's,
    each with pred_logits (B, Qp, P+1), or (B, Qp, P) with the focal predicate head, and sub_logits /
    obj_logits (B, Qp, C+1). kind: 'kl' (the paper) or 'supervised' (the ablation; it needs the targets
    tg). cfg: the run's Config (its loss weights, and which predicate head it has)."""
    if kind == "supervised":
        # PAPER: (section 4.3, Table 3 "SA"): the same supervised SGTR loss on the mirror instead of KL.
        return predicate_loss(mirror, tg, cfg)
    # PAPER: Eq. (2): KL(P_original || P_masked) for the predicate, subject and object distributions,
    # averaged over all predicate queries (no labels needed). P_original is the fixed target
    # (section 3.1.2), hence the detach.
    loss = 0.0
    for key in ("pred_logits", "sub_logits", "obj_logits"):
        if key == "pred_logits" and cfg is not None and cfg.pred_loss == "focal" and cfg.focal_kl == "bernoulli":
            # PAPER: Eq. (2) for the sigmoid predicate head (--pred-loss focal, SGTR's VG setting). The paper
            # says P is "the probability distribution over possible relationships", not what it is for a head
            # of P independent sigmoids. We take the distribution that head models, P independent Bernoullis,
            # whose KL is the sum of the per-predicate Bernoulli KLs (KL adds over independent factors). A
            # softmax over the P logits would ignore how sure a query is that there is any relation at all,
            # which is what ranks the triplets (sigmoid x entity scores). (--focal-kl softmax, that other reading,
            # is kept as a probe: docs/variance.md.)
            loss = loss + bernoulli_kl(target[key].detach(), mirror[key]).sum(-1).mean()
            continue
        log_q = F.log_softmax(mirror[key], -1)  # (B, Qp, P+1 or C+1)
        p = F.softmax(target[key].detach(), -1)
        # the KL summed over the classes, averaged over the B x Qp queries: motifs_align's
        # F.kl_div(log_q, log_p, log_target=True, reduction="batchmean") over its R pairs, spelled with
        # probabilities: equal up to float rounding (a test checks it); kept because the runs of results/ were
        # made with it, and a respelling changes their last bits, so they would no longer verify
        loss = loss + F.kl_div(log_q, p, reduction="none").sum(-1).mean()
    return loss


def bernoulli_kl(target_logits, logits):
    """KL(Bernoulli(sigmoid(target_logits)) || Bernoulli(sigmoid(logits))), elementwise, same shape out.
    log p = logsigmoid(z) and log(1 - p) = logsigmoid(-z) keep it finite for saturated logits."""
    p = target_logits.sigmoid()
    return (p * (F.logsigmoid(target_logits) - F.logsigmoid(logits))
            + (1 - p) * (F.logsigmoid(-target_logits) - F.logsigmoid(-logits)))


def train_step(model, images, targets, cfg):
    """The losses of one training batch -> dict(total, sup, align) of scalars; align is 0 for the
    baseline. model: an SGTR, or its DistributedDataParallel wrapper (called as such, so that DDP
    synchronises the gradients). images (B, 3, H, W) and targets as data.collate gives them."""
    net = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    ent_out, pred_out, inputs = model(images, pad_mask_for(images, targets))  # the original, dropout on
    tg = normalised_targets(targets, images.device)
    sup = supervised_loss(ent_out, pred_out, tg, cfg)  # L_original
    align = torch.zeros((), device=images.device)
    if net.mirror is not None:
        # PAPER: (section 3.1): the mirror runs only here, in training; evaluation and inference run
        # the original SGTR alone, so SGTR and Align-SGTR cost the same at test time.
        mirror = net.mirror(net, inputs)
        target = None
        if cfg.align_loss == "kl":
            # PAPER: (section 4.1): an extra pass of the original decoder WITHOUT dropout gives the
            # target distributions; no_grad: the target is fixed (section 3.1.2).
            with torch.no_grad():
                target = net.forward_decoder(inputs, use_dropout=False)[-1]
        # PAPER: (section 3.2): the alignment at the last decoder layer only.
        align = alignment_loss(target, mirror[-1], cfg.align_loss, tg, cfg)
    # PAPER: Eq. (3): L_final = L_original + lambda * L_align
    return dict(total=sup + cfg.align_weight * align, sup=sup, align=align)


# ----------------------------------------------------------------------------------------------
# Config: one dataclass that is also the command line (`--help` lists every field and default)

@dataclass
class Config:
    # run
    data: str = "synthetic"
    """built-in data, generated on first use: 'synthetic' (small) or 'vgshape' (VG150's shape); else a VG folder"""
    out: str = ""
    """run folder; default runs/sgtr_align-sgdet-<align|noalign>-seed<s>"""
    device: str = "auto"
    """'auto' (cuda if available), 'cpu' or 'cuda'"""
    seed: int = 0
    """random seed of this run: fixes the data order, the initial weights, dropout and the masks"""
    resume: bool = False
    """continue the run in --out from its ckpt_last.pt (same command plus --resume)"""
    preset: str = ""
    """named overrides: 'vg' = SGTR's own settings for Visual Genome"""
    threads: int = 1
    """torch CPU threads; 1 by default: extra threads spin against other jobs (the README's numbers are for 1)"""
    num_workers: int = 0
    """DataLoader workers (a resumed run repeats the uninterrupted one exactly only with 0)"""
    log_every: int = 50
    """iterations between progress lines"""
    eval_every: int = 300
    """iterations between validation runs (model selection)"""
    ckpt_every: int = 50
    """iterations between writes of ckpt_last.pt (also written at each validation)"""
    max_eval_images: int = 0
    """cap on the val and test images, for smoke runs (0 = all)"""
    num_val_im: int = 0
    """the val split's size, carved from train (0 = 500 synthetic, 1500 vgshape, 5000 VG); not --val-images"""
    # the other entry point
    infer: List[str] = dataclasses.field(default_factory=list)
    """image files: draw the scene graph that the model in --ckpt finds in each, then exit"""
    ckpt: str = ""
    """checkpoint for --infer (a ckpt_best.pt written by a training run)"""
    # the paper's alignment (sections 3.2 and 7)
    no_align: bool = False
    """train the SGTR baseline (no mirror, no alignment loss)"""
    mask_p: float = 0.1
    """p: probability that an attention logit is masked (Eq. 1)"""
    align_weight: float = 10.0
    """lambda in L = L_sup + lambda L_align (Eq. 3)"""
    align_loss: str = "kl"
    """'kl' (self-supervised, Eq. 2) or 'supervised' (Table 3 ablation)"""
    tied_head: bool = False
    """share the class heads with the mirror too (Table 3 'PH')"""
    # model sizes (defaults train on the synthetic data on a CPU; --preset vg has SGTR's)
    d_model: int = 128
    """D, transformer width"""
    nheads: int = 4
    """attention heads"""
    ffn_dim: int = 256
    """feed-forward hidden width"""
    dropout: float = 0.1
    """dropout in all transformer blocks (never in the mirror)"""
    backbone_width: int = 32
    """channels of the first CNN stage (doubled per stage)"""
    backbone_stride: int = 16
    """total stride of the CNN (16 -> an 8x8 map for 128 px images)"""
    enc_layers: int = 2
    """image transformer encoder layers"""
    ent_dec_layers: int = 3
    """entity decoder layers"""
    rel_enc_layers: int = 1
    """relation feature encoder layers"""
    pred_dec_layers: int = 3
    """structural predicate decoder layers"""
    num_ent_queries: int = 20
    """Qe"""
    num_pred_queries: int = 30
    """Qp"""
    entity_queries: str = "select"
    """first entity reference boxes: 'select' (the most confident tokens' boxes, as DINO) or 'anchors' (learned)"""
    max_size: int = 0
    """if > 0, resize images so the longest side is this (--infer: default the training images' longest side)"""
    # the entity detector, pretrained first (as SGTR starts from a DETR trained on the dataset)
    detector_ckpt: str = ""
    """a pretrained detector file (written by this script into its cache) to start from instead of the cached one"""
    det_iters: int = 750
    """detector pretraining iterations (entity losses only); cached by its settings, shared by every run"""
    det_batch: int = 16
    """images per detector pretraining iteration"""
    det_lr: float = 4e-4
    """detector pretraining learning rate (warm-up, then x0.1 at --lr-drop)"""
    det_seed: int = 0
    """detector seed (initial weights, data order, dropout): fixed, so every SGTR run starts from one detector"""
    # graph assembling
    ent_topk: int = 3
    """K entities considered per subject / object indicator"""
    # optimisation (AdamW as in DETR / SGTR)
    iters: int = 2000
    """training iterations (the synthetic data's validation mR@50 stops rising by 1,500: docs/variance.md)"""
    batch_size: int = 16
    """images per iteration (per process)"""
    eval_batch: int = 32
    """images per evaluation batch"""
    lr: float = 4e-4
    """learning rate of the parts the detector does not have (relation encoder, predicate node generator)"""
    lr_detector: float = 0.0
    """learning rate of the pretrained detector's transformer and heads (0 with --lr-backbone 0: frozen)"""
    lr_backbone: float = 0.0
    """learning rate of the pretrained CNN (DETR fine-tuning: 1e-5)"""
    feature_cache_gb: float = 4.0
    """keep the frozen detector's outputs per image in memory if they fit in this many GB (0: rerun it every step)"""
    weight_decay: float = 1e-4
    """AdamW weight decay"""
    warmup_iters: int = 200
    """linear warm-up iterations"""
    lr_drop: float = 0.8
    """lr x 0.1 after this fraction of iters (DETR's step schedule)"""
    grad_clip: float = 0.1
    """max gradient norm (DETR's 0.1)"""
    val_images: int = 300
    """val images each validation evaluates, for model selection (0 = all); the split's size: --num-val-im"""
    # loss weights (DETR: class 1, L1 5, GIoU 2, background weight 0.1)
    w_cls: float = 1.0
    """entity / predicate / indicator class losses"""
    w_l1: float = 5.0
    """box L1 loss"""
    w_giou: float = 2.0
    """box GIoU loss"""
    eos_coef: float = 0.1
    """weight of the background / no-relation class"""
    pred_loss: str = "focal"
    """predicate classifier: 'focal' (P sigmoids, SGTR's VG config) or 'softmax' (P+1 classes, 'no relation' weighted by eos_coef)"""
    focal_kl: str = "bernoulli"
    """Eq. 2's predicate term with the focal head: 'bernoulli' (the P Bernoullis' KL) or 'softmax' (a softmax over the P logits; a probe)"""
    post_process: str = "sgtr"
    """test-time triplets: 'sgtr' (SGTR's list, which its published R@K counts) or 'ours' (each query's K x K pairs, one predicate per pair)"""


PRESETS = {
    # SGTR's released Visual Genome config (playground/sgg/detr.res101.c5.one_stage_rel_tfmer/config_vg_sgtr.py),
    # a GPU run: d = 256, 6-layer DETR encoder and decoders, a 3-layer relation encoder, 100 entity and 180
    # predicate queries, 3 entities per indicator; the focal predicate head and SGTR's post-processing; AdamW
    # 8e-5 with 100 warm-up iterations, 24 images an iteration (6 per process on its 4 GPUs), 60k iterations
    # (the released checkpoint, about 25 epochs), x0.1 at 50k; its DETR frozen (it also trains DETR's input
    # projection and heads: docs/sgtr.md). The backbone here is our CNN from scratch (no torchvision /
    # ImageNet weights in this project): see README "differences".
    "vg": dict(d_model=256, nheads=8, ffn_dim=2048, backbone_width=64, backbone_stride=32,
               enc_layers=6, ent_dec_layers=6, rel_enc_layers=3, pred_dec_layers=6,
               num_ent_queries=100, num_pred_queries=180, max_size=800, ent_topk=3,
               pred_loss="focal", post_process="sgtr",
               batch_size=6, eval_batch=8, iters=60000, lr=8e-5, lr_detector=0.0, lr_backbone=0.0,
               det_iters=150000, det_batch=4, det_lr=1e-4,
               warmup_iters=100, lr_drop=50000 / 60000, eval_every=3000, ckpt_every=1000, val_images=1000,
               log_every=100, feature_cache_gb=0),
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
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    preset = given.get("preset", "")
    if preset and preset not in PRESETS:
        fail(f"unknown --preset {preset!r}; choose from {sorted(PRESETS)}")
    cfg = Config(**{**PRESETS.get(preset, {}), **given})
    check_config(cfg)
    return cfg


def check_config(cfg: Config):
    """Every flag's value, checked before anything runs (one error line for a bad one)."""
    positive = ("threads", "log_every", "eval_every", "ckpt_every", "d_model", "nheads", "ffn_dim",
                "backbone_width", "enc_layers", "ent_dec_layers", "pred_dec_layers", "num_ent_queries",
                "num_pred_queries", "ent_topk", "iters", "batch_size", "eval_batch", "det_iters", "det_batch")
    for name in positive:
        if getattr(cfg, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    for name in ("num_workers", "max_eval_images", "num_val_im", "max_size", "val_images", "rel_enc_layers",
                 "warmup_iters", "lr", "lr_detector", "lr_backbone", "det_lr", "weight_decay", "grad_clip",
                 "align_weight", "dropout", "eos_coef", "feature_cache_gb"):
        if getattr(cfg, name) < 0:
            fail(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(cfg, name)}")
    if cfg.device not in ("auto", "cpu", "cuda"):
        fail(f"--device must be auto, cpu or cuda, not {cfg.device!r}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: this machine has no CUDA device (use --device cpu)")
    if cfg.entity_queries not in ("select", "anchors"):
        fail(f"--entity-queries must be select or anchors, not {cfg.entity_queries!r}")
    if cfg.post_process not in ("ours", "sgtr"):
        fail(f"--post-process must be ours or sgtr, not {cfg.post_process!r}")
    if cfg.pred_loss not in ("softmax", "focal"):
        fail(f"--pred-loss must be softmax or focal, not {cfg.pred_loss!r}")
    if cfg.focal_kl not in ("bernoulli", "softmax"):
        fail(f"--focal-kl must be bernoulli or softmax, not {cfg.focal_kl!r}")
    if cfg.align_loss not in ("kl", "supervised"):
        fail(f"--align-loss must be kl or supervised, not {cfg.align_loss!r}")
    if not 0.0 <= cfg.mask_p < 1.0:
        fail(f"--mask-p must be in [0, 1), got {cfg.mask_p}")
    if not 0.0 <= cfg.dropout < 1.0:
        fail(f"--dropout must be in [0, 1), got {cfg.dropout}")
    if not 0.0 <= cfg.lr_drop <= 1.0:
        fail(f"--lr-drop must be in [0, 1], got {cfg.lr_drop}")
    if cfg.d_model % 4:
        fail(f"--d-model must be a multiple of 4 (sine positions), got {cfg.d_model}")
    if cfg.d_model % cfg.nheads:
        fail(f"--d-model {cfg.d_model} must be divisible by --nheads {cfg.nheads}")
    if cfg.backbone_width % 8:
        fail(f"--backbone-width must be a multiple of 8 (GroupNorm with 8 groups), got {cfg.backbone_width}")
    if cfg.backbone_stride < 2 or cfg.backbone_stride & (cfg.backbone_stride - 1):
        fail(f"--backbone-stride must be a power of 2, at least 2, got {cfg.backbone_stride}")
    if cfg.ckpt and not cfg.infer:
        fail("--ckpt is for --infer IMG [IMG ...]; to continue a training run use --out RUN --resume")
    if cfg.infer and not cfg.ckpt:
        fail("--infer needs --ckpt PATH (a ckpt_best.pt written by a training run)")


# ----------------------------------------------------------------------------------------------
# Boxes (normalised cxcywh inside the model, as DETR; pixel xyxy at the evaluator)

def box_cxcywh_to_xyxy(b):
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1)


def box_xyxy_to_cxcywh(b):
    x0, y0, x1, y1 = b.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], -1)


def box_iou(a, b):
    """a (N, 4), b (M, 4) xyxy -> IoU (N, M) and union (N, M). Continuous coordinates (no +1)."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt = torch.max(a[:, None, :2], b[None, :, :2])  # (N, M, 2)
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])  # (N, M, 2)
    inter = (rb - lt).clamp(min=0).prod(-1)  # (N, M)
    union = area_a[:, None] + area_b[None, :] - inter
    return inter / union.clamp(min=1e-7), union


def generalized_box_iou(a, b):
    """GIoU (Rezatofighi et al. 2019) between a (N, 4) and b (M, 4) xyxy -> (N, M) in [-1, 1]."""
    iou, union = box_iou(a, b)
    lt = torch.min(a[:, None, :2], b[None, :, :2])
    rb = torch.max(a[:, None, 2:], b[None, :, 2:])
    hull = (rb - lt).clamp(min=0).prod(-1)  # (N, M) smallest enclosing box
    return iou - (hull - union) / hull.clamp(min=1e-7)


# ----------------------------------------------------------------------------------------------
# Attention blocks: one attention function for the original model, the masked kernel for the mirror

def attention(q, k, v, key_padding_mask=None):
    """Plain scaled dot-product attention with exactly kernels.masked_attention's math at p = 0.

    q (B, Hd, Lq, Dh), k / v (B, Hd, Lk, Dh), key_padding_mask (B, Lk) True = padded. A row whose
    keys are all padded gives zeros (not NaN), as masked_attention does, so that the mirror at p = 0
    is the very same function as the original (tests/test_sgtr_method.py checks this).
    """
    logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, Hd, Lq, Lk)
    if key_padding_mask is None:
        return torch.softmax(logits, -1) @ v  # (B, Hd, Lq, Dh)
    attn = torch.softmax(logits.masked_fill(key_padding_mask[:, None, None, :], float("-inf")), -1)
    if key_padding_mask.all(-1).any():  # a fully padded row: softmax of all -inf is NaN -> zeros
        attn = attn.nan_to_num(0.0)
    return attn @ v  # (B, Hd, Lq, Dh)


class MultiheadAttention(nn.Module):
    """Multi-head attention with its own projections, so that both attention paths share weights."""

    def __init__(self, d, nheads):
        super().__init__()
        self.nheads = nheads
        self.q_proj, self.k_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.v_proj, self.o_proj = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, q, k, v, key_padding_mask=None, mask_p=0.0, seed=None):
        """q (B, Lq, D), k / v (B, Lk, D) -> (B, Lq, D). With a `seed`: the paper's masked attention."""
        B, Lq, D = q.shape
        Lk, Hd = k.shape[1], self.nheads
        q = self.q_proj(q).view(B, Lq, Hd, D // Hd).transpose(1, 2)  # (B, Hd, Lq, Dh)
        k = self.k_proj(k).view(B, Lk, Hd, D // Hd).transpose(1, 2)  # (B, Hd, Lk, Dh)
        v = self.v_proj(v).view(B, Lk, Hd, D // Hd).transpose(1, 2)  # (B, Hd, Lk, Dh)
        if seed is None:
            out = attention(q, k, v, key_padding_mask)  # (B, Hd, Lq, Dh)
        else:  # only the mirror passes a seed
            out = masked_cross_attention(q, k, v, key_padding_mask, mask_p, seed)  # (B, Hd, Lq, Dh)
        return self.o_proj(out.transpose(1, 2).reshape(B, Lq, D))


class FFN(nn.Module):
    def __init__(self, d, hidden, dropout):
        super().__init__()
        self.fc1, self.fc2, self.p = nn.Linear(d, hidden), nn.Linear(hidden, d), dropout

    def forward(self, x, use_dropout):
        return self.fc2(F.dropout(F.relu(self.fc1(x)), self.p, use_dropout))


class MLP(nn.Module):
    """DETR's box head: `layers` linear layers with ReLU in between."""

    def __init__(self, d_in, d_hidden, d_out, layers):
        super().__init__()
        dims = [d_in] + [d_hidden] * (layers - 1) + [d_out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


# ----------------------------------------------------------------------------------------------
# Entity detector (DETR): backbone, sine positions, encoder, entity decoder

class Backbone(nn.Module):
    """A small CNN trained from scratch (conv-GroupNorm-ReLU, stride 2 per stage).

    SGTR uses an ImageNet-pretrained ResNet-101; this project has no pretrained weights, and on the
    synthetic shapes a few stages suffice. GroupNorm rather than BatchNorm: batches are small and
    zero-padded, and per-image statistics do not depend on the rest of the batch.
    """

    def __init__(self, width, stride):
        super().__init__()

        def block(cin, cout, s):
            return [nn.Conv2d(cin, cout, 3, s, 1, bias=False), nn.GroupNorm(8, cout), nn.ReLU(True)]

        layers, ch, s = block(3, width, 2), width, 2  # one conv at full resolution: the costly one
        while s < stride:
            layers += block(ch, 2 * ch, 2) + block(2 * ch, 2 * ch, 1)
            ch, s = 2 * ch, 2 * s
        self.body, self.out_channels = nn.Sequential(*layers), ch

    def forward(self, x):
        return self.body(x)  # (B, 3, H, W) -> (B, C', h, w)


def sine_position_embedding(pad_mask, d):
    """DETR's 2-D sine positions, normalised over each image's own (unpadded) extent.

    pad_mask (B, h, w) True = padding -> (B, S, D). Normalising by the valid extent tells the model
    where its image ends, which it needs to predict boxes relative to the image size.
    """
    not_mask = (~pad_mask).float()
    y = not_mask.cumsum(1)
    x = not_mask.cumsum(2)
    y = y / (y[:, -1:, :] + 1e-6) * 2 * math.pi
    x = x / (x[:, :, -1:] + 1e-6) * 2 * math.pi
    npf = d // 2
    dim_t = 10000 ** (2 * (torch.arange(npf, device=pad_mask.device) // 2) / npf)  # (D/2,)
    px, py = x[..., None] / dim_t, y[..., None] / dim_t  # (B, h, w, D/2)
    px = torch.stack([px[..., 0::2].sin(), px[..., 1::2].cos()], -1).flatten(3)
    py = torch.stack([py[..., 0::2].sin(), py[..., 1::2].cos()], -1).flatten(3)
    return torch.cat([py, px], -1).flatten(1, 2)  # (B, S, D)


def box_sine_embedding(boxes, d):
    """boxes (B, Q, 4) normalised cxcywh -> (B, Q, 2D): each coordinate as D/2 sines and cosines with
    the frequencies of the image positions, so that a query's box and the image tokens' positions live
    in comparable codes (DAB-DETR, Liu et al. 2022)."""
    npf = d // 2
    dim_t = 10000 ** (2 * (torch.arange(npf, device=boxes.device) // 2) / npf)  # (D/2,)
    x = boxes[..., [1, 0, 2, 3], None] * 2 * math.pi / dim_t  # (B, Q, 4, D/2), y first as in the image
    return torch.stack([x[..., 0::2].sin(), x[..., 1::2].cos()], -1).flatten(-3)  # (B, Q, 2D)


def inverse_sigmoid(x, eps=1e-5):
    x = x.clamp(eps, 1 - eps)
    return torch.log(x / (1 - x))


class EncoderLayer(nn.Module):
    """Post-norm transformer encoder layer (DETR): self-attention with positions on q and k, FFN."""

    def __init__(self, d, nheads, ffn, dropout):
        super().__init__()
        self.attn, self.ffn = MultiheadAttention(d, nheads), FFN(d, ffn, dropout)
        self.norm1, self.norm2, self.p = nn.LayerNorm(d), nn.LayerNorm(d), dropout

    def forward(self, x, pos, kpm):  # x, pos (B, S, D); kpm (B, S)
        drop = self.training
        x = self.norm1(x + F.dropout(self.attn(x + pos, x + pos, x, kpm), self.p, drop))
        return self.norm2(x + F.dropout(self.ffn(x, drop), self.p, drop))


class DecoderLayer(nn.Module):
    """Post-norm DETR decoder layer: self-attention among the queries, cross-attention to a memory, FFN.
    The entity decoder's layers, SGTR's predicate query generator and the three sub-decoders of each
    structural predicate decoder layer are all this layer (each with its own weights)."""

    def __init__(self, d, nheads, ffn, dropout):
        super().__init__()
        self.self_attn, self.cross_attn = MultiheadAttention(d, nheads), MultiheadAttention(d, nheads)
        self.ffn, self.p = FFN(d, ffn, dropout), dropout
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, t, qpos, mem, mpos, kpm, use_dropout, mask_p=0.0, seed=None):
        """t, qpos (B, Q, D) content and position of the queries; mem, mpos (B, L, D); kpm (B, L) or None
        -> (B, Q, D). With a seed (the mirror only), the cross-attention is the paper's masked one."""
        t = self.norm1(t + F.dropout(self.self_attn(t + qpos, t + qpos, t), self.p, use_dropout))
        attended = self.cross_attn(t + qpos, mem + mpos, mem, kpm, mask_p, seed)
        t = self.norm2(t + F.dropout(attended, self.p, use_dropout))
        return self.norm3(t + F.dropout(self.ffn(t, use_dropout), self.p, use_dropout))


# ----------------------------------------------------------------------------------------------
# Predicate node generator: the structural predicate decoder (the part the paper mirrors)

class StructuralDecoderLayer(nn.Module):
    """One layer of SGTR's structural predicate decoder (SGTR section 3.3, its predicate_node_generator.py).

    (a) predicate sub-decoder: a decoder layer over the predicate queries whose cross-attention reads
        the relation encoder's memory (image tokens);
    (b) entity indicator sub-decoders, one for the subject and one for the object indicators: a decoder
        layer each (self-attention among the indicators, cross-attention to the entity decoder's
        outputs, FFN), updated in the same layer as the predicate features;
    (c) fusion: the indicators are added into the predicate features, q_p + ReLU(W_s q_s + W_o q_o).
    The three cross-attention blocks are the ones the paper masks in the mirror (section 7, Fig. 4).
    """

    CROSS_BLOCKS = 3  # relation memory, subject indicator, object indicator

    def __init__(self, d, nheads, ffn, dropout):
        super().__init__()
        self.predicate = DecoderLayer(d, nheads, ffn, dropout)
        self.subject, self.object = DecoderLayer(d, nheads, ffn, dropout), DecoderLayer(d, nheads, ffn, dropout)
        self.fuse_sub, self.fuse_obj = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, qp, qs, qo, inputs, use_dropout, mask_p=0.0, seeds=(None, None, None)):
        """qp, qs, qo (B, Qp, D) predicate / subject / object features -> same; `inputs`: the decoder's
        inputs (SGTR.forward_decoder). The original: use_dropout = training, no seeds. The mirror:
        use_dropout False and one seed per cross-attention block (relation memory, subject, object)."""
        rel, rel_pos, rel_kpm = inputs["rel_mem"], inputs["rel_pos"], inputs["rel_kpm"]  # (B, S, D), (B, S)
        ent, ent_pos = inputs["ent_mem"], inputs["ent_pos"]  # (B, Qe, D)
        seed_rel, seed_sub, seed_obj = seeds
        # (a) predicate sub-decoder: self-attention, cross-attention to the relation memory, FFN
        qp = self.predicate(qp, inputs["pos_p"], rel, rel_pos, rel_kpm, use_dropout, mask_p, seed_rel)
        # (b) entity indicator sub-decoders: cross-attention to the entity decoder's outputs
        qs = self.subject(qs, inputs["pos_s"], ent, ent_pos, None, use_dropout, mask_p, seed_sub)
        qo = self.object(qo, inputs["pos_o"], ent, ent_pos, None, use_dropout, mask_p, seed_obj)
        # (c) fusion of the indicators into the predicate features (SGTR's ent_aug_rel_hs)
        qp = qp + F.relu(self.fuse_sub(qs) + self.fuse_obj(qo))  # (B, Qp, D)
        return qp, qs, qo


# ----------------------------------------------------------------------------------------------
# SGTR: the whole model, image -> entities and predicates, one set per decoder layer

def pad_mask_for(images, targets):
    """(B, H, W) True where collate() zero-padded the image (bottom / right)."""
    B, _, H, W = images.shape
    mask = torch.ones(B, H, W, dtype=torch.bool, device=images.device)
    for b, t in enumerate(targets):
        h, w = t["size"]
        mask[b, :h, :w] = False
    return mask


# The entity detector's modules (DETR: backbone, encoder, entity decoder, entity heads), pretrained alone
# on the entity losses (pretrain_detector) before SGTR trains, as SGTR starts from a trained DETR.
DETECTOR_MODULES = ("backbone", "input_proj", "encoder", "ent_anchor", "ent_qpos", "ent_decoder", "ent_norm",
                    "ent_class", "ent_box", "enc_class", "enc_box")
DETECTOR_PARTS = tuple(m + "." for m in DETECTOR_MODULES)


def predicate_outputs(cfg, num_predicates):
    """Outputs of the predicate class heads: P + 1 with the softmax loss (column 0 = "no relation"), P with
    the focal loss (SGTR's VG config: independent sigmoids, "no relation" is all of them low)."""
    return num_predicates - 1 if cfg.pred_loss == "focal" else num_predicates


def predicate_probs(logits, cfg):
    """Predicate logits (.., P + 1) or (.., P) -> scores (.., P + 1), column 0 "no relation", as the
    evaluator reads them: the softmax, or the P sigmoids after a column of zeros (SGTR's focal scoring)."""
    return F.pad(logits.sigmoid(), (1, 0)) if cfg.pred_loss == "focal" else logits.softmax(-1)


class SGTR(nn.Module):
    """SGTR for SGDet. With alignment, `self.mirror` is the mirrored structural predicate decoder
    (Mirror); only train_step runs it, on the decoder inputs that forward returns."""

    def __init__(self, cfg: Config, num_classes: int, num_predicates: int):
        super().__init__()
        d, h, f, p = cfg.d_model, cfg.nheads, cfg.ffn_dim, cfg.dropout
        self.cfg, self.C1, self.P1 = cfg, num_classes, num_predicates  # C + 1, P + 1
        self.register_buffer("pixel_mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        # entity detector (DETR)
        self.backbone = Backbone(cfg.backbone_width, cfg.backbone_stride)
        self.input_proj = nn.Conv2d(self.backbone.out_channels, d, 1)
        self.encoder = nn.ModuleList(EncoderLayer(d, h, f, p) for _ in range(cfg.enc_layers))
        # Entity queries are learned anchor boxes refined layer by layer (DAB-DETR / Deformable DETR's
        # iterative refinement) instead of DETR's position-only queries: on the synthetic data after
        # 500 CPU iterations DETR's queries found 3% of the GT boxes (IoU >= 0.5), anchors 25%. The
        # idea (a set of queries, Hungarian matching) is unchanged. Anchors start spread uniformly
        # over the image with a 0.2 x 0.2 size.
        self.ent_anchor = nn.Embedding(cfg.num_ent_queries, 4)
        with torch.no_grad():
            self.ent_anchor.weight[:, :2].uniform_(0, 1)
            self.ent_anchor.weight[:, 2:].fill_(0.2)
            self.ent_anchor.weight.copy_(inverse_sigmoid(self.ent_anchor.weight))
        self.ent_qpos = MLP(2 * d, d, d, 2)  # anchor box -> query position
        self.ent_decoder = nn.ModuleList(DecoderLayer(d, h, f, p) for _ in range(cfg.ent_dec_layers))
        self.ent_norm = nn.LayerNorm(d)
        self.ent_class = nn.Linear(d, num_classes)  # (.., C + 1)
        self.ent_box = MLP(d, d, 4, 3)  # predicts a correction of the layer's reference box
        nn.init.zeros_(self.ent_box.layers[-1].weight)
        nn.init.zeros_(self.ent_box.layers[-1].bias)
        # Query selection (two-stage Deformable DETR / DINO): every image token predicts a class and a box
        # (a correction of its own cell); the Qe most confident boxes become the decoder's first reference
        # boxes, in place of the learned anchors.
        self.enc_class = nn.Linear(d, num_classes)  # (.., C + 1)
        self.enc_box = MLP(d, d, 4, 3)
        nn.init.zeros_(self.enc_box.layers[-1].weight)
        nn.init.zeros_(self.enc_box.layers[-1].bias)
        # predicate node generator: relation feature encoder, predicate queries made from the entities
        self.rel_encoder = nn.ModuleList(EncoderLayer(d, h, f, p) for _ in range(cfg.rel_enc_layers))
        self.pred_query = nn.Embedding(cfg.num_pred_queries, 3 * d)  # positions: predicate | subject | object
        self.ent_box_embed = MLP(4, d, d, 2)  # entity boxes as positions of the entity tokens
        self.query_gen = DecoderLayer(d, h, f, p)  # SGTR's dynamic query generation (rel_q_gen) ...
        self.query_split = nn.Linear(d, 3 * d)  # ... and split_query: ReLU, then predicate | subject | object
        # the structural predicate decoder and its heads (applied at every layer)
        self.pred_decoder = nn.ModuleList(StructuralDecoderLayer(d, h, f, p) for _ in range(cfg.pred_dec_layers))
        self.pred_norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(3))
        self.pred_class = nn.Linear(d, predicate_outputs(cfg, num_predicates))  # (.., P + 1) or (.., P)
        self.rel_vec = MLP(d, d, 4, 3)  # the relation location: subject and object centres (SGTR's rel_vector)
        self.sub_class, self.obj_class = nn.Linear(d, num_classes), nn.Linear(d, num_classes)
        self.sub_box, self.obj_box = MLP(d, d, 4, 3), MLP(d, d, 4, 3)
        # Created last, after every module of the original (the untied heads were always created here):
        # the original's initial weights do not depend on --no-align, and the parameter order is fixed.
        self.mirror = None if cfg.no_align else Mirror(cfg, num_classes, num_predicates)
        self.detector_frozen = False  # freeze_detector()
        self.feature_cache = None  # a FeatureCache once the detector is frozen (train)

    # -- the image and entity part -------------------------------------------------------------
    def detector_parameters(self):
        """(name, parameter) of the entity detector: what pretrain_detector trains and caches."""
        return [(n, p) for n, p in self.named_parameters() if n.startswith(DETECTOR_PARTS)]

    def freeze_detector(self):
        """A frozen pretrained detector: no gradients, always in eval mode (no dropout), run without
        autograd in encode_and_detect, so a training step costs its forward pass only."""
        self.detector_frozen = True
        for _, p in self.detector_parameters():
            p.requires_grad_(False)
        self.train(self.training)

    def train(self, mode=True):
        super().train(mode)
        if self.detector_frozen:
            for name in DETECTOR_MODULES:
                getattr(self, name).eval()
        return self

    def detect(self, images, pad_mask):
        """The DETR entity detector: images (B, 3, H, W) in [0, 1], pad_mask (B, H, W) -> (ent_out, one
        dict per entity-decoder layer; src (B, S, D) the encoder's output; pos (B, S, D); kpm (B, S))."""
        x = self.backbone((images - self.pixel_mean) / self.pixel_std)  # (B, C', h, w)
        kpm = F.interpolate(pad_mask[:, None].float(), size=x.shape[-2:])[:, 0].bool()  # (B, h, w)
        pos = sine_position_embedding(kpm, self.cfg.d_model)  # (B, S, D)
        src = self.input_proj(x).flatten(2).transpose(1, 2)  # (B, S, D)
        kpm = kpm.flatten(1)  # (B, S)
        for layer in self.encoder:
            src = layer(src, pos, kpm)
        B, Qe = images.shape[0], self.cfg.num_ent_queries
        ref = self.ent_anchor.weight.sigmoid()[None].expand(B, -1, -1)  # (B, Qe, 4) cxcywh
        ent_out = []
        if self.cfg.entity_queries == "select":
            enc = self.token_proposals(src, kpm.view(B, *x.shape[-2:]))  # logits (B, S, C+1), boxes (B, S, 4)
            ent_out.append(enc)  # its own loss (entity_loss), as an auxiliary output
            score = enc["logits"][..., 1:].max(-1).values.masked_fill(kpm, float("-inf"))  # (B, S)
            k = min(Qe, score.shape[1])
            top = score.topk(k, dim=1)  # the k most confident tokens of each image
            picked = enc["boxes"].gather(1, top.indices[..., None].expand(-1, -1, 4)).detach()  # (B, k, 4)
            valid = torch.isfinite(top.values)[..., None]  # (B, k, 1) False for padding tokens
            ref = torch.cat([torch.where(valid, picked, ref[:, :k]), ref[:, k:]], 1)  # (B, Qe, 4)
        t = src.new_zeros(B, Qe, self.cfg.d_model)  # (B, Qe, D) content
        for layer in self.ent_decoder:
            qpos = self.ent_qpos(box_sine_embedding(ref, self.cfg.d_model))  # (B, Qe, D)
            t = layer(t, qpos, src, pos, kpm, self.training)
            e = self.ent_norm(t)  # (B, Qe, D)
            boxes = (inverse_sigmoid(ref) + self.ent_box(e)).sigmoid()  # (B, Qe, 4) refined
            ent_out.append(dict(logits=self.ent_class(e), boxes=boxes, feats=e))  # per layer: aux losses
            ref = boxes.detach()  # the next layer refines this box (no gradient through the reference)
        return ent_out, src, pos, kpm

    def token_proposals(self, src, kpm):
        """Query selection's proposals: src (B, S, D) encoder output, kpm (B, h, w) padding -> dict(logits
        (B, S, C+1), boxes (B, S, 4) normalised cxcywh): each token corrects a box centred on its cell (in
        the image's own, unpadded extent) whose side is two cells."""
        B, h, w = kpm.shape
        valid_h = (~kpm[:, :, 0]).sum(1).clamp(min=1).float()  # (B,) rows of the image itself
        valid_w = (~kpm[:, 0, :]).sum(1).clamp(min=1).float()  # (B,)
        ys = (torch.arange(h, device=src.device).float() + 0.5)[None, :, None] / valid_h[:, None, None]
        xs = (torch.arange(w, device=src.device).float() + 0.5)[None, None, :] / valid_w[:, None, None]
        cells = torch.stack([xs.expand(B, h, w), ys.expand(B, h, w), (2 / valid_w)[:, None, None].expand(B, h, w),
                             (2 / valid_h)[:, None, None].expand(B, h, w)], -1).flatten(1, 2)  # (B, S, 4)
        boxes = (inverse_sigmoid(cells.clamp(max=1.0)) + self.enc_box(src)).sigmoid()
        return dict(logits=self.enc_class(src), boxes=boxes)

    def encode_and_detect(self, images, pad_mask):
        """images (B, 3, H, W) in [0, 1], pad_mask (B, H, W) -> entity outputs and decoder inputs."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.detector_frozen):
            if self.feature_cache is not None:  # each image's detector outputs computed once (FeatureCache)
                ent_out, src, pos, kpm = self.feature_cache(self, images, pad_mask)
            else:
                ent_out, src, pos, kpm = self.detect(images, pad_mask)
        B = images.shape[0]
        rel = src
        for layer in self.rel_encoder:
            rel = layer(rel, pos, kpm)  # (B, S, D) image features refined for relations
        ent_mem = ent_out[-1]["feats"]  # (B, Qe, D)
        ent_pos = self.ent_box_embed(ent_out[-1]["boxes"].detach())  # (B, Qe, D)
        pos_p, pos_s, pos_o = self.pred_query.weight[None].expand(B, -1, -1).chunk(3, -1)  # 3 x (B, Qp, D)
        # SGTR's predicate query initialisation: learned queries read the entity decoder's output (one
        # decoder layer), and the result is split into the initial predicate, subject and object features.
        q = self.query_gen(pos_p, torch.zeros_like(pos_p), ent_mem + ent_pos, torch.zeros_like(ent_mem), None,
                           self.training)  # (B, Qp, D)
        qp, qs, qo = self.query_split(F.relu(q)).chunk(3, -1)  # 3 x (B, Qp, D)
        inputs = dict(rel_mem=rel, rel_pos=pos, rel_kpm=kpm, ent_mem=ent_mem, ent_pos=ent_pos,
                      qp=qp, qs=qs, qo=qo, pos_p=pos_p, pos_s=pos_s, pos_o=pos_o)
        return ent_out, inputs

    # -- the structural predicate decoder, run by the original and by the mirror ---------------------
    def forward_decoder(self, inputs, use_dropout, heads=None, mask_p=0.0, seeds=None):
        """Run the structural predicate decoder; returns one dict of predictions per layer.

        inputs: rel_mem (B, S, D), rel_pos (B, S, D), rel_kpm (B, S), ent_mem / ent_pos (B, Qe, D), the
        initial features qp / qs / qo and the learned positions pos_p / pos_s / pos_o (B, Qp, D).
        heads: the (predicate, subject, object) class heads, the original's if None. seeds: None (the
        original) or one triple of ints per layer (the mirror).
        """
        qp, qs, qo = inputs["qp"], inputs["qs"], inputs["qo"]
        pred_class, sub_class, obj_class = heads or (self.pred_class, self.sub_class, self.obj_class)
        outs = []
        for i, layer in enumerate(self.pred_decoder):
            layer_seeds = seeds[i] if seeds is not None else (None, None, None)
            qp, qs, qo = layer(qp, qs, qo, inputs, use_dropout, mask_p, layer_seeds)
            hp, hs, ho = (norm(x) for norm, x in zip(self.pred_norms, (qp, qs, qo)))  # (B, Qp, D)
            outs.append(dict(pred_logits=pred_class(hp), rel_vec=self.rel_vec(hp).sigmoid(),
                             sub_logits=sub_class(hs), obj_logits=obj_class(ho),
                             sub_boxes=self.sub_box(hs).sigmoid(), obj_boxes=self.obj_box(ho).sigmoid()))
        return outs

    def forward(self, images, pad_mask):
        """images (B, 3, H, W) in [0, 1], pad_mask (B, H, W) -> (ent_out, pred_out, inputs): the entity
        and the predicate predictions, one dict per decoder layer (the last one is the output, the
        others feed the auxiliary losses), and the predicate decoder's inputs (for the mirror)."""
        ent_out, inputs = self.encode_and_detect(images, pad_mask)
        pred_out = self.forward_decoder(inputs, use_dropout=self.training)
        return ent_out, pred_out, inputs


class FeatureCache:
    """The frozen detector, computed once per image (plumbing: not the paper's method; off when the detector is
    fine-tuned, as in --preset vg).

    Once pretrained and frozen, the detector's outputs for an image never change (the images are never
    augmented), yet computing them again at every step was a quarter or more of a training step. The first
    time an image is met (training, validation or test), what the relation side reads of it is kept in
    memory, keyed by its pixels: the encoder's image tokens and their positions, and the last entity-decoder
    layer's classes, boxes and features. Each image is computed alone, zero-padded to one fixed canvas (the
    largest image of the data, the most a batch is padded to), so that its outputs do not depend on which
    images share its batch: a run gives the same numbers whether an image was computed now or earlier (a
    resumed run starts with an empty cache and still ends as the uninterrupted one). Why padded at all: the
    detector was pretrained on zero-padded batches, and its GroupNorm statistics and border features expect
    the padding; computed without any, it found fewer boxes (300 test images: mAP@0.5 0.31, against 0.33 on
    the canvas and 0.34 in padded batches of 8). A batch's valid tokens are then padded at the end to its
    longest image, the padding masked (kpm): attention treats the tokens as a set with positions.
    Without the cache (--feature-cache-gb 0), the frozen entity decoder runs in the training step with its
    dropout on, as in earlier versions (SGTR.training is on, and detect passes it): kept so that the
    small-data study's runs still reproduce; a frozen detector should have no dropout, and here it has none."""

    def __init__(self, canvas):
        self.store, self.canvas = {}, canvas   # canvas: (H, W) every image is padded to (a larger one: its own)

    def __call__(self, model, images, pad_mask):
        outs = []
        for i in range(len(images)):
            h, w = int((~pad_mask[i]).any(1).sum()), int((~pad_mask[i]).any(0).sum())
            image = images[i:i + 1, :, :h, :w]                                  # (1, 3, h, w) the image alone
            key = hashlib.sha1(image.cpu().numpy().tobytes()).hexdigest()
            if key not in self.store:
                H, W = max(self.canvas[0], h), max(self.canvas[1], w)
                canvas = F.pad(image, (0, W - w, 0, H - h))                     # (1, 3, H, W) zero-padded
                mask = torch.ones(1, H, W, dtype=torch.bool, device=images.device)
                mask[0, :h, :w] = False
                training = model.training
                model.train(False)  # no dropout in a frozen detector
                try:
                    ent_out, src, pos, kpm = model.detect(canvas, mask)
                finally:
                    model.train(training)
                keep, last = ~kpm[0], ent_out[-1]                               # (S,) the image's own tokens
                self.store[key] = dict(src=src[0, keep], pos=pos[0, keep], logits=last["logits"][0],
                                       boxes=last["boxes"][0], feats=last["feats"][0])  # (S_i, D) x 2, (Qe, ..) x 3
            outs.append(self.store[key])
        S = max(len(o["src"]) for o in outs)
        src, pos = (torch.stack([F.pad(o[k], (0, 0, 0, S - len(o[k]))) for o in outs]) for k in ("src", "pos"))
        kpm = torch.stack([torch.arange(S, device=images.device) >= len(o["src"]) for o in outs])   # (B, S)
        ent = {k: torch.stack([o[k] for o in outs]) for k in ("logits", "boxes", "feats")}          # (B, Qe, ..)
        return [ent], src, pos, kpm   # as detect: the entity outputs (only the last layer), (B, S, D) x 2, (B, S)

    @staticmethod
    def sizes(datasets):
        """(H, W) of every image of these splits, without reading the images."""
        return [ds.get_groundtruth(i)["size"] for ds in datasets for i in range(len(ds))]

    @staticmethod
    def size_gb(cfg, sizes, num_classes):
        """The memory it would take for images of these sizes, in GB (float32): tokens and positions, entity
        outputs."""
        s, Qe, D = cfg.backbone_stride, cfg.num_ent_queries, cfg.d_model
        total = sum(2 * (-(-h // s)) * (-(-w // s)) * D + Qe * (num_classes + 4 + D) for h, w in sizes)
        return 4 * total / 1e9


def use_feature_cache(cfg, model, splits, log):
    """Give a frozen detector a FeatureCache when the splits' outputs fit in --feature-cache-gb (one line
    says which)."""
    if not model.detector_frozen:
        log("feature cache: off: the detector is fine-tuned (--lr-detector or --lr-backbone), it runs every step")
        return
    if cfg.feature_cache_gb <= 0:
        log("feature cache: off (--feature-cache-gb 0): the frozen detector runs again at every step")
        return
    sizes = FeatureCache.sizes(splits)
    need = FeatureCache.size_gb(cfg, sizes, model.C1)
    if need > cfg.feature_cache_gb:
        log(f"feature cache: off: the frozen detector's outputs would take {need:.1f} GB, more than "
            f"--feature-cache-gb {cfg.feature_cache_gb:g}; the detector runs again at every step")
        return
    model.feature_cache = FeatureCache(canvas=(max(h for h, _ in sizes), max(w for _, w in sizes)))
    log(f"feature cache: on: the frozen detector's outputs are computed once per image and kept in memory "
        f"(at most {need:.2f} GB; --feature-cache-gb 0 turns it off)")


# ----------------------------------------------------------------------------------------------
# Matching and losses (DETR's set prediction loss, SGTR's predicate version)

@torch.no_grad()
def hungarian_match(cost):
    """cost (Q, G) -> (query_idx, gt_idx), each (min(Q, G),) int64: a minimum-cost one-to-one match.

    No GT (G = 0): nothing matched; more GT than queries: Q of them are matched, the rest ignored.
    """
    if cost.shape[0] == 0 or cost.shape[1] == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty.clone()
    if not torch.isfinite(cost).all():
        raise ValueError("matching cost has NaN/inf entries (check the predicted boxes and logits)")
    qi, gi = linear_sum_assignment(cost.cpu().numpy())
    return torch.as_tensor(qi, dtype=torch.long), torch.as_tensor(gi, dtype=torch.long)


def normalised_targets(targets, device):
    """Pixel xyxy GT -> per-image normalised cxcywh boxes (DETR normalises by the unpadded size)."""
    out = []
    for t in targets:
        H, W = t["size"]
        scale = torch.tensor([W, H, W, H], dtype=torch.float32)
        out.append(dict(labels=t["labels"].to(device), rels=t["relations"].to(device),
                        boxes=box_xyxy_to_cxcywh(t["boxes"].float() / scale).to(device)))
    return out


def num_normaliser(n, device):
    """Average count of targets per process (DETR): the same loss scale on every DDP rank."""
    n = torch.tensor(float(n), device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(n)
        n = n / dist.get_world_size()
    return n.clamp(min=1.0)


def box_losses(pred, gt):
    """pred, gt (N, 4) normalised cxcywh -> (sum of L1, sum of 1 - GIoU)."""
    if len(gt) == 0:
        return pred.sum() * 0, pred.sum() * 0
    giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(gt)))
    return F.l1_loss(pred, gt, reduction="sum"), (1 - giou).sum()


def entity_loss(out, tg, cfg):
    """DETR loss of one entity-decoder layer. out: logits (B, Qe, C+1), boxes (B, Qe, 4)."""
    B, Qe, C1 = out["logits"].shape
    prob = out["logits"].softmax(-1)
    cls_target = torch.zeros(B, Qe, dtype=torch.long, device=prob.device)  # 0 = background
    pb, gb = [], []
    for b, t in enumerate(tg):
        cost = (-cfg.w_cls * prob[b][:, t["labels"]]
                + cfg.w_l1 * torch.cdist(out["boxes"][b], t["boxes"], p=1)
                - cfg.w_giou * generalized_box_iou(box_cxcywh_to_xyxy(out["boxes"][b]),
                                                   box_cxcywh_to_xyxy(t["boxes"])))  # (Qe, G)
        qi, gi = hungarian_match(cost)
        cls_target[b, qi] = t["labels"][gi]
        pb.append(out["boxes"][b, qi]), gb.append(t["boxes"][gi])
    weight = torch.ones(C1, device=prob.device)
    weight[0] = cfg.eos_coef  # DETR down-weights the many background queries
    n = num_normaliser(sum(len(t["labels"]) for t in tg), prob.device)
    l1, giou = box_losses(torch.cat(pb), torch.cat(gb))
    ce = F.cross_entropy(out["logits"].flatten(0, 1), cls_target.flatten(), weight)
    return cfg.w_cls * ce + cfg.w_l1 * l1 / n + cfg.w_giou * giou / n


def predicate_loss(out, tg, cfg):
    """SGTR loss of one structural-decoder layer: predicate class, relation location, indicator classes
    and boxes.

    Each GT relation (subject, object, predicate) is matched to one predicate query by the cost of its
    predicate class, its location (L1 between the predicted and the GT subject / object centres, SGTR's
    rel_vector), the subject / object classes and the subject / object boxes (SGTR's entity-aware matcher).
    """
    B, Qp, _ = out["pred_logits"].shape
    # The matching cost reads a distribution over the predicates, (B, Qp, P+1) with column 0 "no relation":
    # the softmax, also for the focal head (SGTR's matcher softmaxes its P sigmoid logits too; column 0 zero).
    pp = out["pred_logits"].softmax(-1)
    if cfg.pred_loss == "focal":
        pp = F.pad(pp, (1, 0))
    sp, op = out["sub_logits"].softmax(-1), out["obj_logits"].softmax(-1)
    pred_target = torch.zeros(B, Qp, dtype=torch.long, device=pp.device)  # 0 = no relation
    sl, ol, slt, olt, sb, ob, sbt, obt, rv, rvt = [], [], [], [], [], [], [], [], [], []
    for b, t in enumerate(tg):
        r = t["rels"]  # (R, 3)
        s_lab, o_lab = t["labels"][r[:, 0]], t["labels"][r[:, 1]]  # (R,)
        s_box, o_box = t["boxes"][r[:, 0]], t["boxes"][r[:, 1]]  # (R, 4)
        loc = torch.cat([s_box[:, :2], o_box[:, :2]], 1)  # (R, 4) subject and object centres
        xyxy = box_cxcywh_to_xyxy
        cost = (-cfg.w_cls * (pp[b][:, r[:, 2]] + sp[b][:, s_lab] + op[b][:, o_lab])
                + cfg.w_l1 * (torch.cdist(out["rel_vec"][b], loc, p=1)
                              + torch.cdist(out["sub_boxes"][b], s_box, p=1)
                              + torch.cdist(out["obj_boxes"][b], o_box, p=1))
                - cfg.w_giou * (generalized_box_iou(xyxy(out["sub_boxes"][b]), xyxy(s_box))
                                + generalized_box_iou(xyxy(out["obj_boxes"][b]), xyxy(o_box))))  # (Qp, R)
        qi, gi = hungarian_match(cost)
        pred_target[b, qi] = r[gi, 2]
        sl.append(out["sub_logits"][b, qi]), ol.append(out["obj_logits"][b, qi])
        slt.append(s_lab[gi]), olt.append(o_lab[gi])
        sb.append(out["sub_boxes"][b, qi]), ob.append(out["obj_boxes"][b, qi])
        sbt.append(s_box[gi]), obt.append(o_box[gi])
        rv.append(out["rel_vec"][b, qi]), rvt.append(loc[gi])
    n = num_normaliser(sum(len(t["rels"]) for t in tg), pp.device)
    if cfg.pred_loss == "focal":
        loss = cfg.w_cls * sigmoid_focal_loss(out["pred_logits"], pred_target, n)
    else:
        weight = torch.ones(pp.shape[-1], device=pp.device)
        weight[0] = cfg.eos_coef
        loss = cfg.w_cls * F.cross_entropy(out["pred_logits"].flatten(0, 1), pred_target.flatten(), weight)
    for logits, labels in ((sl, slt), (ol, olt)):
        loss = loss + cfg.w_cls * F.cross_entropy(torch.cat(logits), torch.cat(labels), reduction="sum") / n
    for pred, gt in ((sb, sbt), (ob, obt)):
        l1, giou = box_losses(torch.cat(pred), torch.cat(gt))
        loss = loss + cfg.w_l1 * l1 / n + cfg.w_giou * giou / n
    return loss + cfg.w_l1 * F.l1_loss(torch.cat(rv), torch.cat(rvt), reduction="sum") / n


def sigmoid_focal_loss(logits, target, n, alpha=0.25, gamma=2.0):
    """SGTR's predicate loss in its VG config (REL_DETR.FOCAL_LOSS, alpha 0.25, gamma 2): the focal loss of
    RetinaNet (Lin et al. 2017) on P independent sigmoids. logits (B, Qp, P); target (B, Qp) in 0..P, where
    0 (an unmatched query) is a row of P zeros; n the GT relation count. Normalised as SGTR's
    loss_labels_fl: the mean over the P classes, summed over the queries, / n, x Qp."""
    y = F.one_hot(target, logits.shape[-1] + 1)[..., 1:].to(logits.dtype)  # (B, Qp, P)
    p = logits.sigmoid()
    p_t = p * y + (1 - p) * (1 - y)  # the probability given to the true value of each output
    loss = F.binary_cross_entropy_with_logits(logits, y, reduction="none") * (1 - p_t) ** gamma
    loss = loss * (alpha * y + (1 - alpha) * (1 - y))  # (B, Qp, P)
    return loss.mean(-1).sum() / n * logits.shape[1]


def supervised_loss(ent_out, pred_out, tg, cfg):
    """The supervised SGTR loss (the paper's L_original): both decoders, auxiliary losses on every layer."""
    pred = sum(predicate_loss(o, tg, cfg) for o in pred_out)
    if not ent_out[-1]["logits"].requires_grad:  # a frozen detector: its losses would be constants
        return pred
    return sum(entity_loss(o, tg, cfg) for o in ent_out) + pred


# ----------------------------------------------------------------------------------------------
# Graph assembling: predicates + entities -> scored triplets (SGDet output)

def image_outputs(ent_out, pred_out, b, cfg):
    """The last decoder layers' predictions for image b of the batch, as assemble_graph reads them: the
    predicate logits become scores (Qp, P+1), column 0 "no relation" (predicate_probs)."""
    out = {k: v[b] for k, v in pred_out[-1].items()}
    out["pred_probs"] = predicate_probs(out.pop("pred_logits"), cfg)
    return dict(ent_logits=ent_out[-1]["logits"][b], ent_boxes=ent_out[-1]["boxes"][b], **out)


@torch.no_grad()
def assemble_graph(out, size, topk=3, max_pairs=100, post_process="ours", sigmoid=False):
    """One image's predictions -> the evaluator's dict (pixel boxes, labels, pairs, rel scores).

    out: ent logits (Qe, C+1) / boxes (Qe, 4); pred_probs (Qp, P+1); rel_vec (Qp, 4) the subject and
    object centres; sub/obj logits (Qp, C+1) and boxes (Qp, 4); boxes and centres normalised cxcywh.
    size: (H, W) of the image.
    SGTR's graph assembling (its rel_detr_inference.get_matching_scores_entities_aware): each subject /
    object indicator is matched to every detected entity by
        match = cos(class distributions)^0.6 x max(GIoU(boxes), 0) x 1 / (1 + L1 distance in pixels
                between the predicted centre and the entity's) x entity confidence^0.6,
    and its top-`topk` entities make topk^2 candidate pairs per predicate query.
    rel_scores = predicate probability x subject match x object match (SGTR's entity-indexing ranking
    option); the evaluator multiplies in the subject and object confidences. A pair found by several
    predicate queries keeps, per predicate class, its best score.
    post_process "sgtr": SGTR's own triplet list instead (sgtr_post_process; sigmoid: the focal head's scores).
    """
    H, W = size
    scale = torch.tensor([W, H, W, H], dtype=torch.float32, device=out["ent_boxes"].device)
    ent_prob = out["ent_logits"].softmax(-1)[:, 1:]  # (Qe, C) without background
    ent_score, ent_label = ent_prob.max(-1)  # (Qe,)
    ent_xyxy = box_cxcywh_to_xyxy(out["ent_boxes"])  # (Qe, 4)
    ent_centre = out["ent_boxes"][:, :2] * scale[:2]  # (Qe, 2) pixels
    pred_prob = out["pred_probs"]  # (Qp, P+1)
    Qp, Qe, P1 = pred_prob.shape[0], ent_prob.shape[0], pred_prob.shape[1]
    k = min(topk, Qe)
    picks = []
    for ind, centre in (("sub", out["rel_vec"][:, :2]), ("obj", out["rel_vec"][:, 2:])):
        cls = F.normalize(out[f"{ind}_logits"].softmax(-1)[:, 1:], dim=-1) @ F.normalize(ent_prob, dim=-1).T
        overlap = generalized_box_iou(box_cxcywh_to_xyxy(out[f"{ind}_boxes"]), ent_xyxy).clamp(min=0)
        near = 1 / (1 + torch.cdist(centre * scale[:2], ent_centre, p=1))  # (Qp, Qe)
        match = cls.clamp(min=0) ** 0.6 * overlap * near * ent_score[None] ** 0.6  # (Qp, Qe)
        val, idx = match.topk(k, dim=-1)  # (Qp, K) the best-fitting entities
        picks.append((val, idx))
    (s_val, s_idx), (o_val, o_idx) = picks
    if post_process == "sgtr":
        return sgtr_post_process(pred_prob, s_idx, o_idx, ent_xyxy * scale, ent_label + 1, ent_score, sigmoid)
    sub = s_idx[:, :, None].expand(Qp, k, k).flatten()  # (Qp*K*K,) entity index of the subject
    obj = o_idx[:, None, :].expand(Qp, k, k).flatten()
    pair_w = (s_val[:, :, None] * o_val[:, None, :]).flatten()  # (Qp*K*K,)
    scores = pred_prob.repeat_interleave(k * k, 0) * pair_w[:, None]  # (Qp*K*K, P+1)
    keep = sub != obj  # an entity is never related to itself
    sub, obj, scores = sub[keep], obj[keep], scores[keep]
    key = sub * Qe + obj  # one id per ordered pair
    uniq, inv = torch.unique(key, return_inverse=True)  # (M,)
    rel_scores = torch.zeros(len(uniq), P1, device=scores.device)
    rel_scores = rel_scores.scatter_reduce(0, inv[:, None].expand_as(scores), scores, "amax")  # (M, P+1)
    # the evaluator multiplies by the subject and object confidences (metrics.py), so they are not
    # in rel_scores; the pairs kept are the best by the evaluator's own triplet score.
    triplet = rel_scores[:, 1:].max(-1).values * ent_score[uniq // Qe] * ent_score[uniq % Qe]  # (M,)
    order = triplet.argsort(descending=True)[:max_pairs]
    uniq, rel_scores = uniq[order], rel_scores[order]
    return dict(boxes=(ent_xyxy * scale).cpu(), labels=(ent_label + 1).cpu(), scores=ent_score.cpu(),
                rel_pairs=torch.stack([uniq // Qe, uniq % Qe], 1).cpu(), rel_scores=rel_scores.cpu())


def sgtr_post_process(pred_prob, s_idx, o_idx, ent_boxes, ent_labels, ent_score, sigmoid, max_triplets=300):
    """SGTR's post-processing (rel_detr_inference.RelPostProcess with its VG config), whose list SGTR's published
    R@K and mR@K count -> the evaluator's dict with ONE ROW PER TRIPLET: rel_pairs may repeat a pair with another
    predicate, and each row of rel_scores has one non-zero predicate. The evaluator's R@K then counts the first K
    rows by score, several predicates per pair allowed, as SGTR's evaluator counts its list.

    pred_prob (Qp, P+1) column 0 "no relation"; s_idx / o_idx (Qp, K) each indicator's K best entities;
    ent_boxes (Qe, 4) pixels, ent_labels / ent_score (Qe,); sigmoid: the scores are the focal head's.
    1. with the focal head, the image's Qp best (query, predicate) scores, so a query gives 0, 1 or several
       predicates; with a softmax head, each query's best predicate (SGTR's two branches);
    2. each with its K best subjects and objects ZIPPED: the k-th subject with the k-th object (Qp x K triplets);
    3. an entity never with itself, nor with a box of IoU >= 0.95 (SGTR: GIoU of boxes it converts once too
       often; we take the IoU of the boxes themselves, here and in 5);
    4. ranked by predicate score x subject confidence x object confidence (no match scores: SGTR's VG config);
    5. a triplet is dropped if a better one has its predicate and its entities, or entities of its labels whose
       boxes both overlap its own at IoU > 0.8 (rel_prediction_filtering); at most max_triplets are kept."""
    Qp, P1 = pred_prob.shape
    K = s_idx.shape[1]
    if sigmoid:
        score, flat = pred_prob[:, 1:].flatten().topk(Qp)  # (Qp,) the best (query, predicate) entries
        query, pred = flat // (P1 - 1), flat % (P1 - 1) + 1  # (Qp,) each
    else:
        score, pred = pred_prob[:, 1:].max(-1)  # (Qp,) each query's best predicate
        query, pred = torch.arange(Qp, device=pred.device), pred + 1
    sub, obj = s_idx[query].flatten(), o_idx[query].flatten()  # (Qp*K,) zipped
    pred, score = pred.repeat_interleave(K), score.repeat_interleave(K)  # (Qp*K,)
    iou = box_iou(ent_boxes, ent_boxes)[0]  # (Qe, Qe)
    keep = (sub != obj) & (iou[sub, obj] < 0.95)
    sub, obj, pred, score = sub[keep], obj[keep], pred[keep], score[keep]
    order = (score * ent_score[sub] * ent_score[obj]).argsort(descending=True, stable=True)
    sub, obj, pred, score = sub[order], obj[order], pred[order], score[order]
    same = (sub[:, None] == sub[None]) & (obj[:, None] == obj[None])  # (T, T) the same entities ...
    alike = ((ent_labels[sub][:, None] == ent_labels[sub][None]) & (ent_labels[obj][:, None] == ent_labels[obj][None])
             & (iou[sub][:, sub] > 0.8) & (iou[obj][:, obj] > 0.8))  # ... or entities that look the same
    dup = (same | alike) & (pred[:, None] == pred[None])  # (T, T) triplet j repeats triplet i
    kept = torch.zeros(len(sub), dtype=torch.bool)
    for j in range(len(sub)):  # greedy, best first: j survives unless a kept better one repeats it
        kept[j] = not (dup[:j, j] & kept[:j]).any()
    sub, obj, pred, score = (x[kept][:max_triplets] for x in (sub, obj, pred, score))
    rel_scores = torch.zeros(len(sub), P1)
    rel_scores[torch.arange(len(sub)), pred] = score
    return dict(boxes=ent_boxes.cpu(), labels=ent_labels.cpu(), scores=ent_score.cpu(),
                rel_pairs=torch.stack([sub, obj], 1).cpu(), rel_scores=rel_scores)


def top_triplets(pred, k):
    """assemble_graph's output -> the k best triplets [(subject, object, predicate, score)], ranked by
    the evaluator's score: best foreground predicate x subject confidence x object confidence."""
    fg = pred["rel_scores"][:, 1:]  # (M, P)
    best, p = fg.max(-1)  # (M,)
    pairs = pred["rel_pairs"]  # (M, 2)
    score = best * pred["scores"][pairs[:, 0]] * pred["scores"][pairs[:, 1]]  # (M,)
    order = score.argsort(descending=True, stable=True)[:k].tolist()
    return [(int(pairs[m, 0]), int(pairs[m, 1]), int(p[m]) + 1, float(score[m])) for m in order]


# ----------------------------------------------------------------------------------------------
# Training: train() (the loop; model selection on validation mR@50)

def train(cfg: Config, device) -> dict:
    """Train one run into cfg.out; returns the test metrics of the best (val mR@50) checkpoint.

    Everything is checked (the data, the run folder, the checkpoint to resume) before anything is
    written; --resume restores every rank's state, and the run ends exactly as an uninterrupted one."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    t_run = (time.time(), time.process_time())
    seed_everything(cfg.seed + rank)  # before the first random draw; each rank its own dropout
    out_dir = cfg.out = default_out(cfg)
    last_path, best_path = os.path.join(out_dir, "ckpt_last.pt"), os.path.join(out_dir, "ckpt_best.pt")
    claim_run_dir(cfg, last_path)   # first: a refused run (e.g. --resume of nothing) does not generate the data
    t_data = time.time()
    train_ds, val_ds, test_ds = load_datasets(cfg)
    data_seconds = time.time() - t_data
    if cfg.detector_ckpt and not os.path.isfile(cfg.detector_ckpt):
        fail(f"--detector-ckpt {cfg.detector_ckpt}: no such file")
    counts = data.predicate_counts(train_ds)  # (P+1,) training frequency: predicate groups, plot order
    groups = metrics.default_predicate_groups(train_ds.idx_to_predicate, counts)
    seen = metrics.training_triplets(train_ds.gt_labels, train_ds.gt_relations)  # every annotated one: zsR@K
    for_infer = what_infer_needs(cfg, train_ds)
    last_ck = read_resume_checkpoint(last_path, for_infer["vocab"], cfg, world) if cfg.resume else None
    barrier()  # every rank has checked everything before rank 0 writes the first byte
    log = open_run(cfg, out_dir)
    det_path, det_cached = detector_path(cfg, train_ds.root, device)
    log(f"run {out_dir} | sgdet | {describe(cfg)}, {cfg.iters} iterations | seed {cfg.seed} | detector: "
        f"{'reused from ' + det_path if det_cached else f'pretrained for {cfg.det_iters} iterations, cached as {det_path}'}"
        f" | {world} process(es) on {device}, {torch.get_num_threads()} thread(s)")
    log(f"data: {len(train_ds)} train / {len(val_ds)} val / {len(test_ds)} test images, "
        f"C = {train_ds.num_classes - 1} classes, P = {train_ds.num_predicates - 1} predicates "
        f"({data_seconds:.0f}s)")
    # Every run, baseline and aligned, any seed, starts from the same pretrained detector (SGTR starts
    # from a DETR trained on the dataset); its own seed, so the run's generators start below.
    det_state, det_quality = get_detector(cfg, train_ds, test_ds, device, rank, log)
    seed_everything(cfg.seed + rank)  # the same whether the detector was trained now or loaded
    model = SGTR(cfg, train_ds.num_classes, train_ds.num_predicates).to(device)
    load_detector(model, det_state, cfg.detector_ckpt or "the cached detector")
    if cfg.lr_detector == 0 and cfg.lr_backbone == 0:
        model.freeze_detector()
    use_feature_cache(cfg, model, [train_ds, val_ds, test_ds], log)
    if model.mirror is not None:
        model.mirror.mask_rng.manual_seed(cfg.seed * 1000 + rank)  # each rank its own masks
    opt, sched = build_optimizer(model, cfg)
    state = resume(last_ck, last_path, model, opt, sched, rank, device) if cfg.resume else new_train_state()
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters "
        f"({'detector frozen, ' if model.detector_frozen else ''}"
        f"{sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M trained), {describe(cfg)}, "
        f"{cfg.iters} iterations x {cfg.batch_size} images x {world} process(es) on {device}, "
        f"{torch.get_num_threads()} thread(s)")
    if cfg.resume:
        log(f"resumed from {last_path} at iteration {state['step']} ({fmt_time(state['train_seconds'])} "
            f"of training so far)")
    ddp = model if world == 1 else nn.parallel.DistributedDataParallel(model)
    n_val = cfg.val_images or len(val_ds)
    n_val = min(n_val, cfg.max_eval_images) if cfg.max_eval_images else n_val
    # The sampler continues where the interrupted run was: the same batches, none replayed.
    sampler = data.TrainingSampler(len(train_ds), seed=cfg.seed, start=state["step"] * cfg.batch_size)
    # Its own generator: otherwise each new DataLoader iterator draws from the global torch RNG.
    loader = torch.utils.data.DataLoader(train_ds, batch_size=cfg.batch_size, collate_fn=data.collate,
                                         sampler=sampler, num_workers=cfg.num_workers,
                                         generator=torch.Generator().manual_seed(cfg.seed * 1000 + rank))
    batches = iter(loader)
    model.train()
    t_start = time.time() - state["train_seconds"]  # training time of this run, earlier sessions included
    t_last, timed_from = time.time(), state["step"]  # it/s counts training only, this session only
    while state["step"] < cfg.iters:
        images, targets = next(batches)
        losses = train_step(ddp, images.to(device), targets, cfg)
        check_finite(state["step"] + 1, losses)
        opt.zero_grad(set_to_none=True)
        losses["total"].backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        state["step"] = step = state["step"] + 1
        for k in ("total", "sup", "align"):
            state["loss_sums"][k] = state["loss_sums"].get(k, 0.0) + losses[k].item()
        if step % cfg.log_every == 0 or step == cfg.iters:
            speed = (step - timed_from) / max(time.time() - t_last, 1e-9)
            log_interval(cfg, state, speed, time.time() - t_start, log)
            t_last, timed_from = time.time(), step
        validated = step % cfg.eval_every == 0 or step == cfg.iters
        if validated:
            validate(model, val_ds, n_val, cfg, device, groups, state, best_path, for_infer, log)
            t_last, timed_from = time.time(), step
        if validated or step % cfg.ckpt_every == 0:
            state["train_seconds"] = time.time() - t_start
            save_checkpoint(last_path, cfg, model, opt, sched, state, device, for_infer)
    train_seconds = time.time() - t_start
    log(f"training done (wall {fmt_time(train_seconds)}, validation included)")

    # Test the best validation checkpoint (the paper's model selection), and the last iteration's weights
    # too (metrics.json's "final"): docs/variance.md compares the two ways of choosing. Rank 0 may have
    # written the best at the last validation: every rank waits for that write, then loads it, and says
    # which one it tests. When it is the last iteration's, they are the same weights, tested once.
    barrier()
    ck = load_checkpoint(best_path, ("model", "step"))
    tested, best_is_last = all_ranks(ck["step"]), ck["step"] == state["step"]
    log("test: ckpt_best.pt of iteration " + ", ".join(f"{s} on rank {r}" for r, s in enumerate(tested))
        + ("" if best_is_last else f", after the last iteration's weights ({state['step']})"))
    if len(set(tested)) != 1:
        raise RuntimeError(f"ranks tested different checkpoints: {tested}")
    t_test = time.time()
    final = None if best_is_last else evaluate(model, test_ds, cfg, device, groups, cfg.max_eval_images,
                                               zeroshot=seen)[0]
    model.load_state_dict(ck["model"])
    summary, examples = evaluate(model, test_ds, cfg, device, groups, cfg.max_eval_images, keep_examples=4,
                                 zeroshot=seen)
    final = {**(final or summary),   # the last iteration's, with its validation mR@50
             "val_mR@50": [h for h in state["history"] if "val_mR@50" in h][-1]["val_mR@50"]}
    summary.update({"det_mAP@0.5": det_quality["mAP@0.5"], "det_recall@0.5": det_quality["recall@0.5"],
                    "det_recall@0.5_class": det_quality["recall@0.5_class"],
                    "best_step": ck["step"], "best_val_mR@50": ck["val_mR@50"], "history": state["history"],
                    "final": final})
    timing = {"train_seconds": train_seconds, "test_seconds": time.time() - t_test}
    finish(cfg, out_dir, summary, timing, examples, train_ds, test_ds, counts, groups, log)
    log(f"total time {clock(t_run)}")
    return summary


class StepSchedule:
    """DETR's schedule as a LambdaLR factor: linear warm-up, then x0.1 from iteration drop_at on."""

    def __init__(self, warmup, drop_at):
        self.warmup, self.drop_at = warmup, drop_at

    def __call__(self, it):
        return min(1.0, (it + 1) / max(1, self.warmup)) * (0.1 if it >= self.drop_at else 1.0)


def build_optimizer(model, cfg):
    """AdamW over three groups (DETR-style fine-tuning of a pretrained detector): the new parts at lr,
    the pretrained detector's transformer and heads at lr_detector, its CNN at lr_backbone; a frozen
    detector's parameters (requires_grad False) are in none. Linear warm-up, then x0.1 at lr_drop."""
    groups = {"new": [], "detector": [], "backbone": []}
    for n, p in model.named_parameters():
        if p.requires_grad:
            groups["backbone" if n.startswith("backbone.") else "detector" if n.startswith(DETECTOR_PARTS)
                   else "new"].append(p)
    lrs = {"new": cfg.lr, "detector": cfg.lr_detector, "backbone": cfg.lr_backbone}
    opt = torch.optim.AdamW([dict(params=groups[g], lr=lrs[g]) for g in groups if groups[g]],
                            weight_decay=cfg.weight_decay)
    schedule = StepSchedule(cfg.warmup_iters, int(cfg.lr_drop * cfg.iters))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


def detector_path(cfg, root, device):
    """Where the pretrained detector for these data and settings is cached -> (path, whether it exists).
    The key holds everything that changes its weights, thread count and instruction set included (float sums
    differ)."""
    if cfg.detector_ckpt:
        return cfg.detector_ckpt, True
    fields = ("d_model", "nheads", "ffn_dim", "dropout", "backbone_width", "backbone_stride", "enc_layers",
              "ent_dec_layers", "num_ent_queries", "entity_queries", "max_size", "det_iters", "det_batch", "det_lr",
              "det_seed", "warmup_iters", "lr_drop", "weight_decay", "grad_clip", "w_cls", "w_l1", "w_giou", "eos_coef")
    key_src = json.dumps({"version": 1, "root": os.path.abspath(root), "threads": torch.get_num_threads(),
                          "isa": torch.backends.cpu.get_cpu_capability(), "device": device.type,
                          **{k: getattr(cfg, k) for k in fields}}, sort_keys=True)
    key = hashlib.sha1(key_src.encode()).hexdigest()[:12]
    path = os.path.join(data.default_cache_dir(), "detectors", f"sgtr-detector-{key}.pt")
    return path, os.path.exists(path)


def get_detector(cfg, train_ds, test_ds, device, rank, log):
    """The pretrained entity detector: loaded from the cache (or --detector-ckpt), else trained and
    cached (on rank 0; the other ranks wait, then load it). -> (its state dict, its test quality)."""
    path, cached = detector_path(cfg, train_ds.root, device)
    if not cached and rank == 0:
        log(f"detector: pretraining {cfg.det_iters} iterations x {cfg.det_batch} images (entity losses only, "
            f"seed {cfg.det_seed}), cached as {path}")
        detector = pretrain_detector(cfg, train_ds, device, log)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_atomic({"detector": {n: p.detach().cpu() for n, p in detector.detector_parameters()},
                     "settings": dataclasses.asdict(cfg)}, path)
    barrier()  # the file exists for every rank
    blob = load_checkpoint(path, ("detector",))
    if cached:
        log(f"detector: loaded from {path}")
    # Its quality on the test split, computed once per number of test images and kept in the file.
    n_eval = min(cfg.max_eval_images or len(test_ds), len(test_ds))
    quality = blob.get(f"quality_test{n_eval}")
    if quality is None and rank == 0:
        detector = SGTR(dataclasses.replace(cfg, no_align=True), train_ds.num_classes, train_ds.num_predicates)
        load_detector(detector, blob["detector"], path)
        quality = detector_quality(detector.to(device), test_ds, cfg, device, n_eval)
        if not cfg.detector_ckpt:  # never write into a file the user gave
            blob[f"quality_test{n_eval}"] = quality
            save_atomic(blob, path)
    quality = all_ranks(quality)[0]  # rank 0's (the other ranks may have read the file before it was added)
    log(f"detector: on {n_eval} test images mAP@0.5 {100 * quality['mAP@0.5']:.2f} | ground-truth boxes "
        f"found at IoU >= 0.5 among its {cfg.num_ent_queries} outputs: {100 * quality['recall@0.5']:.2f}% "
        f"(with the right class: {100 * quality['recall@0.5_class']:.2f}%)")
    return blob["detector"], quality


def load_detector(model, state, path):
    """Copy a pretrained detector's weights into an SGTR (every detector parameter, nothing else)."""
    own = dict(model.detector_parameters())
    if set(state) != set(own) or any(state[n].shape != own[n].shape for n in own):
        fail(f"{path} does not hold a detector with these settings (--d-model, layers, queries, ...)")
    with torch.no_grad():
        for n, p in own.items():
            p.copy_(state[n])


def pretrain_detector(cfg, train_ds, device, log):
    """DETR alone: backbone, encoder, entity decoder and entity heads trained on the entity losses (all
    layers), from its own seed. -> the SGTR whose detector part is trained."""
    seed_everything(cfg.det_seed)
    # Built as the softmax baseline whatever the run's settings: the size of the predicate head changes how many
    # random numbers the construction draws, and the pretraining's dropout would inherit that; the detector
    # (cached by its own settings alone) must come out the same for every run.
    model = SGTR(dataclasses.replace(cfg, no_align=True, pred_loss="softmax"), train_ds.num_classes,
                 train_ds.num_predicates).to(device)
    params = [p for _, p in model.detector_parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.det_lr, weight_decay=cfg.weight_decay)
    warmup = min(cfg.warmup_iters, cfg.det_iters // 5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, StepSchedule(warmup, int(cfg.lr_drop * cfg.det_iters)))
    loader = torch.utils.data.DataLoader(train_ds, batch_size=cfg.det_batch, collate_fn=data.collate,
                                         sampler=data.TrainingSampler(len(train_ds), seed=cfg.det_seed),
                                         num_workers=cfg.num_workers,
                                         generator=torch.Generator().manual_seed(cfg.det_seed))
    model.train()
    batches, t0, loss_sum, n_sum = iter(loader), time.time(), 0.0, 0
    for step in range(1, cfg.det_iters + 1):
        images, targets = next(batches)
        images = images.to(device)
        ent_out = model.detect(images, pad_mask_for(images, targets))[0]
        tg = normalised_targets(targets, device)
        loss = sum(entity_loss(o, tg, cfg) for o in ent_out)
        check_finite(step, {"detector": loss})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        loss_sum, n_sum = loss_sum + loss.item(), n_sum + 1
        if step % cfg.log_every == 0 or step == cfg.det_iters:  # the mean loss since the last line
            rate = step / (time.time() - t0)
            log(f"det it {step}/{cfg.det_iters} | loss {loss_sum / n_sum:.3f} | {rate:.1f} it/s | "
                f"eta {fmt_time((cfg.det_iters - step) / rate)}")
            loss_sum, n_sum = 0.0, 0
    return model


def what_infer_needs(cfg, train_ds):
    """What makes ckpt_best.pt self-contained for --infer: the vocabulary, and the training images'
    longest side (--infer resizes the user's images to it)."""
    return {"vocab": dict(idx_to_label=list(train_ds.idx_to_label), idx_to_predicate=list(train_ds.idx_to_predicate)),
            "image_side": cfg.max_size or max(max(im["width"], im["height"]) for im in train_ds.img_info)}


def new_train_state():
    """What a training run carries from step to step; ckpt_last.pt saves it (under these keys)."""
    return {"step": 0, "best_val_mR@50": -1.0, "best_step": 0, "history": [], "train_seconds": 0.0,
            "loss_sums": {}, "last_log": 0}  # running sums of the losses since the last progress line


def read_resume_checkpoint(last_path, vocab, cfg, world):
    """ckpt_last.pt for --resume, read and checked before anything is written: a checkpoint of other
    data or another process count ends in one error line."""
    ck = load_checkpoint(last_path, ("model", "optimizer", "scheduler", "rng", "vocab", *new_train_state()))
    if ck["vocab"] != vocab:
        fail(f"{last_path} was trained on other classes or predicates than those of --data {cfg.data}")
    if len(ck["rng"]) != world:
        fail(f"{last_path} was written by {len(ck['rng'])} process(es); resume it with as many, not {world}")
    return ck


def resume(ck, last_path, model, opt, sched, rank, device):
    """Load ckpt_last.pt (read_resume_checkpoint) into the model, optimizer, schedule and this rank's
    generators -> the training state it holds. Another layout ends in one error line."""
    try:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
    except (RuntimeError, ValueError, KeyError) as e:
        fail(f"{last_path} holds another model layout than these settings ({str(e).splitlines()[0]})")
    set_rng_states(ck["rng"][rank], model, device)  # this rank's own generators (masks, dropout)
    return {k: ck[k] for k in new_train_state()}


def describe(cfg):
    """The run's method in words, for the log's model line."""
    if cfg.no_align:
        return "baseline (no alignment)"
    return f"aligned (p = {cfg.mask_p:g}, λ = {cfg.align_weight:g}, {cfg.align_loss}{', tied head' if cfg.tied_head else ''})"


def check_finite(step, losses):
    """Stop on a non-finite loss, with a message that names the iteration and every term."""
    for k, v in losses.items():
        if not torch.isfinite(v):
            raise SystemExit(f"non-finite loss at iteration {step}: {k} = {v.item()} "
                             f"(all terms: { {n: round(x.item(), 4) for n, x in losses.items()} })")


def log_interval(cfg, state, speed, seconds_so_far, log):
    """The progress line: the losses' means since the last one (sup = L_original, align = L_align, loss =
    their Eq. 3 total); they go into the history that curves.png plots, and the sums start again."""
    step = state["step"]
    avg = {k: v / (step - state["last_log"]) for k, v in state["loss_sums"].items()}
    state["history"].append({"it": step, **avg})
    lam = 0.0 if cfg.no_align else cfg.align_weight
    log(f"it {step}/{cfg.iters} | loss {avg['total']:.3f} (sup {avg['sup']:.3f}, align {avg['align']:.3f}, "
        f"λ {lam:g}) | {speed:.1f} it/s | eta {fmt_time((cfg.iters - step) * seconds_so_far / step)}")
    state["loss_sums"], state["last_log"] = {}, step


def validate(model, val_ds, n_val, cfg, device, groups, state, best_path, for_infer, log):
    """Validation SGDet on the first n_val images; a new best mR@50 is written to ckpt_best.pt."""
    step = state["step"]
    s, _ = evaluate(model, val_ds, cfg, device, groups, n_val)
    state["history"].append({"it": step, "val_mR@50": s["mR@50"], "val_R@50": s["R@50"]})
    log(f"val it {step} | mR@50 {100 * s['mR@50']:.2f} | R@50 {100 * s['R@50']:.2f} | "
        f"mR@100 {100 * s['mR@100']:.2f} | R@100 {100 * s['R@100']:.2f}")
    # Model selection by validation mR@50 (paper section 4.1). A tie goes to the later checkpoint, the
    # more trained one (and a tiny test run, whose recalls are all 0, still exercises a last validation
    # that replaces ckpt_best.pt).
    if s["mR@50"] >= state["best_val_mR@50"]:
        state["best_val_mR@50"], state["best_step"] = s["mR@50"], step
        if is_main():
            save_atomic({"model": model.state_dict(), "step": step, "args": dataclasses.asdict(cfg),
                         "val_mR@50": s["mR@50"], **for_infer}, best_path)


def save_checkpoint(path, cfg, model, opt, sched, state, device, for_infer):
    """ckpt_last.pt: {model, optimizer, scheduler, args, rng, the training state, what --infer needs}.
    A collective: every rank sends its generators to rank 0, which writes the file."""
    rngs = all_ranks(rng_states(model, device))
    if is_main():
        save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                     "args": dataclasses.asdict(cfg), "rng": rngs, **state, **for_infer}, path)


def finish(cfg, out_dir, summary, timing, examples, train_ds, test_ds, counts, groups, log):
    """The test lines (the best checkpoint's, then the last iteration's), then (main process) metrics.json,
    timing.json and the pictures."""
    keys = [f"{m}@{k}" for m in ("R", "mR", "zsR") for k in (20, 50, 100)]   # the lines motifs_align.py writes
    log("test SGDet | " + " | ".join(f"{k} {100 * summary[k]:.2f}" for k in keys if k in summary)
        + "".join(f" | {g}_mR@100 {100 * summary[f'{g}_mR@100']:.2f}" for g in groups if f"{g}_mR@100" in summary))
    if "final" in summary:   # the last iteration's weights (what the study compares, docs/variance.md)
        log("test SGDet, last iteration | " + " | ".join(f"{k} {100 * summary['final'][k]:.2f}" for k in keys
                                                         if k in summary["final"]))
    if not is_main():
        return
    # metrics.json holds only what the seed and settings determine (a rerun gives the same file);
    # wall-clock times go to timing.json.
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(out_dir, "timing.json"), "w") as f:
        json.dump(timing, f, indent=2)
    plot_curves(summary["history"], 0.0 if cfg.no_align else cfg.align_weight, os.path.join(out_dir, "curves.png"))
    plot_per_predicate(summary["per_predicate_R@100"], train_ds.idx_to_predicate, counts,
                       os.path.join(out_dir, "per_predicate.png"),
                       f"SGDet test R@100 per predicate: ckpt_best.pt, the best validation checkpoint "
                       f"(iteration {summary['best_step']} of {cfg.iters})\n{out_dir}")
    plot_examples(examples, test_ds, os.path.join(out_dir, "examples.png"))
    log(f"wrote {out_dir}/metrics.json, timing.json and pictures")


# ----------------------------------------------------------------------------------------------
# Evaluation: evaluate() (SGDet with metrics.SGEvaluator)

@torch.no_grad()
def evaluate(model, ds, cfg, device, groups, max_images=0, keep_examples=0, zeroshot=None, ev=None):
    """SGDet evaluation on the first `max_images` images of `ds` (all if 0). Returns (summary, examples).
    zeroshot: the training split's (subject, predicate, object) classes (metrics.training_triplets):
    the summary then has zsR@K, the recall of the test triplets never seen in training.
    ev: an empty SGEvaluator to fill instead of a new one (its per-image records stay with the caller)."""
    model.eval()
    n = len(ds) if max_images <= 0 else min(len(ds), max_images)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(n)), batch_size=cfg.eval_batch,
                                         sampler=data.InferenceSampler(n), collate_fn=data.collate,
                                         num_workers=cfg.num_workers, generator=torch.Generator())
    if ev is None:
        ev = metrics.SGEvaluator("sgdet", num_predicates=ds.num_predicates - 1, ks=(20, 50, 100),
                                 predicate_groups=groups, zeroshot_triplets=zeroshot)
    examples = []
    for images, targets in loader:
        images = images.to(device)
        ent_out, pred_out, _ = model(images, pad_mask_for(images, targets))
        for b, t in enumerate(targets):
            pred = assemble_graph(image_outputs(ent_out, pred_out, b, cfg), t["size"], cfg.ent_topk, max_pairs=100,
                                  post_process=cfg.post_process, sigmoid=cfg.pred_loss == "focal")
            ev.add(dict(boxes=t["boxes"], labels=t["labels"], relations=t["relations"]), pred)
            if len(examples) < keep_examples:
                h, w = t["size"]
                examples.append((images[b, :, :h, :w].cpu(), t, pred))
    if dist.is_available() and dist.is_initialized():
        ev.gather()
    model.train()
    return ev.summary(), examples


@torch.no_grad()
def detector_quality(model, ds, cfg, device, n):
    """The pretrained detector alone on the first n images of ds -> {mAP@0.5, recall@0.5, recall@0.5_class}:
    VOC mAP@0.5 of its Qe outputs (label = best foreground class, score = its probability), and the
    share of ground-truth boxes that some output overlaps at IoU >= 0.5 (any class; the right class).
    IoU as the SGDet evaluator counts it (metrics.box_iou_inclusive)."""
    model.eval()
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(n)), batch_size=cfg.eval_batch,
                                         collate_fn=data.collate, num_workers=cfg.num_workers)
    dets, gts, found, found_cls = [], [], 0, 0
    for images, targets in loader:
        images = images.to(device)
        out = model.detect(images, pad_mask_for(images, targets))[0][-1]
        for b, t in enumerate(targets):
            H, W = t["size"]
            score, label = out["logits"][b].softmax(-1)[:, 1:].max(-1)  # (Qe,)
            boxes = (box_cxcywh_to_xyxy(out["boxes"][b]) * torch.tensor([W, H, W, H], device=device)).cpu().numpy()
            d = dict(boxes=boxes, labels=(label + 1).cpu().numpy(), scores=score.cpu().numpy())
            g = dict(boxes=t["boxes"].numpy(), labels=t["labels"].numpy())
            dets.append(d), gts.append(g)
            hit = metrics.box_iou_inclusive(d["boxes"], g["boxes"]) >= 0.5  # (Qe, G)
            found += int(hit.any(0).sum())
            found_cls += int((hit & (d["labels"][:, None] == g["labels"][None])).any(0).sum())
    n_gt = max(1, sum(len(g["labels"]) for g in gts))
    model.train()
    return {"mAP@0.5": detection_map(dets, gts, ds.num_classes), "recall@0.5": found / n_gt,
            "recall@0.5_class": found_cls / n_gt}


def detection_map(dets, gts, num_classes, iou_threshold=0.5):
    """VOC-style mAP@0.5 (as motifs_align.py): per class, all-point interpolated AP over the ranked
    detections; mean over the classes that have test boxes. dets / gts: one dict of numpy arrays per image."""
    aps = []
    for c in range(1, num_classes):
        n_gt = sum(int((g["labels"] == c).sum()) for g in gts)
        if n_gt == 0:
            continue
        scored = [(float(s), i, b) for i, d in enumerate(dets)
                  for b, s in zip(d["boxes"][d["labels"] == c], d["scores"][d["labels"] == c])]
        scored.sort(key=lambda x: -x[0])
        used = [np.zeros(int((g["labels"] == c).sum()), dtype=bool) for g in gts]
        tp = np.zeros(len(scored))
        for k, (_, i, b) in enumerate(scored):
            g = gts[i]["boxes"][gts[i]["labels"] == c]
            if len(g):
                iou = metrics.box_iou_inclusive(b[None], g)[0]
                j = int(iou.argmax())
                if iou[j] >= iou_threshold and not used[i][j]:
                    used[i][j], tp[k] = True, 1.0
        tp_c = np.cumsum(tp)
        recall, precision = tp_c / n_gt, tp_c / np.arange(1, len(tp) + 1)
        # area under the monotone (right-to-left max) precision envelope
        mrec = np.concatenate([[0.0], recall, [1.0]])
        mpre = np.maximum.accumulate(np.concatenate([[0.0], precision, [0.0]])[::-1])[::-1]
        steps = np.where(mrec[1:] != mrec[:-1])[0]
        aps.append(float(((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]).sum()))
    return float(np.mean(aps)) if aps else 0.0


# ----------------------------------------------------------------------------------------------
# Pictures

def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, tight=True, **savefig_kw):
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=110, **savefig_kw)
    pyplot().close(fig)


def plot_curves(history, lam, path):
    """Left: the loss terms of the progress lines, under the same names; right: validation recall."""
    fig, ax = pyplot().subplots(1, 2, figsize=(11, 4))
    tr = [h for h in history if "total" in h]
    curves = [("total", f"total = sup + λ·align, λ = {lam:g}" if lam else "total = sup (baseline, no alignment)"),
              ("sup", "sup (L_original)")] + ([("align", "align (L_align)")] if lam else [])
    for key, label in curves:
        ax[0].plot([h["it"] for h in tr], [h[key] for h in tr], label=label)
    ax[0].set(xlabel="iteration", ylabel="loss (mean over the progress-line interval)", yscale="log",
              title="training loss")
    ax[0].legend()
    va = [h for h in history if "val_mR@50" in h]
    for key in ("val_mR@50", "val_R@50"):
        ax[1].plot([h["it"] for h in va], [100 * h[key] for h in va], "o-", label=key)
    ax[1].set(xlabel="iteration", ylabel="%", title="validation SGDet (model selection: mR@50)")
    ax[1].legend()
    save_figure(fig, path)


def plot_per_predicate(values, names, counts, path, title):
    """One bar per predicate, in data.frequency_order(counts): most frequent in training first, as the
    paper's Fig. 5 (and as `python data.py` prints them). values (P,), counts (P+1,)."""
    order = [int(i) for i in data.frequency_order(counts)]
    fig, ax = pyplot().subplots(figsize=(max(8, 0.34 * len(order)), 4.5))
    ax.bar(range(len(order)), [100 * values[i - 1] for i in order], color="tab:blue")
    ax.set_xticks(range(len(order)))
    ax.set_xticklabels([f"{names[i]} ({counts[i]})" for i in order], rotation=90, fontsize=9)
    ax.set(ylabel="R@100 (%)", xlabel="predicate (training count), by training frequency")
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


def draw_boxes(ax, image, tagged):
    """image (3, H, W) in [0, 1]; tagged: [(tag, xyxy box in pixels, colour)], tag e.g. '3:man'. Each box is
    drawn in its colour with its tag touching it (tag_spot: inside its top-left corner where that is free,
    else on another corner, above or below it): a tag never leaves its box, and hides no other where there is room."""
    plt = pyplot()
    H, W = image.shape[1:]
    ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
    ax.set_axis_off()
    ax.set_xlim(-0.5, W - 0.5)
    ax.set_ylim(H - 0.5, -0.5)
    renderer = ax.figure.canvas.get_renderer()
    (ox, oy), (ex, ey) = ax.transData.transform([(0, 0), (1, 1)])
    sx, sy = abs(ex - ox), abs(ey - oy)  # screen pixels per image pixel, to size the tags in image pixels
    pad = 2 * 1.0 * ax.figure.dpi / 72  # the tag's bbox pad (1 pt), both sides, in screen pixels
    rects = [[float(v) for v in box] for _, box, _ in tagged]
    placed = []
    for k, (tag, box, colour) in enumerate(tagged):
        x0, y0, x1, y1 = rects[k]
        ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color=colour, lw=1.5))
        t = ax.text(x0, y0, str(tag), color="white", fontsize=9, fontweight="bold",
                    bbox=dict(facecolor=colour, edgecolor="none", pad=1.0, alpha=0.85))
        e = t.get_window_extent(renderer)
        xy, ha, va, rect = tag_spot(rects[k], (e.width + pad) / sx, (e.height + pad) / sy, W, H, placed,
                                    rects[:k] + rects[k + 1:])
        t.set(position=xy, ha=ha, va=va)
        placed.append(rect)


def fmt_triplet(ta, sub, pred, tb, obj, score=None):
    """'3:man riding 5:horse 0.41' (tags as on the picture; two significant digits, never 0.00)."""
    return f"{ta}:{sub} {pred} {tb}:{obj}" + ("" if score is None else f"  {score:.2g}")


def plot_examples(examples, ds, path, top=5):
    """Test images, each as two panels: its annotation (GT) and the model's top-`top` triplets.

    Boxes carry numbered tags in the colours of the lists below them. A predicted entity that matches
    an annotated box (same class, IoU >= 0.5 as the evaluator counts) takes that box's number and
    colour, so the panels of one image read side by side; '+' marks a triplet the evaluator counts as
    found (a GT relation with that predicate between two matching boxes), '-' one it does not."""
    if not examples:
        return
    plt = pyplot()
    pw, th, tt, gap = 3.0, (top + 0.6) * 0.18, 0.3, 0.12  # inches: image box, list, title, gaps
    per_row = 2  # examples per row, each GT | predicted
    rows = (len(examples) + per_row - 1) // per_row
    W, H = 2 * per_row * (pw + gap) + gap, rows * (tt + pw + th + gap)
    fig = plt.figure(figsize=(W, H))
    labels, preds = ds.idx_to_label, ds.idx_to_predicate
    for n, (img, t, pred) in enumerate(examples):
        r, c = divmod(n, per_row)
        top_y = H - r * (tt + pw + th + gap) - tt  # inches from the bottom to the top of the images
        gt_boxes, gt_labels = t["boxes"], t["labels"].tolist()
        # GT panel: the first `top` annotated relations and the boxes they name, tagged by GT index
        rels = t["relations"].tolist()[:top]
        gt_lines = [fmt_triplet(s, labels[gt_labels[s]], preds[p], o, labels[gt_labels[o]]) for s, o, p in rels]
        gt_tags = sorted({i for s, o, _ in rels for i in (s, o)})
        gt_tagged = [(f"{g}:{labels[gt_labels[g]]}", gt_boxes[g], f"C{g % 10}") for g in gt_tags]
        # predicted panel: the top triplets; entities matched to GT boxes by class and IoU >= 0.5
        trip = top_triplets(pred, top)
        iou = metrics.box_iou_inclusive(pred["boxes"].numpy(), gt_boxes.numpy())  # (Qe, G)
        same = pred["labels"].numpy()[:, None] == np.array(gt_labels)[None, :]  # (Qe, G)
        hit = (iou >= 0.5) & same
        # entity -> (number, primes); unmatched ones numbered after the GT boxes. A second detection of the same
        # annotated box (a DETR duplicate that SGTR's near-duplicate filter, IoU > 0.8, let through) is primed: 2'
        tag, next_tag = {}, len(gt_labels)
        for s, o, _, _ in trip:
            for e in (s, o):
                if e not in tag:
                    if hit[e].any():
                        g = int(np.where(hit[e], iou[e], -1).argmax())
                        tag[e] = (g, sum(n == g for n, _ in tag.values()))
                    else:
                        tag[e], next_tag = (next_tag, 0), next_tag + 1
        name = {e: f"{n}" + "'" * primes for e, (n, primes) in tag.items()}
        pred_lines = []
        for s, o, p, score in trip:
            ok = any(p == gp and hit[s, gs] and hit[o, go] for gs, go, gp in t["relations"].tolist())
            pred_lines.append(("+ " if ok else "- ") + fmt_triplet(name[s], labels[int(pred["labels"][s])], preds[p],
                                                               name[o], labels[int(pred["labels"][o])], score))
        pred_tagged = [(f"{name[e]}:{labels[int(pred['labels'][e])]}", pred["boxes"][e], f"C{tag[e][0] % 10}")
                       for e in tag]
        panels = ((f"image {t['image_id']}: annotated", gt_tagged, gt_lines),
                  (f"predicted, top {top} ('+' = found)", pred_tagged, pred_lines))
        for k, (title, tagged, lines) in enumerate(panels):
            x = gap + (2 * c + k) * (pw + gap)
            ax = fig.add_axes([x / W, (top_y - pw) / H, pw / W, pw / H])
            draw_boxes(ax, img, tagged)
            ax.set_title(title, fontsize=10, loc="left")
            tx = fig.add_axes([x / W, (top_y - pw - th) / H, pw / W, th / H])
            tx.axis("off")
            tx.text(0, 1, "\n".join(lines) or "(none)", fontsize=9, family="monospace", va="top",
                    transform=tx.transAxes)
    save_figure(fig, path, tight=False)


def plot_scene_graph(image, pred, triplets, names, predicates, title, path):
    """--infer's picture: the image filling the figure at its own aspect ratio, the boxes of the top
    triplets tagged by number, the triplets listed below. image (3, H, W); pred boxes in its pixels."""
    plt = pyplot()
    H, W = image.shape[1:]
    iw = 6.0 if W >= H else max(3.0, 6.0 * W / H)  # inches; the longest side 6 in
    ih = iw * H / W
    th = (len(triplets) + 1.8) * 0.15  # 9-pt lines are 0.15 in apart
    fig = plt.figure(figsize=(iw, ih + th))
    ax = fig.add_axes([0, th / (ih + th), 1, ih / (ih + th)])
    tag = {}  # entity -> tag, in order of first mention
    for s, o, _, _ in triplets:
        for e in (s, o):
            tag.setdefault(e, len(tag))
    draw_boxes(ax, image, [(f"{tag[e]}:{names[int(pred['labels'][e])]}", pred["boxes"][e], f"C{tag[e] % 10}")
                           for e in tag])
    lines = [fmt_triplet(tag[s], names[int(pred["labels"][s])], predicates[p], tag[o],
                         names[int(pred["labels"][o])], score) for s, o, p, score in triplets]
    tx = fig.add_axes([0, 0, 1, th / (ih + th)])
    tx.axis("off")
    tx.text(0.01, 0.97, "\n".join([title] + (lines or ["(no triplets)"])), fontsize=9, family="monospace",
            va="top", transform=tx.transAxes)
    save_figure(fig, path, tight=False, bbox_inches="tight", pad_inches=0.03)  # "tight": a long line stays whole


# ----------------------------------------------------------------------------------------------
# Inference on your own images: infer()

def box_json(box):
    """A box for the json file: pixels to 0.1."""
    return [round(v, 1) for v in box.tolist()]


@torch.no_grad()
def infer(cfg: Config):
    """For each image file: <out>/<stem>_sg.png (the picture) and <out>/<stem>_sg.json (the top
    triplets, boxes in the image's own pixels). Default out: <folder of the checkpoint>/infer."""
    from PIL import Image
    images, stems = [], set()
    for path in cfg.infer:  # every image is read before anything is written (as motifs_align.py, same words)
        if not os.path.isfile(path):
            fail(f"--infer {path}: no such file")
        try:
            with Image.open(path) as im:
                images.append((path, im.convert("RGB")))
        except OSError as e:
            fail(f"--infer {path}: not an image file ({e})")
        stem = os.path.splitext(os.path.basename(path))[0]
        if stem in stems:
            fail(f"two images named {stem}.*: their {stem}_sg.png would overwrite each other; rename one")
        stems.add(stem)
    ck = load_checkpoint(cfg.ckpt, ("model", "args", "vocab", "image_side"))
    try:
        args = Config(**{"pred_loss": "softmax",   # checkpoints written before --pred-loss existed
                         **ck["args"], "no_align": True})
    except TypeError as e:
        fail(f"{cfg.ckpt}: its settings are not those of this sgtr_align.py ({e})")
    names, predicates = ck["vocab"]["idx_to_label"], ck["vocab"]["idx_to_predicate"]
    model = SGTR(args, len(names), len(predicates))
    # Inference runs the original model only (paper section 3.1): the mirror's untied heads are dropped.
    state = {k: v for k, v in ck["model"].items() if not k.startswith("mirror.")}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        fail(f"{cfg.ckpt}: holds another model layout than its own settings describe ({str(e).splitlines()[0]})")
    side = cfg.max_size or ck["image_side"]
    out_dir = cfg.out or os.path.join(os.path.dirname(os.path.abspath(cfg.ckpt)), "infer")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        fail(f"--out {out_dir} is a file; expected a folder for the pictures")
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    model.to(device).eval()
    os.makedirs(out_dir, exist_ok=True)
    for path, img in images:
        W, H = img.size
        s = side / max(W, H)  # the longest side as in training, as the dataset resizes
        w, h = max(1, round(W * s)), max(1, round(H * s))
        x = torch.from_numpy(np.asarray(img.resize((w, h), Image.BILINEAR), dtype=np.float32) / 255)
        x = x.permute(2, 0, 1)[None].to(device)  # (1, 3, h, w)
        ent_out, pred_out, _ = model(x, torch.zeros(1, h, w, dtype=torch.bool, device=device))
        pred = assemble_graph(image_outputs(ent_out, pred_out, 0, args), (h, w), args.ent_topk,
                              post_process=args.post_process, sigmoid=args.pred_loss == "focal")
        scale = torch.tensor([w / W, h / H, w / W, h / H])
        pred["boxes"] = torch.minimum((pred["boxes"] / scale).clamp(min=0), torch.tensor([W, H, W, H]))  # (Qe, 4)
        trip = top_triplets(pred, 10)
        stem = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0])
        with open(stem + "_sg.json", "w") as f:
            json.dump([{"subject": names[int(pred["labels"][a])], "subject_box": box_json(pred["boxes"][a]),
                        "predicate": predicates[p], "object": names[int(pred["labels"][b])],
                        "object_box": box_json(pred["boxes"][b]), "score": sc} for a, b, p, sc in trip], f, indent=1)
        shown = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)  # (3, H, W)
        plot_scene_graph(shown, pred, trip, names, predicates,
                         f"{os.path.basename(path)} ({W}x{H} px): top {len(trip)} triplets", stem + "_sg.png")
        print(f"{path}: {len(trip)} triplets -> {stem}_sg.png, {stem}_sg.json")


# ----------------------------------------------------------------------------------------------
# Plumbing: run folders, checkpoints, processes, logging

def setup_distributed(cfg):
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; gloo on CPU, nccl on GPU. Returns the device."""
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def is_main():
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def all_ranks(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank; [obj] without torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    objs = [None] * dist.get_world_size()
    dist.all_gather_object(objs, obj)
    return objs


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class Log:
    """print + append to <out>/log.txt, on the main process only."""

    def __init__(self, path):
        self.path = path

    def __call__(self, msg):
        if is_main():
            print(msg, flush=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(msg + "\n")


def fmt_time(s):
    s = int(s)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


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


def default_out(cfg):
    return cfg.out or os.path.join("runs", f"sgtr_align-sgdet-{'noalign' if cfg.no_align else 'align'}-seed{cfg.seed}")


def load_datasets(cfg):
    """train / val / test; a problem in the data folder ends in one error line naming the file."""
    try:
        builtin = cfg.data in data.BUILTIN
        before = children_cpu()
        root = data.ensure_synthetic(name=cfg.data) if builtin else cfg.data
        CHILD_CPU.append((time.time(), children_cpu() - before))
        num_val = data.BUILTIN[cfg.data]["num_val"] if builtin else 5000  # val is carved from train
        kw = dict(num_val_im=cfg.num_val_im or num_val, max_size=cfg.max_size or None)
        return (data.VGSGGDataset(root, "train", **kw), data.VGSGGDataset(root, "val", **kw),
                data.VGSGGDataset(root, "test", **kw))
    except data.DataError as e:
        fail(e)


# Settings that do not change a run's numbers; every other field must match for a folder to be resumed.
# (seeds, compare, bench_step: flags of earlier versions, now study.py's, still in older args.json files)
# ("machine" is args.json's record of the instruction set, torch and threads: see check_machine)
NOT_RESULT_FIELDS = {"out", "resume", "log_every", "num_workers", "infer", "ckpt", "seeds", "compare", "bench_step",
                     "machine"}


def run_folder_state(cfg):
    """'new', 'finished' or 'unfinished' for the run folder cfg.out. Reads, never writes: a folder
    that holds anything but a run with these very settings ends in one error line."""
    out, args_file = cfg.out, os.path.join(cfg.out, "args.json")
    if not os.path.exists(args_file):
        if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
            fail(f"{out} exists and is not a run folder (no args.json); pass --out NEW_FOLDER")
        return "new"
    try:
        with open(args_file) as f:
            old = json.load(f)
        assert isinstance(old, dict)
    except (OSError, ValueError, AssertionError):
        fail(f"{args_file} is not the JSON settings of a run; pass --out NEW_FOLDER")
    new = json.loads(json.dumps(dataclasses.asdict(cfg)))  # as args.json would hold them
    differ = sorted(k for k in set(old) | set(new) if k not in NOT_RESULT_FIELDS and old.get(k, "?") != new.get(k, "?"))
    if differ:
        fail(f"{out} holds a run with other settings (differs in: {', '.join(differ)}); pass --out NEW_FOLDER")
    return "finished" if os.path.exists(os.path.join(out, "metrics.json")) else "unfinished"


def check_data_path(cfg):
    """--data names a built-in dataset or an existing folder: the cheapest check, made before the run folder's,
    so that a mistyped path is named as such (and not as a clash with an earlier run's settings)."""
    if cfg.data not in data.BUILTIN and not os.path.isdir(cfg.data):
        fail(f"--data {cfg.data}: no such folder (expected a folder with the VG-SGG files, "
             f"or --data {' / '.join(data.BUILTIN)})")


def claim_run_dir(cfg, last_path):
    """Refuse, in one line, to write into a folder that holds another run, or a finished one (without
    --resume), or to resume a run that has no ckpt_last.pt. Reads, never writes; the data path alone is
    checked first."""
    check_data_path(cfg)
    state = run_folder_state(cfg)
    if state == "finished" and not cfg.resume:
        fail(f"{cfg.out} already holds a finished run with these settings; pass --out NEW_FOLDER to run again")
    if state == "unfinished" and not cfg.resume:
        fail(f"{cfg.out} holds an unfinished run with these settings; add --resume to continue it, "
             f"or pass --out NEW_FOLDER")
    if cfg.resume and state == "new":
        fail(f"--resume: {cfg.out} holds no run (no args.json); start it without --resume")
    if cfg.resume and not os.path.isfile(last_path):
        fail(f"--resume: {cfg.out} has no ckpt_last.pt (the run stopped before its first checkpoint); "
             f"pass --out NEW_FOLDER to start again")


def open_run(cfg, out_dir):
    """Start writing the run folder (main process): args.json for a new run -> the run's Log."""
    if is_main():
        os.makedirs(out_dir, exist_ok=True)
        if not cfg.resume:
            with open(os.path.join(out_dir, "args.json"), "w") as f:
                json.dump({**dataclasses.asdict(cfg), "machine": machine()}, f, indent=2)
    log = Log(os.path.join(out_dir, "log.txt"))
    if cfg.resume:
        check_machine(out_dir, log)
    return log


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


def load_checkpoint(path, keys):
    """A checkpoint written by this script that holds `keys`, or one line that says what the file is not."""
    if not os.path.isfile(path):
        fail(f"{path}: no such checkpoint file")
    with open(path, "rb") as f:
        head = f.read(8)
    # torch.save writes a zip archive ("PK\x03\x04"); torch before 1.6 wrote a pickle ("\x80" + protocol)
    if not head:
        fail(f"{path} is an empty file, not a checkpoint of sgtr_align.py")
    if not head.startswith((b"PK\x03\x04", b"\x80")):
        fail(f"{path} is not a checkpoint of sgtr_align.py: not a file written by torch.save "
             f"(it starts with {head!r})")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # truncated, or objects that weights_only refuses: any failure here is the file's
        msg = (str(e).strip().splitlines() or [""])[0][:120]
        fail(f"{path} is not a checkpoint of sgtr_align.py: a torch.save file that torch.load cannot read "
             f"({type(e).__name__}{': ' + msg if msg else ''})")
    if not isinstance(ck, dict):
        fail(f"{path} is not a checkpoint of sgtr_align.py: it holds a {type(ck).__name__}, not a dict")
    missing = [k for k in keys if k not in ck]
    if missing:
        fail(f"{path} is not the checkpoint of sgtr_align.py needed here: it has no {', '.join(missing)}")
    return ck


def save_atomic(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a crash mid-write never leaves a truncated checkpoint


def seed_everything(seed):
    """Every global generator this process uses: python, numpy, torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_states(model, device):
    """This process's generators, as tensors and lists (so torch.load(weights_only=True) reads them)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, state, gauss_next = random.getstate()
    s = dict(torch=torch.get_rng_state(), numpy=[name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
             python=[version, list(state), gauss_next])
    if model.mirror is not None:
        s["mask"] = model.mirror.mask_rng.get_state()
    if device.type == "cuda":
        s["cuda"] = torch.cuda.get_rng_state(device)
    return s


def set_rng_states(s, model, device):
    torch.set_rng_state(s["torch"])
    if model.mirror is not None:
        model.mirror.mask_rng.set_state(s["mask"])
    name, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, state, gauss_next = s["python"]
    random.setstate((version, tuple(state), gauss_next))
    if "cuda" in s:
        torch.cuda.set_rng_state(s["cuda"], device)


# ----------------------------------------------------------------------------------------------
# main

def main(argv=None):
    cfg = parse_config(argv)  # a bad flag value ends here, in one line
    torch.set_num_threads(cfg.threads)
    if cfg.infer:
        infer(cfg)
        return
    device = setup_distributed(cfg)
    try:
        train(cfg, device)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
