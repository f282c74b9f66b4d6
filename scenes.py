"""The generator of the built-in scene-graph datasets: rendered scenes, annotated the way Visual Genome is.

No real dataset can be downloaded on a laptop in seconds, so the project generates its own, deterministically
from a seed, and writes it through data.py in exactly the VG-SGG format (data.write_vgsgg), where the same
reader as for Visual Genome reads it back. One generator, one set of parameters per dataset (DATASETS):
    synthetic  the small data the study in results/synthetic/ ran on: 4,000 images of 96..160 px, 2..10 objects,
               31 classes, 25 predicates. Its files never change (tests pin them byte for byte).
    vgshape    a dataset with VG150's shape: VG150's 50 predicates, 94 classes with VG's confusable names,
               12,800 images of 160..224 px with about 11 objects and 7 relations each, a predicate tail of
               more than 1,000 to one. `python data.py --data vgshape` prints it beside VG150.
What makes each hard, and which mechanism drives which of VG150's properties: docs/data.md.

You rarely run this file: data.ensure_synthetic() runs it on first use (as a program, so that data.py, the
file readers copy into their own projects, imports nothing of the project). By hand:
    python scenes.py --name vgshape --out DIR [--seed 0]    # generate into DIR
    python scenes.py --name vgshape --annotator             # how incomplete and biased its annotator is

Shapes: G objects of a scene, R relations; boxes are xyxy in pixels.
"""
import argparse
import io
import os
import sys
import time
from collections import defaultdict

import numpy as np
from PIL import Image, ImageDraw

import data

# ----------------------------------------------------------------------------------------------------------
# Scenes: what the generator draws and how it annotates it
#
# What the paper is about has to be visible on it, so the generator imitates the properties of VG that make
# SGG hard, at laptop scale:
#   * 31 object classes drawn as simple glyphs with per-instance variation of size, colour, facing and pose;
#     a few pairs are easy to confuse (man/woman, dog/cat, bench/table).
#   * 25 predicates, VG's most common ones. Which one holds depends on the classes (a hat on a head is
#     "wearing", a cup on a table is "on"), on geometry (a ball on or under a table) and on appearance (a
#     person's pose tells "sitting on" from "standing on" a bench; the side a face looks at tells "looking at"
#     from "near"), so neither the class-pair frequency prior nor geometry alone solves it.
#   * Scenes are composed of small groups ("a person sitting on a chair", "a table with things on it"), drawn
#     from templates with very unequal probabilities, so predicate counts span orders of magnitude like VG's.
#   * Annotation is incomplete and biased like VG's: every true relation is written down only with some
#     probability, and a specific predicate is often replaced by its generic parent ("sitting on" -> "on",
#     "holding" -> "has"), sometimes written twice (generic and specific) for the same pair.
#   * The train split is small (SYNTHETIC_NUM_TRAIN images), so tail predicates have 10 to 50 examples.
# Images are 96..160 px per side, 2..10 objects each. Every drawn object is annotated; only the relations
# are incomplete.
#
# The VG-shaped data ("vgshape") is the same generator with other parameters (DATASETS) and the extras that
# are switched on by its `vg` flag, each one of the things that make VG hard:
#   * crowded scenes: 2..5 groups on larger images, a backdrop (mountain, fence) behind them, buildings with
#     windows, poles with signs and lights, desks with laptops and vases: about 11 objects an image, so an
#     image has over 100 ordered pairs of which about 5 % are related (R@100 > R@50);
#   * parts and clothes as VG annotates them (hand, hair, trousers, shoes, an animal's head and tail, a car's
#     window and light): small boxes inside bigger ones, hard to detect (SGDet);
#   * names that VG's annotators choose among (VG_NAMES: one man is a "man", "person", "guy" or "player"; a
#     wheel a "tire"): classes that look alike or the same, hard to classify (SGCls);
#   * VG150's 50 predicates, written by an annotator (VG_ANNOTATOR) that picks one of the several that fit
#     a pair, mostly the generic one ("on" for "sitting on"), so the rare ones ("mounted on", "painted on",
#     "laying on", "watching") are never the class pair's most frequent predicate: FREQ misses them, and
#     the tail is 1,000 to one;
#   * things that need the image: a grazing animal's lowered head (eating), a girl's hair (girl or boy), snow on
#     a tree (covered in), on top of the small data's poses and facing directions.

SYNTHETIC_VERSION = data.BUILTIN["synthetic"]["version"]   # bump it there whenever the output changes
SYNTHETIC_NUM_TRAIN = 3000       # images with split flag 0 (train + val)
SYNTHETIC_NUM_TEST = 1000        # images with split flag 2
SYNTHETIC_NUM_VAL = data.SYNTHETIC_NUM_VAL   # the num_val_im to pass to VGSGGDataset on the synthetic data
SYNTHETIC_SIZE_RANGE = (96, 160)  # image sides are drawn uniformly in this range (inclusive)
MAX_OBJECTS = 10

# class name -> base RGB colour of its glyph
CLASS_COLORS = {
    "man": (45, 85, 200), "woman": (150, 55, 175), "child": (235, 135, 35),
    "dog": (150, 95, 45), "cat": (175, 125, 70), "horse": (95, 55, 25), "elephant": (135, 135, 145),
    "bird": (230, 200, 30), "head": (235, 195, 160), "wheel": (35, 35, 35),
    "hat": (200, 35, 35), "shirt": (240, 240, 240), "bag": (130, 120, 40), "umbrella": (0, 140, 140),
    "chair": (165, 110, 55), "bench": (120, 90, 60), "table": (120, 70, 40), "bed": (225, 225, 240),
    "car": (200, 40, 40), "bike": (40, 80, 160), "boat": (245, 245, 235),
    "cup": (90, 200, 200), "bottle": (40, 150, 60), "plate": (215, 215, 205), "pizza": (235, 170, 60),
    "ball": (220, 60, 60), "phone": (30, 30, 40),
    "tree": (30, 120, 40), "grass": (80, 160, 60), "street": (110, 110, 115), "water": (60, 110, 200),
}
PERSONS, ITEMS = ("man", "woman", "child"), ("cup", "bottle", "plate", "pizza", "ball", "phone")

# The annotator. true predicate -> (probability the relation is written down at all,
#                                   generic predicate an annotator may write instead, probability of doing so).
# These numbers set the long tail and the head-predicate bias, as in VG where "on" stands for "sitting on",
# "standing on", "parked on", ... and "has" for "holding" or "wearing".
ANNOTATOR = {
    "on": (0.55, None, 0.0), "has": (0.22, None, 0.0), "wearing": (0.65, "has", 0.45), "of": (0.3, "on", 0.45),
    "in": (0.6, "on", 0.45), "near": (0.3, None, 0.0), "behind": (0.5, "near", 0.2),
    "in front of": (0.45, "near", 0.35), "holding": (0.65, "has", 0.45), "sitting on": (0.8, "on", 0.55),
    "standing on": (0.45, "on", 0.6), "next to": (0.45, "near", 0.5), "riding": (0.85, "on", 0.6),
    "under": (0.6, "near", 0.35), "walking on": (0.45, "on", 0.55), "looking at": (0.45, "near", 0.45),
    "parked on": (0.6, "on", 0.6), "carrying": (0.55, "holding", 0.5), "lying on": (0.7, "on", 0.55),
    "eating": (0.6, "holding", 0.5), "above": (0.5, "near", 0.4), "using": (0.6, "holding", 0.55),
    "playing with": (0.5, "near", 0.45), "flying over": (0.6, "above", 0.5), "hanging from": (0.6, "on", 0.5),
}
DUPLICATE_P = 0.15   # when the generic predicate is written, the specific one is written too this often
SYNTHETIC_CLASSES = sorted(CLASS_COLORS)         # alphabetical, as VG's dicts
SYNTHETIC_PREDICATES = sorted(ANNOTATOR)


class _Scene:
    """Objects (dicts with cls, box [x1, y1, x2, y2] in pixels, colour, facing +-1, pose, ...) in drawing
    order, and the *true* relations (subject, object, predicate) before annotation."""

    def __init__(self, rng, W, H, cfg=None):
        self.rng, self.W, self.H = rng, W, H
        self.cfg = cfg or DATASETS["synthetic"]          # the dataset's parameters (DATASETS)
        self.vg = self.cfg["vg"]                           # VG-shaped extras on (see DATASETS["vgshape"])
        self.objs, self.rels, self.mains = [], [], []   # mains: per group, the objects incidental relations use
        self.ground = None                                # index of the ground region, if any

    def add(self, cls, box, **kw):
        jitter = self.rng.integers(-14, 15, size=3)
        color = tuple(int(c) for c in np.clip(np.array(ALL_COLORS[cls]) + jitter, 0, 255))
        self.objs.append(dict(cls=cls, box=[float(v) for v in box], color=color, **kw))
        if self.vg and "name" not in kw:               # which of the plausible names the annotator writes
            self.objs[-1]["name"] = _pick(self.rng, VG_NAMES.get(cls, {cls: 1}))
        return len(self.objs) - 1

    def rel(self, s, o, pred):
        self.rels.append((s, o, pred))

    def walkable(self):
        return self.ground_is("grass", "street", "sidewalk", "snow", "beach")

    def ground_is(self, *kinds):
        return self.ground is not None and self.objs[self.ground]["cls"] in kinds


def _person(sc, cls, cx, bottom, U, pose, f, seat_y=None):
    """A person glyph plus its head (always annotated as a part). Returns the person's index.
    Geometry in units of h0 (standing height); f = +1 faces right, -1 faces left."""
    h0 = U * (0.7 if cls == "child" else 1.0)
    r = 0.13 * h0
    if pose in ("standing", "walking"):
        w = (0.42 if pose == "standing" else 0.55) * h0
        top = bottom - h0
        box = [cx - w / 2, top, cx + w / 2, bottom]
        head = (cx + f * 0.04 * h0, top + r)
        torso = [cx - 0.14 * h0, top + 0.25 * h0, cx + 0.14 * h0, top + 0.6 * h0]
        hand = (cx + f * w / 2, top + 0.48 * h0)
    elif pose == "sitting":   # torso ends on the seat, thighs forward, shins down to `bottom`
        top = seat_y - 0.55 * h0
        xs = sorted([cx - f * 0.2 * h0, cx + f * 0.32 * h0])
        box = [xs[0], top, xs[1], bottom]
        head = (cx - f * 0.05 * h0, top + r)
        torso = sorted([cx - f * 0.19 * h0, cx + f * 0.09 * h0])
        torso = [torso[0], top + 0.25 * h0, torso[1], seat_y]
        hand = (cx + f * 0.24 * h0, top + 0.45 * h0)
    elif pose == "lying":     # horizontal, head at the facing end
        top = bottom - 0.3 * h0
        box = [cx - h0 / 2, top, cx + h0 / 2, bottom]
        head = (cx + f * (h0 / 2 - r), top + 0.15 * h0)
        torso = sorted([cx + f * (h0 / 2 - 2 * r), cx + f * 0.0])
        torso = [torso[0], top + 0.05 * h0, torso[1], bottom - 0.04 * h0]
        hand = (cx + f * 0.1 * h0, top)
    else:                     # "in_vehicle": head and upper torso visible in a window
        top = bottom - 0.5 * h0
        box = [cx - 0.21 * h0, top, cx + 0.21 * h0, bottom]
        head = (cx, top + r)
        torso = [cx - 0.14 * h0, top + 0.25 * h0, cx + 0.14 * h0, bottom]
        hand = (cx + f * 0.21 * h0, top + 0.45 * h0)
    geo = dict(h0=h0, r=r, head=head, torso=torso, hand=hand, seat_y=seat_y)
    kw = {}
    if sc.vg and cls == "child":                # a girl has long hair, a boy not; both may be named "kid"
        girl = bool(sc.rng.random() < 0.5)
        kw = dict(girl=girl, name=_pick(sc.rng, VG_NAMES["girl" if girl else "boy"]))
    p = sc.add(cls, box, facing=f, pose=pose, geo=geo, **kw)
    hd = sc.add("head", [head[0] - r, head[1] - r, head[0] + r, head[1] + r], facing=f)
    sc.rel(p, hd, "has")                        # VG's commonest part relations go both ways
    sc.rel(hd, p, "of")
    if sc.vg:
        _vg_body(sc, p)
    return p


