"""Scene-graph data: the Visual Genome "VG-SGG" format, the built-in datasets in that format, batching.

Every scene graph generation (SGG) paper since Xu et al. 2017 ("Scene Graph Generation by Iterative Message
Passing") trains and tests on the same preprocessed split of Visual Genome (VG150: 150 object classes, 50
predicates), shipped as three files plus the images. This file reads that format exactly as the field's
reference loaders do (Scene-Graph-Benchmark.pytorch `maskrcnn_benchmark/data/datasets/visual_genome.py` and
neural-motifs `dataloaders/visual_genome.py`), with their quirks, so that numbers computed on it are
comparable with published ones. The code is our own; where it follows a convention the comment says so.

No real dataset can be downloaded on a laptop in seconds, so the project also *generates* scene-graph
datasets of rendered images (scenes.py, run on first use and cached; BUILTIN names them), written through
`write_vgsgg` as the very same h5/json/jpg files and read back through the same `VGSGGDataset`:
  synthetic  the default of both model scripts, small (the study in results/synthetic/ ran on it): 4,000 images of
             96..160 px (about 2,290 train / 500 val / 930 test kept), 6.0 objects and 3.5 relations per
             image, 31 classes, 25 predicates; FREQ PredCls R@50 = 0.63, mR@50 = 0.35; about 15 s to generate.
  vgshape    VG150's shape (`--data vgshape`): 12,800 images of 160..224 px (6,945 train / 1,500 val / 4,275
             test), 11.5 objects and 7.2 relations per image, 94 classes, VG150's 50 predicates with a tail
             of 1,192 to one; FREQ PredCls R@50 = 0.65, mR@50 = 0.18; 75 s to 2.5 min to generate on one core.
`python data.py --data NAME` prints where the data is and its shape beside VG150's (docs/data.md).

Layout of a data folder (`root`):
    root/VG-SGG-with-attri.h5          (or VG-SGG.h5)          boxes, labels, relations, split flags
    root/VG-SGG-dicts-with-attri.json  (or VG-SGG-dicts.json)  class and predicate names
    root/image_data.json                                       per image: image_id, width, height, url
    root/VG_100K/{image_id}.jpg                                the images

Public API:
    VGSGGDataset(root, split, num_val_im=5000, ...)   ds[i] -> (image, target); ds.get_groundtruth(i) -> target
    ensure_synthetic(cache_dir=None, seed=0, name="synthetic") -> root   a built-in dataset (generated once by
                                                      scenes.py, then cached); BUILTIN[name]["num_val"] its val
    SYNTHETIC_NUM_VAL                                 the num_val_im to use on the small synthetic data
    write_vgsgg(out_dir, ...)                         write boxes, labels, relations as a VG-SGG folder
    collate(batch) -> (images, targets)               for torch's DataLoader
    TrainingSampler(size, ..., start=0)               infinite shuffled stream, DDP-aware; start resumes it
    InferenceSampler(size)                            sharded sequential, DDP-aware
    predicate_counts(ds) -> (P + 1,)                  training frequency: predicates of the triplets a model
                                                      trains on (as get_groundtruth yields them)
    frequency_order(counts) -> [predicate ids]        most frequent first, ties by id
    print_shape_table(root, num_val_im)               the data's shape beside VG150's (FREQ included)
    DataError                                         raised for every problem with the data files: one line
                                                      naming the file and what was expected (a ValueError)

Shapes: B images in a batch, G ground-truth objects of an image, R ground-truth relations of an image,
C object classes and P predicates (both without the background class at index 0), H x W image height/width.

Run `python data.py [--data vgshape]` to generate (or find) a built-in dataset (or read a VG-SGG folder) and
print its shape beside VG150's and its statistics; `--figures docs/` also draws example scenes and the
training frequency of the predicates.
"""
import argparse
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict

import h5py
import numpy as np
import torch
from PIL import Image

# ----------------------------------------------------------------------------------------------------------
# The VG-SGG format and its reader

class DataError(ValueError):
    """A problem with the user's data files; the message names the file and what was expected.

    Every mistake in a data folder (a missing folder or file, an empty or non-HDF5 h5, a truncated json, a
    missing key, an id the dicts do not name, a missing image) raises this, with a one-line message written to
    read after "error: ": the scripts catch it, print `error: <message>` and exit without a traceback. Mistakes
    in how *code* calls this file (a bad `split`, say) stay plain ValueErrors: those are bugs, and a traceback
    is what finds them. A subclass of ValueError, so code that catches ValueError still catches it.
    """


# The h5 file stores all images' boxes and relations in flat arrays; per image, [first, last] index ranges
# (inclusive, -1 when the image has none) point into them. `relationships` holds *global* box indices.
# Shapes: N image rows, NB boxes and NR relations in the whole file.
H5_SHAPES = {"split": "(N,)", "img_to_first_box": "(N,)", "img_to_last_box": "(N,)", "img_to_first_rel": "(N,)",
             "img_to_last_rel": "(N,)", "labels": "(NB, 1)", "boxes_1024": "(NB, 4)", "relationships": "(NR, 2)",
             "predicates": "(NR, 1)"}
H5_KEYS = tuple(H5_SHAPES)
H5_NAMES = ("VG-SGG-with-attri.h5", "VG-SGG.h5")
DICT_NAMES = ("VG-SGG-dicts-with-attri.json", "VG-SGG-dicts.json")
DICT_KEYS = ("label_to_idx", "predicate_to_idx")   # the json also has idx_to_label/idx_to_predicate: the same
LAYOUT = ("A VG-SGG data folder (--data) is laid out as\n"
          "  root/VG-SGG-with-attri.h5 (or VG-SGG.h5)  an HDF5 file with the datasets\n"
          "      split, img_to_first_box, img_to_last_box, img_to_first_rel, img_to_last_rel  (N,) for N images,\n"
          "      labels (NB, 1), boxes_1024 (NB, 4) for NB boxes,\n"
          "      relationships (NR, 2), predicates (NR, 1) for NR relations\n"
          "  root/VG-SGG-dicts-with-attri.json (or VG-SGG-dicts.json)  with keys " + ", ".join(DICT_KEYS) + "\n"
          "  root/image_data.json  (list of {image_id, width, height, ...}, one per image, in h5 row order)\n"
          "  root/VG_100K/{image_id}.jpg\n")
# What each error message says was expected (one line each; LAYOUT is for --help).
EXPECTED_FOLDER = ("expected a VG-SGG folder: VG-SGG-with-attri.h5 (or VG-SGG.h5), VG-SGG-dicts-with-attri.json "
                   "(or VG-SGG-dicts.json), image_data.json and VG_100K/{image_id}.jpg (see `python data.py --help`)")
EXPECTED_H5 = "expected an HDF5 file with datasets " + ", ".join(f"{k} {s}" for k, s in H5_SHAPES.items())
EXPECTED_DICTS = "expected a JSON object with label_to_idx and predicate_to_idx, each {name: index from 1}"
EXPECTED_IMAGE_DATA = "expected a JSON array of {image_id, width, height, ...} (integers), one per VG image"

# Boxes are stored at a fixed scale: the longest image side is 1024 (and 512 in `boxes_512`), as integer
# (cx, cy, w, h). The preprocessing script (vg_to_roidb.py of Xu et al.) rescaled every image's boxes so one
# int array fits all images; readers must scale them back by max(width, height) / 1024.
BOX_SCALE = 1024

