"""The paper's method in motifs_align.py, pinned: section 3.3 (Align-Motifs), Eqs. (1)-(3), Table 3.

Each test recomputes a value by hand from the model's own modules (the tensors the mirror masks,
the mirror's logits, L_align, the training step's total loss) or checks a gradient that the paper
says must or must not exist, so that a one-line change to the method makes some test fail: a removed
.detach(), swapped KL arguments, a dropped lambda, one input left unmasked, a 1/(1-p) rescale, the
frequency prior in the mirror, the union feature missing from the MLP's input, the mirror run at
test time, the supervised ablation not using the labels, ... A tiny relation model on random
tensors: the whole file takes a few seconds on one CPU thread.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import motifs_align as M

C, P, FC = 6, 5, 3                    # object classes + 1, predicates + 1, feature-map channels
E, H, ROI, DU, DM = 4, 6, 8, 10, 12   # embed_dim, hidden, roi_dim, union_dim, mirror_dim
COUNTS = [4, 3]                       # objects per image: N = 7, R = 4*3 + 3*2 = 18 pairs
N, R = sum(COUNTS), sum(n * (n - 1) for n in COUNTS)


def tiny_cfg(**kw):
    base = dict(mode="predcls", roi_dim=ROI, embed_dim=E, hidden=H, union_dim=DU, mirror_dim=DM, mask_p=0.3)
    base.update(kw)
    return M.Config(**base)


def tiny(seed=0, freq=None, **kw):
    """A tiny MotifsRelationModel whose every weight is moved away from its initial value (so that a
    private copy of a shared module made at construction would no longer agree with the original)."""
    torch.manual_seed(seed)
    freq = torch.randn(C, C, P) if freq is None else freq   # a prior that visibly changes the logits
    model = M.MotifsRelationModel(tiny_cfg(**kw), C, P, FC, 4, freq)
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if name != "freq_bias.weight":
                prm.add_(0.3 * torch.randn_like(prm))
    return model


def tiny_inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    boxes = []
    for n in COUNTS:
        xy = torch.rand(n, 2, generator=g) * 20
        boxes.append(torch.cat([xy, xy + 4 + torch.rand(n, 2, generator=g) * 10], 1))   # (n, 4)
    return dict(fmap=torch.randn(2, FC, 8, 8, generator=g), boxes=boxes, sizes=[(32, 32), (32, 32)],
                obj_feats=torch.randn(N, ROI, generator=g),
                obj_dists=torch.softmax(3 * torch.randn(N, C, generator=g), -1),
                pairs=[M.all_pairs(n, "cpu") for n in COUNTS],
                gt_labels=torch.randint(1, C, (N,), generator=g))


def run(model, inp):
    return model(inp["fmap"], inp["boxes"], inp["sizes"], inp["obj_feats"], inp["obj_dists"], inp["pairs"],
                 inp["gt_labels"])


def run_mirror(model, inp):
    """forward, then the mirror on what forward returns, as train_step runs it -> forward's dict
    with mirror_logits (R, P) added."""
    out = run(model, inp)
    out["mirror_logits"] = model.mirror(model, out["edge_in"], out["union"], out["rel_pairs"], out["counts"],
                                        out["orders"])
    return out


def nonzero(g):
    return g is not None and g.abs().sum() > 0


# ----------------------------------------------------------------------------------------------
# The model by hand, from its own modules (Neural Motifs as motifs_align.py builds it)

def by_hand(model, inp):
    """-> dict edge_in (N, E+2H+roi) = the edge-context LSTM's input, union (R, Du) = the relation
    feature, pairs_g (R, 2), counts, orders, labels (N,) and the original's rel_logits (R, P)."""
    counts = [len(b) for b in inp["boxes"]]
    orders = [((b[:, 0] + b[:, 2]) / 2).argsort() for b in inp["boxes"]]   # Motifs' left-to-right
    offsets = np.cumsum([0] + counts[:-1])
    pairs_g = torch.cat([p + int(o) for p, o in zip(inp["pairs"], offsets)])   # (R, 2)
    pos = torch.cat([M.box_info(b, s) for b, s in zip(inp["boxes"], inp["sizes"])])
    ctx_in = torch.cat([inp["obj_feats"], inp["obj_dists"] @ model.obj_embed_ctx.weight, model.pos_embed(pos)], 1)
    obj_ctx = M.bilstm(model.obj_ctx_rnn, ctx_in, counts, orders)            # (N, 2H)
    if model.mode == "predcls" or model.training:
        labels = inp["gt_labels"]   # predcls; sgcls in training: teacher forcing commits the GT labels
    else:
        labels = model.decoder_rnn(torch.cat([ctx_in, obj_ctx], 1), counts, orders)[1]
    edge_in = torch.cat([model.obj_embed_edge(labels), obj_ctx, inp["obj_feats"]], 1)
    union = model.union_features(inp["fmap"], inp["boxes"], inp["pairs"])   # (R, Du)
    pair = pair_features(model, M.bilstm(model.edge_ctx_rnn, edge_in, counts, orders), pairs_g)
    freq = model.freq_bias.weight[labels[pairs_g[:, 0]] * C + labels[pairs_g[:, 1]]]
    rel_logits = model.rel_compress(model.post_cat(pair) * union) + freq
    return dict(edge_in=edge_in, union=union, pairs_g=pairs_g, counts=counts, orders=orders, labels=labels,
                rel_logits=rel_logits)


