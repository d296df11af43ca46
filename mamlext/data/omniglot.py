"""Omniglot (Lake et al. 2015) for few-shot classification, read straight from the official archives.

``Omniglot`` decodes every ``<Alphabet>/characterNN/*.png`` of the official zips (``images_background*.zip``,
``images_evaluation*.zip``) or of their extracted folders, without extracting anything to disk, resizes them to
``image_size`` (ink = 1.0, background = 0.0) and caches the result as one ``.npy`` plus a ``.json`` index, so the
next construction, of any split, is a single file read. ``TaskSampler`` draws seeded N-way K-shot task batches
from it.

Classes are (alphabet, character) pairs and, with ``rotations=True``, each of the 4 rotations (``np.rot90`` /
``torch.rot90(img, k, dims=(-2, -1))``, i.e. counter-clockwise by 90*k degrees) is a class of its own, as in MAML.
Splits are by alphabet; see ``Omniglot`` for the rules.
"""
import hashlib
import io
import json
import os
import random
import stat
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

CACHE_VERSION = 1
SPLITS = ("train", "val", "test", "all")
ROTATIONS = (0, 90, 180, 270)
_PREFIXES = ("images_background", "images_evaluation")
# Which resampling filter shrinks the 105x105 originals (LANCZOS = PIL's old ANTIALIAS, which MAML used).
RESAMPLE = "LANCZOS"


class FewShotBatch(NamedTuple):
    x_support: Tensor  # [T, ways*shots, 1, H, W] float32
    y_support: Tensor  # [T, ways*shots] int64, labels 0..ways-1
    x_query: Tensor    # [T, ways*query, 1, H, W] float32
    y_query: Tensor    # [T, ways*query] int64


def _decode_png(raw: bytes, image_size: int) -> np.ndarray:
    """One Omniglot PNG (black ink on white) -> float32 [image_size, image_size] in [0, 1], ink = 1."""
    from PIL import Image

    with Image.open(io.BytesIO(raw)) as image:
        image = image.convert("L")
        if image.size != (image_size, image_size):
            image = image.resize((image_size, image_size), getattr(Image.Resampling, RESAMPLE))
        pixels = np.asarray(image, dtype=np.float32)
    return np.clip(1.0 - pixels / 255.0, 0.0, 1.0)


# ----------------------------------------------------------------------------------------------- sources

class _Source:
    """One archive (zip) or extracted folder, with the PNGs it holds keyed by (alphabet, character, file)."""

    def __init__(self, path: Path):
        self.path = path
        self.is_zip = path.is_file()
        name = path.name[:-4] if self.is_zip and path.name.lower().endswith(".zip") else path.name
        self.kind = "evaluation" if "evaluation" in name.lower() else "background"
        self.members: Dict[Tuple[str, str, str], str] = {}  # (alphabet, character, file) -> member / file path
        if self.is_zip:
            self._list_zip()
        else:
            self._list_folder()
        if not self.members:
            raise ValueError(f"Omniglot: no <Alphabet>/<character>/*.png images found in {path}")

    def _list_zip(self):
        try:
            with zipfile.ZipFile(self.path) as archive:
                infos = archive.infolist()
        except (zipfile.BadZipFile, OSError) as error:
            raise ValueError(f"Omniglot: {self.path} is not a readable zip archive ({error})") from error
        self.size = self.path.stat().st_size
        self.mtime_ns = self.path.stat().st_mtime_ns
        for info in infos:
            parts = info.filename.rstrip("/").split("/")
            if info.is_dir() or not parts[-1].lower().endswith(".png") or len(parts) < 3:
                continue
            if any(part.startswith(".") or part == "__MACOSX" for part in parts):
                continue
            self.members[tuple(parts[-3:])] = info.filename

    def _list_folder(self):
        size, mtime = 0, 0
        for file in sorted(self.path.rglob("*.png")):
            rel = file.relative_to(self.path).parts
            if len(rel) < 3 or any(part.startswith(".") for part in rel):
                continue
            status = file.stat()
            size += status.st_size
            mtime = max(mtime, status.st_mtime_ns)
            self.members[tuple(rel[-3:])] = str(file)
        self.size, self.mtime_ns = size, mtime

    def signature(self) -> dict:
        return {"name": self.path.name, "path": str(self.path), "kind": self.kind,
                "type": "zip" if self.is_zip else "folder", "files": len(self.members), "size": self.size,
                "mtime_ns": self.mtime_ns}

    def read_all(self, keys):
        """Yields (key, raw PNG bytes) for ``keys`` (members of this source)."""
        if not self.is_zip:
            for key in keys:
                try:
                    yield key, Path(self.members[key]).read_bytes()
                except OSError as error:
                    raise ValueError(f"Omniglot: cannot read {self.members[key]} ({error})") from error
            return
        try:
            with zipfile.ZipFile(self.path) as archive:
                for key in keys:
                    yield key, archive.read(self.members[key])
        except (zipfile.BadZipFile, OSError, EOFError) as error:
            raise ValueError(f"Omniglot: {self.path} is corrupt: cannot read its images ({error})") from error


