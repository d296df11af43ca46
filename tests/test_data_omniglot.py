"""mamlext.data.Omniglot / TaskSampler: reading the official archives (zips and extracted folders), the cache,
alphabet splits, rotations, task sampling, and every error."""
import io
import json
import os
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import mamlext.data.omniglot as omniglot_module
from mamlext.data import Omniglot, TaskSampler

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"
SHARED_ZIPS = sorted(SHARED.glob("images_background*.zip")) if SHARED.is_dir() else []
needs_shared = pytest.mark.skipif(len(SHARED_ZIPS) < 2, reason=f"shared Omniglot archives not found in {SHARED}")


# ------------------------------------------------------------------------------------- synthetic archives

def png_bytes(rng, size=21, mode="1"):
    """An Omniglot-like PNG: black strokes (random blocks) on white."""
    from PIL import Image

    ink = rng.random((size, size)) < 0.3
    ink[0, :3] = True  # never rotation-symmetric
    ink[-1, -1] = False
    image = Image.fromarray(np.where(ink, 0, 255).astype(np.uint8), "L").convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def make_archive(path, alphabets, images=4, seed=0, bad_member=None):
    """An official-format zip: <subset>/<Alphabet>/characterNN/NNNN_MM.png (with directory entries).
    alphabets: {name: number of characters}. bad_member: (alphabet, character index) whose first PNG is junk."""
    path = Path(path)
    subset = path.name[:-4]
    rng = np.random.default_rng(seed)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{subset}/", b"")
        for alphabet, characters in alphabets.items():
            archive.writestr(f"{subset}/{alphabet}/", b"")
            for c in range(1, characters + 1):
                archive.writestr(f"{subset}/{alphabet}/character{c:02d}/", b"")
                for i in range(1, images + 1):
                    raw = png_bytes(rng)
                    if bad_member == (alphabet, c) and i == 1:
                        raw = b"\x89PNG not really"
                    archive.writestr(f"{subset}/{alphabet}/character{c:02d}/{c:04d}_{i:02d}.png", raw)
    return path


def files_under(root):
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*") if p.is_file())


@pytest.fixture
def synthetic(tmp_path):
    """A data folder with one background (5 alphabets) and one evaluation (2 alphabets) archive."""
    data = tmp_path / "data"
    data.mkdir()
    make_archive(data / "images_background.zip", {f"Bg{i}": 2 for i in range(5)}, seed=1)
    make_archive(data / "images_evaluation.zip", {"EvA": 2, "EvB": 3}, seed=2)
    return data


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    if len(SHARED_ZIPS) < 2:
        pytest.skip(f"shared Omniglot archives not found in {SHARED}")
    cache = tmp_path_factory.mktemp("omniglot_cache")
    Omniglot(SHARED, split="all", cache_dir=cache, progress=False)  # decode once for the module
    return cache


# ------------------------------------------------------------------------------------- the shared archives

@needs_shared
def test_shared_archives_load_from_zips_without_extracting(tmp_path, monkeypatch):
    def no_extract(*args, **kwargs):
        raise AssertionError("Omniglot must not extract archives")

    monkeypatch.setattr(zipfile.ZipFile, "extract", no_extract)
    monkeypatch.setattr(zipfile.ZipFile, "extractall", no_extract)
    monkeypatch.chdir(tmp_path)
    shared_before = {p.name: p.stat().st_mtime_ns for p in SHARED.iterdir()}
    cache = tmp_path / "cache"
    ds = Omniglot(SHARED, split="all", cache_dir=cache, progress=False)
    assert not ds.from_cache
    assert files_under(tmp_path) == [f"cache/{ds.cache_path.stem}.json", f"cache/{ds.cache_path.name}"]
    assert {p.name: p.stat().st_mtime_ns for p in SHARED.iterdir()} == shared_before
    index = json.loads(ds.cache_path.with_suffix(".json").read_text())
    assert [s["name"] for s in index["sources"]] == [p.name for p in SHARED_ZIPS]
    assert index["image_size"] == 28 and len(index["characters"]) == 136 + 156 - 50


