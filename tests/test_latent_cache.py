"""train.cache_latents: the cached VAE posteriors give the uncached loss and training, each item is
encoded once, a resumed run continues to the bit, and the switch is refused where slices never
repeat (augmentation, shifts)."""
import numpy as np
import pytest
import torch

from fsmis.config import load_config
from fsmis.engine import checkpoints as ck
from fsmis.engine.latent_cache import LatentCache, episode_keys
from fsmis.data.batch import collate
from fsmis.engine.trainer import Trainer
from safetensors.torch import load_file

from test_training import _config, tiny_data  # noqa: F401  (fixture)

NO_AUG = ["data.augment=false", "data.shift_px=0"]


def _trainer(tmp_path, data, name, *over):
    cfg = load_config(_config(tmp_path, data), [*NO_AUG, *over])
    return Trainer(cfg, tmp_path / name, "cpu", progress=False).setup()


def test_cached_posteriors_give_the_uncached_loss(tmp_path, tiny_data):
    tr = _trainer(tmp_path, tiny_data, "x")
    model = tr.model.eval()
    rng = np.random.default_rng(0)
    episodes = [tr.method.sampler.sample(rng) for _ in range(3)]
    batch = collate(episodes, tr.cfg.data.image_size)
    cache = LatentCache(model)
    with torch.no_grad():
        plain = model.loss(batch, torch.Generator().manual_seed(11))
        cached = model.loss(batch, torch.Generator().manual_seed(11), cache.batch_posteriors(batch, episodes))
        other_noise = model.loss(batch, torch.Generator().manual_seed(12), cache.batch_posteriors(batch, episodes))
    torch.testing.assert_close(cached, plain, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(other_noise, plain)  # the generator does drive the posterior samples
    # 3 episodes x (support + query) images and masks: each distinct slice / (slice, class) once
    ks, km, qs, qm = episode_keys(episodes)
    assert cache.encoded == len(set(ks + qs)) + len(set(km + qm))
    assert cache.lookups == 2 * 4 * 3


def test_cache_encodes_each_item_once_and_value_depends_on_item_only(tmp_path, tiny_data):
    tr = _trainer(tmp_path, tiny_data, "y")
    rng = np.random.default_rng(1)
    episodes = [tr.method.sampler.sample(rng) for _ in range(4)]
    batch = collate(episodes, tr.cfg.data.image_size)
    a = LatentCache(tr.model)
    first = a.batch_posteriors(batch, episodes)
    encoded = a.encoded
    again = a.batch_posteriors(batch, episodes)
    assert a.encoded == encoded and a.lookups == 2 * 4 * 4
    for x, y in zip(first, again):
        assert torch.equal(x, y)
    # a fresh cache filled in another order holds bit-identical values
    b = LatentCache(tr.model)
    rev = list(reversed(episodes))
    b.batch_posteriors(collate(rev, tr.cfg.data.image_size), rev)
    assert a.store.keys() == b.store.keys()
    for k in a.store:
        assert torch.equal(a.store[k], b.store[k]), k


def test_episode_keys_refuse_augmented_episodes(tmp_path, tiny_data):
    tr = _trainer(tmp_path, tiny_data, "z")
    e = tr.method.sampler.sample(np.random.default_rng(0))
    e.augmented = "query"
    with pytest.raises(ValueError, match="augmentation"):
        episode_keys([e])


@pytest.mark.parametrize("over", [["data.augment=true"], ["data.shift_px=2"]])
def test_trainer_refuses_cache_with_augmentation_or_shifts(tmp_path, tiny_data, over):
    cfg = load_config(_config(tmp_path, tiny_data), [*NO_AUG, "train.cache_latents=true", *over])
    with pytest.raises(ValueError, match="cache_latents"):
        Trainer(cfg, tmp_path / "r", "cpu", progress=False).setup()


def test_cached_training_follows_uncached_and_resumes_to_the_bit(tmp_path, tiny_data):
    plain = _trainer(tmp_path, tiny_data, "plain")
    plain.fit()
    cached = _trainer(tmp_path, tiny_data, "cached", "train.cache_latents=true")
    summary = cached.fit()
    assert summary["latent_cache"]["encoded"] < summary["latent_cache"]["lookups"]
    wa = load_file(str(ck.resolve_checkpoint(tmp_path / "plain", "last") / "model.safetensors"))
    wb = load_file(str(ck.resolve_checkpoint(tmp_path / "cached", "last") / "model.safetensors"))
    # batched vs single encodings differ by ~1e-6; after 4 AdamW steps at lr 1e-3 that stays far
    # below the size of one step (1e-3)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-3, atol=1e-4, msg=lambda m: f"{k}: {m}")
    # interrupted after 2 steps; the resumed run starts with an empty cache
    b = _trainer(tmp_path, tiny_data, "b", "train.cache_latents=true")
    b.train_step()
    b.train_step()
    b.save()
    c = _trainer(tmp_path, tiny_data, "b", "train.cache_latents=true")
    assert c.resume() == 2 and len(c.method.latent_cache) == 0
    c.fit()
    wc = load_file(str(ck.resolve_checkpoint(tmp_path / "b", "last") / "model.safetensors"))
    for k in wb:
        assert torch.equal(wb[k], wc[k]), k


def test_demo_config_trains_with_the_cache(tmp_path, tiny_data):
    """configs/demo.yaml as shipped (SQI on 7 attn1 layers, cached latents) runs the trainer; only the
    data, image size and step count are shrunk here."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / "demo.yaml",
                      [f"data.root={tiny_data}", "data.image_size=32", "data.min_fg_pixels=10",
                       "train.max_steps=2", "train.val_every=0", "train.ckpt_every=2", "train.image_every=0"])
    assert cfg.train.cache_latents and not cfg.data.augment and cfg.data.shift_px == 0
    assert cfg.model.vae is None and cfg.model.vae_path is None  # the demo sets the trained demo VAE
    cfg.model.vae = load_config(root / "configs" / "demo_vae.yaml").model.architecture
    tr = Trainer(cfg, tmp_path / "demo", "cpu", progress=False).setup()
    n_attn1 = sum(1 for name, _ in tr.model.unet.attn_processors.items() if ".attn1." in name)
    assert n_attn1 == 7
    summary = tr.fit()
    assert summary["steps"] == 2 and summary["latent_cache"]["encoded"] > 0