def pair_features(model, edge_ctx, pairs_g):
    head, tail = model.post_emb(edge_ctx).chunk(2, dim=1)                   # (N, 2H) each
    return torch.cat([head[pairs_g[:, 0]], tail[pairs_g[:, 1]]], dim=1)     # (R, 4H)


def mirror_by_hand(model, edge_in_m, union_m, h, tied=False):
    """Section 3.3: the shared edge-context LSTM and head/tail projection on the masked LSTM input,
    then the untied Linear-ReLU-Linear-ReLU-Linear head on [pair features, masked union feature];
    no frequency prior. The tied ablation uses the original's last two layers instead."""
    pair_m = pair_features(model, M.bilstm(model.edge_ctx_rnn, edge_in_m, h["counts"], h["orders"]), h["pairs_g"])
    if tied:
        return model.rel_compress(model.post_cat(pair_m) * union_m)
    l1, l2, l3 = model.mirror.head[0], model.mirror.head[2], model.mirror.head[4]
    x = torch.cat([pair_m, union_m], dim=1)                                 # (R, 4H + Du)
    return l3(F.relu(l2(F.relu(l1(x)))))


class KnownMasks:
    """Replaces motifs_align.random_mask: records what it is given and applies a known 0/1 mask
    (half the elements zeroed, whatever p; a function of the shape, so every run gets the same
    masks), so that the mirror can be recomputed by hand."""

    def __init__(self, monkeypatch):
        self.calls = []

        def fake(x, p):
            g = torch.Generator().manual_seed(x.numel())
            m = (torch.rand(x.shape, generator=g) >= 0.5).to(x.dtype)
            self.calls.append(dict(x=x.detach().clone(), p=p, requires_grad=x.requires_grad, mask=m))
            return x * m
        monkeypatch.setattr(M, "random_mask", fake)

    def by_shape(self, shape):
        found = [c for c in self.calls if tuple(c["x"].shape) == tuple(shape)]
        assert len(found) == 1, f"expected one masked tensor of shape {tuple(shape)}, got {len(found)}"
        return found[0]


# ----------------------------------------------------------------------------------------------
# Eq. (1): random masking

def test_random_mask_zeroes_each_element_independently_with_probability_p():
    for p in (0.1, 0.4):
        z = (M.random_mask(torch.ones(4000, 64), p) == 0).float()           # 1 = zeroed
        assert abs(z.mean().item() - p) < 0.005
        assert (z.mean(0) - p).abs().max() < 0.05          # every column: not one draw per column ...
        assert z.mean(1).var() < 0.02                      # ... nor per row (those give 0/1 fractions)
        assert abs((z[:, :-1] * z[:, 1:]).mean().item() - p * p) < 0.01   # neighbours independent
    a, b = M.random_mask(torch.ones(1000), 0.5), M.random_mask(torch.ones(1000), 0.5)
    assert not torch.equal(a, b), "the same mask twice: masks must be fresh at every call"