def _dress(sc, p, item_p, bag_p=0.12):
    """Shirt, hat, bag and a held item for person p, with their true relations. The same class pair gets
    different predicates depending on where things are: a hat on the head is worn, in the hand held; a
    phone at the ear is used, in the hand held; a ball at the feet is played with."""
    rng, o = sc.rng, sc.objs[p]
    g, f = o["geo"], o["facing"]
    h0, r, (hx, hy) = g["h0"], g["r"], g["head"]
    x1, y1, x2, y2 = o["box"]
    if o["pose"] != "lying" and rng.random() < 0.5:
        kind = _pick(rng, {"shirt": .5, "jacket": .32, "coat": .18}) if sc.vg else "shirt"
        t = g["torso"] if kind != "coat" else g["torso"][:3] + [g["torso"][3] + 0.15 * h0]   # a coat is longer
        sc.rel(p, sc.add(kind, t, stripes=int(rng.integers(2, 4))), "wearing")
    if rng.random() < 0.3:
        kind = _pick(rng, {"hat": .45, "cap": .35, "helmet": .2}) if sc.vg else "hat"
        sc.rel(p, sc.add(kind, [hx - 1.3 * r, hy - 1.9 * r, hx + 1.3 * r, hy - 0.45 * r], facing=f), "wearing")
    if o["pose"] in ("standing", "walking") and rng.random() < bag_p:
        bx = x1 if f > 0 else x2                                   # on the back
        b = sc.add("bag", [bx - 0.12 * h0, y1 + 0.38 * h0, bx + 0.12 * h0, y1 + 0.62 * h0])
        sc.rel(p, b, "carrying")
        if sc.vg:
            sc.rel(b, p, "on back of")
    if rng.random() >= item_p:
        return
    kinds = ["cup", "bottle", "phone", "pizza", "ball", "umbrella", "bag", "hat"]
    kind = rng.choice(kinds, p=[.16, .16, .17, .13, .1, .12, .09, .07])
    (ax, ay), u = g["hand"], h0
    if kind == "umbrella":
        i = sc.add(kind, [ax - 0.35 * u, hy - r - 0.4 * u, ax + 0.35 * u, ay], facing=f)
        sc.rel(p, i, "holding")
        sc.rel(i, p, "above")
        return
    w, h = {"cup": (.22, .22), "bottle": (.15, .32), "phone": (.15, .24), "pizza": (.26, .26), "ball": (.24, .24),
            "bag": (.24, .24), "hat": (.28, .18)}[kind]
    w, h = w * u, h * u
    if kind == "phone" and rng.random() < 0.4:                  # at the ear: using
        cx, cy, pred = hx + f * 0.9 * r, hy, "using"
    elif kind == "pizza" and rng.random() < 0.4:                # at the mouth: eating
        cx, cy, pred = hx + f * (r + 0.4 * w), hy + 0.3 * r, "eating"
    elif kind == "ball" and o["pose"] in ("standing", "walking") and rng.random() < 0.45:   # at the feet
        cx, cy, pred = (x2 + 0.6 * w) if f > 0 else (x1 - 0.6 * w), y2 - h / 2, "playing with"
    else:
        cx, cy, pred = ax + f * 0.3 * w, ay, "holding"
    i = sc.add(kind, [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], facing=f)
    sc.rel(p, i, pred)


def _quadruped(sc, cls, cx, bottom, U, f, lying=False):
    size = {"dog": (.6, .4), "cat": (.48, .32), "horse": (1.1, .8), "elephant": (1.2, .9), "sheep": (.7, .5),
            "cow": (1.1, .75), "zebra": (1.0, .75), "giraffe": (1.0, 1.3), "bear": (.9, .65)}[cls]
    w, h = size[0] * U, size[1] * U * (0.5 if lying else 1.0)
    a = sc.add(cls, [cx - w / 2, bottom - h, cx + w / 2, bottom], facing=f, pose="lying" if lying else "standing")
    if sc.vg:
        _vg_animal_parts(sc, a)
    return a


def _support(sc, obj, pred_if_street=None):
    """True relation of a standing object to the ground below it."""
    if sc.ground is None:
        return
    g = sc.objs[sc.ground]["cls"]
    if pred_if_street and g == "street":
        sc.rel(obj, sc.ground, pred_if_street)
    elif g != "water":
        sc.rel(obj, sc.ground, "on")


# Group templates. Each places its objects around x = cx with feet on the line y = gy; U is the scale
# (a standing man's height). They return the group's "main" objects for the incidental relations.

def _g_person(sc, cx, gy, U):
    rng = sc.rng
    cls = rng.choice(PERSONS, p=[.45, .35, .2])
    pose = "walking" if rng.random() < 0.35 else "standing"
    p = _person(sc, cls, cx, gy, U, pose, rng.choice([-1, 1]))
    _dress(sc, p, item_p=0.45)
    if sc.walkable():
        sc.rel(p, sc.ground, "walking on" if pose == "walking" else "standing on")
    return [p]


def _g_seat(sc, cx, gy, U):
    rng = sc.rng
    kind = rng.choice(["chair", "bench"], p=[.55, .45])
    f = rng.choice([-1, 1])
    w, h, seat = (0.42 * U, 0.55 * U, 0.45) if kind == "chair" else (0.95 * U, 0.42 * U, 0.5)
    modes = ["sit", "lie", "stand_on", "next_to", "bag_on", "hang"]
    mode = rng.choice(modes, p=[.55, .06, .07, .2, .04, .08])
    if mode == "lie" and kind == "chair":
        mode = "sit"
    sx = cx - f * 0.2 * U if mode == "next_to" else cx
    s = sc.add(kind, [sx - w / 2, gy - h, sx + w / 2, gy], facing=f, seat=seat)
    _support(sc, s)
    seat_y = gy - h * (1 - seat)
    cls = rng.choice(PERSONS, p=[.45, .35, .2])
    if mode == "sit":
        p = _person(sc, cls, sx, gy, U, "sitting", f, seat_y=seat_y)
        sc.rel(p, s, "sitting on")
        _dress(sc, p, item_p=0.3, bag_p=0)
    elif mode == "lie":        # lying along the bench
        p = _person(sc, cls, sx, seat_y + 0.02 * U, min(U, w / 1.05), "lying", f)
        sc.rel(p, s, "lying on")
    elif mode == "stand_on":   # standing on the seat: the same class pair as sitting, another pose
        p = _person(sc, cls, sx, seat_y, U * 0.9, "standing", f)
        sc.rel(p, s, "standing on")
        _dress(sc, p, item_p=0.1, bag_p=0)
    elif mode == "next_to":
        p = _person(sc, cls, sx + f * (w / 2 + 0.25 * U), gy, U, "standing", -f)
        sc.rel(p, s, "next to")
        _dress(sc, p, item_p=0.3)
    else:                      # no person: a bag on the seat, or hanging from the chair's back / the bench's end
        back_x = sx - f * w / 2
        if mode == "bag_on":
            b = sc.add("bag", [sx - 0.12 * U, seat_y - 0.22 * U, sx + 0.12 * U, seat_y + 0.01 * U])
            sc.rel(b, s, "on")
        else:
            b = sc.add("bag", [back_x - 0.11 * U, gy - h + 0.05 * U, back_x + 0.11 * U, gy - h + 0.3 * U])
            sc.rel(b, s, "hanging from")
        return [s]
    return [p, s]


def _g_ride(sc, cx, gy, U):
    rng = sc.rng
    if sc.vg:
        kind = _pick(rng, {"horse": .3, "elephant": .1, "bike": .32, "motorcycle": .28})
    else:
        kind = rng.choice(["horse", "elephant", "bike"], p=[.45, .15, .4])
    f = rng.choice([-1, 1])
    U = U * (0.8 if kind == "elephant" else 0.9)
    if kind in ("bike", "motorcycle"):
        w, h, wr = 0.9 * U, 0.5 * U, 0.19 * U
        m = sc.add(kind, [cx - w / 2, gy - h, cx + w / 2, gy], facing=f)
        for wx in (cx - w / 2 + wr, cx + w / 2 - wr):
            wh = sc.add("wheel", [wx - wr, gy - 2 * wr, wx + wr, gy])
            sc.rel(m, wh, "has")
            sc.rel(wh, m, "of")
        back_y = gy - h
    else:
        m = _quadruped(sc, kind, cx, gy, U, f)
        back_y = sc.objs[m]["box"][1] + 0.25 * (gy - sc.objs[m]["box"][1])
        _support(sc, m)
    u = rng.random()
    cls = rng.choice(PERSONS, p=[.5, .3, .2])
    if u < 0.6:
        p = _person(sc, cls, cx - f * 0.05 * U, back_y + 0.3 * U, U, "sitting", f, seat_y=back_y)
        sc.rel(p, m, "riding")
        _dress(sc, p, item_p=0.1, bag_p=0)
        return [p, m]
    if u < 0.9:                # standing beside it, facing it: same class pair, not riding
        x1, _, x2, _ = sc.objs[m]["box"]
        px = x1 - 0.2 * U if rng.random() < 0.5 else x2 + 0.2 * U
        p = _person(sc, cls, px, gy, U, "standing", 1 if px < cx else -1)
        sc.rel(p, m, "next to")
        sc.rel(p, m, "looking at")
        _dress(sc, p, item_p=0.2)
        return [p, m]
    return [m]


def _g_table(sc, cx, gy, U):
    rng = sc.rng
    w, h = 1.0 * U, 0.45 * U
    t = sc.add("table", [cx - w / 2, gy - h, cx + w / 2, gy])
    _support(sc, t)
    if rng.random() < 0.08:    # a cat (or small dog) standing on the table
        kind = rng.choice(["cat", "dog"], p=[.7, .3])
        a = _quadruped(sc, kind, cx + rng.uniform(-0.2, 0.2) * w, gy - h + 0.02 * U, U * 0.6, rng.choice([-1, 1]))
        sc.rel(a, t, "on")
        return [t, a]
    if rng.random() < 0.25:    # under the table (drawn after it, between its legs)
        kind = rng.choice(["dog", "cat", "ball"], p=[.4, .3, .3])
        ux = cx + rng.uniform(-0.15, 0.15) * w
        if kind == "ball":
            u = sc.add("ball", [ux - 0.12 * U, gy - 0.24 * U, ux + 0.12 * U, gy])
        else:
            u = _quadruped(sc, kind, ux, gy, U * 0.75, rng.choice([-1, 1]), lying=rng.random() < 0.5)
        sc.rel(u, t, "under")
    n = rng.choice([1, 2, 3], p=[.4, .4, .2])
    slots = np.linspace(cx - 0.35 * w, cx + 0.35 * w, n) if n > 1 else [cx + rng.uniform(-.2, .2) * w]
    top = gy - h
    for x in slots:
        kind = rng.choice(ITEMS, p=[.25, .2, .2, .1, .05, .2])
        size = {"cup": (.22, .22), "bottle": (.15, .32), "plate": (.4, .14), "pizza": (.26, .26), "ball": (.24, .24),
                "phone": (.15, .24)}[kind]
        iw, ih = size[0] * U, size[1] * U
        if kind == "phone":    # lies flat
            iw, ih = ih, 0.1 * U
        i = sc.add(kind, [x - iw / 2, top - ih + 0.02 * U, x + iw / 2, top + 0.02 * U])
        sc.rel(i, t, "on")
        if kind == "plate" and rng.random() < 0.4:
            z = sc.add("pizza", [x - 0.13 * U, top - 0.24 * U, x + 0.13 * U, top - 0.04 * U])
            sc.rel(z, i, "on")
    return [t]


