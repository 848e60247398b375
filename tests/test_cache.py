"""The decoded-image cache (``--cache ram|DIR``): hits and misses by file content, a changed image
read again, the same batches as without it, and a cross-fit that decodes each image once."""

from __future__ import annotations

import collections
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finetune import loaders
from tests.conftest import make_image_folder, tiny_config
from zoo import cache as image_cache
from zoo import data
from zoo.data import read_dataset
from zoo.errors import UserInputError


@pytest.fixture
def decodes(monkeypatch) -> collections.Counter:
    """Counts zoo.data.load_rgb calls per file name (every decode in zoo goes through it)."""
    counter: collections.Counter = collections.Counter()
    real = data.load_rgb

    def counting(path):
        counter[Path(path).name] += 1
        return real(path)

    monkeypatch.setattr(data, "load_rgb", counting)
    return counter


def _dcfg(input_size=32):
    return {"input_size": [3, input_size, input_size], "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3,
            "crop_pct": 0.875, "crop_mode": "center"}


def _rewrite(path: Path, value: int) -> None:
    """Replace the image with other pixels; a later mtime too, as an editor saving it would leave."""
    Image.fromarray(np.full((60, 50, 3), value, np.uint8)).save(path)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))


@pytest.mark.parametrize("where", ["ram", "dir"])
def test_second_fill_hits_and_changed_file_is_read_again(tmp_path, decodes, where):
    root = make_image_folder(tmp_path / "data", per_class=(3, 0, 0), size=(60, 80))
    samples = read_dataset(root).split("train") + read_dataset(root).split("val")
    cache = "ram" if where == "ram" else str(tmp_path / "cache")
    sources = loaders.image_sources(cache, root, _dcfg(), 0.35)

    first = image_cache.fill(sources.store, samples, sources.caps)
    assert (first.decoded, first.cached, first.bad) == (len(samples), 0, [])
    again = image_cache.fill(sources.store, samples, sources.caps)
    assert (again.decoded, again.cached) == (0, len(samples))
    assert set(decodes.values()) == {1}

    changed = samples[0].path
    _rewrite(changed, 7)
    store = sources.store if where == "ram" else image_cache.open_store(cache, root)  # DIR: as a new process would
    after = image_cache.fill(store, samples, sources.caps)
    assert (after.decoded, after.cached) == (1, len(samples) - 1)
    assert decodes[changed.name] == 2
    pixels = store.pixels(after.refs[0][sources.train_cap.key])
    assert pixels.shape == (60, 50, 3) and (pixels == 7).all()  # the new content, not the old entry


def test_dir_cache_is_shared_through_its_files(tmp_path, decodes):
    root = make_image_folder(tmp_path / "data", per_class=(2, 0, 0), size=(70, 90))
    samples = read_dataset(root).split("train")
    cache = str(tmp_path / "cache")
    image_cache.fill(image_cache.open_store(cache, root), samples, loaders.image_sources(cache, root, _dcfg(), 0.35).caps)
    image_cache._CONTENT_KEYS.clear()  # another process: nothing in memory
    other = loaders.image_sources(cache, root, _dcfg(), 0.35)
    reader = other.train(samples)
    assert set(decodes.values()) == {1}
    assert np.array_equal(np.asarray(reader(0)), np.asarray(other.train_cap.apply(Image.open(samples[0].path).convert("RGB"))))
    assert sorted(p.suffix for p in Path(cache).iterdir()) == [".json", ".lock", ".pixels"]


def test_unreadable_image_is_reported_once_and_remembered(tmp_path, decodes):
    root = make_image_folder(tmp_path / "data", per_class=(2, 0, 0))
    broken = root / "train" / "ant" / "broken.png"
    broken.write_bytes(b"not an image")
    samples = read_dataset(root).split("train") + read_dataset(root).split("val")
    cfg = tiny_config(root, tmp_path / "run", cache="ram")
    good, bad = loaders.check_images(cfg, root, samples, workers=1)
    assert [sid for sid, _ in bad] == ["train/ant/broken.png"] and len(good) == len(samples) - 1
    assert bad == data.check_images(samples)[1]  # the same words as the uncached check
    loaders.check_images(cfg, root, samples, workers=1)
    assert decodes["broken.png"] == 2  # once by each check above: the cache remembered it, no third decode


def test_corrupt_dir_index_says_how_to_fix(tmp_path):
    root = make_image_folder(tmp_path / "data", per_class=(1, 0, 0))
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / f"{image_cache.dataset_key(root)}.index.json").write_text("{}")
    with pytest.raises(UserInputError, match=r"index\.json: not a zoo image-cache index .*delete it"):
        image_cache.open_store(str(cache), root)


def test_cache_option_that_is_a_file_is_refused(tmp_path):
    afile = tmp_path / "x"
    afile.write_text("")
    with pytest.raises(UserInputError, match=r"--cache must be 'ram' or a folder"):
        loaders.image_sources(str(afile), tmp_path, _dcfg(), 0.35)


