"""Decode once (clipcl.imagecache): the cached sets give what decoding every time gave, where that is deterministic,
the same crop distribution where it is random, the same augmentation for the same seed, and nothing left on disk."""

from __future__ import annotations

import math
import random
from pathlib import Path

import open_clip
import pytest
import torch
import torchvision.transforms.functional as TVF
from conftest import make_task
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from clipcl import TrainOptions, add_task
from clipcl.data import ImageDataset, ImageItem, load_image, scan_task_folder
from clipcl.errors import DataError
from clipcl.imagecache import (
    MEMORY_LIMIT_ENV,
    SPILL_DIR,
    CachedTrainImages,
    CropPlan,
    build_image_cache,
    plan_eval_transform,
    plan_train_transform,
)
from clipcl.runtime import make_loader

SIZES = [(40, 40), (300, 200), (37, 90), (1000, 120), (120, 900), (9, 7), (30, 24)]  # (width, height)


def _images(folder: Path, count: int = 18, seed: int = 0) -> list[ImageItem]:
    """Images of the sizes above (extreme aspects among them, so torchvision's fallback crop is drawn too), some grey
    and some with transparency, as JPEG and PNG."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(count):
        width, height = SIZES[i % len(SIZES)]
        image = Image.effect_noise((width, height), 60).convert("RGB")
        image.paste((rng.randrange(256), rng.randrange(256), rng.randrange(256)), (0, 0, width // 2, height // 3))
        name = f"{i:02d}.jpg" if i % 3 else f"{i:02d}.png"
        if i % 4 == 1:
            image = image.convert("L")
        if i % 6 == 3:
            image = image.convert("RGBA")
            image.putalpha(128)
        image.save(folder / name)
        items.append(ImageItem(name, i % 3))
    return items


def _transforms(size: int = 32, **aug: object) -> tuple[object, object]:
    return (open_clip.image_transform(size, is_train=True, aug_cfg=aug or None),
            open_clip.image_transform(size, is_train=False))


@pytest.mark.parametrize("memory_limit", [None, 0])
def test_the_cached_eval_set_is_the_decoding_one_bit_for_bit(tmp_path: Path, memory_limit: int | None) -> None:
    items = _images(tmp_path / "images")
    train, evaluation = _transforms()
    cache = build_image_cache(tmp_path / "images", items, train, evaluation, label_offset=4, threads=2,
                              spill_dir=tmp_path / "spill", memory_limit=memory_limit)
    assert cache.mapped == (memory_limit == 0)
    assert not (tmp_path / "spill").exists()  # a spilled store's file is unlinked as it is made, then its folder
    decoding = ImageDataset(tmp_path / "images", items, evaluation, label_offset=4)
    for index in range(len(items)):
        image, label = cache.eval[index]
        expected, expected_label = decoding[index]
        assert label == expected_label
        assert image.dtype == expected.dtype and torch.equal(image, expected), index
    cache.close()


def test_batches_and_loss_through_the_cache_equal_the_decoding_ones(tmp_path: Path, tiny_config: Path,
                                                                    tiny_weights: Path) -> None:
    """What the statistics passes and the evaluation read: the same batches, so the same loss."""
    open_clip.add_model_config(tiny_config)
    model, train, evaluation = open_clip.create_model_and_transforms(tiny_config.stem, pretrained=str(tiny_weights))
    model.eval()
    items = _images(tmp_path / "images", count=12)
    cache = build_image_cache(tmp_path / "images", items, train, evaluation, threads=1)
    decoding = ImageDataset(tmp_path / "images", items, evaluation)
    text = model.encode_text(open_clip.get_tokenizer(tiny_config.stem)(["a", "b", "c"]), normalize=True)
    with torch.no_grad():
        for (cached, labels), (decoded, expected) in zip(make_loader(cache.eval, 5, 0), make_loader(decoding, 5, 0),
                                                         strict=True):
            assert torch.equal(cached, decoded) and torch.equal(labels, expected)
            losses = [torch.nn.functional.cross_entropy(100 * model.encode_image(x, normalize=True) @ text.T, labels)
                      for x in (cached, decoded)]
            assert torch.equal(losses[0], losses[1])


def test_augmentation_is_reproducible_from_the_seed_and_from_the_run_generator(tmp_path: Path) -> None:
    items = _images(tmp_path / "images")
    train, _ = _transforms()
    cache = build_image_cache(tmp_path / "images", items, train, None, threads=2)
    assert cache.eval is None and isinstance(cache.train, CachedTrainImages)
    batch = torch.arange(len(items))
    first = cache.train.augment(batch, torch.Generator().manual_seed(5))
    assert first.shape == (len(items), 3, 32, 32) and first.dtype == torch.float32
    assert torch.equal(first, cache.train.augment(batch, torch.Generator().manual_seed(5)))
    assert not torch.equal(first, cache.train.augment(batch, torch.Generator().manual_seed(6)))
    # an epoch's augmenter is seeded by one draw from the run's generator: the same state, the same epoch
    run = torch.Generator().manual_seed(0)
    state = run.get_state()
    epoch = cache.train.epoch_augmenter(run)
    one = [epoch(batch[:7]), epoch(batch[7:])]
    run.set_state(state)
    again = cache.train.epoch_augmenter(run)
    assert all(torch.equal(a, b) for a, b in zip(one, [again(batch[:7]), again(batch[7:])], strict=True))
    run.set_state(state)
    other_process = cache.train.epoch_augmenter(run, process_index=1)
    assert not torch.equal(one[0], other_process(batch[:7]))
    # memory-mapped, the same images
    mapped = build_image_cache(tmp_path / "images", items, train, None, threads=1, memory_limit=0,
                               spill_dir=tmp_path / "spill")
    assert mapped.mapped and mapped.train is not None
    assert torch.equal(first, mapped.train.augment(batch, torch.Generator().manual_seed(5)))


def _crop_statistics(crops: list[tuple[int, int, int, int]], height: int, width: int) -> tuple[float, ...]:
    shares = [h * w / (height * width) for _, _, h, w in crops]
    aspects = [math.log(w / h) for _, _, h, w in crops]
    tops = [top / max(1, height - h) if height > h else 0.5 for top, _, h, _ in crops]
    return (sum(shares) / len(shares), sum(aspects) / len(aspects), sum(tops) / len(tops),
            sum(a * a for a in aspects) / len(aspects))


@pytest.mark.parametrize("scale", [(0.9, 1.0), (0.08, 1.0)])
def test_crops_follow_torchvisions_distribution(scale: tuple[float, float]) -> None:
    plan = CropPlan((32, 32), scale, (3 / 4, 4 / 3), TVF.InterpolationMode.BICUBIC)
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    for height, width in [(200, 300), (64, 64), (120, 1000), (900, 120), (7, 9)]:
        ours = plan.draw([(height, width)] * 3000, generator)
        theirs = [tuple(RandomResizedCrop.get_params(torch.empty(1, height, width), list(scale), [3 / 4, 4 / 3]))
                  for _ in range(3000)]
        for top, left, h, w in ours:
            assert 0 <= top <= height - h and 0 <= left <= width - w and h > 0 and w > 0
        ours_stats, theirs_stats = _crop_statistics(ours, height, width), _crop_statistics(theirs, height, width)
        assert ours_stats == pytest.approx(theirs_stats, abs=0.03), (height, width)


def test_cached_sizes_keep_every_crop_at_full_resolution() -> None:
    plan = CropPlan((224, 224), (0.9, 1.0), (3 / 4, 4 / 3), TVF.InterpolationMode.BICUBIC)
    assert plan.cache_size(200, 300) == (200, 300)  # smaller than what the crops need: kept as it is
    assert plan.cache_size(64, 64) == (64, 64)
    height, width = plan.cache_size(3000, 4000)
    assert (height, width) == (pytest.approx(236, abs=2), pytest.approx(315, abs=3))  # a photo shrinks to ~the output
    for size in [(3000, 4000), (500, 6000), (6000, 500), (1000, 1000)]:
        cached = plan.cache_size(*size)
        assert cached[0] <= size[0] and cached[1] <= size[1]
        crops = plan.draw([size] * 500, torch.Generator().manual_seed(1))
        for _, _, h, w in crops:  # every crop, scaled to the cached grid, still spans the output
            assert h * cached[0] / size[0] >= 224 - 1 and w * cached[1] / size[1] >= 224 - 1


def test_an_image_kept_at_its_size_is_cropped_as_the_decoding_transform_crops_it(tmp_path: Path) -> None:
    """Same crop, same result up to the resampler (torch's antialiased bicubic against Pillow's)."""
    items = _images(tmp_path / "images", count=14)
    train, _ = _transforms()
    plan = plan_train_transform(train)
    assert plan is not None
    cache = build_image_cache(tmp_path / "images", items, train, None)
    assert cache.train is not None
    compared = 0
    for index, item in enumerate(items):
        image = load_image(tmp_path / "images" / item.relpath)
        if plan.crop.cache_size(image.height, image.width) != (image.height, image.width):
            continue
        compared += 1
        ((top, left, h, w), _), = cache.train.draw([index], torch.Generator().manual_seed(index))
        expected = TVF.normalize(TVF.to_tensor(TVF.resized_crop(image, top, left, h, w, [32, 32],
                                                                TVF.InterpolationMode.BICUBIC)),
                                 plan.mean, plan.std)
        got = cache.train.augment([index], torch.Generator().manual_seed(index))[0]
        assert (got - expected).abs().mean() < 0.05, index
    assert compared >= 4


def test_open_clips_colour_steps_are_cached_and_other_transforms_are_not(tmp_path: Path) -> None:
    train, evaluation = _transforms(color_jitter=(0.4, 0.4, 0.4, 0.1), color_jitter_prob=0.8, gray_scale_prob=0.2)
    plan = plan_train_transform(train)
    assert plan is not None and [step.jitter is None for step in plan.colors] == [False, True]
    items = _images(tmp_path / "images", count=8)
    cache = build_image_cache(tmp_path / "images", items, train, evaluation)
    assert cache.train is not None
    batch = cache.train.augment(range(8), torch.Generator().manual_seed(0))
    assert torch.isfinite(batch).all() and torch.equal(batch, cache.train.augment(range(8),
                                                                                  torch.Generator().manual_seed(0)))
    assert plan_train_transform(evaluation) is None  # no random crop
    assert plan_train_transform(lambda image: image) is None
    assert plan_eval_transform(train) is None  # random
    assert build_image_cache(tmp_path / "images", items, lambda image: image, None).train is None


def test_an_image_unreadable_since_the_scan_is_a_data_error(tmp_path: Path) -> None:
    items = _images(tmp_path / "images", count=3)
    (tmp_path / "images" / items[1].relpath).write_bytes(b"not an image any more")
    with pytest.raises(DataError, match="readable when the task was scanned"):
        build_image_cache(tmp_path / "images", items, *_transforms())


def test_add_task_through_a_memory_mapped_cache_leaves_nothing_behind(workspace: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    folder = make_task(tmp_path / "data" / "a", ["red", "green"], per_class=6)
    options = TrainOptions(epochs=1, batch_size=4, workers=0, evaluate=False)
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "0")
    report = add_task(workspace, folder, options)
    assert report.record.training.steps > 0
    assert not (workspace / SPILL_DIR).exists()
    data = scan_task_folder(folder, holdout=0.2)
    assert report.record.counts.train == data.counts(data.train)