def _g_animal(sc, cx, gy, U):
    rng = sc.rng
    if sc.vg:
        kind = _pick(rng, {"dog": .22, "cat": .16, "horse": .12, "elephant": .1, "giraffe": .1, "zebra": .09,
                           "cow": .08, "sheep": .08, "bear": .05})
    else:
        kind = rng.choice(["dog", "cat", "horse", "elephant"], p=[.4, .3, .17, .13])
    f = rng.choice([-1, 1])
    if kind not in ("dog", "cat"):
        m = _quadruped(sc, kind, cx, gy, U * 0.8, f)
        if sc.walkable():
            sc.rel(m, sc.ground, "standing on")
            if sc.vg and sc.ground_is("grass") and kind != "bear" and rng.random() < 0.25:
                sc.rel(m, sc.ground, "eating")          # grazing: the head is down (drawn so)
                sc.objs[m]["grazing"] = True
        if sc.vg and rng.random() < 0.35:              # a herd: a second one, beside and a little behind
            m2 = _quadruped(sc, kind, cx - f * 0.5 * U, gy - 0.04 * U, U * 0.7, f)
            sc.rel(m2, m, "near")
            sc.rel(m, m2, "near")
            return [m, m2]
        return [m]
    lying = rng.random() < 0.4
    m = _quadruped(sc, kind, cx - f * 0.1 * U, gy, U, f, lying=lying)
    if sc.walkable():
        sc.rel(m, sc.ground, "lying on" if lying else "standing on")
    x1, y1, x2, y2 = sc.objs[m]["box"]
    nose = x2 if f > 0 else x1
    u = rng.random()
    if u < 0.15:
        bx = nose + f * 0.12 * U                # in front of the nose, on the ground
        b = sc.add("ball", [bx - 0.1 * U, gy - 0.2 * U, bx + 0.1 * U, gy])
        sc.rel(m, b, "playing with")
    elif u < 0.22 and not lying:
        b = sc.add("pizza", [nose - 0.1 * U, y1, nose + 0.1 * U, y1 + 0.2 * U])
        sc.rel(m, b, "eating")
    return [m]


def _g_bed(sc, cx, gy, U):
    rng = sc.rng
    f = rng.choice([-1, 1])
    w, h = 1.15 * U, 0.45 * U
    b = sc.add("bed", [cx - w / 2, gy - h, cx + w / 2, gy], facing=f)
    _support(sc, b)
    top = gy - 0.8 * h                        # mattress top
    u = rng.random()
    if u < 0.35:
        p = _person(sc, rng.choice(PERSONS), cx + f * 0.05 * U, top + 0.05 * U, U * 0.95, "lying", -f)
        sc.rel(p, b, "lying on")
        return [p, b]
    if u < 0.8:
        a = _quadruped(sc, rng.choice(["dog", "cat"]), cx, top + 0.03 * U, U * 0.9, f, lying=True)
        sc.rel(a, b, "lying on")
        return [a, b]
    return [b]


def _g_car(sc, cx, gy, U):
    rng = sc.rng
    f = rng.choice([-1, 1])
    w, h, wr = 1.3 * U, 0.6 * U, 0.14 * U
    kind = _pick(rng, {"car": .6, "truck": .22, "bus": .18}) if sc.vg else "car"
    if kind != "car":
        w, h = (1.5 * U, 0.8 * U) if kind == "truck" else (1.7 * U, 0.85 * U)
    c = sc.add(kind, [cx - w / 2, gy - h, cx + w / 2, gy], facing=f)
    if sc.vg:
        for part, box in _vehicle_parts(sc.objs[c]).items():
            if rng.random() < 0.6:
                q = sc.add(part, box, part=True)
                sc.rel(q, c, "on")
                sc.rel(c, q, "has")
    _support(sc, c, pred_if_street="parked on")
    mains = [c]
    if rng.random() < 0.3:                    # a person in the window
        p = _person(sc, rng.choice(PERSONS, p=[.5, .3, .2]), cx + f * 0.05 * w, gy - h + 0.45 * U,
                    U * 0.75, "in_vehicle", f)
        sc.rel(p, c, "in")
        mains.append(p)
    for wx in (cx - 0.3 * w, cx + 0.3 * w):
        wh = sc.add("wheel", [wx - wr, gy - 2 * wr, wx + wr, gy])
        sc.rel(c, wh, "has")
        sc.rel(wh, c, "of")
    return mains


def _g_tree(sc, cx, gy, U):
    rng = sc.rng
    w, h = 0.6 * U * rng.uniform(0.9, 1.2), 1.1 * U
    t = sc.add("tree", [cx - w / 2, gy - h, cx + w / 2, gy])
    _support(sc, t)
    u = rng.random()
    if u < 0.45:                              # perched on the crown
        bx = cx + rng.uniform(-0.2, 0.2) * w
        b = sc.add("bird", [bx - 0.13 * U, gy - h - 0.13 * U, bx + 0.13 * U, gy - h + 0.07 * U],
                   facing=rng.choice([-1, 1]), pose="perched")
        sc.rel(b, t, "on")
    elif u < 0.6:                             # flying above it
        bx = cx + rng.uniform(-0.3, 0.3) * w
        by = max(2.0, gy - h - 0.45 * U)
        b = sc.add("bird", [bx - 0.15 * U, by, bx + 0.15 * U, by + 0.2 * U], facing=rng.choice([-1, 1]),
                   pose="flying")
        sc.rel(b, t, "above")
    if sc.vg and rng.random() < 0.3:          # a leaf (branch) sticking out of the crown
        lx = cx + rng.choice([-1, 1]) * 0.45 * w
        q = sc.add("leaf", [lx - 0.08 * U, gy - 0.8 * h, lx + 0.08 * U, gy - 0.8 * h + 0.12 * U])
        sc.rel(q, t, "on")
    if sc.vg and sc.ground_is("snow"):        # snow on the crown (drawn white)
        sc.objs[t]["snowy"] = True
        sc.rel(t, sc.ground, "covered in")
        if rng.random() < 0.3:
            sc.rel(sc.ground, t, "covering")
    return [t]


def _g_flying(sc, cx, gy, U):
    by = sc.rng.uniform(0.08, 0.35) * sc.H
    b = sc.add("bird", [cx - 0.15 * U, by, cx + 0.15 * U, by + 0.2 * U], facing=sc.rng.choice([-1, 1]),
               pose="flying")
    if sc.ground is not None:
        sc.rel(b, sc.ground, "flying over")
    return [b]


def _g_bird(sc, cx, gy, U):
    """Birds on the ground or flying over it: the same (bird, ground) pair, told apart by the wings."""
    rng, f = sc.rng, sc.rng.choice([-1, 1])
    if sc.ground is not None and rng.random() < (0.5 if sc.ground_is("water") else 0.3):
        return _g_flying(sc, cx, gy, U)
    b = sc.add("bird", [cx - 0.13 * U, gy - 0.2 * U, cx + 0.13 * U, gy], facing=f, pose="perched")
    if sc.ground is not None:
        sc.rel(b, sc.ground, "on")              # standing on the ground, or swimming on the water
    return [b]


def _g_boat(sc, cx, gy, U):
    rng = sc.rng
    f = rng.choice([-1, 1])
    w, h = 1.2 * U, 0.75 * U
    b = sc.add("boat", [cx - w / 2, gy - h, cx + w / 2, gy], facing=f)
    sc.rel(b, sc.ground, "in")
    if rng.random() < 0.45:
        p = _person(sc, rng.choice(PERSONS), cx + f * 0.25 * w, gy - 0.3 * h, U * 0.7, "in_vehicle", f)
        sc.rel(p, b, "in")
        return [p, b]
    return [b]


# VG-shaped extras (DATASETS["vgshape"] only). VG annotates the parts and clothes of things (hand of, wheel on,
# window on), so its images are crowded with small boxes inside bigger ones; these add them.

def _pick(rng, weights):
    """One key of {name: weight}, drawn with probability proportional to its weight."""
    names = list(weights)
    p = np.array([weights[n] for n in names], dtype=float)
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def _vg_body(sc, p):
    """A person's hand, hair, trousers and shoes: small boxes inside the person's, as VG annotates them."""
    rng, o = sc.rng, sc.objs[p]
    g, f, pose = o["geo"], o["facing"], o["pose"]
    h0, r, (hx, hy) = g["h0"], g["r"], g["head"]
    x1, y1, x2, y2 = o["box"]
    if pose != "lying" and rng.random() < 0.45:
        ax, ay = g["hand"]
        q = sc.add("hand", [ax - 0.06 * h0, ay - 0.06 * h0, ax + 0.06 * h0, ay + 0.06 * h0])
        sc.rel(p, q, "has")
        sc.rel(q, p, "of")
    if (o["cls"] == "woman" or o.get("girl")) and rng.random() < 0.6:     # the long hair the person glyph draws
        hb = sorted([hx - f * 1.2 * r, hx - f * 0.6 * r])
        q = sc.add("hair", [hb[0], hy - 0.8 * r, hb[1], hy + 1.3 * r], part=True)
        sc.rel(p, q, "has")
        sc.rel(q, p, "of")
    if pose in ("standing", "walking") and rng.random() < 0.5:
        kind = _pick(rng, {"pant": .45, "jean": .35, "short": .2})
        t = g["torso"]
        top = t[3] - 0.02 * h0
        bottom = y2 if kind != "short" else top + 0.5 * (y2 - top)
        q = sc.add(kind, [max(x1, (t[0] + t[2]) / 2 - 0.16 * h0), top, min(x2, (t[0] + t[2]) / 2 + 0.16 * h0), bottom],
                   part=True)
        o["legwear"] = (kind, sc.objs[q]["color"])                 # the person glyph draws its legs in it
        sc.rel(p, q, "wearing")
    if pose in ("standing", "walking") and rng.random() < 0.3:
        kind = _pick(rng, {"shoe": .5, "sneaker": .3, "boot": .2})
        cx = (x1 + x2) / 2
        q = sc.add(kind, [cx - 0.14 * h0, y2 - (0.1 if kind == "boot" else 0.06) * h0, cx + 0.14 * h0, y2])
        sc.rel(p, q, "wearing")


def _animal_head_box(o):
    """Where the quadruped glyph draws its head (the same formulas as _draw_object) -> box."""
    x1, y1, x2, y2 = o["box"]
    w, h, f = x2 - x1, y2 - y1, o["facing"]
    X = lambda t: (x1 + t * w) if f > 0 else (x2 - t * w)
    lying = o.get("pose") == "lying"
    hr = 0.2 * (h / (0.5 if lying else 1.0))
    hcx, hcy = X(0.82), (y1 + (0.3 if lying else 0.22) * h)
    if o["cls"] in ("horse", "giraffe"):
        hcx, hcy = X(0.86), y1 + 0.1 * h
    if o.get("grazing"):
        hcy = y1 + 0.75 * h
    return [hcx - 0.9 * hr, hcy - 0.8 * hr, hcx + 0.9 * hr, hcy + 0.8 * hr]