@needs_shared
def test_shared_images_shape_range_and_merged_alphabets(shared_cache):
    ds = Omniglot(SHARED, split="all", cache_dir=shared_cache, progress=False)
    # Greek (24 characters) and Latin (26) are in both archives: merged by name, not doubled.
    assert ds.alphabets == sorted(["Balinese", "Early_Aramaic", "Greek", "Korean", "Latin", "Japanese_(katakana)",
                                   "Sanskrit", "Tagalog"])
    assert ds.images.shape == (242 * 4, 20, 1, 28, 28) and ds.num_classes == 968 == len(ds.class_names)
    assert ds.images.dtype == torch.float32
    assert ds.images.min() == 0.0 and ds.images.max() == 1.0
    assert 0.02 < ds.images.mean() < 0.3  # mostly background (0), some ink (1)
    assert sum(name.startswith("Greek/") for name in ds.class_names) == 24 * 4
    assert sum(name.startswith("Latin/") for name in ds.class_names) == 26 * 4
    assert len(set(ds.class_names)) == ds.num_classes
    assert ds.class_names[:4] == [f"Balinese/character01/rot{r}" for r in (0, 90, 180, 270)]


@needs_shared
def test_shared_rotations_are_distinct_rot90_classes(shared_cache):
    ds = Omniglot(SHARED, split="all", cache_dir=shared_cache, progress=False)
    plain = Omniglot(SHARED, split="all", rotations=False, cache_dir=shared_cache, progress=False)
    assert plain.num_classes == 242 and plain.class_names[0] == "Balinese/character01/rot0"
    images = ds.images.view(242, 4, 20, 1, 28, 28)
    torch.testing.assert_close(images[:, 0], plain.images, rtol=0, atol=0)
    for k in range(1, 4):
        torch.testing.assert_close(images[:, k], torch.rot90(plain.images, k, dims=(-2, -1)), rtol=0, atol=0)
        assert not torch.equal(images[:, k], images[:, 0])


@needs_shared
def test_shared_background_only_split_is_seeded_60_20_20(shared_cache):
    def split(name, seed=0):
        return Omniglot(SHARED, split=name, split_seed=seed, cache_dir=shared_cache, progress=False)

    train, val, test = split("train"), split("val"), split("test")
    assert (len(train.alphabets), len(val.alphabets), len(test.alphabets)) == (4, 2, 2)
    assert sorted(train.alphabets + val.alphabets + test.alphabets) == split("all").alphabets
    assert train.num_classes + val.num_classes + test.num_classes == 968
    assert not set(train.class_names) & set(val.class_names) | set(test.class_names) & set(train.class_names)
    assert split("val").alphabets == val.alphabets  # same seed, same split
    assert len({tuple(split("test", seed).alphabets) for seed in range(6)}) > 1  # the seed matters


@needs_shared
def test_shared_second_construction_reads_the_cache(shared_cache, monkeypatch):
    def broken_decoder(*args, **kwargs):
        raise AssertionError("decoded although the cache is valid")

    monkeypatch.setattr(omniglot_module, "_decode_png", broken_decoder)
    ds = Omniglot(SHARED, split="train", cache_dir=shared_cache, progress=False)
    assert ds.from_cache and ds.images.shape[1:] == (20, 1, 28, 28)
    # The shared zips passed as a list of paths are the same sources: same cache.
    assert Omniglot([str(p) for p in SHARED_ZIPS], split="all", cache_dir=shared_cache, progress=False).from_cache


@needs_shared
def test_shared_sampler_draws_5_way_1_shot_tasks(shared_cache):
    ds = Omniglot(SHARED, split="train", cache_dir=shared_cache, progress=False)
    batch = TaskSampler(ds, ways=5, shots=1, query=15, meta_batch=4, seed=0).sample()
    assert batch.x_support.shape == (4, 5, 1, 28, 28) and batch.x_query.shape == (4, 75, 1, 28, 28)
    assert batch.y_support.shape == (4, 5) and batch.y_query.shape == (4, 75)


# ------------------------------------------------------------------------------------- synthetic archives

