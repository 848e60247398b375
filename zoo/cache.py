"""Decoded-image cache: each image decoded and size-capped once, kept as uint8 pixels.

Decoding a JPEG costs more than the augmentations that follow it, and a run decodes
every image every epoch, in every fold of a cross-fit and in every member of an
ensemble. With ``--cache ram`` (a process-level store per dataset: the K folds of one
``zoo finetune --folds K`` share it) or ``--cache DIR`` (one memory-mapped pixel file and
one index per dataset, shared by every process that names the same DIR), an image is
decoded once; augmentations still run every epoch, on the cached pixels.

An entry is keyed by the file's content (a BLAKE2b hash of its bytes) and by the
:class:`ShortSideCap` applied after decoding, so a changed image is read again and a
run with another input size gets its own entries. Within a process the hash of a file
is reused while its size, modification time and inode stay the same.

A cap keeps an image whose shorter side is within ``size`` as it is and shrinks larger
ones with torchvision's ``Resize(size)``: the op ``eval_transform`` starts with, so an
image stored at the eval cap goes through the eval transform to the same tensor as the
original. The train cap is applied with or without a cache (``finetune.loaders``), so
``--cache`` changes speed, never the batches.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from zoo import atomic
from zoo.data import Sample, unreadable_reason
from zoo.errors import UserInputError

RAM = "ram"
INDEX_VERSION = 1


# --------------------------------------------------------------------------- caps

@dataclass(frozen=True)
class ShortSideCap:
    """Shrink an image whose shorter side is over ``size`` to exactly ``size`` (aspect kept); leave smaller ones."""

    size: int
    interpolation: str  # bilinear | bicubic | nearest (torchvision's names)

    @property
    def key(self) -> str:
        return f"short{self.size}-{self.interpolation}"

    def apply(self, image):
        if min(image.size) <= self.size:
            return image
        from torchvision.transforms import InterpolationMode, Resize

        return Resize(self.size, interpolation=InterpolationMode(self.interpolation))(image)


def train_cap(input_size: int, crop_scale: float, interpolation: str) -> ShortSideCap:
    """The smallest image the random resized crop needs: its smallest crop (``crop_scale`` of the area)
    still spans ``input_size`` pixels, so the crop is never upsampled because of the cap."""
    # timm's train crop may pick "random" interpolation; the cap is one fixed resize.
    interpolation = interpolation if interpolation in ("bilinear", "bicubic", "nearest") else "bicubic"
    return ShortSideCap(math.ceil(input_size / math.sqrt(crop_scale)), interpolation)


def eval_cap(eval_transform) -> ShortSideCap | None:
    """The eval transform's own first resize as a cap, or None where it starts otherwise (squash, border)."""
    first = getattr(eval_transform, "transforms", [None])[0]
    from torchvision.transforms import Resize

    if type(first) is not Resize or first.max_size is not None:
        return None
    size = first.size if isinstance(first.size, int) else (first.size[0] if len(first.size) == 1 else None)
    return None if size is None else ShortSideCap(int(size), first.interpolation.value)


# --------------------------------------------------------------------------- content keys

_CONTENT_KEYS: dict[str, tuple[tuple[int, int, int], str]] = {}


def content_key(path: Path) -> str:
    """BLAKE2b (128-bit) of the file's bytes; reused in this process while size, mtime and inode stay the same."""
    st = os.stat(path)
    stamp = (st.st_size, st.st_mtime_ns, st.st_ino)
    known = _CONTENT_KEYS.get(str(path))
    if known is not None and known[0] == stamp:
        return known[1]
    digest = hashlib.blake2b(Path(path).read_bytes(), digest_size=16).hexdigest()
    _CONTENT_KEYS[str(path)] = (stamp, digest)
    return digest


# --------------------------------------------------------------------------- stores

Ref = tuple[int, int, int]  # (offset, height, width) of an entry's HxWx3 uint8 pixels


class RamStore:
    """Pixels in this process's memory; DataLoader workers (forked) read them without copying."""

    def __init__(self):
        self.refs: dict[str, Ref] = {}  # "<content>/<cap key>" -> ref
        self.bad: dict[str, str] = {}  # content -> why it cannot be decoded
        self._blobs: dict[int, np.ndarray] = {}  # offset (here: a counter) -> pixels
        self._lock = threading.Lock()

    @contextmanager
    def filling(self) -> Iterator[None]:
        with self._lock:
            yield

    def append(self, pixels: np.ndarray) -> Ref:
        offset = len(self._blobs)
        self._blobs[offset] = pixels
        return offset, pixels.shape[0], pixels.shape[1]

    def pixels(self, ref: Ref) -> np.ndarray:
        return self._blobs[ref[0]]

    def nbytes(self) -> int:
        return sum(b.nbytes for b in self._blobs.values())