def _is_source_dir(path: Path) -> bool:
    return path.name.startswith(_PREFIXES)


def _find_sources(data) -> List[Path]:
    paths = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    if not paths:
        raise ValueError("Omniglot: data is an empty list of paths")
    found: List[Path] = []
    for entry in paths:
        path = Path(entry).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"Omniglot: data path {path} does not exist")
        path = path.resolve()
        if path.is_file() or _is_source_dir(path):
            found.append(path)
            continue
        # A directory holding archives and/or extracted folders.
        zips = sorted(p for p in path.iterdir() if p.is_file() and p.name.startswith(_PREFIXES)
                      and p.name.lower().endswith(".zip"))
        stems = {p.name[:-4] for p in zips}
        folders = sorted(p for p in path.iterdir() if p.is_dir() and _is_source_dir(p) and p.name not in stems)
        if zips or folders:
            found.extend(zips + folders)
        elif any(path.glob("*/*/*.png")):  # an extracted folder under another name: <Alphabet>/<character>/*.png
            found.append(path)
        else:
            raise FileNotFoundError(
                f"Omniglot: no archive found in {path} (expected images_background*.zip / images_evaluation*.zip "
                f"or their extracted folders)")
    return sorted(set(found))


# ----------------------------------------------------------------------------------------------- cache

def _dir_writable(path: Path) -> bool:
    """Writable for us AND not marked read-only by its mode bits (root's os.access ignores those)."""
    try:
        return path.is_dir() and os.access(path, os.W_OK) and bool(path.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP
                                                                                          | stat.S_IWOTH))
    except OSError:
        return False


def _default_cache_dir(data, sources: List[Path]) -> Path:
    if isinstance(data, (str, os.PathLike)) and Path(data).expanduser().resolve().is_dir() \
            and not _is_source_dir(Path(data).expanduser().resolve()):
        beside = Path(data).expanduser().resolve()
    else:
        beside = sources[0].parent
    if _dir_writable(beside):
        return beside
    return Path(os.path.expanduser("~")) / ".cache" / "mamlext"


