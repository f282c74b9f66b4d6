"""The paper's method in sgtr_align.py, pinned: sections 3.1, 3.2, 4.1, 4.3 and supplementary 7.

The core of this file is a by-hand reference of the structural predicate decoder (decoder_by_hand):
the same modules as the model, its own attention with the mirror's mask taken from
kernels.masked_attention.bernoulli_mask(seed) (the mask is a pure function of the seed). From it the
tests recompute L_align (KL(P_original || P_masked) on the predicate, subject and object
distributions of the last layer), the supervised ablation, the tied-head ablation and Eq. (3), and
compare with what S.train_step returns, so that a one-line change to the method makes some test fail: a mask in a
self-attention or in the original, a reused seed, dropout in the mirror or in the target pass, the
mirror's heads used for the target, alignment on another layer, swapped KL arguments, a missing
.detach() or lambda, ... A tiny SGTR on random images: the whole file takes seconds on one CPU thread.
"""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import sgtr_align as S
from kernels.masked_attention import bernoulli_mask

C1, P1 = 8, 6  # C + 1 object classes, P + 1 predicates
KEYS = ("pred_logits", "sub_logits", "obj_logits")


def tiny_cfg(**kw):
    base = dict(d_model=32, nheads=2, ffn_dim=64, backbone_width=8, backbone_stride=8, enc_layers=1,
                ent_dec_layers=2, rel_enc_layers=1, pred_dec_layers=3, num_ent_queries=5,
                num_pred_queries=7, dropout=0.5, mask_p=0.3)
    base.update(kw)
    return S.Config(**base)


def tiny(**kw):
    """A tiny SGTR in training mode whose weights are moved away from their initial values (so that a
    private copy of a shared module made at construction would no longer agree with the original)."""
    torch.manual_seed(0)
    model = S.SGTR(tiny_cfg(**kw), C1, P1).train()
    with torch.no_grad():
        for prm in model.parameters():
            prm.add_(0.2 * torch.randn_like(prm))
    return model


def batch(B=2, seed=0):
    """Random images of different sizes (so padding is exercised) with random boxes and relations."""
    g = torch.Generator().manual_seed(seed)
    sizes = [(48, 40), (40, 48)][:B]
    images = torch.zeros(B, 3, 48, 48)
    targets = []
    for b, (h, w) in enumerate(sizes):
        images[b, :, :h, :w] = torch.rand(3, h, w, generator=g)
        xy = torch.rand(3, 2, generator=g) * 20
        boxes = torch.cat([xy, xy + 5 + torch.rand(3, 2, generator=g) * 15], 1)
        targets.append(dict(boxes=boxes, labels=torch.tensor([1, 2, 3]),
                            relations=torch.tensor([[0, 1, 2], [2, 0, 5]]), size=(h, w)))
    return images, S.pad_mask_for(images, targets), targets


def setup(**kw):
    """A tiny model whose encode_and_detect is computed once, on batch(), and then always returns the
    same outputs: S.train_step's decoder passes (original, mirror, target) then see the very inputs
    that the by-hand decoder gets, whatever dropout the step draws elsewhere.
    -> model, the decoder inputs, (images, targets) for train_step, the normalised targets."""
    model = tiny(**kw)
    images, mask, targets = batch()
    encoded = model.encode_and_detect(images, mask)
    model.encode_and_detect = lambda *a: encoded
    return model, encoded[1], (images, targets), S.normalised_targets(targets, "cpu")


def heads(model, mirror):
    """The (predicate, subject, object) class heads of the original, or of the mirror: untied ones,
    the original's in the tied-head ablation (decided by the config, not by what the model built)."""
    if mirror and not model.cfg.tied_head:
        return model.mirror.pred_class, model.mirror.sub_class, model.mirror.obj_class
    return model.pred_class, model.sub_class, model.obj_class


def align_of(model, step_batch):
    """L_align of S.train_step on step_batch = (images, targets)."""
    return S.train_step(model, *step_batch, model.cfg)["align"]


def has_grad(g):
    return g is not None and g.abs().sum() > 0


# ----------------------------------------------------------------------------------------------
# The structural predicate decoder by hand