def test_evaluation_archive_is_test_and_background_is_train_val(synthetic, tmp_path):
    kw = dict(cache_dir=tmp_path / "cache", progress=False, image_size=8)
    train, val, test = (Omniglot(synthetic, split=s, **kw) for s in ("train", "val", "test"))
    assert test.alphabets == ["EvA", "EvB"] and test.num_classes == (2 + 3) * 4
    assert len(val.alphabets) == 1 and len(train.alphabets) == 4  # val = 20% of 5, test = the evaluation archive
    assert sorted(train.alphabets + val.alphabets) == [f"Bg{i}" for i in range(5)]
    assert train.images.shape == (4 * 2 * 4, 4, 1, 8, 8)
    assert Omniglot(synthetic, split="all", **kw).alphabets == sorted([f"Bg{i}" for i in range(5)] + ["EvA", "EvB"])
    # Two background alphabets still give a (one-alphabet) val split.
    small = tmp_path / "small"
    small.mkdir()
    make_archive(small / "images_background.zip", {"A": 1, "B": 1})
    make_archive(small / "images_evaluation.zip", {"C": 1})
    assert [len(Omniglot(small, split=s, **kw).alphabets) for s in ("train", "val", "test")] == [1, 1, 1]


def test_explicit_alphabets_override_the_split(synthetic, tmp_path):
    kw = dict(cache_dir=tmp_path / "cache", progress=False, image_size=8)
    ds = Omniglot(synthetic, split="test", alphabets=["Bg3", "EvB"], **kw)
    assert ds.alphabets == ["Bg3", "EvB"] and ds.num_classes == (2 + 3) * 4
    assert {name.split("/")[0] for name in ds.class_names} == {"Bg3", "EvB"}
    with pytest.raises(ValueError, match=r"unknown alphabet.*'Klingon'"):
        Omniglot(synthetic, alphabets=["Bg0", "Klingon"], **kw)


def test_extracted_folder_matches_the_zip(synthetic, tmp_path):
    kw = dict(split="all", progress=False, image_size=8)
    from_zip = Omniglot(synthetic, cache_dir=tmp_path / "c1", **kw)
    extracted = tmp_path / "extracted"
    for archive in synthetic.glob("*.zip"):
        with zipfile.ZipFile(archive) as z:
            z.extractall(extracted)
    assert sorted(p.name for p in extracted.iterdir()) == ["images_background", "images_evaluation"]
    for data in (extracted, [extracted / "images_background", extracted / "images_evaluation"]):
        ds = Omniglot(data, cache_dir=tmp_path / "c2", **kw)
        assert ds.class_names == from_zip.class_names
        torch.testing.assert_close(ds.images, from_zip.images, rtol=0, atol=0)
    # The test split still comes from the evaluation folder.
    assert Omniglot(extracted, split="test", cache_dir=tmp_path / "c2", progress=False, image_size=8).alphabets \
        == ["EvA", "EvB"]