def _atomic_write(path: Path, write):
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _decode_sources(sources: List[_Source], image_size: int, progress: bool):
    """Decodes every character of every source; returns (array [chars, n, S, S], index dict)."""
    # Merge by name: one alphabet / character / file even when several archives hold it (first source wins).
    owner: Dict[Tuple[str, str, str], _Source] = {}
    alphabet_kinds: Dict[str, set] = {}
    for source in sources:
        for key in source.members:
            owner.setdefault(key, source)
            alphabet_kinds.setdefault(key[0], set()).add(source.kind)
    characters: Dict[Tuple[str, str], List[str]] = {}
    for alphabet, character, file in sorted(owner):
        characters.setdefault((alphabet, character), []).append(file)
    counts = [len(files) for files in characters.values()]
    n_per_class = min(counts)
    if max(counts) != n_per_class:
        warnings.warn(f"Omniglot: characters hold {n_per_class} to {max(counts)} images; keeping the first "
                      f"{n_per_class} (by file name) of each", stacklevel=3)
    keep = {(a, c, f) for (a, c), files in characters.items() for f in files[:n_per_class]}
    char_index = {name: i for i, name in enumerate(characters)}
    images = np.zeros((len(characters), n_per_class, image_size, image_size), dtype=np.float32)

    bar = None
    if progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=len(keep), desc="Omniglot: decoding", unit="img", leave=False)
        except ImportError:
            pass
    try:
        for source in sources:
            keys = sorted(k for k in keep if owner[k] is source)
            for (alphabet, character, file), raw in source.read_all(keys):
                where = f"{source.path}: {source.members[(alphabet, character, file)]}"
                try:
                    image = _decode_png(raw, image_size)
                except Exception as error:  # PIL.UnidentifiedImageError, OSError, SyntaxError, ...
                    raise ValueError(f"Omniglot: unreadable PNG {where} ({type(error).__name__}: {error})") \
                        from error
                slot = characters[(alphabet, character)].index(file)
                images[char_index[(alphabet, character)], slot] = image
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    index = {"version": CACHE_VERSION, "image_size": image_size, "resample": RESAMPLE,
             "sources": [s.signature() for s in sources],
             "alphabets": {a: sorted(k) for a, k in sorted(alphabet_kinds.items())},
             "characters": [f"{a}/{c}" for a, c in characters], "n_per_class": n_per_class,
             "shape": list(images.shape)}
    return images, index


def _load_cache(npy: Path, meta: Path, sources: List[_Source], image_size: int):
    try:
        index = json.loads(meta.read_text())
    except (OSError, ValueError):
        return None
    if (index.get("version") != CACHE_VERSION or index.get("image_size") != image_size
            or index.get("resample") != RESAMPLE or index.get("sources") != [s.signature() for s in sources]):
        return None
    try:
        images = np.load(npy)
    except (OSError, ValueError):
        return None
    if list(images.shape) != index.get("shape") or images.dtype != np.float32:
        return None
    return images, index


# ----------------------------------------------------------------------------------------------- dataset

def _split_alphabets(index: dict, split_seed: int) -> Dict[str, List[str]]:
    kinds = index["alphabets"]
    evaluation = sorted(a for a, k in kinds.items() if "evaluation" in k)  # evaluation wins on a clash
    background = sorted(a for a in kinds if a not in evaluation)
    shuffled = list(background)
    random.Random(split_seed).shuffle(shuffled)
    n = len(shuffled)
    if evaluation:
        n_val = max(1, round(0.2 * n)) if n >= 2 else 0
        n_test = 0
    else:
        n_val = max(1, round(0.2 * n)) if n >= 3 else 0
        n_test = max(1, round(0.2 * n)) if n >= 3 else 0
    val, test = shuffled[:n_val], shuffled[n_val:n_val + n_test]
    train = shuffled[n_val + n_test:]
    return {"train": sorted(train), "val": sorted(val), "test": sorted(evaluation or test),
            "all": sorted(kinds)}