def _vg_animal_parts(sc, a):
    rng, o = sc.rng, sc.objs[a]
    x1, y1, x2, y2 = o["box"]
    w, h, f = x2 - x1, y2 - y1, o["facing"]
    if rng.random() < 0.45:
        q = sc.add("head", _animal_head_box(o), part=True)
        sc.rel(a, q, "has")
        sc.rel(q, a, "of")
    if rng.random() < 0.35:
        tx = x1 if f > 0 else x2                                       # the tail is at the back
        q = sc.add("tail", [tx - 0.08 * w, y1 + 0.15 * h, tx + 0.05 * w, y1 + 0.5 * h], facing=f)
        sc.rel(a, q, "has")
        sc.rel(q, a, "of")


def _vehicle_parts(o):
    """Window and head light of a car / truck / bus glyph (as _draw_object draws them) -> {part: box}."""
    x1, y1, x2, y2 = o["box"]
    w, h, f = x2 - x1, y2 - y1, o["facing"]
    X = lambda t: (x1 + t * w) if f > 0 else (x2 - t * w)
    Y = lambda t: y1 + t * h
    win = {"car": (0.33, 0.08, 0.69, 0.38), "truck": (0.78, 0.3, 0.95, 0.5), "bus": (0.82, 0.12, 0.97, 0.4)}[o["cls"]]
    xs = sorted([X(win[0]), X(win[2])])
    ls = sorted([X(0.93), X(1.0)])
    return {"window": [xs[0], Y(win[1]), xs[1], Y(win[3])], "light": [ls[0], Y(0.5), ls[1], Y(0.62)]}


def _g_building(sc, cx, gy, U):
    """A building with windows, maybe a door, a sign and a clock: many small boxes on one big one."""
    rng = sc.rng
    w, h = 1.2 * U * rng.uniform(0.9, 1.2), 1.6 * U * rng.uniform(0.9, 1.15)
    top = max(1.0, gy - h)
    b = sc.add("building", [cx - w / 2, top, cx + w / 2, gy])
    rows, cols = int(rng.integers(1, 3)), int(rng.integers(2, 4))
    for i in range(rows):
        for j in range(cols):
            if rng.random() < 0.7:
                wx, wy = cx - w / 2 + (j + 0.5) * w / cols, top + (i + 0.6) * (gy - top) / (rows + 1.5)
                q = sc.add("window", [wx - 0.12 * w, wy - 0.1 * (gy - top), wx + 0.12 * w, wy + 0.1 * (gy - top)])
                sc.rel(q, b, "on")
                if rng.random() < 0.3:
                    sc.rel(b, q, "has")
    if rng.random() < 0.5:
        dx = cx + rng.uniform(-0.25, 0.25) * w
        q = sc.add("door", [dx - 0.1 * w, gy - 0.3 * (gy - top), dx + 0.1 * w, gy])
        sc.rel(q, b, "on")
    if rng.random() < 0.15:
        q = sc.add("clock", [cx - 0.1 * w, top + 0.02 * h, cx + 0.1 * w, top + 0.02 * h + 0.2 * w])
        sc.rel(q, b, "on")
    if rng.random() < 0.2:
        q = sc.add("sign", [cx - 0.3 * w, gy - 0.45 * (gy - top), cx + 0.3 * w, gy - 0.35 * (gy - top)])
        sc.rel(q, b, "on")
    return [b]


def _g_pole(sc, cx, gy, U):
    """A pole with a sign (with letters), a street light or a flag on it."""
    rng = sc.rng
    h = 1.4 * U
    pole = sc.add("pole", [cx - 0.03 * U, gy - h, cx + 0.03 * U, gy])
    _support(sc, pole)
    u = rng.random()
    if u < 0.55:
        s = sc.add("sign", [cx - 0.22 * U, gy - 0.95 * h, cx + 0.22 * U, gy - 0.95 * h + 0.28 * U])
        sc.rel(s, pole, "on")
        if rng.random() < 0.5:
            q = sc.add("letter", [cx - 0.1 * U, gy - 0.95 * h + 0.07 * U, cx + 0.1 * U, gy - 0.95 * h + 0.21 * U])
            sc.rel(s, q, "says")
            sc.rel(q, s, "on")
    elif u < 0.85:
        q = sc.add("light", [cx - 0.1 * U, gy - h - 0.02 * U, cx + 0.1 * U, gy - h + 0.1 * U])
        sc.rel(q, pole, "on")
    else:
        f = rng.choice([-1, 1])
        fx = sorted([cx, cx + f * 0.4 * U])
        q = sc.add("flag", [fx[0], gy - h, fx[1], gy - h + 0.25 * U])
        sc.rel(q, pole, "hanging from")
    return [pole]


def _g_desk(sc, cx, gy, U):
    """A desk or counter with a laptop (its screen), a vase of flowers, a bowl of oranges, and a person at it."""
    rng = sc.rng
    kind = _pick(rng, {"desk": .45, "counter": .3, "table": .25})
    w, h = (0.9 * U, 0.45 * U) if kind != "counter" else (1.1 * U, 0.55 * U)
    t = sc.add(kind, [cx - w / 2, gy - h, cx + w / 2, gy])
    _support(sc, t)
    top = gy - h
    mains = [t]
    slots = np.linspace(cx - 0.3 * w, cx + 0.3 * w, 2)
    for x in slots:
        kind = _pick(rng, {"laptop": .3, "vase": .2, "bowl": .2, "glass": .15, "book": .15})
        if kind == "laptop":
            q = sc.add("laptop", [x - 0.18 * U, top - 0.24 * U, x + 0.18 * U, top + 0.01 * U], facing=rng.choice([-1, 1]))
            sc.rel(q, t, "on")
            if rng.random() < 0.5:
                s = sc.add("screen", [x - 0.13 * U, top - 0.22 * U, x + 0.13 * U, top - 0.06 * U], part=True)
                sc.rel(s, q, "of")
                sc.rel(q, s, "has")
        elif kind == "vase":
            q = sc.add("vase", [x - 0.08 * U, top - 0.25 * U, x + 0.08 * U, top + 0.01 * U])
            sc.rel(q, t, "on")
            if rng.random() < 0.6:
                fl = sc.add("flower", [x - 0.12 * U, top - 0.42 * U, x + 0.12 * U, top - 0.2 * U])
                sc.rel(fl, q, "in")
        elif kind == "bowl":
            q = sc.add("bowl", [x - 0.15 * U, top - 0.12 * U, x + 0.15 * U, top + 0.01 * U])
            sc.rel(q, t, "on")
            if rng.random() < 0.5:
                fr = sc.add(_pick(rng, {"orange": .5, "banana": .5}), [x - 0.1 * U, top - 0.2 * U, x + 0.1 * U, top - 0.06 * U])
                sc.rel(fr, q, "in")
        else:
            s = {"glass": (.12, .2), "book": (.25, .08)}[kind]
            q = sc.add(kind, [x - s[0] / 2 * U, top - s[1] * U, x + s[0] / 2 * U, top + 0.01 * U])
            sc.rel(q, t, "on")
    if rng.random() < 0.4:                        # someone standing at it, facing it
        f = rng.choice([-1, 1])
        p = _person(sc, _pick(rng, {"man": .45, "woman": .35, "child": .2}), cx - f * (w / 2 + 0.1 * U), gy, U,
                    "standing", f)
        sc.rel(p, t, "at")
        if rng.random() < 0.3:
            sc.rel(p, q, "using" if sc.objs[q]["cls"] == "laptop" else "looking at")
        mains.append(p)
    return mains


def _g_sky(sc, cx, gy, U):
    """An airplane or a kite in the sky (flying over the ground), with the person flying the kite."""
    rng = sc.rng
    by = rng.uniform(0.05, 0.25) * sc.H
    if rng.random() < 0.5:
        f = rng.choice([-1, 1])
        q = sc.add("airplane", [cx - 0.45 * U, by, cx + 0.45 * U, by + 0.22 * U], facing=f)
        if sc.ground is not None:
            sc.rel(q, sc.ground, "flying over")
        return [q]
    q = sc.add("kite", [cx - 0.15 * U, by, cx + 0.15 * U, by + 0.25 * U])
    if sc.ground is not None:
        sc.rel(q, sc.ground, "flying over")
    p = _person(sc, _pick(rng, {"man": .35, "woman": .25, "child": .4}), cx + rng.uniform(-0.3, 0.3) * U, gy, U,
                "standing", rng.choice([-1, 1]))
    sc.rel(p, q, "flying")
    if sc.walkable():
        sc.rel(p, sc.ground, "standing on")
    return [p, q]


def _vg_backdrop(sc, gy):
    """Far things behind every group (VG's images are crowded with them): a mountain, a fence along the
    ground, snow on the trees. Drawn first, so everything else occludes them."""
    rng, W, H = sc.rng, sc.W, sc.H
    if rng.random() < 0.15:
        mx = rng.uniform(0.2, 0.8) * W
        m = sc.add("mountain", [mx - 0.45 * W, 0.2 * H, mx + 0.45 * W, gy - 0.06 * H])
        if sc.ground_is("snow"):
            sc.rel(m, sc.ground, "covered in")
    if sc.walkable() and rng.random() < 0.25:
        fe = sc.add("fence", [0, gy - 0.2 * H, W - 1, gy - 0.06 * H])
        sc.rel(fe, sc.ground, "along")


# template -> (function, probability weight on land, weight on water, width in units of U). The weights
# are what makes the long tail; the width lets a template be picked only where it fits at a readable size.
GROUPS = {"person": (_g_person, 10, 0, 0.6), "seat": (_g_seat, 4, 0, 1.1), "ride": (_g_ride, 2.2, 0, 1.2),
          "table": (_g_table, 3.5, 0, 1.0), "animal": (_g_animal, 3.5, 0, 0.8), "bed": (_g_bed, 1.0, 0, 1.2),
          "car": (_g_car, 2.5, 0, 1.3), "tree": (_g_tree, 2.5, 0, 0.7), "bird": (_g_bird, 1.0, 1, 0.3),
          "boat": (_g_boat, 0, 6, 1.2)}
MIN_SCALE = 0.36     # smallest U / H: below it small items would be 3-4 px, too small to see