def test_cache_defaults_beside_writable_data_else_home(synthetic, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    ds = Omniglot(synthetic, split="all", progress=False, image_size=8)
    assert ds.cache_path.parent == synthetic and ds.cache_path.exists()
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    make_archive(readonly / "images_background_x.zip", {"A": 1, "B": 1, "C": 1})
    readonly.chmod(0o555)
    try:
        ds = Omniglot(readonly, split="all", progress=False, image_size=8)
        assert ds.cache_path.parent == tmp_path / "home" / ".cache" / "mamlext" and ds.cache_path.exists()
        assert files_under(readonly) == ["images_background_x.zip"]
    finally:
        readonly.chmod(0o755)


def test_changed_archive_invalidates_the_cache(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    archive = make_archive(data / "images_background.zip", {"A": 2, "B": 2, "C": 2}, seed=0)
    kw = dict(split="all", cache_dir=tmp_path / "cache", progress=False, image_size=8)
    first = Omniglot(data, **kw)
    assert not first.from_cache and Omniglot(data, **kw).from_cache
    make_archive(archive, {"A": 2, "B": 2, "C": 2}, seed=5)  # same names, new drawings
    stat = archive.stat()
    os.utime(archive, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # coarse file-system clocks
    changed = Omniglot(data, **kw)
    assert not changed.from_cache and not torch.equal(changed.images, first.images)
    assert Omniglot(data, **kw).from_cache
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1  # rewritten in place, not accumulated


def test_background_only_pools_alphabets_60_20_20(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    make_archive(data / "images_background.zip", {f"A{i}": 1 for i in range(10)})
    kw = dict(cache_dir=tmp_path / "cache", progress=False, image_size=8)
    sizes = [len(Omniglot(data, split=s, **kw).alphabets) for s in ("train", "val", "test")]
    assert sizes == [6, 2, 2]
    two = tmp_path / "two"
    two.mkdir()
    make_archive(two / "images_background.zip", {"A": 1, "B": 1})
    assert Omniglot(two, split="train", **kw).alphabets == ["A", "B"]
    with pytest.raises(ValueError, match=r"split 'test' is empty.*two"):
        Omniglot(two, split="test", **kw)


def test_uneven_image_counts_keep_the_smallest(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    make_archive(data / "images_background_a.zip", {"A": 1}, images=3)
    make_archive(data / "images_background_b.zip", {"B": 1}, images=5)
    with pytest.warns(UserWarning, match="3 to 5 images"):
        ds = Omniglot(data, split="all", cache_dir=tmp_path / "cache", progress=False, image_size=8)
    assert ds.images.shape[:2] == (8, 3)


# ------------------------------------------------------------------------------------- dataset errors

def test_errors_name_the_path(tmp_path):
    kw = dict(cache_dir=tmp_path / "cache", progress=False, image_size=8)
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"{re.escape(str(missing))}.*does not exist"):
        Omniglot(missing, **kw)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no archives here")
    with pytest.raises(FileNotFoundError, match=f"no archive found in {re.escape(str(empty))}"):
        Omniglot(empty, **kw)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "images_background.zip").write_bytes(b"PK\x03\x04 truncated junk")
    bad_zip = re.escape(str(corrupt / "images_background.zip"))
    with pytest.raises(ValueError, match=f"{bad_zip} is not a readable zip"):
        Omniglot(corrupt, **kw)
    bad_png = tmp_path / "badpng"
    bad_png.mkdir()
    make_archive(bad_png / "images_background.zip", {"A": 2, "B": 1}, bad_member=("A", 2))
    with pytest.raises(ValueError, match=r"unreadable PNG .*images_background.zip: "
                                         r"images_background/A/character02/0002_01.png"):
        Omniglot(bad_png, **kw)
    no_png = tmp_path / "nopng"
    no_png.mkdir()
    with zipfile.ZipFile(no_png / "images_background.zip", "w") as z:
        z.writestr("images_background/readme.txt", b"hi")
    with pytest.raises(ValueError, match="no <Alphabet>/<character>/\\*.png images found in .*nopng"):
        Omniglot(no_png, **kw)
    good = tmp_path / "good"
    good.mkdir()
    make_archive(good / "images_background.zip", {"A": 1})
    with pytest.raises(ValueError, match="split must be one of"):
        Omniglot(good, split="training", **kw)
    with pytest.raises(ValueError, match="image_size must be a positive int"):
        Omniglot(good, image_size=0, cache_dir=tmp_path / "cache")


# ------------------------------------------------------------------------------------- TaskSampler

class Coded:
    """A dataset whose image (c, i) is filled with the value 1000 * c + i, so batches can be decoded."""

    def __init__(self, classes=12, per_class=6, size=3):
        codes = 1000 * torch.arange(classes)[:, None] + torch.arange(per_class)[None, :]
        self.images = codes[:, :, None, None, None].float().expand(classes, per_class, 1, size, size).clone()


def decode(x):
    code = x[..., 0, 0, 0].long()
    return code // 1000, code % 1000


def test_sampler_shapes_labels_and_distinct_draws(device):
    ways, shots, query, T = 4, 2, 3, 50
    batch = TaskSampler(Coded(), ways, shots, query, T, seed=1, device=device).sample()
    assert batch.x_support.shape == (T, ways * shots, 1, 3, 3) and batch.x_query.shape == (T, ways * query, 1, 3, 3)
    assert batch.y_support.shape == (T, ways * shots) and batch.y_query.shape == (T, ways * query)
    assert batch.x_support.dtype == torch.float32 and batch.y_support.dtype == torch.int64
    assert all(t.device.type == device for t in batch)
    batch = [t.cpu() for t in batch]
    (s_cls, s_img), (q_cls, q_img) = decode(batch[0]), decode(batch[2])
    for t in range(T):
        label_to_class = {}
        for cls, img, lab in [(s_cls[t], s_img[t], batch[1][t]), (q_cls[t], q_img[t], batch[3][t])]:
            for c, l in zip(cls.tolist(), lab.tolist()):
                assert label_to_class.setdefault(l, c) == c  # one class per label, support and query agree
        assert sorted(label_to_class) == list(range(ways))
        assert len(set(label_to_class.values())) == ways  # distinct classes
        assert sorted(batch[1][t].tolist()) == sorted(list(range(ways)) * shots)
        assert sorted(batch[3][t].tolist()) == sorted(list(range(ways)) * query)
        pairs = list(zip(s_cls[t].tolist() + q_cls[t].tolist(), s_img[t].tolist() + q_img[t].tolist()))
        assert len(set(pairs)) == ways * (shots + query)  # distinct images, support and query disjoint


def test_sampler_permutes_labels_and_covers_classes():
    sampler = TaskSampler(Coded(), ways=4, shots=1, query=1, meta_batch=200, seed=0)
    batch = sampler.sample()
    first_labels = batch.y_support  # class drawn first, second, ... -> its label
    assert len({tuple(row) for row in first_labels.tolist()}) > 10  # labels are not assigned in draw order
    for t in range(len(first_labels)):
        assert sorted(first_labels[t].tolist()) == [0, 1, 2, 3]
    classes, images = decode(batch.x_support)
    assert set(classes.flatten().tolist()) == set(range(12)) and set(images.flatten().tolist()) == set(range(6))
    label_of_class0 = batch.y_support[classes == 0]
    assert set(label_of_class0.tolist()) == {0, 1, 2, 3}  # any class gets any label


def test_sampler_is_seeded_and_resumes_from_state_dict():
    def batches(sampler, n):
        return [sampler.sample() for _ in range(n)]

    a, b = TaskSampler(Coded(), 3, 1, 2, 4, seed=7), TaskSampler(Coded(), 3, 1, 2, 4, seed=7)
    for x, y in zip(batches(a, 3), batches(b, 3)):
        assert all(torch.equal(u, v) for u, v in zip(x, y))
    other = TaskSampler(Coded(), 3, 1, 2, 4, seed=8).sample()
    assert not torch.equal(other.x_support, TaskSampler(Coded(), 3, 1, 2, 4, seed=7).sample().x_support)

    run = TaskSampler(Coded(), 3, 1, 2, 4, seed=3)
    batches(run, 2)
    state = run.state_dict()
    assert state["batches_sampled"] == 2
    expected = batches(run, 3)
    resumed = TaskSampler(Coded(), 3, 1, 2, 4, seed=123)
    resumed.load_state_dict(state)
    for x, y in zip(expected, batches(resumed, 3)):
        assert all(torch.equal(u, v) for u, v in zip(x, y))
    it = iter(TaskSampler(Coded(), 3, 1, 2, 4, seed=3))
    assert torch.equal(next(it).x_query, TaskSampler(Coded(), 3, 1, 2, 4, seed=3).sample().x_query)


def test_sampler_errors_name_the_argument():
    data = Coded(classes=5, per_class=4)
    with pytest.raises(ValueError, match=r"ways=6 exceeds the dataset's 5 classes"):
        TaskSampler(data, ways=6, shots=1, query=1, meta_batch=1)
    with pytest.raises(ValueError, match=r"shots \+ query = 2 \+ 3 = 5 exceeds the 4 images per class"):
        TaskSampler(data, ways=2, shots=2, query=3, meta_batch=1)
    for name in ("ways", "shots", "query", "meta_batch"):
        sizes = dict(ways=2, shots=1, query=1, meta_batch=1)
        for bad in (0, -1, 1.5):
            with pytest.raises(ValueError, match=f"{name} must be a positive int"):
                TaskSampler(data, **{**sizes, name: bad})
    with pytest.raises(ValueError, match="dataset must have .images"):
        TaskSampler(object(), 2, 1, 1, 1)
    with pytest.raises(ValueError, match="no 'generator'"):
        TaskSampler(data, 2, 1, 1, 1).load_state_dict({})