class DirStore:
    """Pixels in ``DIR/<dataset key>.pixels`` (append-only, memory-mapped) and their index in ``<key>.index.json``.

    Filling takes an exclusive lock on ``<key>.lock``: processes that fill the same dataset
    at once (``--fold I`` tasks side by side) wait, then find the images decoded by the first.
    """

    def __init__(self, folder: Path, dataset_key: str):
        self.folder = folder
        self.pixel_path = folder / f"{dataset_key}.pixels"
        self.index_path = folder / f"{dataset_key}.index.json"
        self.lock_path = folder / f"{dataset_key}.lock"
        self.refs: dict[str, Ref] = {}
        self.bad: dict[str, str] = {}
        self._map: np.ndarray | None = None
        self._file = None
        self._read_index()

    def _read_index(self) -> None:
        if not self.index_path.is_file():
            return
        try:
            index = json.loads(self.index_path.read_text(encoding="utf-8"))
            if index.get("version") != INDEX_VERSION:
                raise ValueError(f"version {index.get('version')!r}, expected {INDEX_VERSION}")
            self.refs = {k: tuple(v) for k, v in index["refs"].items()}
            self.bad = dict(index["bad"])
        except (ValueError, KeyError, TypeError) as e:
            raise UserInputError(f"{self.index_path}: not a zoo image-cache index ({e}); delete it and "
                                 f"{self.pixel_path.name}, and the next run fills the cache again") from None

    @contextmanager
    def filling(self) -> Iterator[None]:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self._read_index()  # another process may have filled entries while this one waited
                before = (len(self.refs), len(self.bad))
                with open(self.pixel_path, "ab") as self._file:
                    yield
                    self._file.flush()
                    os.fsync(self._file.fileno())
                # The index names only bytes already written: a crash in between leaves unused bytes, never a bad entry.
                if (len(self.refs), len(self.bad)) != before:
                    atomic.write_json(self.index_path, {"version": INDEX_VERSION, "refs": self.refs, "bad": self.bad})
            finally:
                self._file = None
                fcntl.flock(lock, fcntl.LOCK_UN)

    def append(self, pixels: np.ndarray) -> Ref:
        offset = self._file.tell()
        self._file.write(np.ascontiguousarray(pixels).tobytes())
        self._file.flush()  # readable through pixels() at once
        return offset, pixels.shape[0], pixels.shape[1]

    def pixels(self, ref: Ref) -> np.ndarray:
        offset, h, w = ref
        end = offset + h * w * 3
        if self._map is None or self._map.shape[0] < end:  # first use in this process, or the file grew
            self._map = np.memmap(self.pixel_path, dtype=np.uint8, mode="r")
        return self._map[offset:end].reshape(h, w, 3)

    def nbytes(self) -> int:
        return self.pixel_path.stat().st_size if self.pixel_path.is_file() else 0

    def __getstate__(self):  # workers map the file themselves
        return {**self.__dict__, "_map": None, "_file": None}


_RAM_STORES: dict[str, RamStore] = {}


def dataset_key(root: Path) -> str:
    return hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:16]


def open_store(cache: str, root: Path) -> RamStore | DirStore:
    """The store of dataset ``root`` for ``--cache`` (``ram`` or a folder); in RAM one per dataset and process."""
    if cache == RAM:
        return _RAM_STORES.setdefault(dataset_key(root), RamStore())
    folder = Path(cache)
    if folder.exists() and not folder.is_dir():
        raise UserInputError(f"--cache {cache}: is a file; give a folder for the cache (created if missing) or 'ram'")
    return DirStore(folder, dataset_key(root))


def check_cache_option(cache: str | None) -> None:
    if cache is not None and (not cache or (cache != RAM and Path(cache).exists() and not Path(cache).is_dir())):
        raise UserInputError(f"--cache must be 'ram' or a folder (created if missing), got {cache!r}")


# --------------------------------------------------------------------------- filling and reading

@dataclass
class FillResult:
    decoded: int  # images decoded by this call
    cached: int  # images whose every cap was in the store already
    bad: list[tuple[str, str]]  # (sample id, why) of images that cannot be decoded
    refs: list[dict[str, Ref] | None]  # per sample: cap key -> ref (None for a bad image)