def attention_by_hand(mha, q, k, v, kpm=None, p=0.0, seed=None):
    """Multi-head attention with the model's projections; with a seed, each attention logit is set
    to -inf with probability p before the softmax (section 3.2), the mask bernoulli_mask(seed)."""
    B, Lq, D = q.shape
    Lk, Hd = k.shape[1], mha.nheads
    split = lambda x, L: x.view(B, L, Hd, D // Hd).transpose(1, 2)            # (B, Hd, L, Dh)
    qh, kh, vh = split(mha.q_proj(q), Lq), split(mha.k_proj(k), Lk), split(mha.v_proj(v), Lk)
    logits = qh @ kh.transpose(-1, -2) / math.sqrt(D // Hd)                   # (B, Hd, Lq, Lk)
    drop = torch.zeros(logits.shape, dtype=torch.bool)
    if seed is not None:
        drop = bernoulli_mask(seed, logits.shape, p)
    if kpm is not None:
        drop = drop | kpm[:, None, None, :]
    attn = logits.masked_fill(drop, float("-inf")).softmax(-1).nan_to_num(0.0)   # no key left: zeros
    return mha.o_proj((attn @ vh).transpose(1, 2).reshape(B, Lq, D))


def layer_by_hand(L, t, qpos, mem, mpos, kpm=None, p=0.0, seed=None):
    """A decoder layer without dropout: self-attention (never masked), cross-attention (masked with a
    seed), FFN, each a post-norm residual."""
    t = L.norm1(t + attention_by_hand(L.self_attn, t + qpos, t + qpos, t))
    t = L.norm2(t + attention_by_hand(L.cross_attn, t + qpos, mem + mpos, mem, kpm, p, seed))
    return L.norm3(t + L.ffn.fc2(F.relu(L.ffn.fc1(t))))


def decoder_by_hand(model, inputs, class_heads, p=0.0, seeds=None):
    """No dropout anywhere. seeds None = the original (nothing masked); else one (relation memory,
    subject, object) seed triple per layer for the three cross-attention blocks, never the
    self-attention. -> one dict of predictions per layer."""
    qp, qs, qo = inputs["qp"], inputs["qs"], inputs["qo"]
    rel, rel_pos, kpm = inputs["rel_mem"], inputs["rel_pos"], inputs["rel_kpm"]
    ent, ent_pos = inputs["ent_mem"], inputs["ent_pos"]
    outs = []
    for i, L in enumerate(model.pred_decoder):
        s = seeds[i] if seeds is not None else (None, None, None)
        qp = layer_by_hand(L.predicate, qp, inputs["pos_p"], rel, rel_pos, kpm, p, s[0])   # predicate sub-decoder
        qs = layer_by_hand(L.subject, qs, inputs["pos_s"], ent, ent_pos, None, p, s[1])    # subject indicators
        qo = layer_by_hand(L.object, qo, inputs["pos_o"], ent, ent_pos, None, p, s[2])     # object indicators
        qp = qp + F.relu(L.fuse_sub(qs) + L.fuse_obj(qo))                                  # fusion
        hp, hs, ho = (norm(x) for norm, x in zip(model.pred_norms, (qp, qs, qo)))
        outs.append(dict(pred_logits=class_heads[0](hp), rel_vec=model.rel_vec(hp).sigmoid(),
                         sub_logits=class_heads[1](hs), obj_logits=class_heads[2](ho),
                         sub_boxes=model.sub_box(hs).sigmoid(), obj_boxes=model.obj_box(ho).sigmoid()))
    return outs


def kl_by_hand(target, mirror, focal_kl="bernoulli"):
    """Eq. (2) for the three distributions: sum over classes, mean over queries and images, summed. A focal
    predicate head (P outputs, not P + 1) is P Bernoullis: the sum of their KLs (bernoulli_kl_by_hand); with
    focal_kl 'softmax', a softmax over its P logits instead."""
    total = 0.0
    for key in KEYS:
        if key == "pred_logits" and target[key].shape[-1] == P1 - 1 and focal_kl == "bernoulli":
            total = total + bernoulli_kl_by_hand(target[key], mirror[key]).sum(-1).mean().float()
            continue
        p, log_q = target[key].softmax(-1), mirror[key].log_softmax(-1)
        total = total + (p * (p.log() - log_q)).sum(-1).mean()
    return total


def align_with_seeds(model, step_batch):
    """L_align of S.train_step, and the seeds it drew (the mask generator is rewound and drawn again)."""
    rng = model.mirror.mask_rng
    state = rng.get_state()
    loss = align_of(model, step_batch)
    after = rng.get_state()
    rng.set_state(state)
    seeds = model.mirror.draw_seeds()
    assert torch.equal(rng.get_state(), after), "a training step must draw one set of seeds"
    return loss, seeds


# ----------------------------------------------------------------------------------------------
# Eq. (2) on the last layer, the target pass, the mirror

@pytest.mark.parametrize("head", ["focal", "softmax", "focal, softmax KL"])
@pytest.mark.parametrize("tied", [False, True])
def test_alignment_loss_equals_kl_of_the_original_to_the_masked_mirror_by_hand(tied, head):
    focal_kl = "softmax" if head == "focal, softmax KL" else "bernoulli"
    model, inputs, step_batch, tg = setup(tied_head=tied, pred_loss=head.split(",")[0], focal_kl=focal_kl)
    loss, seeds = align_with_seeds(model, step_batch)
    with torch.no_grad():
        # target: the original decoder, ORIGINAL heads, no dropout, no mask; mirror: masked, no dropout,
        # untied heads (the original ones in the tied ablation)
        target = decoder_by_hand(model, inputs, heads(model, mirror=False))
        mirror = decoder_by_hand(model, inputs, heads(model, mirror=True), 0.3, seeds)
        expected = kl_by_hand(target[-1], mirror[-1], focal_kl)
        if head.startswith("focal"):   # the two readings of Eq. 2 for the focal head differ
            other = "softmax" if focal_kl == "bernoulli" else "bernoulli"
            assert abs(expected - kl_by_hand(target[-1], mirror[-1], other)) > 1e-3
        # (each alternative is visibly different here, so the comparison below can fail)
        assert abs(expected - kl_by_hand(mirror[-1], target[-1])) > 1e-3            # direction
        assert abs(expected - kl_by_hand(target[0], mirror[0])) > 1e-3              # layer
        unmasked = decoder_by_hand(model, inputs, heads(model, mirror=True))
        assert abs(expected - kl_by_hand(target[-1], unmasked[-1])) > 1e-3         # the masks matter
    torch.testing.assert_close(loss, expected)


def test_both_model_files_compute_the_same_eq2_for_a_softmax_distribution():
    """Eq. 2 is spelled twice: motifs_align with log-probabilities and reduction='batchmean' over its R pairs,
    sgtr_align with probabilities, summed over the classes and averaged over the B x Qp queries (the spelling
    its committed runs were made with). On the same distributions they are one loss."""
    import motifs_align as M
    g = torch.Generator().manual_seed(0)
    orig, mirror = torch.randn(2, 6, 51, generator=g), torch.randn(2, 6, 51, generator=g)
    same = torch.randn(2, 6, 151, generator=g)   # subject / object: the mirror equals the target, KL 0
    cfg = S.Config(pred_loss="softmax")
    sgtr = S.alignment_loss(dict(pred_logits=orig, sub_logits=same, obj_logits=same),
                            dict(pred_logits=mirror, sub_logits=same, obj_logits=same), "kl", cfg=cfg)
    motifs = M.alignment_loss(orig.flatten(0, 1), mirror.flatten(0, 1), "kl")   # R = B x Qp pairs
    assert motifs > 0.5
    torch.testing.assert_close(sgtr, motifs)


def test_masks_only_in_the_mirrors_cross_attention_with_fresh_seeds(monkeypatch):
    """Section 7: one mask per cross-attention block (relation memory, subject, object) per layer and
    per step, never in a self-attention, never in the original decoder."""
    calls = []
    real = S.masked_attention
    monkeypatch.setattr(S, "masked_attention", lambda q, k, v, p, seed, kpm=None: calls.append(
        dict(seed=seed, p=p, Lq=q.shape[2], Lk=k.shape[2])) or real(q, k, v, p, seed, kpm))
    model = tiny()
    cfg, L, rng = model.cfg, model.cfg.pred_dec_layers, model.mirror.mask_rng
    images, mask, targets = batch()
    tokens, Qe = (48 // cfg.backbone_stride) ** 2, cfg.num_ent_queries
    drawn = []
    for _ in range(2):   # two training steps
        state = rng.get_state()
        S.train_step(model, images, targets, cfg)
        after = rng.get_state()
        rng.set_state(state)
        drawn += [s for triple in model.mirror.draw_seeds() for s in triple]
        rng.set_state(after)
    assert len(calls) == 2 * 3 * L, f"{len(calls)} masked attention calls, expected 3 per layer per step"
    assert [c["Lk"] for c in calls] == [tokens, Qe, Qe] * (2 * L)   # relation memory, subject, object
    assert all(c["Lq"] == cfg.num_pred_queries and c["p"] == cfg.mask_p for c in calls)
    assert [c["seed"] for c in calls] == drawn                       # in order: layer by layer, block by block
    assert len(set(drawn)) == len(drawn), "a mask seed was reused across blocks, layers or steps"
    calls.clear()
    S.train_step(S.SGTR(tiny_cfg(no_align=True), C1, P1).train(), images, targets, cfg)
    assert calls == []                                               # the baseline never masks


def test_draw_seeds_fresh_per_block_layer_and_step_and_reproducible():
    a, b = tiny(seed=3).mirror, tiny(seed=3).mirror
    s1, s2 = a.draw_seeds(), a.draw_seeds()
    assert len(s1) == 3 and all(len(t) == 3 for t in s1)
    flat = [x for t in s1 + s2 for x in t]
    assert len(set(flat)) == len(flat)
    assert b.draw_seeds() == s1 and b.draw_seeds() == s2                       # one seed fixes the masks
    assert tiny(seed=4).mirror.draw_seeds() != s1


def test_no_dropout_in_the_mirror_nor_in_the_target_pass():
    model, inputs, step_batch, tg = setup(dropout=0.5)
    # the training pass of the original does use dropout (so the checks below could fail)
    a = model.forward_decoder(inputs, use_dropout=True)[-1]["pred_logits"]
    b = model.forward_decoder(inputs, use_dropout=True)[-1]["pred_logits"]
    assert not torch.allclose(a, b)
    state = model.mirror.mask_rng.get_state()
    step1 = S.train_step(model, *step_batch, model.cfg)
    model.mirror.mask_rng.set_state(state)
    torch.manual_seed(123)   # another dropout draw: no effect when nothing uses dropout
    step2 = S.train_step(model, *step_batch, model.cfg)
    assert step1["sup"].item() != step2["sup"].item()   # (the draw did change the original's pass)
    assert step1["align"].item() == step2["align"].item() and step1["align"].item() > 0


def test_target_is_the_dropout_free_original_with_the_original_heads():
    model, inputs, step_batch, tg = setup()
    captured = []
    real = model.forward_decoder

    def spy(*a, **k):
        outs = real(*a, **k)
        captured.append(outs[-1])
        return outs
    model.forward_decoder = spy

    def target():
        captured.clear()
        align_of(model, step_batch)
        fixed = [o for o in captured if not o["pred_logits"].requires_grad]
        assert len(fixed) == 1, "expected one gradient-free target pass"
        return fixed[0]
    with torch.no_grad():
        reference = real(inputs, use_dropout=False)[-1]
    t = target()
    for key in KEYS:
        torch.testing.assert_close(t[key], reference[key])
    with torch.no_grad():
        for name in ("pred_class", "sub_class", "obj_class"):
            getattr(model.mirror, name).weight.normal_()
    t2 = target()
    for key in KEYS:   # changing the mirror's heads does not change the target ...
        torch.testing.assert_close(t2[key], t[key])
    with torch.no_grad():
        model.pred_class.weight.normal_()
    assert not torch.allclose(target()["pred_logits"], t["pred_logits"])   # ... changing the original's does


def test_only_the_last_layer_is_aligned():
    model, inputs, step_batch, tg = setup()
    real = model.forward_decoder
    torch.manual_seed(0)
    state = model.mirror.mask_rng.get_state()
    clean = align_of(model, step_batch)

    def noisy(layers):
        def f(*a, **k):
            outs = real(*a, **k)
            for i in layers:
                outs[i] = {key: v + 3 * torch.randn_like(v) for key, v in outs[i].items()}
            return outs
        return f
    model.forward_decoder = noisy([0, 1])   # every layer's predictions but the last one's
    model.mirror.mask_rng.set_state(state)
    torch.testing.assert_close(align_of(model, step_batch), clean)
    model.forward_decoder = noisy([2])      # (the last layer's do count)
    model.mirror.mask_rng.set_state(state)
    assert abs(align_of(model, step_batch) - clean) > 1e-3


def test_mirror_at_p0_with_tied_heads_is_the_dropout_free_original():
    """The anchor: nothing masked and the same heads -> the mirror IS the original without dropout
    (weights shared, not copied: tiny() moved every weight after construction)."""
    model, inputs, _, _ = setup(tied_head=True, mask_p=0.0)
    with torch.no_grad():
        orig = model.forward_decoder(inputs, use_dropout=False)
        mirror = model.mirror(model, inputs)
        ref = decoder_by_hand(model, inputs, heads(model, mirror=False))
    for layer in range(3):
        for key in orig[layer]:
            torch.testing.assert_close(mirror[layer][key], orig[layer][key], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(orig[layer][key], ref[layer][key], atol=1e-5, rtol=1e-5)


def test_mirror_shares_every_weight_except_three_untied_class_heads():
    plain = set(dict(S.SGTR(tiny_cfg(no_align=True), C1, P1).named_parameters()))
    untied = set(dict(S.SGTR(tiny_cfg(), C1, P1).named_parameters()))
    tied = set(dict(S.SGTR(tiny_cfg(tied_head=True), C1, P1).named_parameters()))
    assert untied - plain == {f"mirror.{h}_class.{w}" for h in ("pred", "sub", "obj") for w in ("weight", "bias")}
    assert plain <= untied and tied == plain


def test_plain_attention_is_masked_attention_at_p0():
    """The original's attention and the kernel at p = 0 are the same function (padding included)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, 5, 16, generator=g)
    k, v = torch.randn(2, 2, 7, 16, generator=g), torch.randn(2, 2, 7, 16, generator=g)
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    kpm[0, 4:] = True
    kpm[1] = True  # a fully padded image row -> zeros in both
    ours = S.attention(q, k, v, kpm)
    torch.testing.assert_close(ours, S.masked_attention(q, k, v, 0.0, 123, kpm), atol=1e-6, rtol=1e-5)
    assert ours[1].abs().max() == 0


# ----------------------------------------------------------------------------------------------
# Gradients: a fixed target, the stop-gradient at the decoder's inputs

def align_grads(**kw):
    model, _, step_batch, _ = setup(**kw)
    align_of(model, step_batch).backward()
    return {n: p.grad for n, p in model.named_parameters()}


def test_target_distributions_are_fixed():
    grads = align_grads()
    # P_original is a fixed target: the original class heads get nothing from L_align ...
    for name in ("pred_class", "sub_class", "obj_class"):
        assert not has_grad(grads[name + ".weight"]), f"L_align reached the original {name} head"
    # ... while the mirror's untied heads do
    for name in ("mirror.pred_class", "mirror.sub_class", "mirror.obj_class"):
        assert has_grad(grads[name + ".weight"])


BEFORE_THE_DECODER = ("backbone.", "input_proj.", "encoder.", "enc_class.", "enc_box.", "ent_anchor.", "ent_qpos.",
                      "ent_decoder.", "ent_norm.", "ent_class.", "ent_box.", "rel_encoder.", "pred_query.", "query_gen.",
                      "query_split.", "ent_box_embed.")


@pytest.mark.parametrize("kw", [dict(), dict(align_loss="supervised"), dict(tied_head=True)])
def test_stop_gradient_at_the_mirrors_inputs(kw):
    grads = align_grads(**kw)
    leaked = [n for n, g in grads.items() if n.startswith(BEFORE_THE_DECODER) and has_grad(g)]
    assert not leaked, f"L_align ({kw}) reached parameters before the decoder: {leaked[:5]}"
    # the structural decoder itself is trained by the alignment, in every layer
    for i in range(3):
        for sub_decoder in ("predicate", "subject", "object"):
            for block in ("self_attn", "cross_attn"):
                assert has_grad(grads[f"pred_decoder.{i}.{sub_decoder}.{block}.q_proj.weight"]), (i, sub_decoder, block)


# ----------------------------------------------------------------------------------------------
# The ablations (section 4.3, Table 3) and Eq. (3)

def test_supervised_ablation_is_the_predicate_loss_of_the_mirrors_last_layer():
    model, inputs, step_batch, tg = setup(align_loss="supervised")
    loss, seeds = align_with_seeds(model, step_batch)
    with torch.no_grad():
        mirror = decoder_by_hand(model, inputs, heads(model, mirror=True), 0.3, seeds)
        target = decoder_by_hand(model, inputs, heads(model, mirror=False))
        expected = S.predicate_loss(mirror[-1], tg, model.cfg)
        for other in (S.predicate_loss(mirror[0], tg, model.cfg), S.predicate_loss(target[-1], tg, model.cfg),
                      expected + kl_by_hand(target[-1], mirror[-1])):
            assert abs(expected - other) > 1e-3      # (the alternatives are visibly different)
    torch.testing.assert_close(loss, expected)


def test_total_is_sup_plus_lambda_align_and_its_gradient_scales():
    model = tiny(dropout=0.0)   # no dropout: encode_and_detect gives the inputs forward() sees
    images, mask, targets = batch()
    targets[1] = dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long),
                      relations=torch.zeros(0, 3, dtype=torch.long), size=targets[1]["size"])  # no relations
    with torch.no_grad():
        _, inputs = model.encode_and_detect(images, mask)
        model.mirror.mask_rng.manual_seed(5)
        seeds = model.mirror.draw_seeds()
        expected = kl_by_hand(decoder_by_hand(model, inputs, heads(model, mirror=False))[-1],
                              decoder_by_hand(model, inputs, heads(model, mirror=True), 0.3, seeds)[-1])
    grads, sups = {}, []
    for lam in (1.0, 4.0):
        cfg = dataclasses.replace(model.cfg, align_weight=lam)
        model.mirror.mask_rng.manual_seed(5)
        model.zero_grad()
        losses = S.train_step(model, images, targets, cfg)
        assert all(torch.isfinite(v) for v in losses.values())
        torch.testing.assert_close(losses["align"], expected)
        torch.testing.assert_close(losses["total"], losses["sup"] + lam * expected)   # Eq. (3)
        sups.append(losses["sup"].item())
        losses["total"].backward()
        grads[lam] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert sups[0] == pytest.approx(sups[1])
    for name in ("mirror.pred_class.weight", "mirror.obj_class.bias"):   # reached by L_align only
        assert has_grad(grads[1.0][name])
        torch.testing.assert_close(grads[4.0][name], 4.0 * grads[1.0][name])
    base = S.SGTR(tiny_cfg(no_align=True), C1, P1).train()
    assert base.mirror is None and S.train_step(base, images, targets, base.cfg)["align"] == 0


class Images(list):
    """A list of (image, target) pairs that evaluate() reads as a dataset."""
    num_predicates = P1


def test_inference_never_runs_the_mirror(monkeypatch):
    calls = []
    real = S.masked_attention
    monkeypatch.setattr(S, "masked_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    aligned = tiny()
    base = S.SGTR(tiny_cfg(no_align=True), C1, P1)
    base.load_state_dict(aligned.state_dict(), strict=False)
    called = []
    aligned.mirror.register_forward_hook(lambda *a: called.append("mirror"))
    for name in ("pred_class", "sub_class", "obj_class"):
        getattr(aligned.mirror, name).register_forward_hook(lambda *a: called.append(1))
    images, mask, targets = batch()
    aligned.eval(), base.eval()
    state = aligned.mirror.mask_rng.get_state()
    with torch.no_grad():
        a, b = aligned(images, mask), base(images, mask)
    # and evaluate() (which switches the model to eval itself)
    test_set = Images((images[i, :, :h, :w], t) for i, t in enumerate(targets) for h, w in [t["size"]])
    S.evaluate(aligned, test_set, aligned.cfg, torch.device("cpu"), None)
    assert calls == [] and called == [] and torch.equal(aligned.mirror.mask_rng.get_state(), state)
    # the aligned model at inference is exactly SGTR with the same weights, every layer and output
    for ours, plain in zip(a[:2], b[:2]):
        for layer_a, layer_b in zip(ours, plain, strict=True):
            for key in layer_a:
                torch.testing.assert_close(layer_a[key], layer_b[key], atol=0, rtol=0)
    aligned.train()
    S.train_step(aligned, images, targets, aligned.cfg)
    assert calls and "mirror" in called and 1 in called  # (the hooks do fire in training: the check above can fail)


# ----------------------------------------------------------------------------------------------
# The focal predicate head (--pred-loss focal, SGTR's VG config): its loss, its scores, Eq. (2) for it

def bernoulli_kl_by_hand(zp, zq):
    """KL between two Bernoullis per element, from the probabilities themselves."""
    p, q = zp.double().sigmoid(), zq.double().sigmoid()
    return p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()


def test_focal_head_has_p_outputs_and_no_relation_column_in_the_mirror_too():
    model = tiny(pred_loss="focal")
    assert model.pred_class.out_features == P1 - 1 and model.mirror.pred_class.out_features == P1 - 1
    assert model.sub_class.out_features == C1   # the indicators keep their softmax over C + 1
    logits = torch.randn(4, P1 - 1)
    probs = S.predicate_probs(logits, model.cfg)   # what the evaluator ranks
    assert probs.shape == (4, P1) and probs[:, 0].abs().max() == 0
    torch.testing.assert_close(probs[:, 1:], logits.sigmoid())
    softmax = tiny_cfg(pred_loss="softmax")
    torch.testing.assert_close(S.predicate_probs(torch.randn(4, P1).clamp(-3, 3), softmax).sum(-1), torch.ones(4))


def test_sigmoid_focal_loss_by_hand():
    """RetinaNet's focal loss on each (query, predicate) output, as SGTR's loss_labels_fl normalises it."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 4, generator=g) * 2                # B = 2 images, Qp = 3 queries, P = 4
    target = torch.tensor([[2, 0, 4], [0, 0, 1]])                  # 0 = unmatched: every output's target is 0
    total = 0.0
    for b in range(2):
        for q in range(3):
            for c in range(4):
                y = 1.0 if target[b, q] == c + 1 else 0.0
                p = torch.sigmoid(logits[b, q, c]).item()
                p_t = p if y else 1 - p
                alpha_t = 0.25 if y else 0.75
                total += alpha_t * (1 - p_t) ** 2 * -math.log(p_t) / 4   # mean over the P = 4 outputs
    expected = total / 3 * 3   # / n (3 GT relations), x Qp (3)
    torch.testing.assert_close(S.sigmoid_focal_loss(logits, target, 3.0), torch.tensor(expected, dtype=torch.float32))
    # an unmatched query is pushed down on every output: its loss falls as its logits fall
    low = logits.clone()
    low[0, 1] -= 3
    assert S.sigmoid_focal_loss(low, target, 3.0) < S.sigmoid_focal_loss(logits, target, 3.0)


def test_focal_predicate_loss_runs_through_the_matcher():
    model, inputs, step_batch, tg = setup(pred_loss="focal", no_align=True)
    loss = S.train_step(model, *step_batch, model.cfg)["sup"]
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert has_grad(model.pred_class.weight)


def test_bernoulli_kl_is_a_kl():
    g = torch.Generator().manual_seed(2)
    zp, zq = torch.randn(50, 7, generator=g) * 4, torch.randn(50, 7, generator=g) * 4
    kl = S.bernoulli_kl(zp, zq)
    torch.testing.assert_close(kl.double(), bernoulli_kl_by_hand(zp, zq), atol=1e-5, rtol=1e-4)
    assert kl.min() >= -1e-6 and S.bernoulli_kl(zp, zp).abs().max() < 1e-6
    saturated = S.bernoulli_kl(torch.tensor([60.0, -60.0]), torch.tensor([-60.0, 60.0]))
    assert torch.isfinite(saturated).all() and saturated.min() > 50   # logsigmoid, not log(sigmoid)


def test_focal_alignment_is_bernoulli_kl_for_predicates_and_softmax_kl_for_the_indicators():
    """Eq. (2) with the sigmoid head: the predicate term is the KL of P independent Bernoullis (summed over
    the predicates, averaged over the queries); subject and object stay softmax distributions."""
    model, inputs, step_batch, tg = setup(pred_loss="focal")
    loss, seeds = align_with_seeds(model, step_batch)
    with torch.no_grad():
        target = decoder_by_hand(model, inputs, heads(model, mirror=False))[-1]
        mirror = decoder_by_hand(model, inputs, heads(model, mirror=True), 0.3, seeds)[-1]
        pred = bernoulli_kl_by_hand(target["pred_logits"], mirror["pred_logits"]).sum(-1).mean().float()
        indicators = 0.0
        for key in ("sub_logits", "obj_logits"):
            p, log_q = target[key].softmax(-1), mirror[key].log_softmax(-1)
            indicators = indicators + (p * (p.log() - log_q)).sum(-1).mean()
        softmax_pred = (target["pred_logits"].softmax(-1) * (target["pred_logits"].log_softmax(-1)
                                                              - mirror["pred_logits"].log_softmax(-1))).sum(-1).mean()
        assert abs(pred - softmax_pred) > 1e-3   # (the softmax KL over the P logits is visibly another loss)
    torch.testing.assert_close(loss, pred + indicators)
