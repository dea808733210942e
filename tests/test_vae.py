"""The optional ``vae`` head: thumbnails, the packed output, its terms falling in training, the criterion's
dict terms, and nothing changing while it is off."""

import pytest
import torch

from geoloc.geo import distance_matrix
from geoloc.heads import (
    THUMB_SIZE,
    VAE_LATENT,
    HeadSizes,
    Targets,
    VaeHead,
    build_heads,
    split_vae,
    thumbnails,
)
from geoloc.losses import Criterion

CENTROIDS = torch.tensor([[30.0, -90.0], [35.0, -100.0], [40.0, -80.0]])


def _targets(kl_weight=1e-3):
    return Targets(CENTROIDS, distance_matrix(CENTROIDS), None, "sample", 75.0, "haversine",
                   vae_kl_weight=kl_weight)  # fmt: skip


def _pixel_batch(n=6, seed=0):
    """uint8 views whose thumbnails differ per sample (a colour per view and sample), one view missing."""
    g = torch.Generator().manual_seed(seed)
    colours = torch.randint(0, 256, (n, 4, 3, 1, 1), generator=g, dtype=torch.uint8)
    images = colours.expand(n, 4, 3, 64, 64).clone()
    images[:, :, :, :32] //= 2  # a darker upper half: not a flat thumbnail
    mask = torch.ones(n, 4, dtype=torch.bool)
    mask[0, 2] = False
    latlon = torch.stack([torch.rand(n, generator=g) * 10 + 30, -torch.rand(n, generator=g) * 20 - 80], 1)
    return {"images": images, "view_mask": mask, "label": torch.arange(n) % 3, "latlon": latlon}


def test_thumbnails_are_exact_area_means():
    images = torch.randint(0, 256, (2, 4, 3, 256, 256), dtype=torch.uint8)
    thumb = thumbnails(images)
    assert thumb.shape == (2, 4, 3, THUMB_SIZE, THUMB_SIZE) and thumb.dtype == torch.uint8
    block = images[1, 3, 2, 16:32, 48:64].double().mean()  # the (1, 3) cell of channel 2, view 3, sample 1
    assert thumb[1, 3, 2, 1, 3].item() == int(torch.round(block).item())
    flat = torch.full((1, 4, 3, 256, 256), 77, dtype=torch.uint8)
    assert (thumbnails(flat) == 77).all()


def test_vae_output_packs_mu_logvar_and_a_reconstruction_and_eval_is_deterministic():
    torch.manual_seed(0)
    head = VaeHead(16, 32, 0.0, HeadSizes(3))
    h = torch.randn(5, 16)
    out = head(h)
    mu, logvar, recon = split_vae(out)
    assert mu.shape == logvar.shape == (5, VAE_LATENT) and recon.shape == (5, 4, 3, THUMB_SIZE, THUMB_SIZE)
    assert out.dtype == torch.float32
    assert not torch.equal(head(h)[:, 2 * VAE_LATENT :], out[:, 2 * VAE_LATENT :])  # training samples z
    head.eval()
    assert torch.equal(head(h), head(h))  # eval decodes mu


def _train_vae(kl_weight: float, steps: int = 150):
    torch.manual_seed(0)
    batch = _pixel_batch(8)
    targets = _targets(kl_weight)
    crit = Criterion(["vae"], {"vae": 1.0}, targets)
    h = torch.randn(8, 16)  # a fixed embedding per sample
    head = VaeHead(16, 64, 0.0, HeadSizes(3))
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    loss_batch = crit.loss_batch(batch, "cpu")
    history = []
    for _ in range(steps):
        terms = crit({"vae": head(h)}, loss_batch)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        history.append({k: v.item() for k, v in terms.items()})
    return history, loss_batch


def test_vae_terms_fall_under_the_elbo():
    history, _ = _train_vae(kl_weight=1.0)
    first, last = history[0], history[-1]
    assert last["loss_vae_rec"] < 0.7 * first["loss_vae_rec"]  # down to about the mean thumbnail
    assert last["loss_vae_kl"] < 0.1 * first["loss_vae_kl"]  # the posterior sits on the prior
    assert last["loss"] == pytest.approx(last["loss_vae"])  # its weight is 1