def test_random_mask_only_zeroes_without_rescaling():
    x = torch.randn(50, 40, 30)
    y = M.random_mask(x, 0.3)
    assert y.shape == x.shape
    kept = y != 0
    assert torch.equal(y[kept], x[kept]), "kept elements must be unchanged: no 1/(1-p) rescale (Eq. 1)"
    assert abs(kept.float().mean().item() - 0.7) < 0.01
    assert torch.equal(M.random_mask(x, 0.0), x)


# ----------------------------------------------------------------------------------------------
# The mirrored relation predictor (section 3.3)

@pytest.mark.parametrize("mode,tied", [("predcls", False), ("sgcls", False), ("predcls", True)])
def test_mirror_masks_both_inputs_and_runs_the_shared_predictor_on_them(monkeypatch, mode, tied):
    """The mirror masks exactly the edge-context LSTM's input and the union (relation) feature, both
    detached, with p; its LSTM, pair features and head then run on those masked tensors."""
    masks = KnownMasks(monkeypatch)
    model, inp = tiny(mode=mode, tied_head=tied), tiny_inputs()
    model.train()
    out = run_mirror(model, inp)
    with torch.no_grad():
        h = by_hand(model, inp)
    assert len(masks.calls) == 2, f"random_mask called {len(masks.calls)} times, expected 2 (Eq. 1 on both inputs)"
    edge, union = masks.by_shape(h["edge_in"].shape), masks.by_shape(h["union"].shape)
    for call, ref in ((edge, h["edge_in"]), (union, h["union"])):
        torch.testing.assert_close(call["x"], ref)        # the right tensor, unmasked before the call
        assert call["p"] == pytest.approx(0.3)            # with the configured p
        assert not call["requires_grad"], "the mirror's inputs must be detached (stop-gradient)"
    with torch.no_grad():
        expected = mirror_by_hand(model, h["edge_in"] * edge["mask"], h["union"] * union["mask"], h, tied)
    torch.testing.assert_close(out["mirror_logits"], expected)
    # the original predictor still sees the unmasked inputs and keeps its frequency prior
    torch.testing.assert_close(out["rel_logits"], h["rel_logits"])
    # (the known masks do change the result, so the comparison above could fail)
    with torch.no_grad():
        assert not torch.allclose(expected, mirror_by_hand(model, h["edge_in"], h["union"], h, tied), atol=1e-4)


def test_mirror_shares_every_weight_but_an_untied_three_layer_mlp_head():
    plain = set(dict(tiny(no_align=True).named_parameters()))
    aligned = tiny()
    extra = set(dict(aligned.named_parameters())) - plain
    assert plain <= set(dict(aligned.named_parameters()))
    assert extra and all(n.startswith("mirror.head.") for n in extra), extra   # no private copies
    kinds = [type(m) for m in aligned.mirror.head]
    assert kinds == [torch.nn.Linear, torch.nn.ReLU, torch.nn.Linear, torch.nn.ReLU, torch.nn.Linear], kinds
    l1, l2, l3 = aligned.mirror.head[0], aligned.mirror.head[2], aligned.mirror.head[4]
    # it reads [pair features (4H), masked union feature (Du)] and predicts the P predicate logits
    assert (l1.in_features, l1.out_features, l2.out_features, l3.out_features) == (4 * H + DU, DM, DM, P)
    # the tied ablation adds no weight at all
    assert set(dict(tiny(tied_head=True).named_parameters())) == plain
    # the untied head is created last, as before the Mirror module existed: parameter order (gradient
    # clipping sums over it) and the initial weights of every other module do not depend on it
    names = [n for n, _ in aligned.named_parameters()]
    assert names[-len(extra):] == [f"mirror.head.{i}.{w}" for i in (0, 2, 4) for w in ("weight", "bias")]