def _decode(path: Path, caps: Sequence[ShortSideCap]) -> dict[str, np.ndarray] | str:
    """Each cap's pixels of the image at ``path``, from one decode; or why it cannot be decoded."""
    from zoo import data  # looked up at call time: tests count decodes by wrapping data.load_rgb

    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
        image = data.load_rgb(path)
    except Exception as e:  # PIL raises many types for broken files; every one means skip
        return unreadable_reason(e)
    return {cap.key: np.asarray(cap.apply(image), dtype=np.uint8) for cap in caps}


def fill(store: RamStore | DirStore, samples: Sequence[Sample], caps: Sequence[ShortSideCap], *,
         workers: int = 1, progress: Callable[[int, int], None] | None = None) -> FillResult:
    """Decode the images of ``samples`` missing from ``store`` (for any of ``caps``) once, in ``workers`` threads.

    ``progress(done, len(samples))`` is called after each decode; images found in the cache count as done."""
    caps = list(dict.fromkeys(caps))
    keys: list[str | None] = []
    bad: dict[int, str] = {}
    for i, s in enumerate(samples):
        try:
            keys.append(content_key(s.path))
        except OSError as e:
            keys.append(None)
            bad[i] = unreadable_reason(e)
    with store.filling():
        todo = [i for i, k in enumerate(keys) if k is not None and k not in store.bad
                and any(f"{k}/{c.key}" not in store.refs for c in caps)]
        unique = list({keys[i]: i for i in todo}.values())  # the same bytes twice (copies): decode once
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # PIL decodes and resizes without the GIL
            for done, (i, result) in enumerate(zip(unique, pool.map(lambda i: _decode(samples[i].path, caps), unique)), 1):
                if progress is not None:
                    progress(len(samples) - len(unique) + done, len(samples))
                if isinstance(result, str):
                    store.bad[keys[i]] = result
                    continue
                stored: list[tuple[np.ndarray, Ref]] = []  # caps that leave the image alike share one copy
                for cap_key, pixels in result.items():
                    ref = next((r for p, r in stored if p.shape == pixels.shape and np.array_equal(p, pixels)), None)
                    if ref is None:
                        ref = store.append(pixels)
                        stored.append((pixels, ref))
                    store.refs[f"{keys[i]}/{cap_key}"] = ref
    refs: list[dict[str, Ref] | None] = []
    for i, k in enumerate(keys):
        if k is not None and k in store.bad:
            bad[i] = store.bad[k]
        refs.append(None if i in bad else {c.key: store.refs[f"{k}/{c.key}"] for c in caps})
    todo_set = set(todo)
    return FillResult(decoded=len(unique), cached=sum(1 for i in range(len(samples)) if i not in todo_set and i not in bad),
                      bad=[(samples[i].id, why) for i, why in sorted(bad.items())], refs=refs)


class CachedImages:
    """``index -> PIL image`` over a dataset's samples, from the store's pixels at one cap (for ``ImageDataset``)."""

    def __init__(self, store: RamStore | DirStore, refs: list[Ref]):
        self.store = store
        self.refs = refs

    def __call__(self, index: int):
        from PIL import Image

        # A copy: memory-mapped pixels are read-only, and the transforms may write into the image.
        return Image.fromarray(np.array(self.store.pixels(self.refs[index])), mode="RGB")


class CappedImages:
    """``index -> PIL image``: decode, then cap (the uncached path; the same pixels as :class:`CachedImages`)."""

    def __init__(self, samples: Sequence[Sample], cap: ShortSideCap):
        self.paths = [s.path for s in samples]
        self.cap = cap

    def __call__(self, index: int):
        from zoo import data

        return self.cap.apply(data.load_rgb(self.paths[index]))


def cached_images(store: RamStore | DirStore, samples: Sequence[Sample], cap: ShortSideCap,
                  caps: Sequence[ShortSideCap], *, workers: int = 1) -> Callable[[int], object]:
    """Fill ``store`` for ``samples`` at every cap of ``caps`` and return a reader at ``cap``."""
    result = fill(store, samples, caps, workers=workers)
    if result.bad:
        sample_id, why = result.bad[0]
        raise UserInputError(f"{sample_id}: cannot be decoded any more ({why}); it was readable when the run checked "
                             "its images: replace the file or remove it, and start the run again")
    return CachedImages(store, [r[cap.key] for r in result.refs])