class Omniglot:
    """Omniglot characters as classes ([num_classes, n_per_class, 1, S, S] float32 images, ink = 1).

    data: a directory holding the official archives and/or their extracted folders, or a list of archive / folder
      paths. Nothing is extracted: PNGs are read from the zips.
    split: "train" / "val" / "test" / "all". Alphabets of images_evaluation* sources are "test"; those of
      images_background* sources are "train" and "val" (a seeded 20% of them, >= 1 when there are >= 2). Without
      an evaluation source the background alphabets are split by seed 60/20/20 into train/val/test (>= 1 each
      when there are >= 3). An alphabet found in several archives is one alphabet (characters merged by name).
    alphabets: exactly these alphabets instead of a split (``split`` is then ignored).
    cache_dir: where ``omniglot_<key>.npy`` / ``.json`` go; default beside the data when that directory is
      writable (and not chmod'ed read-only), else ~/.cache/mamlext. A changed archive (size or mtime) rebuilds it.
    """

    def __init__(self, data, split: str = "train", alphabets: Optional[Sequence[str]] = None,
                 image_size: int = 28, rotations: bool = True, cache_dir=None, split_seed: int = 0,
                 progress: bool = True):
        if split not in SPLITS:
            raise ValueError(f"Omniglot: split must be one of {SPLITS}, got {split!r}")
        if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
            raise ValueError(f"Omniglot: image_size must be a positive int, got {image_size!r}")
        if isinstance(alphabets, str):
            alphabets = [alphabets]
        paths = _find_sources(data)
        sources = [_Source(p) for p in paths]
        self.sources = paths
        self.image_size = image_size
        self.rotations = bool(rotations)

        cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir(data, paths)
        key = hashlib.sha1(json.dumps([[str(p) for p in paths], image_size, CACHE_VERSION, RESAMPLE])
                           .encode()).hexdigest()[:16]
        npy, meta = cache_dir / f"omniglot_{key}.npy", cache_dir / f"omniglot_{key}.json"
        self.cache_path = npy
        cached = _load_cache(npy, meta, sources, image_size) if npy.exists() and meta.exists() else None
        self.from_cache = cached is not None
        if cached is None:
            cached = _decode_sources(sources, image_size, progress)
            try:
                cache_dir.mkdir(parents=True, exist_ok=True)
                _atomic_write(npy, lambda f: np.save(f, cached[0]))
                _atomic_write(meta, lambda f: f.write(json.dumps(cached[1], indent=1).encode()))
            except OSError as error:
                warnings.warn(f"Omniglot: could not write the cache to {cache_dir} ({error}); the next "
                              f"construction will decode again", stacklevel=2)
        all_images, index = cached

        splits = _split_alphabets(index, split_seed)
        if alphabets is not None:
            unknown = sorted(set(alphabets) - set(splits["all"]))
            if unknown:
                raise ValueError(f"Omniglot: unknown alphabet(s) {unknown} in alphabets= (the data at "
                                 f"{', '.join(map(str, paths))} has {splits['all']})")
            chosen = sorted(set(alphabets))
            self.split = "custom"
        else:
            chosen = splits[split]
            self.split = split
        if not chosen:
            what = "alphabets=[]" if alphabets is not None else f"split {split!r}"
            raise ValueError(f"Omniglot: {what} is empty for the data at {', '.join(map(str, paths))} "
                             f"(alphabets: {splits['all']}; split_seed={split_seed})")
        self.alphabets = chosen
        wanted = set(chosen)
        rows = [i for i, name in enumerate(index["characters"]) if name.split("/", 1)[0] in wanted]
        characters = [index["characters"][i] for i in rows]
        base = all_images[rows]  # [chars, n, S, S]
        if self.rotations:
            base = np.stack([np.rot90(base, k, axes=(-2, -1)) for k in range(4)], axis=1)
            base = base.reshape(-1, *base.shape[2:])
            self.class_names = [f"{c}/rot{r}" for c in characters for r in ROTATIONS]
        else:
            self.class_names = [f"{c}/rot0" for c in characters]
        self.images = torch.from_numpy(np.ascontiguousarray(base)).unsqueeze(2)
        self.num_classes = self.images.shape[0]
        self.n_per_class = self.images.shape[1]

    def __len__(self) -> int:
        return self.num_classes

    def __repr__(self) -> str:
        return (f"Omniglot(split={self.split!r}, alphabets={len(self.alphabets)}, classes={self.num_classes}, "
                f"images_per_class={self.n_per_class}, image_size={self.image_size}, rotations={self.rotations})")