def test_train_cap_keeps_the_smallest_crop_at_input_size():
    cap = image_cache.train_cap(224, 0.35, "bicubic")
    assert cap.size == 379  # ceil(224 / sqrt(0.35))
    assert cap.apply(Image.new("RGB", (500, 375))).size == (500, 375)  # smaller already: kept
    assert cap.apply(Image.new("RGB", (4000, 3000))).size == (505, 379)


def _batches(loader, seed=0):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return [batch[0] for batch in loader]


@pytest.mark.parametrize("cache", ["ram", "dir"])
def test_batches_are_the_same_with_and_without_the_cache(tmp_path, cache):
    # 120x150 images: larger than the train cap (55 at input 32, crop scale 0.35) and the eval resize (36).
    root = make_image_folder(tmp_path / "data", per_class=(6, 3, 0), size=(120, 150))
    dataset = read_dataset(root)
    train, val = dataset.split("train"), dataset.split("val")
    dcfg = _dcfg()
    train_tf = loaders.train_transform(dcfg, auto_augment="rand-m7-mstd0.5-inc1", crop_scale=0.35, hflip=0.5)
    eval_tf = loaders.eval_transform(dcfg)
    plain = loaders.image_sources(None, root, dcfg, 0.35)
    cached = loaders.image_sources("ram" if cache == "ram" else str(tmp_path / "cache"), root, dcfg, 0.35)

    def train_batches(sources):
        loader = loaders.train_loader(train, train_tf, batch_size=4, workers=0, generator=torch.Generator().manual_seed(3),
                                      num_classes=3, balanced=False, drop_last=False, pin_memory=False,
                                      images=sources.train(train))
        return _batches(loader)

    without, with_cache = train_batches(plain), train_batches(cached)
    assert len(without) == len(with_cache) == 5
    assert all(torch.equal(a, b) for a, b in zip(without, with_cache))
    assert not torch.equal(without[0], without[1])  # the comparison can tell batches apart

    eval_plain = _batches(loaders.eval_loader(val, eval_tf, batch_size=4, workers=0, pin_memory=False))
    eval_cached = _batches(loaders.eval_loader(val, eval_tf, batch_size=4, workers=0, pin_memory=False,
                                               images=cached.eval(val)))
    assert all(torch.equal(a, b) for a, b in zip(eval_plain, eval_cached))


def test_cached_batches_are_the_same_from_loader_workers(tmp_path):
    # Forked workers read the RAM store they inherited and map the DIR store's file themselves.
    root = make_image_folder(tmp_path / "data", per_class=(4, 0, 0), size=(120, 150))
    train = read_dataset(root).split("train")
    dcfg = _dcfg()
    train_tf = loaders.train_transform(dcfg, auto_augment="none", crop_scale=0.35, hflip=0.5)
    outs = []
    for cache in (None, str(tmp_path / "cache"), "ram"):
        sources = loaders.image_sources(cache, root, dcfg, 0.35)
        loader = loaders.train_loader(train, train_tf, batch_size=3, workers=2, generator=torch.Generator().manual_seed(1),
                                      num_classes=3, balanced=False, drop_last=False, pin_memory=False,
                                      images=sources.train(train))
        outs.append(torch.cat(_batches(loader)))
    assert outs[0].shape == (len(train), 3, 32, 32)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@pytest.mark.slow
def test_cross_fit_decodes_each_image_once(tmp_path, decodes):
    from finetune.kfold import finetune_folds

    # No val/: no holdout to predict (test_cross_fit_holdout_predictions_reuse_the_cache has one).
    root = make_image_folder(tmp_path / "data", per_class=(5, 0, 0), size=(60, 70))
    result = finetune_folds(tiny_config(root, tmp_path / "run", folds=2, epochs=2, cache="ram"), log=lambda m: None)
    assert result.assembled
    assert len(decodes) == 15 and set(decodes.values()) == {1}, decodes

    # Another member of the ensemble, cached on disk: its first fold decodes, every later fold and member reuses.
    decodes.clear()
    disk = str(tmp_path / "cache")
    finetune_folds(tiny_config(root, tmp_path / "member-a", folds=2, epochs=1, cache=disk), log=lambda m: None)
    assert len(decodes) == 15 and set(decodes.values()) == {1}, decodes
    decodes.clear()
    image_cache._CONTENT_KEYS.clear()
    finetune_folds(tiny_config(root, tmp_path / "member-b", folds=2, epochs=1, cache=disk, seed=1), log=lambda m: None)
    assert not decodes


@pytest.mark.slow
def test_cross_fit_holdout_predictions_reuse_the_cache(tmp_path, decodes):
    from finetune.kfold import finetune_folds

    # val/ is the holdout: every fold model predicts it (finetune.inference), from the run's cache.
    root = make_image_folder(tmp_path / "data", per_class=(4, 2, 0), size=(60, 70))
    result = finetune_folds(tiny_config(root, tmp_path / "run", folds=2, epochs=1, cache="ram"), log=lambda m: None,
                            progress=False)
    assert result.assembled and "holdout" in result.scores
    # 12 pool and 6 holdout files, each decoded once (val/ reuses train/'s file names: those count 2).
    assert sum(decodes.values()) == 18 and len(decodes) == 12, decodes