# image_data.json lists 108,077 VG images but the h5 has 108,073 rows: these 4 image files are corrupted and
# were left out by the preprocessing. Skipping them is what keeps h5 row i and image i aligned (the reference
# loaders hard-code the same 4 ids).
CORRUPTED_IMAGE_IDS = (1592, 1722, 4616, 4617)

SPLITS = ("train", "val", "test")


def _one_line(e):
    return " ".join(str(e).split())


def _find_file(root, names):
    for name in names:
        if os.path.isfile(os.path.join(root, name)):
            return os.path.join(root, name)
    raise DataError(f"{root}: missing {' or '.join(names)}; {EXPECTED_FOLDER}")


def _read_json(path, expected):
    """The parsed json file, or a DataError naming the file (and where the json breaks)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or _one_line(e)}); {expected}") from None
    if not raw.strip():
        raise DataError(f"{path}: the file is empty; {expected}")
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:   # a truncated download ends in e.g. "Expecting ',' delimiter"
        raise DataError(f"{path}: not valid JSON ({e.msg}: line {e.lineno} column {e.colno}); "
                        f"{expected}") from None
    except UnicodeDecodeError as e:     # an h5 or a jpg under a json's name
        raise DataError(f"{path}: not JSON text (byte {e.start} is not UTF-8); {expected}") from None


def _json_type(x):
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(x), "number")


def load_vg_dicts(dict_file):
    """Class and predicate names from the dicts json, as lists with '__background__' at index 0."""
    info = _read_json(dict_file, EXPECTED_DICTS)
    if not isinstance(info, dict):
        raise DataError(f"{dict_file}: holds a JSON {_json_type(info)}; {EXPECTED_DICTS}")
    missing = [k for k in DICT_KEYS if k not in info]
    if missing:
        raise DataError(f"{dict_file}: missing key(s) {', '.join(missing)}; {EXPECTED_DICTS}")
    # Indices in the json start at 1; 0 is reserved for "no object" / "no relation" in every SGG model.
    names = []
    for key in DICT_KEYS:
        to_idx = info[key]
        if not isinstance(to_idx, dict) or not to_idx or any(type(v) is not int for v in to_idx.values()):
            raise DataError(f"{dict_file}: {key} is not a non-empty {{name: integer index}} object; {EXPECTED_DICTS}")
        idx = sorted(to_idx.values())
        if idx != list(range(1, len(to_idx) + 1)):
            shown = ", ".join(map(str, idx[:6])) + (", ..." if len(idx) > 6 else "")
            raise DataError(f"{dict_file}: {key} has the indices {shown}; expected each of 1..{len(idx)} once")
        names.append(["__background__"] + sorted(to_idx, key=to_idx.get))
    return names[0], names[1]


def load_image_info(image_file):
    """image_data.json without the 4 corrupted images, so that entry i describes h5 row i."""
    im_data = _read_json(image_file, EXPECTED_IMAGE_DATA)
    if not isinstance(im_data, list):
        raise DataError(f"{image_file}: holds a JSON {_json_type(im_data)}; {EXPECTED_IMAGE_DATA}")
    for k, im in enumerate(im_data):
        if not (isinstance(im, dict) and all(type(im.get(key)) is int for key in ("image_id", "width", "height"))
                and im["image_id"] >= 0 and im["width"] > 0 and im["height"] > 0):
            text = json.dumps(im)
            raise DataError(f"{image_file}: entry {k} is {text[:80] + ' ...' if len(text) > 80 else text}; "
                            f"expected {{image_id, width, height, ...}}, integers, id >= 0 and positive sizes")
    return [im for im in im_data if im["image_id"] not in CORRUPTED_IMAGE_IDS]


def _open_h5(h5_file):
    """h5py.File(h5_file, "r"), or a DataError naming the file (h5py's own error does not)."""
    if os.path.getsize(h5_file) == 0:
        raise DataError(f"{h5_file}: the file is empty; {EXPECTED_H5}")
    try:
        return h5py.File(h5_file, "r")
    except OSError as e:   # "Unable to synchronously open file (file signature not found)", truncated files, ...
        raise DataError(f"{h5_file}: not a readable HDF5 file ({_one_line(e)}); {EXPECTED_H5}") from None


def _read_h5(h5_file):
    """All H5_KEYS datasets of the h5 file as arrays, checked: key -> array. A DataError names the file and
    the first dataset that is missing, unreadable, of the wrong shape, or whose index ranges point outside."""
    arrays = {}
    with _open_h5(h5_file) as h5:
        missing = [k for k in H5_KEYS if not isinstance(h5.get(k), h5py.Dataset)]
        if missing:
            raise DataError(f"{h5_file}: missing dataset(s) {', '.join(missing)}; {EXPECTED_H5}")
        for k in H5_KEYS:
            try:
                arrays[k] = h5[k][()]
            except (OSError, TypeError, ValueError) as e:   # truncated or corrupt after the header
                raise DataError(f"{h5_file}: dataset {k} cannot be read ({_one_line(e)}); {EXPECTED_H5}") from None
    n, nb, nr = (arrays[k].shape[0] if arrays[k].ndim else 0 for k in ("split", "labels", "relationships"))
    want = {"(N,)": (n,), "(NB, 1)": (nb, 1), "(NB, 4)": (nb, 4), "(NR, 2)": (nr, 2), "(NR, 1)": (nr, 1)}
    for k, shape in H5_SHAPES.items():
        a = arrays[k]
        if not np.issubdtype(a.dtype, np.number) or a.shape != want[shape]:
            raise DataError(f"{h5_file}: dataset {k} has shape {a.shape} and dtype {a.dtype}; expected numbers "
                            f"of shape {shape}, N = {n} (rows of split), NB = {nb} (of labels), NR = {nr} (of "
                            f"relationships)")
    for kind, total in (("box", nb), ("rel", nr)):
        first, last = arrays[f"img_to_first_{kind}"], arrays[f"img_to_last_{kind}"]
        ok = (first == -1) | ((first >= 0) & (first <= last) & (last < total))                    # (N,)
        if not ok.all():
            row = int(np.argmin(ok))
            raise DataError(f"{h5_file}: row {row} has img_to_first_{kind} = {first[row]}, img_to_last_{kind} = "
                            f"{last[row]}; expected -1 (none) or first <= last < {total}")
    return arrays


def _box_iou_inclusive(a, b):
    """IoU of xyxy boxes a (N, 4) and b (M, 4) -> (N, M), pixel-inclusive (w = x2 - x1 + 1) as in the
    reference code, so boxes that merely touch count as overlapping."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])                  # (N, M, 2)
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])                  # (N, M, 2)
    wh = np.clip(rb - lt + 1, 0, None)                               # (N, M, 2)
    inter = wh[..., 0] * wh[..., 1]                                  # (N, M)
    area_a = (a[:, 2] - a[:, 0] + 1) * (a[:, 3] - a[:, 1] + 1)       # (N,)
    area_b = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)       # (M,)
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def load_graphs(h5_file, split, num_im=-1, num_val_im=0, filter_empty_rels=True, filter_non_overlap=False):
    """Read one split's graphs from the h5 file, following the reference `load_graphs`.

    Returns (rows, boxes, labels, relations): rows (N,) the h5 row of each kept image; per kept image
    boxes (G, 4) float xyxy at BOX_SCALE, labels (G,) int64 in 1..C, relations (R, 3) int64 rows
    (subject index, object index, predicate in 1..P), indices local to the image.
    """
    h5 = _read_h5(h5_file)
    data_split = h5["split"]
    first_box, last_box = h5["img_to_first_box"], h5["img_to_last_box"]
    first_rel, last_rel = h5["img_to_first_rel"], h5["img_to_last_rel"]
    all_labels = h5["labels"][:, 0].astype(np.int64)
    all_boxes = h5[f"boxes_{BOX_SCALE}"].astype(np.float64)    # (cx, cy, w, h)
    all_rels = h5["relationships"].astype(np.int64)            # global box indices
    all_preds = h5["predicates"][:, 0].astype(np.int64)

    # VG-SGG has only two split flags: 0 = train, 2 = test. There is no official val split: everyone
    # carves val from the *start* of the (filtered) train split and trains on the rest.
    mask = data_split == (2 if split == "test" else 0)
    mask &= first_box >= 0                      # images without any box are dropped
    if filter_empty_rels:
        mask &= first_rel >= 0                  # images without any relation are dropped
    rows = np.nonzero(mask)[0]
    if num_im > -1:
        rows = rows[:num_im]
    if num_val_im > 0:
        rows = rows[:num_val_im] if split == "val" else rows[num_val_im:] if split == "train" else rows

    bad = np.nonzero(np.any(all_boxes[:, 2:] <= 0, axis=1))[0]
    if len(bad):
        raise DataError(f"{h5_file}: boxes_{BOX_SCALE} has {len(bad)} box(es) with zero or negative width/height "
                        f"(the first is box {bad[0]}); expected (cx, cy, w, h) with w, h >= 1")
    # (cx, cy, w, h) -> (x1, y1, x2, y2) exactly as the reference loaders write it: x1 = cx - w/2 and then
    # x2 = x1 + w, computed in place on the int32 array, so x1 is truncated to an integer (for an odd w the
    # box sits half a step of the 1024 grid left of its float centre). We reproduce the truncation so that
    # our boxes, and every IoU computed on them, are the reference's to the bit.
    xyxy = _decode_boxes(all_boxes)                                                        # (all boxes, 4)

    kept_rows, boxes, labels, relations = [], [], [], []
    for row in rows:
        b0, b1 = first_box[row], last_box[row] + 1
        boxes_i, labels_i = xyxy[b0:b1], all_labels[b0:b1]
        if first_rel[row] >= 0:
            r0, r1 = first_rel[row], last_rel[row] + 1
            pair = all_rels[r0:r1] - b0                                      # (R, 2) local indices
            if pair.size and (pair.min() < 0 or pair.max() >= len(boxes_i)):
                raise DataError(f"{h5_file}: row {row} has a relationship pointing outside its own boxes; "
                                f"expected global indices {b0}..{b1 - 1} (img_to_first_box..img_to_last_box)")
            rels_i = np.column_stack([pair, all_preds[r0:r1]])               # (R, 3)
        else:
            rels_i = np.zeros((0, 3), dtype=np.int64)
        if filter_non_overlap:
            # An option of Neural Motifs / SGB for SGDet training: keep only relations whose two boxes
            # overlap (IoU > 0 at the 1024 scale, pixel-inclusive) and drop images left without any.
            ious = _box_iou_inclusive(boxes_i, boxes_i)                       # (G, G)
            rels_i = rels_i[ious[rels_i[:, 0], rels_i[:, 1]] > 0]
            if len(rels_i) == 0:
                continue
        kept_rows.append(row)
        boxes.append(boxes_i)
        labels.append(labels_i)
        relations.append(rels_i)
    return np.array(kept_rows, dtype=np.int64), boxes, labels, relations


class VGSGGDataset(torch.utils.data.Dataset):
    """One split of a VG-SGG folder. `ds[i] -> (image, target)`.

    image: float32 (3, H, W) in [0, 1]; target: `boxes` float32 (G, 4) xyxy in the returned image's pixels,
    `labels` int64 (G,) in 1..C, `relations` int64 (R, 3) (subject index, object index, predicate in 1..P),
    `image_id` int, `size` (H, W). `max_size` resizes so the longest side is max_size (None: original size).

    The filters are the field's: `filter_empty_rels` drops images without relations; `filter_duplicate_rels`
    (train only) keeps one predicate per (subject, object) pair, chosen by a draw seeded with the image id (see
    get_groundtruth); `filter_non_overlap` (train only, used for SGDet) keeps only relations between
    overlapping boxes. `num_im` keeps the first images only.

    Every problem with the files raises DataError (one line naming the file); the folder is checked here,
    once, so that training does not stop hours in on a missing image.
    """

    def __init__(self, root, split, num_val_im=5000, filter_empty_rels=True, filter_duplicate_rels=True,
                 filter_non_overlap=False, num_im=-1, max_size=None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if split == "val" and num_val_im <= 0:
            raise ValueError("split='val' needs num_val_im > 0: VG has no val split, it is the first "
                             "num_val_im images of train")
        if filter_non_overlap and split != "train":
            raise ValueError("filter_non_overlap is a training-time filter; use it with split='train' only")
        if not os.path.isdir(root):
            raise DataError(f"{root}: {'not a folder' if os.path.exists(root) else 'no such folder'}; "
                            f"{EXPECTED_FOLDER}")
        h5_file, dict_file = _find_file(root, H5_NAMES), _find_file(root, DICT_NAMES)
        image_file = _find_file(root, ("image_data.json",))
        self.image_dir = os.path.join(root, "VG_100K")
        if not os.path.isdir(self.image_dir):
            raise DataError(f"{root}: missing the image folder VG_100K/; {EXPECTED_FOLDER}")

        self.root, self.split, self.max_size = root, split, max_size
        # Duplicate predicates are only reduced for training (the test set keeps every annotation).
        self.filter_duplicate_rels = filter_duplicate_rels and split == "train"
        self.idx_to_label, self.idx_to_predicate = load_vg_dicts(dict_file)
        self.num_classes, self.num_predicates = len(self.idx_to_label), len(self.idx_to_predicate)

        infos = load_image_info(image_file)
        rows, self.gt_boxes, self.gt_labels, self.gt_relations = load_graphs(
            h5_file, split, num_im, num_val_im if split != "test" else 0, filter_empty_rels, filter_non_overlap)
        with _open_h5(h5_file) as h5:
            num_rows = len(h5["split"])
        if len(infos) != num_rows:
            raise DataError(f"{image_file}: {len(infos)} images (without the corrupted ids {CORRUPTED_IMAGE_IDS}) "
                            f"but {h5_file} has {num_rows} rows; expected one entry per h5 row, in row order")
        self.img_info = [infos[r] for r in rows]
        self.image_ids = [int(im["image_id"]) for im in self.img_info]
        # An id the dicts json does not name means the h5 and json do not belong together; a 0 would be read
        # as "no object" / "no relation" and silently trained as background.
        for image_id, labels, rels in zip(self.image_ids, self.gt_labels, self.gt_relations):
            for what, ids, n in (("label", labels, self.num_classes), ("predicate", rels[:, 2], self.num_predicates)):
                bad = ids[(ids < 1) | (ids >= n)]
                if len(bad):
                    raise DataError(f"{h5_file}: image {image_id} has {what} {bad[0]}, outside the {what}s "
                                    f"1..{n - 1} of {dict_file}; expected the h5 and dicts json of one dataset")
        missing = [i for i in self.image_ids if not os.path.isfile(self._image_path(i))]
        if missing:
            names = ", ".join(f"{i}.jpg" for i in missing[:3]) + (", ..." if len(missing) > 3 else "")
            raise DataError(f"{self.image_dir}: {len(missing)} image(s) of the {split} split missing ({names}); "
                            f"expected one {{image_id}}.jpg per image of {image_file}")

    def _image_path(self, image_id):
        return os.path.join(self.image_dir, f"{image_id}.jpg")

    def __len__(self):
        return len(self.image_ids)

    def _out_size(self, index):
        """(H, W) of the returned image: the size image_data.json states, resized to max_size."""
        info = self.img_info[index]
        w, h = int(info["width"]), int(info["height"])
        s = 1.0 if self.max_size is None else self.max_size / max(w, h)
        return max(1, round(h * s)), max(1, round(w * s))

    def get_groundtruth(self, index):
        """The target of image `index` without reading the image (for statistics and evaluation). The same
        on every call: nothing in it is drawn from a global RNG."""
        info = self.img_info[index]
        out_h, out_w = self._out_size(index)
        # Boxes are stored for a longest side of 1024; the reference loaders scale them back with the
        # width/height of image_data.json (not the jpg's), so do we.
        boxes = self.gt_boxes[index] / BOX_SCALE * max(info["width"], info["height"])      # (G, 4)
        boxes = boxes * np.array([out_w / info["width"], out_h / info["height"]] * 2)
        # Clip (never drop: relations index the boxes) to the last pixel, x in [0, W - 1].
        boxes = np.clip(boxes, 0, np.array([out_w - 1, out_h - 1] * 2))
        rels = torch.as_tensor(self.gt_relations[index], dtype=torch.int64).reshape(-1, 3)  # (R, 3)
        if self.filter_duplicate_rels and len(rels):
            # VG annotators often gave one pair several predicates ("on" and "sitting on"); for training, one
            # of them is kept. The reference loaders (Scene-Graph-Benchmark, neural-motifs) draw it with
            # np.random.choice each time the image is loaded, so the triplets a model trains on depend on the
            # global RNG, the worker and the epoch. We draw it from a generator seeded with the image id: an
            # image always yields the same triplets, in any process, worker or call order, so runs repeat
            # exactly and predicate_counts() counts exactly what a model trains on. The price: a model sees
            # one of a pair's predicates, not each in turn over the epochs.
            rng = np.random.default_rng(self.image_ids[index])
            by_pair = defaultdict(list)               # (subject, object) -> predicates, in annotation order
            for s, o, p in rels.tolist():
                by_pair[(s, o)].append(p)
            rels = torch.tensor([(s, o, preds[rng.integers(len(preds))]) for (s, o), preds in by_pair.items()],
                                dtype=torch.int64)                                                 # (R', 3)
        return {"boxes": torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                "labels": torch.as_tensor(self.gt_labels[index], dtype=torch.int64),
                "relations": rels, "image_id": self.image_ids[index], "size": (out_h, out_w)}

    def __getitem__(self, index):
        target = self.get_groundtruth(index)
        path = self._image_path(self.image_ids[index])
        try:
            with Image.open(path) as f:
                img = f.convert("RGB")                                         # some VG images are gray
        except OSError as e:   # not an image, a truncated jpg, deleted since __init__ checked it
            raise DataError(f"{path}: cannot be read as an image ({_one_line(e)}); expected the jpg of image "
                            f"{target['image_id']}") from None
        out_h, out_w = target["size"]
        # The boxes were scaled with image_data.json's width/height (as the reference loaders do), so a jpg of
        # another size is resized to that frame (Scene-Graph-Benchmark only prints an error for those).
        if img.size != (out_w, out_h):
            img = img.resize((out_w, out_h), Image.BILINEAR)
        image = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, H, W)
        return image.float().div_(255), target


# ----------------------------------------------------------------------------------------------------------
# Batching: collate and samplers (DDP-aware)

def collate(batch):
    """[(image (3, H_i, W_i), target)] -> images (B, 3, Hmax, Wmax) zero-padded at bottom/right, [targets].
    Padding at the bottom/right keeps box coordinates valid; each target keeps its own `size`."""
    images, targets = zip(*batch)
    h = max(im.shape[1] for im in images)
    w = max(im.shape[2] for im in images)
    out = images[0].new_zeros((len(images), 3, h, w))                 # (B, 3, Hmax, Wmax)
    for i, im in enumerate(images):
        out[i, :, :im.shape[1], :im.shape[2]] = im
    return out, list(targets)


def _rank_world(rank, world_size):
    if rank is None or world_size is None:
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        rank = (torch.distributed.get_rank() if dist else 0) if rank is None else rank
        world_size = (torch.distributed.get_world_size() if dist else 1) if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
    return rank, world_size


class TrainingSampler(torch.utils.data.Sampler):
    """Infinite stream of indices for iteration-based training (as detectron2's TrainingSampler).

    All ranks generate the same stream of permutations from `seed`; rank r takes every world_size-th index
    starting at r, so within each window of world_size consecutive draws the ranks see disjoint images.
    rank/world_size default to torch.distributed's when it is initialised (pass them explicitly in tests).

    `start` skips the first `start` indices of this rank's stream, so a run resumed after k iterations of
    batch b passes start=k*b and sees exactly the images it would have seen without stopping (with the same
    seed and world size). The skipped epochs' permutations are still drawn, to bring the generator to the
    same state (milliseconds per skipped epoch).
    """

    def __init__(self, size, shuffle=True, seed=0, rank=None, world_size=None, start=0):
        if size <= 0:
            raise ValueError(f"TrainingSampler needs a non-empty dataset, got size {size}")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.size, self.shuffle, self.seed, self.start = size, shuffle, seed, start
        self.rank, self.world_size = _rank_world(rank, world_size)

    def _infinite(self, skip):
        """The shared stream (all ranks) from its position `skip` on."""
        g = torch.Generator().manual_seed(self.seed)
        epochs, skip = divmod(skip, self.size)
        for _ in range(epochs if self.shuffle else 0):
            torch.randperm(self.size, generator=g)          # discarded: only advances g as that epoch did
        while True:
            epoch = torch.randperm(self.size, generator=g) if self.shuffle else torch.arange(self.size)
            yield from epoch[skip:].tolist()
            skip = 0

    def __iter__(self):
        # This rank's j-th index is the shared stream's index j * world_size + rank.
        stream = self._infinite(self.start * self.world_size + self.rank)
        return itertools.islice(stream, 0, None, self.world_size)


class InferenceSampler(torch.utils.data.Sampler):
    """range(size) split into world_size contiguous shards, no padding or repetition (DistributedSampler
    pads by repeating images, which would count some test images twice in the metrics)."""

    def __init__(self, size, rank=None, world_size=None):
        rank, world_size = _rank_world(rank, world_size)
        shard = (size + world_size - 1) // world_size
        self.indices = range(min(rank * shard, size), min((rank + 1) * shard, size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


# Writing the files, in exactly the VG-SGG format read above

def _decode_boxes(cxcywh):
    """int (cx, cy, w, h) (G, 4) at the 1024 scale -> float xyxy (G, 4) at that scale, as the reference
    loaders decode them: x1 = cx - w/2 truncated to an integer (they compute it in place on the int32
    array), x2 = x1 + w. With VG's encoding (cx = x1 + w // 2) an odd w therefore comes back one grid
    step left of where it was: a quirk of the field's pipeline that we keep, so boxes match it exactly."""
    cxcywh = np.asarray(cxcywh, np.float64)
    x1y1 = np.trunc(cxcywh[:, :2] - cxcywh[:, 2:] / 2)                                     # (G, 2)
    return np.concatenate([x1y1, x1y1 + cxcywh[:, 2:]], 1)                                 # (G, 4)


def _encode_boxes(boxes, W, H, scale):
    """xyxy pixel boxes (G, 4) -> int32 (cx, cy, w, h) for a longest side of `scale`, rounding as VG's
    preprocessing (vg_to_roidb.py encode_box): corner floored, size ceiled, centre = corner + size // 2."""
    s = scale / max(W, H)
    x, y = np.floor(s * boxes[:, 0]), np.floor(s * boxes[:, 1])
    w = np.maximum(np.ceil(s * (boxes[:, 2] - boxes[:, 0])), 1)
    h = np.maximum(np.ceil(s * (boxes[:, 3] - boxes[:, 1])), 1)
    return np.stack([x + w // 2, y + h // 2, w, h], 1).astype(np.int32)   # (G, 4)


def write_vgsgg(out_dir, split, image_data, boxes, labels, relations, classes, predicates):
    """Write a dataset in the VG-SGG format read above: VG-SGG.h5, VG-SGG-dicts.json and image_data.json in
    out_dir (the images, VG_100K/{image_id}.jpg, are the caller's). Per image, in h5 row order: split flag
    (0 train, 2 test), image_data entry {image_id, width, height, ...}, boxes (G, 4) xyxy in pixels, labels
    (G,) in 1..C, relations (R, 3) (subject index, object index, predicate in 1..P) local to the image;
    classes / predicates: the C and P names in index order. Writes no timestamps: the same input gives
    byte-identical files."""
    first_box, last_box, first_rel, last_rel, all_rels, all_preds = [], [], [], [], [], []
    n_boxes = n_rels = 0
    for b, rels in zip(boxes, relations):
        first_box.append(n_boxes)
        last_box.append(n_boxes + len(b) - 1)
        if len(rels):
            all_rels.append(rels[:, :2] + n_boxes)                   # global box indices, as in VG's h5
            all_preds.append(rels[:, 2])
            first_rel.append(n_rels)
            last_rel.append(n_rels + len(rels) - 1)
        else:
            first_rel.append(-1)
            last_rel.append(-1)
        n_boxes += len(b)
        n_rels += len(rels)
    # Each image's boxes are encoded against its own size, as VG's boxes_1024/boxes_512.
    enc = {s: np.concatenate([_encode_boxes(b, im["width"], im["height"], s) for b, im in zip(boxes, image_data)])
           for s in (1024, 512)}
    preds = np.concatenate(all_preds) if all_preds else np.zeros(0, np.int64)
    with h5py.File(os.path.join(out_dir, "VG-SGG.h5"), "w") as h5:
        def put(name, arr, dtype):
            h5.create_dataset(name, data=np.asarray(arr, dtype=dtype), track_times=False)  # no timestamps:
        put("split", split, np.int32)                                                     # byte-identical files
        put("img_to_first_box", first_box, np.int32)
        put("img_to_last_box", last_box, np.int32)
        put("img_to_first_rel", first_rel, np.int32)
        put("img_to_last_rel", last_rel, np.int32)
        put("labels", np.concatenate(labels)[:, None], np.int64)                       # (num boxes, 1)
        put("boxes_1024", enc[1024], np.int32)
        put("boxes_512", enc[512], np.int32)
        put("relationships", np.concatenate(all_rels) if all_rels else np.zeros((0, 2)), np.int32)
        put("predicates", preds[:, None], np.int64)                                     # (num relations, 1)
    obj_count = Counter(np.concatenate(labels).tolist())
    pred_count = Counter(preds.tolist())
    dicts = {"label_to_idx": {c: i + 1 for i, c in enumerate(classes)},
             "idx_to_label": {str(i + 1): c for i, c in enumerate(classes)},
             "predicate_to_idx": {p: i + 1 for i, p in enumerate(predicates)},
             "idx_to_predicate": {str(i + 1): p for i, p in enumerate(predicates)},
             "object_count": {c: obj_count[i + 1] for i, c in enumerate(classes)},
             "predicate_count": {p: pred_count[i + 1] for i, p in enumerate(predicates)}}
    with open(os.path.join(out_dir, "VG-SGG-dicts.json"), "w") as f:
        json.dump(dicts, f, indent=1)
    with open(os.path.join(out_dir, "image_data.json"), "w") as f:
        json.dump(image_data, f)


# ----------------------------------------------------------------------------------------------------------
# The built-in datasets: generated on first use by scenes.py, cached

# name -> the version of its files (the cache folder is per version: bump it whenever the output changes) and
# the val images to carve from its train split. What each is and how it is made: scenes.py, docs/data.md.
BUILTIN = {"synthetic": dict(version=6, num_val=500),    # small: the study in results/synthetic/ ran on it; the default
           "vgshape": dict(version=1, num_val=1500)}     # VG150's shape (python data.py --data vgshape)
SYNTHETIC_NUM_VAL = BUILTIN["synthetic"]["num_val"]      # the num_val_im to pass to VGSGGDataset on it
SCENES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scenes.py")


def generate_synthetic(out_dir, seed=0, num_train=None, num_test=None, verbose=True, name="synthetic"):
    """Generate the built-in dataset `name` into out_dir (VG-SGG.h5, VG-SGG-dicts.json, image_data.json,
    VG_100K/) by running scenes.py, the generator, as a program: this file imports nothing of the project,
    so that it can be copied alone. num_train / num_test: images with the train / test flag (default the
    dataset's). Deterministic: the same name, seed and sizes give byte-identical files."""
    if not os.path.isfile(SCENES):
        raise DataError(f"{SCENES}: missing; the built-in data is generated by scenes.py, kept next to data.py")
    cmd = [sys.executable, SCENES, "--name", name, "--seed", str(seed), "--out", out_dir]
    cmd += ["--num-train", str(num_train)] if num_train is not None else []
    cmd += ["--num-test", str(num_test)] if num_test is not None else []
    subprocess.run(cmd + ([] if verbose else ["--quiet"]), check=True)
    return out_dir

def default_cache_dir():
    return os.environ.get("SGG_ALIGN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sgg_align")


def ensure_synthetic(cache_dir=None, seed=0, name="synthetic"):
    """Root folder of the built-in dataset `name` (a key of BUILTIN), generated on first use and cached.

    The folder ($SGG_ALIGN_CACHE or ~/.cache/sgg_align)/{name}-v{version}-seed{seed} is written atomically:
    generated into a temporary sibling, then renamed, so an interrupted run never leaves a half dataset that
    later runs would trust, and two processes generating at once both end up reading one complete copy.
    """
    cache_dir = cache_dir or default_cache_dir()
    if name not in BUILTIN:
        raise ValueError(f"no built-in dataset {name!r}; the built-in ones are {', '.join(BUILTIN)}")
    tag = f"{name}-v{BUILTIN[name]['version']}-seed{seed}"
    root = os.path.join(cache_dir, tag)
    if os.path.isdir(root):
        return root
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{tag}-", dir=cache_dir)
    try:
        generate_synthetic(tmp, seed, name=name)
        os.rename(tmp, root)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)   # our own temporary folder only
        if not os.path.isdir(root):               # not "another process finished first": a real error
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


# ----------------------------------------------------------------------------------------------------------
# Statistics, figures and the command line

def split_statistics(ds):
    """Counts over one split, from the raw annotations (before duplicate filtering): images, objects and
    relations per image, how many times each class (C + 1,) and predicate (P + 1,) is annotated (index 0
    unused). For the training frequency of the predicates use predicate_counts()."""
    num_obj = np.array([len(ds.gt_labels[i]) for i in range(len(ds))])
    num_rel = np.array([len(ds.gt_relations[i]) for i in range(len(ds))])
    labels = np.concatenate(ds.gt_labels) if len(ds) else np.zeros(0, np.int64)
    preds = np.concatenate([r[:, 2] for r in ds.gt_relations]) if len(ds) else np.zeros(0, np.int64)
    return {"images": len(ds), "objects_per_image": num_obj, "relations_per_image": num_rel,
            "class_counts": np.bincount(labels, minlength=ds.num_classes),
            "predicate_counts": np.bincount(preds, minlength=ds.num_predicates)}


def predicate_counts(ds):
    """Training frequency, the project's one definition of it: how often each predicate occurs among the
    triplets a model trains on -> int64 (P + 1,), index 0 = 0.

    Counts the relations exactly as `ds.get_groundtruth(i)` yields them for every image i of the split: on a
    train split (filter_duplicate_rels), one predicate per annotated pair, so a generic "on" written next to
    "sitting on" counts once, not twice as in split_statistics(). `python data.py`, its figure and both model
    scripts (head/body/tail groups, per-predicate plots) order predicates by it. ds: a VGSGGDataset, or a
    torch Subset of one.
    """
    base, indices = (ds.dataset, ds.indices) if isinstance(ds, torch.utils.data.Subset) else (ds, range(len(ds)))
    counts = np.zeros(base.num_predicates, dtype=np.int64)                                   # (P + 1,)
    for i in indices:
        counts += np.bincount(base.get_groundtruth(i)["relations"][:, 2].numpy(), minlength=base.num_predicates)
    return counts


def frequency_order(counts):
    """Predicate ids 1..P, most frequent first, ties by id (a stable sort, so the order never depends on
    anything but the counts): counts (P + 1,) as from predicate_counts, index 0 ignored -> list of P ints."""
    return [int(p) + 1 for p in np.argsort(-np.asarray(counts)[1:], kind="stable")]


def print_statistics(root, num_val_im=SYNTHETIC_NUM_VAL):
    """Print images per split, objects/relations per image and the training frequency of the predicates
    (predicate_counts, as a histogram on a log scale)."""
    # Built with the defaults, as the model scripts build them, so that train yields the triplets they train on.
    datasets = {s: VGSGGDataset(root, s, num_val_im=num_val_im) for s in SPLITS}
    train = datasets["train"]
    counts = predicate_counts(train)
    for split, ds in datasets.items():
        st = split_statistics(ds)
        o, r = st["objects_per_image"], st["relations_per_image"]
        if not len(ds):
            print(f"{split:5s}:     0 images")
            continue
        print(f"{split:5s}: {st['images']:5d} images | objects/image {o.mean():.2f} (min {o.min()}, max {o.max()}) "
              f"| relations/image {r.mean():.2f} (min {r.min()}, max {r.max()}) | {r.sum()} relations"
              + (f" ({counts.sum()} trained on: one predicate per pair)" if ds is train else ""))
    if counts.sum() == 0:
        print("no training relations")
        return
    spread = (f"max/min = {counts[1:].max() / counts[1:].min():.0f}x" if counts[1:].min() > 0 else
              f"{(counts[1:] == 0).sum()} predicate(s) never occur")
    print(f"{train.num_classes - 1} classes, {train.num_predicates - 1} predicates by training frequency (the train "
          f"relations a model trains on, one predicate per pair), most frequent first ({spread}); bars: log scale")
    for p in frequency_order(counts):
        bar = "#" * int(round(40 * math.log10(1 + counts[p]) / math.log10(1 + counts.max())))
        print(f"  {train.idx_to_predicate[p]:>14s} {counts[p]:6d} {100 * counts[p] / counts.sum():5.1f}% {bar}")


# The shape of a dataset beside VG150's (python data.py --data NAME)

def frequency_prior(train):
    """Neural Motifs' FREQ predictor: for every (subject class, object class), the training distribution of
    the predicates, background (no relation: every unrelated ordered pair of objects) included, counted on
    the raw annotations (build `train` with filter_duplicate_rels=False) -> float64 (C + 1, C + 1, P + 1)."""
    C, P = train.num_classes, train.num_predicates
    counts = np.zeros((C, C, P))
    for lab, rel in zip(train.gt_labels, train.gt_relations):
        unrelated = ~np.eye(len(lab), dtype=bool)                                     # (G, G)
        unrelated[rel[:, 0], rel[:, 1]] = False
        np.add.at(counts, (lab[rel[:, 0]], lab[rel[:, 1]], rel[:, 2]), 1)
        np.add.at(counts, (*np.meshgrid(lab, lab, indexing="ij"), 0), unrelated)
    return (counts + 1e-3) / (counts + 1e-3).sum(-1, keepdims=True)


def freq_predcls_recall(prior, ds, ks=(20, 50, 100)):
    """PredCls R@K and mR@K of a prior (C + 1, C + 1, P + 1) on the split ds, with the graph constraint,
    as metrics.SGEvaluator computes them (a short copy so that this file stays a leaf: every ordered pair
    of GT objects predicts its arg-max predicate with that probability as score; ties broken by subject,
    object, predicate; a GT triplet is hit when the labels agree and both boxes have IoU >= 0.5; mR@K
    averages over all P predicates) -> {"R@K": ..., "mR@K": ...}."""
    P = ds.num_predicates - 1
    recall = {k: [] for k in ks}
    per_pred = {k: [[] for _ in range(P + 1)] for k in ks}
    for i in range(len(ds)):
        t = ds.get_groundtruth(i)
        lab, rel, boxes = t["labels"].numpy(), t["relations"].numpy(), t["boxes"].numpy()
        if not len(rel):
            continue
        s, o = np.nonzero(~np.eye(len(lab), dtype=bool))                  # (M,) every ordered pair
        fg = prior[lab[s], lab[o], 1:]                                    # (M, P)
        best, score = fg.argmax(1) + 1, fg.max(1)                         # (M,) each
        top = np.lexsort((best, o, s, -score))[:max(ks)]                 # (T,) ranked pairs
        same = (_box_iou_inclusive(boxes, boxes) >= 0.5) & (lab[:, None] == lab[None, :])    # (G, G)
        hit = same[s[top]][:, rel[:, 0]] & same[o[top]][:, rel[:, 1]] & (best[top][:, None] == rel[None, :, 2])  # (T, R)
        for k in ks:
            h = hit[:k].any(0)                                            # (R,)
            recall[k].append(h.mean())
            for p in np.unique(rel[:, 2]):
                per_pred[k][p].append(h[rel[:, 2] == p].mean())
    out = {}
    for k in ks:
        out[f"R@{k}"] = float(np.mean(recall[k])) if recall[k] else 0.0
        out[f"mR@{k}"] = float(sum(np.mean(v) for v in per_pred[k][1:] if v) / P)
    return out


# VG150's values (Xu et al. 2017's split as Scene-Graph-Benchmark loads it; Tang et al. 2020, Table 1, SGB's
# re-run of FREQ and Motifs; REL_PROP in SGB's config/defaults.py for the predicate shares), and the band the
# built-in VG-shaped data was built to fall in.
VG150 = {
    "predicates": ("50", lambda v: v == 50), "object classes": ("150", lambda v: v >= 75),
    "objects per image": ("about 11", lambda v: 9 <= v <= 13),
    "relations per image": ("about 6", lambda v: 4.5 <= v <= 7.5),
    "ordered object pairs related": ("about 5 %", lambda v: 0.03 <= v <= 0.08),
    "top-5 predicates' share": ("73 %", lambda v: 0.65 <= v <= 0.80),
    "top-10 predicates' share": ("89 %", lambda v: 0.82 <= v <= 0.93),
    "most / least frequent": ("thousands to one", lambda v: v >= 1000),
    "every predicate in train, val, test": ("yes", lambda v: v),
    "FREQ PredCls R@100 - R@50": ("62.2 - 60.6 = 1.6 points", lambda v: v >= 0.01),
    "FREQ PredCls mR@50 / R@50": ("13.0 / 60.6 = 0.21", lambda v: v <= 0.35),
    "Motifs PredCls mR@50 / R@50": ("14.6 / 66.0 = 0.22", lambda v: v <= 0.40),
    "Motifs SGCls R@50 / PredCls R@50": ("39.1 / 66.0 = 0.59", lambda v: v <= 0.75),
    "Motifs SGDet R@50 / PredCls R@50": ("32.1 / 66.0 = 0.49", lambda v: v <= 0.65),
    "test images": ("26,446", lambda v: v >= 4000), "val images": ("5,000", lambda v: v >= 1000),
}
BANDS = {"object classes": ">= 75", "objects per image": "9-13", "relations per image": "4.5-7.5",
         "ordered object pairs related": "3-8 %", "top-5 predicates' share": "65-80 %",
         "top-10 predicates' share": "82-93 %", "most / least frequent": ">= 1000", "predicates": "50",
         "every predicate in train, val, test": "yes", "FREQ PredCls R@100 - R@50": ">= 1 point",
         "FREQ PredCls mR@50 / R@50": "<= 0.35", "Motifs PredCls mR@50 / R@50": "<= 0.40",
         "Motifs SGCls R@50 / PredCls R@50": "<= 0.75", "Motifs SGDet R@50 / PredCls R@50": "<= 0.65",
         "test images": ">= 4000", "val images": ">= 1000"}
# The Motifs baseline's test numbers on the built-in data (motifs_align.py --no-align, seed 0, the default
# schedule), measured by the commands in docs/data.md: {name: {mode: {"R@50": .., "mR@50": ..}}}. The model
# scripts cannot run from here, so the table reads their recorded results.
MOTIFS_MEASURED = {"vgshape": {"predcls": {"R@50": 0.6656, "mR@50": 0.1796}, "sgcls": {"R@50": 0.3388, "mR@50": 0.0781},
                              "sgdet": {"R@50": 0.1727, "mR@50": 0.0304}}}
# The same two baselines as the study in results/{name}/ ran them later (its README; tests/test_docs.py holds these
# to its run folders), which the table names so that the two sets of numbers are not read as one: FREQ by
# `motifs_align.py --freq-baseline`, whose prior counts background SGB's way; Motifs PredCls trained for 2,000
# iterations (the rows above: 1,000), the last iteration's weights (above: the best validation checkpoint), the
# mean of 4 seeds (above: seed 0).
STUDY_MEASURED = {"vgshape": {"freq": {"R@50": 0.6043, "mR@50": 0.1696}, "predcls": {"R@50": 0.6733, "mR@50": 0.2086}}}


def shape_statistics(root, num_val_im, name=None):
    """Every quantity of the VG150 table for the data in root, each on its own split -> {quantity: value},
    with per-split values as {split: value}."""
    raw = {s: VGSGGDataset(root, s, num_val_im=num_val_im, filter_duplicate_rels=False) for s in SPLITS}
    out = {"predicates": raw["train"].num_predicates - 1, "object classes": raw["train"].num_classes - 1}
    per = defaultdict(dict)
    for s, ds in raw.items():
        n_obj = np.array([len(l) for l in ds.gt_labels])
        per["objects per image"][s] = float(n_obj.mean())
        per["relations per image"][s] = float(np.mean([len(r) for r in ds.gt_relations]))
        related = sum(len({(a, b) for a, b, _ in r.tolist()}) for r in ds.gt_relations)
        per["ordered object pairs related"][s] = related / float((n_obj * (n_obj - 1)).sum())
    out.update(per)
    counts = predicate_counts(VGSGGDataset(root, "train", num_val_im=num_val_im))[1:]   # as trained on
    share = np.sort(counts)[::-1] / counts.sum()
    out["top-5 predicates' share"], out["top-10 predicates' share"] = float(share[:5].sum()), float(share[:10].sum())
    out["most / least frequent"] = float(counts.max() / counts.min()) if counts.min() > 0 else float("inf")
    present = [split_statistics(ds)["predicate_counts"][1:] > 0 for ds in raw.values()]
    out["every predicate in train, val, test"] = bool(np.all(present))
    out["missing"] = {s: [ds.idx_to_predicate[p + 1] for p in np.nonzero(~m)[0]] for (s, ds), m in zip(raw.items(), present)}
    freq = freq_predcls_recall(frequency_prior(raw["train"]), raw["test"])
    out["freq"] = freq
    out["FREQ PredCls R@100 - R@50"] = freq["R@100"] - freq["R@50"]
    out["FREQ PredCls mR@50 / R@50"] = freq["mR@50"] / freq["R@50"]
    m = MOTIFS_MEASURED.get(name, {})
    if "predcls" in m:
        out["Motifs PredCls mR@50 / R@50"] = m["predcls"]["mR@50"] / m["predcls"]["R@50"]
        for mode, title in (("sgcls", "SGCls"), ("sgdet", "SGDet")):
            if mode in m:
                out[f"Motifs {title} R@50 / PredCls R@50"] = m[mode]["R@50"] / m["predcls"]["R@50"]
    out["test images"], out["val images"] = len(raw["test"]), len(raw["val"])
    return out


def _fmt(key, v):
    if key.startswith("FREQ PredCls R@100 - R@50"):   # a difference of recalls: points, as VG150's column
        return f"{100 * v:.1f} points"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if "share" in key or "related" in key:
        return f"{100 * v:.1f} %"
    if key.endswith("frequent"):
        return f"{v:,.0f} to one"
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:.2f}" if "per image" in key else f"{v:.3f}"


def print_shape_table(root, num_val_im, name=None):
    """The shape table: each quantity, VG150's value, ours (per split where it is one), the band,
    and whether ours is in it."""
    st = shape_statistics(root, num_val_im, name)
    print(f"{'':38s} {'VG150':24s} {'ours (train / val / test where per split)':44s} {'band':10s} met")
    for key, (vg, ok) in VG150.items():
        v = st.get(key)
        if v is None:
            ours, met = "not measured (see docs/data.md)", "-"
        elif isinstance(v, dict):
            ours, met = " / ".join(_fmt(key, v[s]) for s in SPLITS), "yes" if all(ok(x) for x in v.values()) else "NO"
        else:
            ours, met = _fmt(key, v), "yes" if ok(v) else "NO"
        print(f"{key:38s} {vg:24s} {ours:44s} {BANDS[key]:10s} {met}")
    f = st["freq"]
    print(f"FREQ PredCls on test: R@20/50/100 {100 * f['R@20']:.1f} / {100 * f['R@50']:.1f} / {100 * f['R@100']:.1f}, "
          f"mR@20/50/100 {100 * f['mR@20']:.1f} / {100 * f['mR@50']:.1f} / {100 * f['mR@100']:.1f} "
          f"(VG150: 53.6 / 60.6 / 62.2, mR@50 13.0)")
    study = STUDY_MEASURED.get(name, {})
    print("  its prior counts every unrelated ordered pair as background; motifs_align.py --freq-baseline's counts, "
          "as SGB's get_VG_statistics, only pairs of overlapping boxes"
          + (f", and gives R@50 {100 * study['freq']['R@50']:.2f}, mR@50 {100 * study['freq']['mR@50']:.2f} "
             f"(results/{name}/)" if "freq" in study else ""))
    measured = MOTIFS_MEASURED.get(name, {})
    if measured:
        runs = "; ".join(f"{mode} R@50 {100 * m['R@50']:.1f} mR@50 {100 * m['mR@50']:.1f}" for mode, m in measured.items())
        print(f"Motifs baseline on test (recorded: motifs_align.py --<mode> --no-align --seed 0 --data {name} "
              f"--feature-cache-gb 0, docs/data.md): {runs} (VG150: PredCls 66.0 / 14.6, SGCls 39.1, SGDet 32.1)")
    if "predcls" in study:
        print(f"  1,000 iterations, the best validation checkpoint, seed 0; the study's baselines (results/{name}/) "
              f"train 2,000 iterations and test the last weights: PredCls R@50 {100 * study['predcls']['R@50']:.2f}, "
              f"mR@50 {100 * study['predcls']['mR@50']:.2f} (mean of 4 seeds)")
    missing = {s: m for s, m in st["missing"].items() if m}
    if missing:
        print("predicates missing: " + "; ".join(f"{s}: {', '.join(m)}" for s, m in missing.items()))
    print("sources: VG150 = Xu et al. 2017's split as Scene-Graph-Benchmark loads it; FREQ and Motifs: Tang et al. "
          "2020, Table 1 (SGB's re-run); predicate shares: REL_PROP in SGB's config/defaults.py")
    return st


def draw_figures(root, out_dir, num_val_im=SYNTHETIC_NUM_VAL, num_examples=6, name="synthetic"):
    """{name}_examples.png (test scenes with their annotated triplets) and {name}_predicates.png
    (training frequency of the predicates, predicate_counts, most frequent first, log scale) in out_dir."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    test = VGSGGDataset(root, "test", num_val_im=num_val_im)
    picks = [i for i in range(len(test)) if len(test.gt_relations[i]) >= 3][:num_examples]
    cols = (len(picks) + 1) // 2
    fig = plt.figure(figsize=(3.4 * cols, 9.4))
    grid = fig.add_gridspec(4, cols, height_ratios=[3, 1.3, 3, 1.3], hspace=0.12, wspace=0.08,
                            left=0.01, right=0.99, top=0.93, bottom=0.01)
    for n, i in enumerate(picks):
        ax, text = fig.add_subplot(grid[2 * (n // cols), n % cols]), fig.add_subplot(grid[2 * (n // cols) + 1, n % cols])
        image, t = test[i]
        ax.imshow(image.permute(1, 2, 0).numpy())
        names = [test.idx_to_label[l] for l in t["labels"].tolist()]
        for k, (x1, y1, x2, y2) in enumerate(t["boxes"].tolist()):
            ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color=f"C{k % 10}", lw=1))
            ax.text(x1, y1, f"{k}:{names[k]}", color=f"C{k % 10}", fontsize=6, va="bottom")
        ax.set_title(f"image {t['image_id']} ({t['size'][1]}x{t['size'][0]} px)", fontsize=8)
        ax.axis("off")
        lines = [f"{s}:{names[s]} -{test.idx_to_predicate[p]}-> {o}:{names[o]}"
                 for s, o, p in t["relations"].tolist()]
        text.text(0.02, 1.0, "\n".join(lines[:8] + (["..."] if len(lines) > 8 else [])), fontsize=7,
                  va="top", family="monospace", transform=text.transAxes)
        text.axis("off")
    fig.suptitle(f"{name}: scenes of the test split with their annotated relations: incomplete, and biased to "
                 "generic predicates", fontsize=9)
    fig.savefig(os.path.join(out_dir, f"{name}_examples.png"), dpi=110)
    plt.close(fig)

    train = VGSGGDataset(root, "train", num_val_im=num_val_im)
    counts = predicate_counts(train)
    order = frequency_order(counts)
    fig, ax = plt.subplots(figsize=(9 if len(order) <= 25 else 14, 3.6))
    ax.bar(range(len(order)), counts[order], color="C0")
    ax.set_yscale("log")
    ax.set_xticks(range(len(order)))
    ax.set_xticklabels([train.idx_to_predicate[p] for p in order], rotation=70, ha="right", fontsize=8)
    ax.set_ylabel("count (log scale)")
    ax.set_title(f"{name}: training frequency of the predicates (log scale)\n{len(train)} train images, "
                 f"{counts.sum()} relations as trained on (one predicate per annotated pair)", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, f"{name}_predicates.png"), dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description="Generate (or find) a built-in scene-graph dataset, or inspect a "
                                     "VG-SGG folder: print where it is, its shape beside VG150's and its "
                                     "statistics.", epilog=LAYOUT, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="synthetic",
                        help=f"a built-in dataset ({', '.join(BUILTIN)}) or the path of a VG-SGG folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the built-in data")
    parser.add_argument("--cache-dir", default=None, help="default: $SGG_ALIGN_CACHE or ~/.cache/sgg_align")
    parser.add_argument("--num-val-im", type=int, default=None,
                        help="val images carved from train (default: the built-in data's, 5000 on VG)")
    parser.add_argument("--figures", metavar="DIR", default=None, help="also write the two figures into DIR")
    args = parser.parse_args()
    if args.num_val_im is not None and args.num_val_im < 1:
        sys.exit(f"error: --num-val-im must be at least 1 (val is the first images of train), got {args.num_val_im}")
    builtin = args.data in BUILTIN
    root = ensure_synthetic(args.cache_dir, args.seed, args.data) if builtin else args.data
    num_val_im = args.num_val_im if args.num_val_im is not None else (BUILTIN[args.data]["num_val"] if builtin else 5000)
    try:
        print(f"folder: {root}")
        print_shape_table(root, num_val_im, args.data if builtin else None)
        print_statistics(root, num_val_im)
        if args.figures:
            name = args.data if builtin else "data"
            draw_figures(root, args.figures, num_val_im, name=name)
            print(f"wrote {os.path.join(args.figures, name + '_examples.png')} and {name}_predicates.png")
    except DataError as e:   # the user's data: one line, no traceback (STYLE.md 7)
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