def test_mirror_at_p0_with_tied_heads_and_no_prior_reproduces_the_original_exactly():
    """The anchor: nothing masked, the same head, a zero frequency prior -> the mirror IS the original."""
    model, inp = tiny(tied_head=True, mask_p=0.0, freq=torch.zeros(C, C, P)), tiny_inputs()
    model.train()
    with torch.no_grad():
        out = run_mirror(model, inp)
    torch.testing.assert_close(out["mirror_logits"], out["rel_logits"], atol=0, rtol=0)


def test_no_frequency_prior_in_the_mirror(monkeypatch):
    KnownMasks(monkeypatch)   # the same masks in both runs
    model, inp = tiny(), tiny_inputs()
    model.train()
    with torch.no_grad():
        before = run_mirror(model, inp)
        model.freq_bias.weight.normal_(0, 10)
        after = run_mirror(model, inp)
    assert not torch.allclose(before["rel_logits"], after["rel_logits"])        # the original uses it
    torch.testing.assert_close(before["mirror_logits"], after["mirror_logits"])  # the mirror does not


def align_grads(mode="predcls", kind="kl", inputs_grad=False, **kw):
    model, inp = tiny(mode=mode, **kw), tiny_inputs()
    if inputs_grad:
        inp["obj_feats"].requires_grad_(True)
        inp["fmap"].requires_grad_(True)
    model.train()
    out = run_mirror(model, inp)
    labels = torch.randint(0, P, (R,), generator=torch.Generator().manual_seed(0))
    M.alignment_loss(out["rel_logits"], out["mirror_logits"], kind, labels).backward()
    return {n: p.grad for n, p in model.named_parameters()}, inp


BEFORE_THE_PREDICTOR = ("obj_embed_ctx", "pos_embed", "obj_ctx_rnn", "decoder_rnn", "obj_embed_edge",
                        "rect_conv", "union_fc")


@pytest.mark.parametrize("mode,kind,tied", [("predcls", "kl", False), ("sgcls", "kl", False),
                                            ("sgcls", "supervised", False), ("sgcls", "kl", True)])
def test_align_gradient_stops_at_the_mirror_inputs(mode, kind, tied):
    grads, inp = align_grads(mode, kind, inputs_grad=True, tied_head=tied)
    leaked = [n for n, g in grads.items() if n.startswith(BEFORE_THE_PREDICTOR) and nonzero(g)]
    assert not leaked, f"L_align reached {leaked}, before the relation predictor"
    assert inp["obj_feats"].grad is None and inp["fmap"].grad is None
    # ...and it does train the relation predictor's message passing (shared) and the mirror's head
    head = ("post_cat.weight", "rel_compress.weight") if tied else ("mirror.head.0.weight", "mirror.head.4.weight")
    for name in ("edge_ctx_rnn.weight_ih_l0", "edge_ctx_rnn.weight_hh_l0_reverse", "post_emb.weight") + head:
        assert nonzero(grads[name]), f"L_align did not reach {name}"


@pytest.mark.parametrize("kind", ["kl", "supervised"])
def test_align_loss_does_not_train_the_original_head(kind):
    grads, _ = align_grads(kind=kind)
    # post_cat, rel_compress and the frequency prior make P_original and are not in the untied mirror
    for name in ("post_cat.weight", "rel_compress.weight", "freq_bias.weight"):
        assert not nonzero(grads[name]), f"L_align reached {name}"


class MirrorCalls:
    """Counts the runs of the mirror (Mirror.forward) and of the masking (random_mask)."""

    def __init__(self, monkeypatch):
        self.mirror, self.masks = [], []
        mirror_forward, mask = M.Mirror.forward, M.random_mask
        monkeypatch.setattr(M.Mirror, "forward", lambda *a: self.mirror.append(1) or mirror_forward(*a))
        monkeypatch.setattr(M, "random_mask", lambda x, p: self.masks.append(1) or mask(x, p))