# The VG-shaped data's vocabulary. Colours of the classes it adds (the glyphs are drawn in _draw_object).
VG_COLORS = {
    "jacket": (70, 75, 95), "coat": (110, 80, 60), "cap": (40, 60, 160), "helmet": (235, 235, 235),
    "hand": (225, 180, 145), "hair": (60, 40, 20), "pant": (80, 80, 85), "jean": (50, 80, 150), "short": (170, 150, 110),
    "shoe": (50, 40, 35), "sneaker": (235, 235, 240), "boot": (90, 55, 30), "tail": (120, 80, 40),
    "sheep": (235, 235, 225), "cow": (245, 245, 245), "zebra": (240, 240, 240), "giraffe": (225, 175, 80),
    "bear": (80, 55, 35), "truck": (60, 130, 70), "bus": (240, 190, 30), "motorcycle": (60, 60, 70),
    "window": (170, 210, 235), "light": (250, 240, 150), "building": (175, 130, 110), "door": (90, 60, 40),
    "clock": (245, 245, 245), "sign": (30, 110, 60), "letter": (250, 250, 250), "pole": (90, 90, 95),
    "flag": (200, 40, 60), "desk": (150, 100, 60), "counter": (190, 190, 200), "laptop": (130, 130, 140),
    "screen": (70, 120, 200), "vase": (140, 60, 150), "flower": (240, 90, 160), "bowl": (235, 225, 200),
    "orange": (245, 150, 20), "banana": (245, 220, 60), "glass": (200, 225, 235), "book": (160, 40, 40),
    "airplane": (225, 225, 235), "kite": (230, 50, 120), "mountain": (120, 130, 150), "fence": (160, 120, 80),
    "leaf": (60, 160, 50), "sidewalk": (185, 180, 170), "snow": (245, 248, 252), "beach": (230, 210, 160),
}
ALL_COLORS = {**CLASS_COLORS, **VG_COLORS}
# Which name the annotator writes for a drawn thing: VG names one man "man", "person", "guy" or "player",
# one wheel "wheel" or "tire". A model cannot tell which name a box will get; it can tell a man from a boy.
VG_NAMES = {
    "man": {"man": .6, "person": .17, "guy": .13, "player": .1},
    "woman": {"woman": .64, "lady": .18, "person": .18},
    "girl": {"girl": .55, "kid": .2, "child": .15, "person": .1},
    "boy": {"boy": .55, "kid": .2, "child": .15, "person": .1},
    "car": {"car": .85, "vehicle": .15}, "truck": {"truck": .85, "vehicle": .15}, "bus": {"bus": .9, "vehicle": .1},
    "wheel": {"wheel": .6, "tire": .4}, "airplane": {"airplane": .6, "plane": .4},
    "jacket": {"jacket": .75, "coat": .25}, "coat": {"coat": .7, "jacket": .3},
    "table": {"table": .9, "desk": .1}, "desk": {"desk": .75, "table": .25}, "counter": {"counter": .8, "table": .2},
    "pant": {"pant": .8, "jean": .2}, "jean": {"jean": .7, "pant": .3},
    "shoe": {"shoe": .75, "sneaker": .25}, "sneaker": {"sneaker": .6, "shoe": .4}, "boot": {"boot": .7, "shoe": .3},
    "hat": {"hat": .8, "cap": .2}, "cap": {"cap": .7, "hat": .3}, "helmet": {"helmet": .85, "hat": .15},
    "letter": {"letter": .6, "number": .4}, "orange": {"orange": .75, "fruit": .25},
    "banana": {"banana": .75, "fruit": .25}, "pizza": {"pizza": .8, "food": .2},
    "bike": {"bike": .9, "motorcycle": .1}, "motorcycle": {"motorcycle": .85, "bike": .15},
    "sheep": {"sheep": .9, "animal": .1}, "cow": {"cow": .9, "animal": .1}, "bear": {"bear": .9, "animal": .1},
}
# The annotator of the VG-shaped data: true predicate (or (true predicate, subject class)) ->
# (probability the relation is written down at all, {predicate written: weight}). Every written predicate is
# one of VG150's 50: where many fit one pair (a man "sitting on" a bench is also "on" it), annotators pick
# one, mostly the generic one, and the rare ones ("mounted on", "painted on", "growing on", "and") are
# written for the same truths as their common neighbours, which is what makes VG's tail long and FREQ-proof.
VG_ANNOTATOR = {
    "on": (0.65, {"on": 1}),
    ("on", "window"): (0.4, {"on": .55, "of": .2, "in": .12, "part of": .06, "to": .02}),
    ("on", "door"): (0.4, {"on": .5, "of": .3, "part of": .1, "to": .1}),
    ("on", "letter"): (0.5, {"on": .6, "painted on": .25, "part of": .15}),
    ("on", "sign"): (0.55, {"on": .55, "attached to": .2, "mounted on": .1, "hanging from": .08, "for": .07}),
    ("on", "light"): (0.45, {"on": .6, "attached to": .15, "mounted on": .1, "hanging from": .15}),
    ("on", "clock"): (0.55, {"on": .6, "mounted on": .2, "attached to": .2}),
    ("on", "leaf"): (0.5, {"on": .45, "of": .3, "growing on": .25}),
    "has": (0.2, {"has": .88, "with": .1, "made of": .02}),
    "wearing": (0.7, {"wearing": .52, "has": .22, "wears": .2, "in": .06}),
    "of": (0.28, {"of": .85, "on": .11, "part of": .02, "from": .02}),
    "in": (0.6, {"in": .85, "on": .15}),
    "near": (0.2, {"near": .86, "with": .06, "and": .03, "between": .03, "to": .02}),
    "next to": (0.35, {"near": .78, "with": .1, "against": .04, "between": .04, "and": .04}),
    "behind": (0.45, {"behind": .8, "near": .2}),
    "in front of": (0.4, {"in front of": .65, "near": .35}),
    "holding": (0.65, {"holding": .55, "has": .35, "with": .1}),
    "sitting on": (0.8, {"sitting on": .4, "on": .5, "in": .1}),
    "standing on": (0.45, {"standing on": .35, "on": .55, "in": .1}),
    "riding": (0.85, {"riding": .45, "on": .45, "sitting on": .1}),
    "under": (0.6, {"under": .65, "near": .35}),
    "walking on": (0.45, {"walking on": .35, "on": .4, "walking in": .12, "in": .08, "across": .05}),
    "looking at": (0.4, {"looking at": .45, "near": .35, "watching": .2}),
    "parked on": (0.6, {"parked on": .4, "on": .5, "in": .1}),
    "carrying": (0.55, {"carrying": .45, "holding": .35, "has": .2}),
    "lying on": (0.7, {"lying on": .3, "laying on": .25, "on": .45}),
    "eating": (0.6, {"eating": .6, "near": .2, "has": .2}),
    "above": (0.5, {"above": .45, "over": .25, "near": .3}),
    "using": (0.6, {"using": .5, "holding": .4, "with": .1}),
    "playing with": (0.5, {"playing": .35, "with": .3, "near": .35}),
    "flying over": (0.6, {"above": .4, "over": .3, "flying in": .3}),
    "hanging from": (0.6, {"hanging from": .45, "on": .5, "from": .05}),
    "on back of": (0.4, {"on": .5, "on back of": .3, "belonging to": .2}),
    "says": (0.45, {"says": .3, "has": .7}),
    "at": (0.5, {"at": .3, "near": .45, "in front of": .25}),
    "flying": (0.6, {"holding": .5, "with": .3, "has": .2}),
    "along": (0.5, {"along": .3, "on": .45, "near": .25}),
    "covered in": (0.6, {"covered in": .3, "with": .3, "has": .4}),
    "covering": (0.6, {"covering": .35, "on": .65}),
}
VG_PREDICATES = sorted({p for _, choices in VG_ANNOTATOR.values() for p in choices})
VG_GROUPS = {"person": (_g_person, 10, 0, 0.6), "seat": (_g_seat, 3.5, 0, 1.1), "ride": (_g_ride, 2, 0, 1.2),
             "table": (_g_table, 2.5, 0, 1.0), "desk": (_g_desk, 2, 0, 1.1), "animal": (_g_animal, 4, 0, 0.9),
             "bed": (_g_bed, 0.8, 0, 1.2), "car": (_g_car, 3, 0, 1.5), "tree": (_g_tree, 2.5, 0, 0.7),
             "bird": (_g_bird, 1, 1, 0.3), "boat": (_g_boat, 0, 6, 1.2), "building": (_g_building, 2.5, 0, 1.2),
             "pole": (_g_pole, 2, 0, 0.4), "sky": (_g_sky, 0.8, 0, 0.9)}
VG_CLASSES = sorted(set(CLASS_COLORS) | set(VG_COLORS) | {n for names in VG_NAMES.values() for n in names})

# The built-in datasets: one generator, one set of parameters each. "synthetic" is the small data the study
# in results/synthetic/ ran on (its files must never change: bump its version if they do); "vgshape" has VG150's shape.
DATASETS = {
    "synthetic": dict(
        **data.BUILTIN["synthetic"], num_train=SYNTHETIC_NUM_TRAIN, num_test=SYNTHETIC_NUM_TEST,
        size_range=SYNTHETIC_SIZE_RANGE, max_objects=MAX_OBJECTS,
        grounds={"none": .3, "grass": .32, "street": .28, "water": .1}, groups=GROUPS,
        num_groups={1: .2, 2: .45, 3: .35}, group_px=45, scale=(0.5, 0.6), min_scale=MIN_SCALE,
        classes=SYNTHETIC_CLASSES, predicates=SYNTHETIC_PREDICATES, vg=False),
    "vgshape": dict(
        **data.BUILTIN["vgshape"], num_train=8500, num_test=4300, size_range=(160, 224), max_objects=20,
        grounds={"none": .12, "grass": .25, "street": .22, "sidewalk": .12, "water": .07, "snow": .1, "beach": .12},
        groups=VG_GROUPS, num_groups={2: .4, 3: .3, 4: .2, 5: .1}, group_px=40, scale=(0.36, 0.46),
        min_scale=0.26, classes=VG_CLASSES, predicates=VG_PREDICATES, vg=True),
}


def _annotate_vg(sc):
    """The VG-shaped annotator (VG_ANNOTATOR): true relations -> [(subject, object, VG150 predicate)]. When it
    writes a generic predicate for a specific truth it sometimes writes the specific one too (VG has both)."""
    rng, out = sc.rng, []
    for s, o, pred in sc.rels:
        p_write, choices = VG_ANNOTATOR.get((pred, sc.objs[s]["cls"]), VG_ANNOTATOR[pred])
        if rng.random() >= p_write:
            continue
        written = _pick(rng, choices)
        out.append((s, o, written))
        if written != pred and pred in choices and rng.random() < DUPLICATE_P:
            out.append((s, o, pred))
    return out


def _incidental(sc):
    """True spatial relations between objects of different groups: occlusion (behind / in front of),
    side by side (next to), close (near), and a face turned towards something (looking at)."""
    rng, mains = sc.rng, [m for group in sc.mains for m in group]
    group_of = {m: gi for gi, group in enumerate(sc.mains) for m in group}
    boxes = np.array([sc.objs[m]["box"] for m in mains]).reshape(-1, 4)
    for a in range(len(mains)):
        for b in range(a + 1, len(mains)):     # a was drawn before b: a is farther away
            if group_of[mains[a]] == group_of[mains[b]]:
                continue
            A, B = boxes[a], boxes[b]
            iw = min(A[2], B[2]) - max(A[0], B[0])
            ih = min(A[3], B[3]) - max(A[1], B[1])
            inter = max(iw, 0) * max(ih, 0)
            small = min((A[2] - A[0]) * (A[3] - A[1]), (B[2] - B[0]) * (B[3] - B[1]))
            oa, ob = (mains[a], mains[b]) if rng.random() < 0.5 else (mains[b], mains[a])
            if inter > 0.1 * small:
                sc.rel(mains[a], mains[b], "behind")
                sc.rel(mains[b], mains[a], "in front of")
            elif -iw < 0.12 * sc.W and abs(A[3] - B[3]) < 0.06 * sc.H:
                sc.rel(oa, ob, "next to")
            elif -iw < 0.3 * sc.W:
                sc.rel(oa, ob, "near")
    for a in mains:                            # looking at: the face points at the other object's centre
        o = sc.objs[a]
        if o["cls"] not in PERSONS + ("dog", "cat") or o.get("pose") in ("lying", "in_vehicle"):
            continue
        cx = (o["box"][0] + o["box"][2]) / 2
        for b in mains:
            if group_of[b] != group_of[a]:
                bx = (sc.objs[b]["box"][0] + sc.objs[b]["box"][2]) / 2
                if 0 < o["facing"] * (bx - cx) < 0.5 * sc.W and rng.random() < 0.5:
                    sc.rel(a, b, "looking at")