# ----------------------------------------------------------------------------------------------- sampler

class TaskSampler:
    """Infinite seeded stream of N-way K-shot batches of ``meta_batch`` tasks from an ``Omniglot``-like dataset
    (anything with ``.images`` [C, N, 1, H, W], or that tensor itself).

    Each task draws ``ways`` distinct classes and ``shots + query`` distinct images of each; class j of the task
    gets label perm[j] for a fresh random permutation of 0..ways-1. Support and query are grouped by class
    (class after class, in draw order). All randomness comes from one CPU torch.Generator, so a seed fixes every
    batch on any device; ``state_dict()`` / ``load_state_dict()`` resume exactly.
    """

    def __init__(self, dataset, ways: int, shots: int, query: int, meta_batch: int, seed: int = 0, device="cpu"):
        images = dataset if isinstance(dataset, Tensor) else getattr(dataset, "images", None)
        if not isinstance(images, Tensor) or images.dim() != 5:
            raise ValueError("TaskSampler: dataset must have .images of shape [classes, images, C, H, W]")
        for name, value in (("ways", ways), ("shots", shots), ("query", query), ("meta_batch", meta_batch)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TaskSampler: {name} must be a positive int, got {value!r}")
        num_classes, per_class = images.shape[:2]
        if ways > num_classes:
            raise ValueError(f"TaskSampler: ways={ways} exceeds the dataset's {num_classes} classes")
        if shots + query > per_class:
            raise ValueError(f"TaskSampler: shots + query = {shots} + {query} = {shots + query} exceeds the "
                             f"{per_class} images per class")
        self.ways, self.shots, self.query, self.meta_batch = ways, shots, query, meta_batch
        self.seed = seed
        self.device = torch.device(device)
        self.images = images.to(self.device).contiguous()  # one copy on the device; batches gathered there
        self.num_classes, self.per_class = num_classes, per_class
        self.generator = torch.Generator().manual_seed(seed)
        self.batches_sampled = 0

    def sample(self) -> FewShotBatch:
        T, W, S, Q, N = self.meta_batch, self.ways, self.shots, self.query, self.per_class
        g = self.generator
        classes = torch.stack([torch.randperm(self.num_classes, generator=g)[:W] for _ in range(T)])  # [T, W]
        picks = torch.rand(T, W, N, generator=g).argsort(dim=2)[:, :, :S + Q]                 # [T, W, S+Q]
        labels = torch.rand(T, W, generator=g).argsort(dim=1)                                  # [T, W]
        self.batches_sampled += 1
        rows = (classes[:, :, None] * N + picks).to(self.device)  # rows of images viewed as [C*N, 1, H, W]
        labels = labels.to(self.device)[:, :, None]
        flat, shape = self.images.view(-1, *self.images.shape[2:]), self.images.shape[2:]
        return FewShotBatch(flat.index_select(0, rows[:, :, :S].reshape(-1)).view(T, W * S, *shape),
                            labels.expand(T, W, S).reshape(T, W * S),
                            flat.index_select(0, rows[:, :, S:].reshape(-1)).view(T, W * Q, *shape),
                            labels.expand(T, W, Q).reshape(T, W * Q))

    def __iter__(self):
        while True:
            yield self.sample()

    def state_dict(self) -> dict:
        return {"seed": self.seed, "generator": self.generator.get_state(), "batches_sampled": self.batches_sampled,
                "ways": self.ways, "shots": self.shots, "query": self.query, "meta_batch": self.meta_batch}

    def load_state_dict(self, state: dict) -> None:
        if "generator" not in state:
            raise ValueError("TaskSampler.load_state_dict: state has no 'generator' entry")
        self.generator.set_state(state["generator"])
        self.seed = state.get("seed", self.seed)
        self.batches_sampled = state.get("batches_sampled", 0)