def test_only_the_training_step_runs_the_mirror_and_eval_equals_the_plain_model(monkeypatch):
    calls = MirrorCalls(monkeypatch)
    aligned, inp = tiny(mode="sgcls"), tiny_inputs()
    plain = tiny(no_align=True, mode="sgcls", seed=123)
    plain.load_state_dict(M.strip_mirror(aligned.state_dict()))           # strict: the same layout
    aligned.eval()
    plain.eval()
    with torch.no_grad():
        a, b = run(aligned, inp), run(plain, inp)
    for k in ("rel_logits", "obj_logits", "obj_labels", "obj_scores"):
        assert torch.equal(a[k], b[k]), k
    aligned.train()
    run(aligned, inp)                       # the model's forward never runs it, in either mode
    assert calls.mirror == [] and calls.masks == []
    step(monkeypatch, aligned, inp, tiny_cfg(mode="sgcls"))
    assert calls.mirror == [1] and len(calls.masks) == 2   # train_step does (so the checks above can fail)


# ----------------------------------------------------------------------------------------------
# Eq. (2): L_align = KL(P_original || P_masked), and the supervised ablation (Table 3)

def test_alignment_loss_is_kl_original_to_masked_by_hand():
    # Two pairs with deliberately asymmetric distributions, so that KL(q || p) != KL(p || q).
    orig = torch.tensor([[4.0, 0.0, 0.0, -1.0, 0.0], [0.0, 0.0, 3.0, 0.0, 1.0]], requires_grad=True)
    mirror = torch.tensor([[0.0, 1.0, 0.5, 0.0, 0.0], [1.0, -1.0, 0.0, 0.0, 0.0]], requires_grad=True)
    loss = M.alignment_loss(orig, mirror, "kl")
    p = orig.detach().exp() / orig.detach().exp().sum(1, keepdim=True)       # P_original
    q = mirror.detach().exp() / mirror.detach().exp().sum(1, keepdim=True)   # P_masked
    kl_pq = (p * (p / q).log()).sum(1).mean()     # sum over predicates, mean over the R = 2 pairs
    kl_qp = (q * (q / p).log()).sum(1).mean()
    assert abs(kl_pq - kl_qp) > 0.1                # the direction is visible in this example
    torch.testing.assert_close(loss, kl_pq)
    loss.backward()
    assert orig.grad is None, "a gradient reached P_original: the KL target must be fixed (detached)"
    torch.testing.assert_close(mirror.grad, (q - p) / 2)   # d KL(p || softmax(m)) / dm = (q - p) / R
    assert M.alignment_loss(mirror, mirror, "kl").abs() < 1e-6


def test_supervised_ablation_is_cross_entropy_of_the_mirror_on_the_labels():
    g = torch.Generator().manual_seed(0)
    mirror = torch.randn(9, P, generator=g, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 0, 2, 1])
    expected = -(mirror.detach().log_softmax(1)[torch.arange(9), labels]).mean()
    for _ in range(2):   # whatever P_original is: no KL term
        orig = torch.randn(9, P, generator=g, requires_grad=True)
        loss = M.alignment_loss(orig, mirror, "supervised", labels)
        torch.testing.assert_close(loss, expected)
        loss.backward()
        assert orig.grad is None or not nonzero(orig.grad)
    assert (expected - M.alignment_loss(orig, mirror, "kl")).abs() > 0.1


# ----------------------------------------------------------------------------------------------
# Eq. (3) in the training step: L = L_original + lambda * L_align, on every sampled pair

SAMPLE_PAIRS = M.sample_pairs
TARGET_RELS = [torch.tensor([[0, 1, 2], [2, 3, 4]]), torch.tensor([[1, 0, 3]])]   # (s, o, predicate)