def _make_scene(rng, W, H, cfg=None):
    """Compose one image: optional ground band, a few groups at different depths, incidental relations.
    cfg: the dataset's parameters (DATASETS[name]; default the small synthetic data's)."""
    sc = _Scene(rng, W, H, cfg)
    cfg = sc.cfg
    gy = H * rng.uniform(0.8, 0.9)
    ground = rng.choice(list(cfg["grounds"]), p=list(cfg["grounds"].values()))
    if ground != "none":
        sc.ground = sc.add(ground, [0, gy - 0.08 * H, W - 1, H - 1])
    if sc.vg:
        _vg_backdrop(sc, gy)
    groups = cfg["groups"]
    names = list(groups)
    weights = np.array([groups[n][2 if ground == "water" else 1] for n in names], dtype=float)
    widths = np.array([groups[n][3] for n in names])
    n_groups = min(rng.choice(list(cfg["num_groups"]), p=list(cfg["num_groups"].values())),
                   max(1, int(W // cfg["group_px"])))
    edges = np.concatenate([[0], np.cumsum(rng.dirichlet([4] * n_groups))]) * W
    # far groups first (drawn first, smaller, feet higher): depth order = drawing order
    order = rng.permutation(n_groups)
    for rank, k in enumerate(order):
        far = (n_groups - 1 - rank) / max(n_groups - 1, 1)          # 1 = farthest, 0 = nearest
        slot_w = edges[k + 1] - edges[k]
        U = H * rng.uniform(*cfg["scale"]) * (1 - 0.15 * far)
        # Each template about fits its slot (neighbours may overlap a bit: occlusion, "behind"); one that
        # would have to shrink below MIN_SCALE is not picked here.
        fit_U = np.minimum(U, 1.35 * slot_w / widths)
        w_k = np.where(fit_U >= cfg["min_scale"] * H, weights, 0)
        if w_k.sum() == 0:
            continue
        name = rng.choice(names, p=w_k / w_k.sum())
        cx = (edges[k] + edges[k + 1]) / 2 + rng.uniform(-0.18, 0.18) * slot_w
        n_before = len(sc.objs)
        mains = groups[name][0](sc, cx, gy - 0.05 * H * far, fit_U[names.index(name)])
        if len(sc.objs) > cfg["max_objects"]:   # too many objects: drop the whole group
            sc.rels = [r for r in sc.rels if r[0] < n_before and r[1] < n_before]
            del sc.objs[n_before:]
            continue
        sc.mains.append(mains)
    _incidental(sc)
    return sc


def _annotate(sc):
    """The biased, incomplete annotator: true relations -> list of (subject, object, predicate name)."""
    rng, out = sc.rng, []
    if sc.vg:
        return _annotate_vg(sc)
    for s, o, pred in sc.rels:
        p_write, generic, p_generic = ANNOTATOR[pred]
        if rng.random() >= p_write:
            continue
        if generic is not None and rng.random() < p_generic:
            out.append((s, o, generic))
            if rng.random() < DUPLICATE_P:
                out.append((s, o, pred))
        else:
            out.append((s, o, pred))
    return out


# Rendering: each class is a glyph drawn inside its box, at 2x resolution then downsampled (anti-aliasing).

SS = 2   # supersampling factor


def _dark(c, k=0.6):
    return tuple(int(v * k) for v in c)


def _draw_object(d, o):
    """Draw object o's glyph inside its box on the canvas d (SS times the image resolution)."""
    cls, c, f = o["cls"], o["color"], o.get("facing", 1)
    x1, y1, x2, y2 = o["box"]
    w, h = x2 - x1, y2 - y1
    X = lambda t: (x1 + t * w) if f > 0 else (x2 - t * w)   # t measured along the facing direction
    Y = lambda t: y1 + t * h
    P = lambda *pts: [(x * SS, y * SS) for x, y in pts]
    if o.get("part"):
        return   # drawn by the thing it is part of (a car's window, a person's hair or trousers)

    def rect(a, b, cc, e, fill, outline=None, width=1, radius=0):
        xy = [min(a, cc) * SS, min(b, e) * SS, max(a, cc) * SS, max(b, e) * SS]
        radius = min(radius * SS, (xy[2] - xy[0]) / 2 - 1, (xy[3] - xy[1]) / 2 - 1)  # PIL fails on larger ones
        if radius >= 1:
            d.rounded_rectangle(xy, radius=radius, fill=fill, outline=outline, width=width)
        else:
            d.rectangle(xy, fill=fill, outline=outline, width=width)

    def ell(a, b, cc, e, fill, outline=None, width=1):
        d.ellipse([min(a, cc) * SS, min(b, e) * SS, max(a, cc) * SS, max(b, e) * SS], fill=fill,
                  outline=outline, width=width)

    def line(pts, fill, width):
        d.line(P(*pts), fill=fill, width=max(1, int(round(width * SS))))

    if cls in PERSONS:
        g, pose = o["geo"], o["pose"]
        h0, r, (hx, hy), t = g["h0"], g["r"], g["head"], g["torso"]
        lw = 0.08 * h0
        leg = c if cls != "woman" else CLASS_COLORS["head"]
        if o.get("legwear"):
            leg = o["legwear"][1] if o["legwear"][0] != "short" else CLASS_COLORS["head"]
        hip = ((t[0] + t[2]) / 2, t[3] - 0.02 * h0)
        if pose == "standing":
            for dx in (-0.06, 0.06):
                line([(hip[0] + dx * h0, hip[1]), (hip[0] + dx * h0, y2)], _dark(leg, 0.8), lw)
        elif pose == "walking":
            line([hip, (x1 + 0.1 * w, y2)], _dark(leg, 0.8), lw)
            line([hip, (x2 - 0.1 * w, y2)], _dark(leg, 0.8), lw)
        elif pose == "sitting":
            knee = (hip[0] + f * 0.28 * h0, g["seat_y"] - 0.04 * h0)
            line([hip, knee], _dark(leg, 0.8), lw)
            line([knee, (knee[0], y2)], _dark(leg, 0.8), lw)
        elif pose == "lying":
            line([(X(0.5), Y(0.5)), (X(0.0), Y(0.6))], _dark(leg, 0.8), lw)
        if o.get("legwear", ("",))[0] == "short":
            rect(hip[0] - 0.1 * h0, hip[1] - 0.02 * h0, hip[0] + 0.1 * h0, hip[1] + 0.45 * (y2 - hip[1]),
                 fill=o["legwear"][1])
        rect(*t, fill=c, outline=_dark(c), radius=0.05 * h0)
        if cls == "woman" and pose != "in_vehicle":
            line([(t[0], t[3]), (t[2], t[3])], _dark(c, 0.8), 0.12 * h0)
        if pose != "lying":
            sh = ((t[0] + t[2]) / 2, t[1] + 0.05 * h0)
            line([sh, g["hand"]], _dark(c, 0.8), 0.06 * h0)
        ell(hx - r, hy - r, hx + r, hy + r, fill=CLASS_COLORS["head"], outline=_dark(CLASS_COLORS["head"]))
        if cls == "woman" or o.get("girl"):   # long hair on the back of the head
            line([(hx - f * 0.8 * r, hy - 0.6 * r), (hx - f * 1.0 * r, hy + 1.2 * r)], (60, 40, 20), 0.35 * r)
        ex = hx + f * 0.5 * r
        ell(ex - 0.18 * r, hy - 0.3 * r, ex + 0.18 * r, hy + 0.05 * r, fill=(20, 20, 20))
    elif cls in ("dog", "cat", "horse", "elephant", "sheep", "cow", "zebra", "giraffe", "bear"):
        lying = o.get("pose") == "lying"
        by0, by1 = (Y(0.35), Y(1.0)) if lying else (Y(0.25), Y(0.68))
        if cls == "giraffe":
            by0, by1 = Y(0.4), Y(0.72)
        if not lying:
            for t_ in (0.15, 0.3, 0.55, 0.7):
                line([(X(t_), Y(0.5)), (X(t_), y2)], _dark(c, 0.75), 0.07 * h)
        ell(X(0.02), by0, X(0.78), by1, fill=c, outline=_dark(c))
        if cls == "zebra":          # stripes tell a zebra from a white horse
            for t_ in (0.15, 0.27, 0.39, 0.51, 0.63):
                line([(X(t_), by0 + 0.1 * (by1 - by0)), (X(t_ + 0.04), by1)], (20, 20, 20), 0.05 * w)
        elif cls in ("cow", "giraffe"):   # spots
            spot = (30, 30, 30) if cls == "cow" else (140, 80, 30)
            for tx, ty in ((0.2, 0.35), (0.45, 0.6), (0.6, 0.3)):
                ell(X(tx - 0.06), by0 + (ty - 0.15) * (by1 - by0), X(tx + 0.06), by0 + (ty + 0.15) * (by1 - by0),
                    fill=spot)
        elif cls == "sheep":        # fleece
            for tx in (0.15, 0.35, 0.55):
                ell(X(tx - 0.1), by0 - 0.05 * h, X(tx + 0.12), by0 + 0.2 * h, fill=_dark(c, 0.93))
        hr = 0.2 * (h / (0.5 if lying else 1.0))
        hcx, hcy = X(0.82), (Y(0.3) if lying else Y(0.22))
        if o.get("grazing"):        # head down to the grass
            hcy = Y(0.75)
        if cls == "giraffe":        # the long neck
            line([(X(0.65), Y(0.45)), (X(0.86), Y(0.1))], c, 0.12 * w)
            hcx, hcy = X(0.86), Y(0.1)
        if cls == "horse":
            d.polygon(P((X(0.6), Y(0.3)), (X(0.72), Y(0.05)), (X(0.85), Y(0.05)), (X(0.75), Y(0.45))), fill=c)
            hcx, hcy = X(0.86), Y(0.1)
            line([(X(0.62), Y(0.3)), (X(0.73), Y(0.04))], (30, 15, 5), 0.05 * h)
        if cls == "elephant":
            line([(X(0.93), hcy), (X(0.97), Y(0.85) if not lying else y2)], _dark(c, 0.85), 0.08 * h)
        ell(hcx - hr * 0.9, hcy - hr * 0.8, hcx + hr * 0.9, hcy + hr * 0.8, fill=c, outline=_dark(c))
        if cls == "cat":
            for dx in (-0.5, 0.3):
                d.polygon(P((hcx + dx * hr, hcy - 0.5 * hr), (hcx + (dx + 0.4) * hr, hcy - 1.5 * hr),
                            (hcx + (dx + 0.6) * hr, hcy - 0.4 * hr)), fill=_dark(c, 0.8))
        elif cls == "dog":
            ell(hcx - f * 0.8 * hr - 0.25 * hr, hcy - 0.5 * hr, hcx - f * 0.8 * hr + 0.25 * hr, hcy + 0.7 * hr,
                fill=_dark(c, 0.6))
            line([(X(0.03), Y(0.35) if not lying else Y(0.5)), (X(-0.02), Y(0.1) if not lying else Y(0.3))],
                 _dark(c, 0.8), 0.05 * h)
        elif cls == "elephant":
            ell(hcx - f * 1.1 * hr, hcy - 0.9 * hr, hcx - f * 0.1 * hr, hcy + 1.0 * hr, fill=_dark(c, 0.85))
        ex = hcx + f * 0.4 * hr
        ell(ex - 0.12 * hr, hcy - 0.3 * hr, ex + 0.12 * hr, hcy - 0.05 * hr, fill=(15, 15, 15))
    elif cls == "bird":
        if o.get("pose") == "flying":
            d.polygon(P((X(0.3), Y(0.6)), (X(0.05), Y(0.0)), (X(0.55), Y(0.55))), fill=_dark(c, 0.85))
            d.polygon(P((X(0.45), Y(0.6)), (X(0.75), Y(0.0)), (X(0.65), Y(0.6))), fill=_dark(c, 0.85))
            ell(X(0.1), Y(0.5), X(0.8), Y(1.0), fill=c)
            hb = (Y(0.55), Y(0.95))
        else:
            line([(X(0.45), Y(0.7)), (X(0.45), y2)], (60, 60, 60), 0.08 * h)
            ell(X(0.05), Y(0.3), X(0.75), Y(0.8), fill=c)
            hb = (Y(0.05), Y(0.45))
        ell(X(0.6), hb[0], X(0.88), hb[1], fill=c, outline=_dark(c))
        d.polygon(P((X(0.86), (hb[0] + hb[1]) / 2 - 0.08 * h), (X(1.0), (hb[0] + hb[1]) / 2),
                    (X(0.86), (hb[0] + hb[1]) / 2 + 0.08 * h)), fill=(230, 120, 20))
    elif cls == "head":
        pass   # drawn as part of its person
    elif cls == "wheel":
        ell(x1, y1, x2, y2, fill=c)
        ell(x1 + 0.3 * w, y1 + 0.3 * h, x2 - 0.3 * w, y2 - 0.3 * h, fill=(170, 170, 170))
    elif cls == "hat":
        rect(x1, Y(0.72), x2, y2, fill=_dark(c, 0.8))
        rect(X(0.2), y1, X(0.8), Y(0.75), fill=c, radius=0.1 * w)
    elif cls == "cap":              # a brim to the front only
        rect(X(0.5), Y(0.75), X(1.0), y2, fill=_dark(c, 0.8))
        rect(X(0.15), Y(0.2), X(0.75), Y(0.8), fill=c, radius=0.2 * w)
    elif cls == "helmet":           # a round shell
        d.pieslice([x1 * SS, y1 * SS, x2 * SS, (y2 + 0.8 * h) * SS], 180, 360, fill=c, outline=_dark(c))
    elif cls in ("jacket", "coat"):  # open at the front, with a collar
        rect(x1, y1, x2, y2, fill=c, outline=_dark(c, 0.7))
        line([((x1 + x2) / 2, y1), ((x1 + x2) / 2, y2)], _dark(c, 0.5), 0.08 * w)
        d.polygon(P((x1, y1), ((x1 + x2) / 2, Y(0.25)), (x2, y1)), fill=_dark(c, 0.8))
    elif cls == "shirt":
        rect(x1, y1, x2, y2, fill=c, outline=_dark(c, 0.7))
        for k in range(o.get("stripes", 2)):
            yy = y1 + (k + 0.7) * h / (o.get("stripes", 2) + 0.5)
            line([(x1, yy), (x2, yy)], (60, 160, 220), 0.1 * h)
    elif cls == "bag":
        line([(X(0.25), Y(0.3)), (X(0.5), y1), (X(0.75), Y(0.3))], _dark(c), 0.08 * w)
        rect(x1, Y(0.3), x2, y2, fill=c, outline=_dark(c), radius=0.1 * w)
    elif cls == "umbrella":
        d.pieslice([x1 * SS, y1 * SS, x2 * SS, (y1 + 2 * 0.45 * h) * SS], 180, 360, fill=c, outline=_dark(c))
        line([((x1 + x2) / 2, Y(0.45)), ((x1 + x2) / 2, y2)], (50, 50, 50), 0.04 * w)
    elif cls in ("chair", "bench"):
        seat = o["seat"]
        rect(x1, Y(seat), x2, Y(seat + 0.12), fill=c, outline=_dark(c))
        for t_ in (0.08, 0.92):
            line([(X(t_), Y(seat + 0.1)), (X(t_), y2)], _dark(c, 0.8), 0.07 * (w if cls == "chair" else h))
        if cls == "chair":
            rect(X(0.0), y1, X(0.18), Y(seat), fill=c, outline=_dark(c))
        else:
            for yy in (0.05, 0.25):
                rect(x1 + 0.05 * w, Y(yy), x2 - 0.05 * w, Y(yy + 0.1), fill=_dark(c, 0.9))
            for t_ in (0.1, 0.9):
                line([(X(t_), y1), (X(t_), Y(seat))], _dark(c, 0.8), 0.05 * h)
    elif cls == "desk":             # a table with a drawer block
        rect(x1, y1, x2, Y(0.16), fill=c, outline=_dark(c))
        rect(X(0.6), Y(0.16), X(0.95), y2, fill=_dark(c, 0.85), outline=_dark(c, 0.6))
        line([(X(0.06), Y(0.16)), (X(0.06), y2)], _dark(c, 0.8), 0.06 * w)
    elif cls == "counter":          # a solid block
        rect(x1, y1, x2, y2, fill=c, outline=_dark(c, 0.7))
        rect(x1, y1, x2, Y(0.12), fill=_dark(c, 0.8))
    elif cls == "table":
        rect(x1, y1, x2, Y(0.16), fill=c, outline=_dark(c))
        for t_ in (0.06, 0.94):
            line([(X(t_), Y(0.16)), (X(t_), y2)], _dark(c, 0.8), 0.06 * w)
    elif cls == "bed":
        rect(X(0.0), y1, X(0.08), y2, fill=(140, 90, 60))
        rect(X(0.05), Y(0.2), X(1.0), Y(0.85), fill=c, outline=_dark(c, 0.8))
        ell(X(0.1), Y(0.25), X(0.3), Y(0.5), fill=(250, 250, 250), outline=(180, 180, 190))
        line([(X(0.97), Y(0.8)), (X(0.97), y2)], (140, 90, 60), 0.06 * h)
    elif cls == "bus":              # tall and boxy, a row of windows
        rect(x1, y1, x2, Y(0.85), fill=c, outline=_dark(c), radius=0.05 * h)
        for t_ in (0.05, 0.27, 0.49, 0.71):
            rect(X(t_), Y(0.12), X(t_ + 0.15), Y(0.4), fill=ALL_COLORS["window"])
        rect(X(0.82), Y(0.12), X(0.97), Y(0.4), fill=ALL_COLORS["window"])
        ell(X(0.94), Y(0.5), X(1.0), Y(0.62), fill=ALL_COLORS["light"])
    elif cls == "truck":            # a cab and a cargo box
        rect(X(0.0), y1, X(0.7), Y(0.85), fill=_dark(c, 0.7), outline=_dark(c, 0.5))
        rect(X(0.72), Y(0.25), X(1.0), Y(0.85), fill=c, outline=_dark(c), radius=0.05 * h)
        rect(X(0.78), Y(0.3), X(0.95), Y(0.5), fill=ALL_COLORS["window"])
        ell(X(0.93), Y(0.5), X(1.0), Y(0.62), fill=ALL_COLORS["light"])
    elif cls == "car":
        d.polygon(P((X(0.18), Y(0.42)), (X(0.3), y1), (X(0.72), y1), (X(0.85), Y(0.42))), fill=_dark(c, 0.85))
        rect(X(0.33), Y(0.08), X(0.69), Y(0.38), fill=(170, 210, 235))
        rect(x1, Y(0.4), x2, Y(0.85), fill=c, outline=_dark(c), radius=0.08 * h)
        ell(X(0.93), Y(0.5), X(1.0), Y(0.62), fill=(250, 240, 150))
    elif cls in ("bike", "motorcycle"):
        if cls == "motorcycle":     # an engine block and a thicker frame
            rect(X(0.35), Y(0.35), X(0.65), Y(0.7), fill=_dark(c, 0.7))
        wr = 0.38 * h
        back, front = (X(0.0) + X(0.0 + 2 * wr / w)) / 2, (X(1.0) + X(1.0 - 2 * wr / w)) / 2
        seat = (X(0.4), Y(0.15))
        line([(back, y2 - wr), seat, (X(0.7), Y(0.25)), (front, y2 - wr)], c, 0.07 * h)
        line([(back, y2 - wr), (X(0.55), y2 - wr), seat], c, 0.07 * h)
        line([(X(0.7), Y(0.25)), (X(0.72), y1)], (40, 40, 40), 0.06 * h)
    elif cls == "boat":
        d.polygon(P((x1, Y(0.6)), (x2, Y(0.6)), (X(0.85), y2), (X(0.15), y2)), fill=c, outline=(120, 70, 40))
        line([(x1, Y(0.7)), (x2, Y(0.7))], (140, 80, 40), 0.06 * h)
        line([(X(0.45), y1), (X(0.45), Y(0.6))], (90, 60, 30), 0.03 * w)
        d.polygon(P((X(0.47), y1), (X(0.47), Y(0.55)), (X(0.8), Y(0.55))), fill=(235, 120, 90))
    elif cls == "cup":
        ell(X(0.6), Y(0.2), X(1.0), Y(0.7), fill=None, outline=c, width=max(1, int(0.12 * w * SS)))
        rect(X(0.0), y1, X(0.75), y2, fill=c, outline=_dark(c))
    elif cls == "bottle":
        rect(X(0.32), y1, X(0.68), Y(0.4), fill=_dark(c, 0.85))
        rect(x1, Y(0.35), x2, y2, fill=c, outline=_dark(c), radius=0.2 * w)
        rect(x1, Y(0.6), x2, Y(0.78), fill=(240, 230, 200))
    elif cls == "plate":
        ell(x1, y1, x2, y2, fill=c, outline=_dark(c, 0.8))
        ell(x1 + 0.2 * w, y1 + 0.25 * h, x2 - 0.2 * w, y2 - 0.25 * h, fill=_dark(c, 0.93))
    elif cls == "pizza":
        ell(x1, y1, x2, y2, fill=(200, 120, 40))
        ell(x1 + 0.12 * w, y1 + 0.12 * h, x2 - 0.12 * w, y2 - 0.12 * h, fill=c)
        for tx, ty in ((0.35, 0.35), (0.62, 0.45), (0.42, 0.66)):
            ell(x1 + (tx - 0.08) * w, y1 + (ty - 0.08) * h, x1 + (tx + 0.08) * w, y1 + (ty + 0.08) * h,
                fill=(190, 30, 30))
    elif cls == "ball":
        ell(x1, y1, x2, y2, fill=c, outline=_dark(c))
        rect(x1 + 0.1 * w, Y(0.42), x2 - 0.1 * w, Y(0.58), fill=(250, 250, 250))
    elif cls == "phone":
        rect(x1, y1, x2, y2, fill=c, radius=0.15 * min(w, h))
        rect(x1 + 0.15 * w, y1 + 0.15 * h, x2 - 0.15 * w, y2 - 0.15 * h, fill=(110, 170, 230))
    elif cls == "tree":
        rect(X(0.42), Y(0.5), X(0.58), y2, fill=(110, 70, 35))
        ell(x1, y1, x2, Y(0.65), fill=c, outline=_dark(c))
        ell(X(0.2), Y(0.1), X(0.55), Y(0.4), fill=_dark(c, 0.8))
        if o.get("snowy"):
            ell(X(0.15), y1, X(0.85), Y(0.25), fill=(245, 248, 252))
    elif cls == "grass":
        rect(x1, y1, x2, y2, fill=c)
        for k in range(int(w / 6)):
            xx = x1 + 3 + 6 * k
            line([(xx, y1 + 0.2 * h + (k % 3) * 0.15 * h), (xx + 2, y1 + 0.05 * h + (k % 3) * 0.15 * h)],
                 _dark(c, 0.7), 1)
    elif cls == "street":
        rect(x1, y1, x2, y2, fill=c)
        for k in range(int(w / 16) + 1):
            line([(x1 + 16 * k, (y1 + y2) / 2), (x1 + 16 * k + 8, (y1 + y2) / 2)], (235, 235, 235), 1.5)
    elif cls == "water":
        rect(x1, y1, x2, y2, fill=c)
        for k in range(int(w / 12) + 1):
            for row in (0.3, 0.7):
                xx, yy = x1 + 12 * k + (6 if row > 0.5 else 0), y1 + row * h
                d.arc([xx * SS, (yy - 2) * SS, (xx + 8) * SS, (yy + 2) * SS], 180, 360, fill=(170, 200, 240),
                      width=SS)
    elif cls in ("sidewalk", "snow", "beach"):
        rect(x1, y1, x2, y2, fill=c)
        step = {"sidewalk": 14, "snow": 9, "beach": 7}[cls]
        for k in range(int(w / step) + 1):
            xx = x1 + step * k
            if cls == "sidewalk":
                line([(xx, y1), (xx - 4, y2)], _dark(c, 0.8), 1)
            else:
                ell(xx, y1 + (0.2 + 0.3 * (k % 3)) * h, xx + 2, y1 + (0.2 + 0.3 * (k % 3)) * h + 2, fill=_dark(c, 0.9))
    elif cls == "tail":
        line([(X(0.9), y1), (X(0.1), y2)], c, 0.3 * w)
    elif cls in ("hand", "orange", "leaf", "light", "flower"):
        ell(x1, y1, x2, y2, fill=c, outline=_dark(c, 0.8))
        if cls == "flower":
            ell(x1 + 0.35 * w, y1 + 0.35 * h, x2 - 0.35 * w, y2 - 0.35 * h, fill=(250, 230, 60))
    elif cls in ("shoe", "sneaker", "boot"):
        rect(x1, y1, x2, y2, fill=c, outline=_dark(c, 0.6), radius=0.3 * h)
    elif cls in ("building", "door", "pole", "book", "glass"):
        rect(x1, y1, x2, y2, fill=c, outline=_dark(c, 0.75))
        if cls == "building":
            rect(x1, y1, x2, y1 + 0.06 * h, fill=_dark(c, 0.7))
    elif cls == "window":
        rect(x1, y1, x2, y2, fill=c, outline=(70, 60, 50), width=SS)
        line([((x1 + x2) / 2, y1), ((x1 + x2) / 2, y2)], (70, 60, 50), 1)
    elif cls == "clock":
        ell(x1, y1, x2, y2, fill=c, outline=(30, 30, 30), width=SS)
        line([((x1 + x2) / 2, (y1 + y2) / 2), ((x1 + x2) / 2, y1 + 0.2 * h), ((x1 + x2) / 2, (y1 + y2) / 2),
              (x2 - 0.25 * w, (y1 + y2) / 2)], (30, 30, 30), 1)
    elif cls == "sign":
        rect(x1, y1, x2, y2, fill=c, outline=(240, 240, 240), width=SS)
    elif cls == "letter":
        for k in range(3):
            xx = x1 + (k + 0.5) * w / 3
            line([(xx - 0.1 * w, y2), (xx, y1), (xx + 0.1 * w, y2)], c, 0.06 * w)
    elif cls == "flag":
        rect(x1, y1, x2, y2, fill=c)
        rect(x1, Y(0.4), x2, Y(0.6), fill=(245, 245, 245))
    elif cls == "laptop":
        rect(x1, y1, x2, Y(0.85), fill=c, outline=_dark(c, 0.6))
        rect(x1 + 0.12 * w, y1 + 0.08 * h, x2 - 0.12 * w, Y(0.7), fill=ALL_COLORS["screen"])
        rect(x1 - 0.05 * w, Y(0.85), x2 + 0.05 * w, y2, fill=_dark(c, 0.8))
    elif cls in ("vase", "bowl"):
        if cls == "vase":
            ell(x1, Y(0.2), x2, y2, fill=c, outline=_dark(c))
            rect(X(0.35), y1, X(0.65), Y(0.3), fill=c)
        else:
            d.pieslice([x1 * SS, (y1 - h) * SS, x2 * SS, y2 * SS], 0, 180, fill=c, outline=_dark(c))
    elif cls == "banana":
        d.arc([x1 * SS, (y1 - h) * SS, x2 * SS, y2 * SS], 20, 160, fill=c, width=max(1, int(0.35 * h * SS)))
    elif cls == "airplane":
        ell(x1, Y(0.35), x2, Y(0.75), fill=c, outline=_dark(c))
        d.polygon(P((X(0.35), Y(0.5)), (X(0.55), y2), (X(0.62), Y(0.5))), fill=_dark(c, 0.85))
        d.polygon(P((X(0.0), Y(0.5)), (X(0.05), y1), (X(0.15), Y(0.5))), fill=_dark(c, 0.85))
    elif cls == "kite":
        cxk, cyk = (x1 + x2) / 2, (y1 + y2) / 2
        d.polygon(P((cxk, y1), (x2, cyk), (cxk, y2), (x1, cyk)), fill=c, outline=_dark(c))
    elif cls == "mountain":
        d.polygon(P((x1, y2), ((x1 + x2) / 2, y1), (x2, y2)), fill=c)
        d.polygon(P((X(0.4), Y(0.2)), ((x1 + x2) / 2, y1), (X(0.6), Y(0.2))), fill=(245, 248, 252))
    elif cls == "fence":
        line([(x1, Y(0.3)), (x2, Y(0.3))], c, 0.1 * h)
        for k in range(int(w / 7) + 1):
            line([(x1 + 7 * k, y1), (x1 + 7 * k, y2)], c, 0.12 * h)
    else:
        raise ValueError(f"no glyph for class {cls!r}")


def _render(sc):
    """Scene -> uint8 image (H, W, 3): background gradient, glyphs in drawing order, sensor noise."""
    rng, W, H = sc.rng, sc.W, sc.H
    top, bottom = rng.integers(150, 256, size=3), rng.integers(150, 256, size=3)
    t = np.linspace(0, 1, H * SS)[:, None, None]
    column = (top * (1 - t) + bottom * t).astype(np.uint8)                             # (H*SS, 1, 3)
    img = Image.fromarray(column).resize((W * SS, H * SS), Image.NEAREST)
    d = ImageDraw.Draw(img)
    for o in sc.objs:
        _draw_object(d, o)
    img = np.asarray(img.resize((W, H), Image.BOX), dtype=np.float32)                  # (H, W, 3)
    img += 5 * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _finalize(sc, annotated):
    """Clip boxes to the image, drop objects that fell (almost) outside it, shuffle the object order (so that
    no model can read structure from it), and map relations to (subject, object, predicate index)."""
    rng, W, H = sc.rng, sc.W, sc.H
    boxes = np.array([o["box"] for o in sc.objs]).reshape(-1, 4)
    boxes = np.clip(boxes, 0, [W - 1, H - 1, W - 1, H - 1])
    keep = np.nonzero((boxes[:, 2] - boxes[:, 0] >= 2) & (boxes[:, 3] - boxes[:, 1] >= 2))[0]
    order = keep[rng.permutation(len(keep))]
    new = {int(old): k for k, old in enumerate(order)}
    classes, predicates = sc.cfg["classes"], sc.cfg["predicates"]
    labels = np.array([classes.index(sc.objs[i].get("name", sc.objs[i]["cls"])) + 1 for i in order], dtype=np.int64)
    rels = [(new[s], new[o], predicates.index(p) + 1) for s, o, p in annotated if s in new and o in new]
    rels = np.array(rels, dtype=np.int64).reshape(-1, 3)[rng.permutation(len(rels))]
    return boxes[order], labels, rels

# ----------------------------------------------------------------------------------------------------------
# Generating a dataset

def generate(out_dir, seed=0, num_train=None, num_test=None, verbose=True, name="synthetic"):
    """Generate the built-in dataset `name` (a key of DATASETS) into out_dir: the jpgs here, the h5 and the
    jsons through data.write_vgsgg. num_train / num_test: images with the train / test flag (default the
    dataset's). Deterministic: the same name, seed and sizes give byte-identical files."""
    cfg = DATASETS[name]
    num_train = cfg["num_train"] if num_train is None else num_train
    num_test = cfg["num_test"] if num_test is None else num_test
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(out_dir, "VG_100K"), exist_ok=True)
    lo, hi = cfg["size_range"]
    n = num_train + num_test
    image_data, all_boxes, all_labels, all_rels = [], [], [], []
    ids = (i for i in range(1, 10 ** 9) if i not in data.CORRUPTED_IMAGE_IDS)   # never reuse VG's 4 skipped ids
    t0 = time.time()
    for k in range(n):
        W, H = (int(v) for v in rng.integers(lo, hi + 1, size=2))
        while True:
            sc = _make_scene(rng, W, H, cfg)
            boxes, labels, rels = _finalize(sc, _annotate(sc))
            if 2 <= len(labels) <= cfg["max_objects"]:
                break
        image_id = next(ids)
        buf = io.BytesIO()
        Image.fromarray(_render(sc)).save(buf, format="JPEG", quality=92)
        with open(os.path.join(out_dir, "VG_100K", f"{image_id}.jpg"), "wb") as f:
            f.write(buf.getvalue())
        image_data.append({"image_id": image_id, "width": W, "height": H,
                           "url": f"{name}://seed{seed}/{image_id}.jpg", "coco_id": None, "flickr_id": None})
        all_boxes.append(boxes)
        all_labels.append(labels)
        all_rels.append(rels)
        if verbose and ((k + 1) % 250 == 0 or k + 1 == n):
            line = f"generating {name} scenes (seed {seed}): {k + 1}/{n} images | {time.time() - t0:.1f}s"
            if sys.stderr.isatty():   # on a terminal the line rewrites itself
                print("\r" + line, end="\n" if k + 1 == n else "", file=sys.stderr, flush=True)
            else:                     # a log file gets plain lines, one per update
                print(line, file=sys.stderr, flush=True)
    data.write_vgsgg(out_dir, [0] * num_train + [2] * num_test, image_data, all_boxes, all_labels, all_rels,
                     cfg["classes"], cfg["predicates"])
    return out_dir


def annotation_statistics(seed=0, num_scenes=2000, name="synthetic"):
    """How incomplete and biased the synthetic annotator is, measured on freshly composed scenes (no
    rendering): (fraction of true relations written down, fraction of written labels that are a generic
    predicate instead of the pair's true specific one)."""
    rng, cfg = np.random.default_rng(seed), DATASETS[name]
    num_true = num_written = num_generic = 0
    for _ in range(num_scenes):
        W, H = (int(v) for v in rng.integers(cfg["size_range"][0], cfg["size_range"][1] + 1, size=2))
        sc = _make_scene(rng, W, H, cfg)
        truth = defaultdict(set)
        for s, o, p in sc.rels:
            truth[(s, o)].add(p)
        written = _annotate(sc)
        num_true += len(sc.rels)
        num_written += len(written)
        num_generic += sum(p not in truth[(s, o)] for s, o, p in written)
    return num_written / num_true, num_generic / max(num_written, 1)


def main():
    parser = argparse.ArgumentParser(description="Generate a built-in scene-graph dataset into a folder "
                                     "(data.ensure_synthetic() does it for you, into the cache), or measure its annotator.")
    parser.add_argument("--name", default="synthetic", choices=list(DATASETS), help="which built-in dataset")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data")
    parser.add_argument("--out", default=None, help="folder to write the VG-SGG files into")
    parser.add_argument("--num-train", type=int, default=None, help="images with the train flag (default: the dataset's)")
    parser.add_argument("--num-test", type=int, default=None, help="images with the test flag (default: the dataset's)")
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    parser.add_argument("--annotator", action="store_true", help="print how incomplete and biased the annotator is")
    args = parser.parse_args()
    if args.out:
        generate(args.out, args.seed, args.num_train, args.num_test, not args.quiet, args.name)
    if args.annotator:
        written, other = annotation_statistics(args.seed, name=args.name)
        print(f"annotator of {args.name} (2000 fresh scenes): {100 * written:.0f}% of the true relations are written "
              f"down; {100 * other:.0f}% of the written labels are another predicate than the true one")
    if not (args.out or args.annotator):
        parser.error("nothing to do: give --out DIR and/or --annotator")


if __name__ == "__main__":
    main()