def test_vae_reconstructs_each_sample_better_than_their_mean_thumbnail():
    history, loss_batch = _train_vae(kl_weight=1e-3, steps=300)
    thumb, mask = loss_batch["thumb"].float() / 255, loss_batch["view_mask"].float()
    mean = (thumb * mask[..., None, None, None]).sum(0) / mask.sum(0)[:, None, None, None]
    baseline = (((mean - thumb) ** 2).mean((2, 3, 4)) * mask).sum() / mask.sum()
    assert history[-1]["loss_vae_rec"] < 0.5 * baseline.item()  # the latent carries the sample


def test_criterion_logs_a_heads_named_values_but_sums_only_its_term():
    torch.manual_seed(0)
    heads = build_heads(["state", "vae"], 16, 32, 0.0, HeadSizes(3))
    h = torch.randn(6, 16)
    outputs = {name: head(h) for name, head in heads.items()}
    crit = Criterion(["state", "vae"], {"state": 0.5, "vae": 2.0}, _targets(0.01))
    terms = crit(outputs, crit.loss_batch(_pixel_batch(6), "cpu"))
    assert set(terms) == {"loss", "loss_state", "loss_vae", "loss_vae_rec", "loss_vae_kl"}
    torch.testing.assert_close(terms["loss_vae"], terms["loss_vae_rec"] + 0.01 * terms["loss_vae_kl"])
    torch.testing.assert_close(terms["loss"], 0.5 * terms["loss_state"] + 2.0 * terms["loss_vae"])


def test_a_head_value_that_takes_a_terms_name_is_refused(monkeypatch):
    crit = Criterion(["vae", "state"], {"vae": 1.0, "state": 1.0}, _targets())
    monkeypatch.setattr(
        VaeHead, "loss", staticmethod(lambda out, b, t: {"loss": out.sum(), "loss_state": out.sum()})
    )
    with pytest.raises(ValueError, match="loss_state"):
        crit({"vae": torch.ones(2, 3), "state": torch.zeros(2, 3)}, {"label": torch.zeros(2, dtype=torch.long),
                                                                       "latlon": torch.zeros(2, 2)})  # fmt: skip


def test_missing_views_are_not_reconstructed():
    batch = _pixel_batch(2)
    crit = Criterion(["vae"], {"vae": 1.0}, _targets())
    loss_batch = crit.loss_batch(batch, "cpu")
    out = VaeHead(16, 32, 0.0, HeadSizes(3)).eval()(torch.randn(2, 16))
    base = crit({"vae": out}, loss_batch)["loss_vae_rec"]
    loss_batch["thumb"][0, 2] = 255 - loss_batch["thumb"][0, 2]  # sample 0's missing view
    assert torch.equal(crit({"vae": out}, loss_batch)["loss_vae_rec"], base)


def test_with_the_vae_off_nothing_reads_or_makes_thumbnails(monkeypatch):
    """Off (not in model.heads): the loss batch is label + latlon as before, thumbnails are never made,
    and a batch carrying the cache's thumbnails gives the same terms and gradients as one without."""
    import geoloc.heads

    monkeypatch.setattr(
        geoloc.heads, "thumbnails", lambda *a: pytest.fail("thumbnails made with the vae off")
    )
    crit = Criterion(["state", "gps"], {"state": 0.8, "gps": 0.2}, _targets())
    batch = _pixel_batch(6)
    assert set(crit.loss_batch(batch, "cpu")) == {"label", "latlon"}
    with_thumb = crit.loss_batch({**batch, "thumb": torch.zeros(6, 4, 3, THUMB_SIZE, THUMB_SIZE)}, "cpu")
    results = []
    for loss_batch in (crit.loss_batch(batch, "cpu"), with_thumb):
        torch.manual_seed(0)
        heads = build_heads(["state", "gps"], 16, 32, 0.1, HeadSizes(3))
        h = torch.randn(6, 16)
        terms = crit({n: head(h) for n, head in heads.items()}, loss_batch)
        terms["loss"].backward()
        results.append((terms, [p.grad.clone() for p in heads.parameters()]))
    (t0, g0), (t1, g1) = results
    assert t0.keys() == t1.keys() and all(torch.equal(t0[k], t1[k]) for k in t0)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1, strict=True))
    assert crit.state_dict() == {}