def step(monkeypatch, model, inp, cfg):
    """train_step on the tiny inputs (the frozen detector's part replaced by them). Returns its
    losses dict, the model's outputs (mirror_logits added when the mirror ran) and the sampled
    predicate labels (R,)."""
    monkeypatch.setattr(M, "stage1_outputs", lambda *a, **k: dict(
        fmap=inp["fmap"], boxes=inp["boxes"], obj_feats=inp["obj_feats"], obj_dists=inp["obj_dists"], det=None))
    sampled, outs, mirrors = [], [], []
    monkeypatch.setattr(M, "sample_pairs", lambda *a: sampled.append(SAMPLE_PAIRS(*a)) or sampled[-1])
    labels = inp["gt_labels"].split(COUNTS)
    targets = [dict(size=s, boxes=b, labels=l, relations=r)
               for s, b, l, r in zip(inp["sizes"], inp["boxes"], labels, TARGET_RELS)]
    hooks = [model.register_forward_hook(lambda m, a, o: outs.append(o))]
    if model.mirror is not None:
        hooks.append(model.mirror.register_forward_hook(lambda m, a, o: mirrors.append(o)))
    torch.manual_seed(7)   # the same pairs and masks for every call
    losses = M.train_step(model, None, None, targets, cfg)
    for h in hooks:
        h.remove()
    assert len(outs) == 1 and len(mirrors) == (model.mirror is not None)
    out = {**outs[0], **({"mirror_logits": mirrors[0]} if mirrors else {})}
    return losses, out, torch.cat([lab for _, lab in sampled])


def kl_by_hand(orig_logits, mirror_logits):
    p, log_q = orig_logits.softmax(-1), mirror_logits.log_softmax(-1)
    return (p * (p.log() - log_q)).sum(-1).mean()


@pytest.mark.parametrize("kind", ["kl", "supervised"])
def test_train_step_total_is_sup_plus_lambda_align_on_all_sampled_pairs(monkeypatch, kind):
    inp = tiny_inputs()
    results = {}
    for lam in (1.0, 7.0):
        cfg = tiny_cfg(align_weight=lam, align_loss=kind)
        model = tiny()
        model.train()
        losses, out, labels = step(monkeypatch, model, inp, cfg)
        # the sampled pairs hold both related and unrelated pairs; L_align covers all of them
        assert (labels > 0).any() and (labels == 0).any() and len(labels) == len(out["mirror_logits"])
        rel, mir = out["rel_logits"].detach(), out["mirror_logits"].detach()
        torch.testing.assert_close(losses["sup"], F.cross_entropy(rel, labels))         # L_original (predcls)
        if kind == "kl":
            expected_align = kl_by_hand(rel, mir)                                        # Eq. (2)
        else:
            expected_align = -mir.log_softmax(-1)[torch.arange(len(labels)), labels].mean()   # Table 3
        torch.testing.assert_close(losses["align"], expected_align)
        torch.testing.assert_close(losses["total"], losses["sup"] + lam * expected_align)   # Eq. (3)
        losses["total"].backward()
        results[lam] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        assert losses["align"] > 1e-3
    # the gradient of lambda * L_align scales with lambda (the untied head gets nothing else)
    for name in ("mirror.head.0.weight", "mirror.head.4.bias"):
        assert nonzero(results[1.0][name])
        torch.testing.assert_close(results[7.0][name], 7.0 * results[1.0][name])
    # and L_original alone trains the original head: its gradient there does not depend on lambda
    torch.testing.assert_close(results[7.0]["rel_compress.weight"], results[1.0]["rel_compress.weight"])


def test_train_step_without_alignment_has_no_mirror_and_a_zero_align(monkeypatch):
    model, inp = tiny(no_align=True), tiny_inputs()
    model.train()
    losses, out, labels = step(monkeypatch, model, inp, tiny_cfg(no_align=True))
    assert model.mirror is None and "mirror_logits" not in out
    assert set(losses) == {"total", "sup", "align"} and losses["align"].item() == 0.0
    torch.testing.assert_close(losses["total"], F.cross_entropy(out["rel_logits"], labels))
    torch.testing.assert_close(losses["sup"], losses["total"])


def test_command_line_reaches_the_ablations():
    cfg = M.parse_config(["--align-loss", "supervised", "--tied-head", "--mask-p", "0.2", "--align-weight", "3"])
    assert (cfg.align_loss, cfg.tied_head, cfg.mask_p, cfg.align_weight, cfg.no_align) == ("supervised", True, 0.2, 3.0, False)
    model = M.MotifsRelationModel(tiny_cfg(tied_head=True, mask_p=0.2), C, P, FC, 4, torch.zeros(C, C, P))
    assert model.mirror.mask_p == 0.2 and model.mirror.tied and model.mirror.head is None
    assert not list(model.mirror.parameters())
