"""Folder scanning: formats and colour modes, unreadable files, splits."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from clipcl.data import load_image, scan_task_folder, stratified_split
from clipcl.errors import DataError


def _write_every_format(folder: Path) -> None:
    folder.mkdir(parents=True)
    base = Image.new("RGB", (24, 16), (200, 10, 10))
    base.save(folder / "a.jpg")
    base.save(folder / "b.png")
    base.save(folder / "c.webp")
    base.save(folder / "d.bmp")
    base.save(folder / "e.tiff")
    frames = [base, Image.new("RGB", (24, 16), (0, 0, 255))]
    frames[0].save(folder / "f.gif", save_all=True, append_images=frames[1:])
    base.convert("L").save(folder / "g.png")
    base.convert("P").save(folder / "h.png")
    Image.new("RGBA", (24, 16), (200, 10, 10, 0)).save(folder / "i.png")
    base.convert("CMYK").save(folder / "j.jpg")
    Image.new("I;16", (24, 16), 40000).save(folder / "k.png")


def test_every_supported_format_and_mode_is_read(tmp_path: Path) -> None:
    _write_every_format(tmp_path / "task" / "red_things")
    (tmp_path / "task" / "blue").mkdir()
    Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "task" / "blue" / "x.png")
    data = scan_task_folder(tmp_path / "task", holdout=0.0)
    assert data.classes == ["blue", "red things"]
    assert data.counts(data.train) == {"blue": 1, "red things": 11}
    assert not data.skipped
    for item in data.train:
        image = load_image(data.root / item.relpath)
        assert image.mode == "RGB"


def test_gif_gives_its_first_frame_and_transparency_becomes_white(tmp_path: Path) -> None:
    _write_every_format(tmp_path / "c")
    assert load_image(tmp_path / "c" / "f.gif").getpixel((0, 0))[0] > 150  # red first frame, not the blue second
    assert load_image(tmp_path / "c" / "i.png").getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    image = Image.new("RGB", (30, 10), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when shown
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    assert load_image(buffer.getvalue()).size == (10, 30)


def test_unreadable_files_are_skipped_and_counted(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / "t" / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (i * 50, 0, 0)).save(tmp_path / "t" / name / f"{i}.png")
    (tmp_path / "t" / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    png = (tmp_path / "t" / "b" / "0.png").read_bytes()
    (tmp_path / "t" / "b" / "truncated.png").write_bytes(png[: len(png) // 2])
    seen = []
    data = scan_task_folder(tmp_path / "t", holdout=0.0, on_skip=lambda path, why: seen.append(path))
    assert sorted(data.skipped) == sorted(seen) == ["a/broken.jpg", "b/truncated.png"]
    assert len(data.train) == 6


def test_holdout_is_stratified_seeded_and_disjoint(tmp_path: Path) -> None:
    from clipcl.data import ImageItem

    items = [ImageItem(f"{label}/{i}.png", label) for label in range(3) for i in range(10)]
    train, test = stratified_split(items, 0.2, seed=1)
    assert sorted(i.label for i in test) == [0, 0, 1, 1, 2, 2]
    assert not {i.relpath for i in train} & {i.relpath for i in test}
    assert stratified_split(items, 0.2, seed=1) == (train, test)
    assert stratified_split(items, 0.2, seed=2)[1] != test


def test_fingerprint_follows_content(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8), (10, 10, 10)).save(tmp_path / name / "0.png")
    first = scan_task_folder(tmp_path).fingerprint
    Image.new("RGB", (8, 8), (11, 10, 10)).save(tmp_path / "a" / "0.png")
    assert scan_task_folder(tmp_path).fingerprint != first


def test_test_split_with_an_unknown_class_is_refused(tmp_path: Path) -> None:
    for split, name in (("train", "a"), ("train", "b"), ("val", "c")):
        (tmp_path / split / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / split / name / "0.png")
    with pytest.raises(DataError, match="val/ has a class that train/ lacks"):
        scan_task_folder(tmp_path)


def test_a_lone_train_folder_is_the_class_root_and_a_lone_test_folder_is_refused(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / "t" / "train" / name).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / "t" / "train" / name / f"{i}.png")
    data = scan_task_folder(tmp_path / "t", holdout=0.2)
    assert data.classes == ["a", "b"] and data.split == "holdout" and len(data.test) == 2
    (tmp_path / "u" / "val" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="val/ but no train/"):
        scan_task_folder(tmp_path / "u")
