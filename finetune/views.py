"""Consistent views for distillation: one augmented view of an image, the same for every network that sees it.

A view is a set of seeded parameters, not pixels: a crop box in the source image's pixels and a flip. Each
network renders it at its own input size, interpolation and normalisation (``render``), so a teacher at 260
pixels and a student at 224 see the same region of the photo. View 0 is each network's own evaluation
transform (resize, centre crop): the view the members' out-of-fold predictions were made on. Views 1.. are
random resized crops (area ``crop_scale``..1, aspect 3/4..4/3, timm's and torchvision's recipe) with a
horizontal flip of probability ``hflip``, drawn from a generator keyed by (seed, view, sample id), so a view
is the same whatever the order, batch or process that draws it. The teacher's outputs for each view are
computed once (``zoo.pipeline.distill``); the student's epochs cycle through them (``view_of``).

With ``mix`` > 0 a view 1.. is also a mixup of two images (Beyer et al.'s "function matching"): the image's
crop, times a weight drawn from Beta(mix, mix), plus a partner image's crop of the same view index times the
rest. The partner is drawn (``mix_partners``) among the images of the same group (those the same fold models
teach, so an out-of-fold target stays out of fold), and the teacher's output is for the mixed pixels, so with
N images the student meets N x (V - 1) new images that teacher and student see alike.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torchvision.transforms.functional as TF
from timm.data.transforms import str_to_interp_mode

from finetune import loaders
from zoo.data import ImageDataset, Sample


@dataclass(frozen=True)
class ViewSpec:
    """How the views of every image are drawn: ``count`` views (view 0 the centre view), seeded by ``seed``."""

    count: int
    seed: int = 0
    crop_scale: float = 0.35
    hflip: float = 0.5
    mix: float = 0.0  # views 1.. mixed with a partner image by a Beta(mix, mix) weight; 0: no mixing

    def to_dict(self) -> dict[str, Any]:
        spec = asdict(self)
        if not self.mix:  # as recorded before mixing existed, so those caches and configs still match
            del spec["mix"]
        return spec


def _sample_key(sample_id: str) -> int:
    return int.from_bytes(hashlib.sha256(sample_id.encode()).digest()[:8], "little")


@dataclass
class ViewMixing:
    """Which partner each view of each image is mixed with: ``partners`` [N, V] (a row index into the same images, -1:
    not mixed) and ``weights`` [N, V] (the image's own share of the pixels; 1 where not mixed)."""

    partners: np.ndarray
    weights: np.ndarray

    def mixed(self, row: int, view: int) -> bool:
        return bool(self.partners[row, view] >= 0)


def mix_partners(spec: ViewSpec, ids: Sequence[str], groups: Sequence[Any]) -> ViewMixing | None:
    """The partners and weights of every view of the images ``ids``: view v (1..) of image i is mixed with another image
    of i's group (``groups[i]``; uniformly among them, drawn from a generator keyed by (seed, view, image id), so it
    does not depend on the order of ``ids``) with i's weight from Beta(mix, mix). None when ``spec.mix`` is 0."""
    if not spec.mix:
        return None
    n, v = len(ids), spec.count
    partners, weights = np.full((n, v), -1, dtype=np.int64), np.ones((n, v), dtype=np.float32)
    members: dict[Any, list[int]] = {}
    for i, group in enumerate(groups):
        members.setdefault(group, []).append(i)
    for rows in members.values():
        rows = sorted(rows, key=lambda i: ids[i])  # by id: the same draw for the same images in any order
        if len(rows) < 2:
            continue  # no partner: the image's views stay unmixed
        for place, i in enumerate(rows):
            for view in range(1, v):
                rng = np.random.default_rng([spec.seed, view, _sample_key(ids[i]), 1])  # 1: apart from the crop's draw
                other = int(rng.integers(len(rows) - 1))
                partners[i, view] = rows[other + (other >= place)]  # any of the group but itself
                weights[i, view] = rng.beta(spec.mix, spec.mix)
    return ViewMixing(partners, weights)


def view_params(spec: ViewSpec, sample_id: str, view: int, width: int, height: int) -> tuple[tuple[int, int, int, int], bool]:
    """The crop box (top, left, height, width, in source pixels) and flip of ``view`` (1..) of an image of this size."""
    rng = np.random.default_rng([spec.seed, view, _sample_key(sample_id)])
    area = width * height
    log_ratio = (math.log(3 / 4), math.log(4 / 3))
    box = None
    for _ in range(10):  # torchvision's RandomResizedCrop.get_params, on a generator of our own
        target = area * rng.uniform(spec.crop_scale, 1.0)
        ratio = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            box = (int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w)
            break
    if box is None:  # the fallback of torchvision: the whole image, clipped to the aspect range
        ratio = width / height
        w, h = (width, int(round(width / (4 / 3)))) if ratio > 4 / 3 else (int(round(height * 3 / 4)), height) \
            if ratio < 3 / 4 else (width, height)
        box = ((height - h) // 2, (width - w) // 2, h, w)
    return box, bool(rng.uniform() < spec.hflip)


class ViewRenderer:
    """Renders views of PIL images for one network's data config (input size, interpolation, mean, std)."""

    def __init__(self, data_config: dict[str, Any], spec: ViewSpec):
        self.spec = spec
        self.size = tuple(int(s) for s in data_config["input_size"][-2:])
        self.interpolation = str_to_interp_mode(data_config["interpolation"])
        self.mean, self.std = list(data_config["mean"]), list(data_config["std"])
        self.centre = loaders.eval_transform(data_config)

    def __call__(self, image, sample_id: str, view: int, partner: tuple[Any, str] | None = None,
                 weight: float = 1.0) -> torch.Tensor:
        """``image`` (PIL) in ``view``; with ``partner`` (its PIL image and id), mixed with the partner's crop of the
        same view: ``weight`` x this one + (1 - ``weight``) x the partner's (normalisation is affine, so mixing the
        normalised tensors mixes the pixels)."""
        if view == 0:
            return self.centre(image)
        own = self._crop(image, sample_id, view)
        if partner is None:
            return own
        return own.mul_(weight).add_(self._crop(*partner, view), alpha=1.0 - weight)

    def _crop(self, image, sample_id: str, view: int) -> torch.Tensor:
        (top, left, h, w), flip = view_params(self.spec, sample_id, view, *image.size)
        crop = TF.resized_crop(image, top, left, h, w, list(self.size), interpolation=self.interpolation)
        if flip:
            crop = TF.hflip(crop)
        return TF.normalize(TF.to_tensor(crop), self.mean, self.std)


def render_view(renderer: ViewRenderer, image_of: Callable[[int], Any], id_of: Callable[[int], str], index: int, view: int,
                mixing: ViewMixing | None = None) -> torch.Tensor:
    """Image ``index`` in ``view``, mixed with its partner where ``mixing`` says so (partners as indices of the same
    images): the one way the teacher's pass and the student's dataset render a view, so both see the same pixels."""
    if mixing is None or not mixing.mixed(index, view):
        return renderer(image_of(index), id_of(index), view)
    other = int(mixing.partners[index, view])
    return renderer(image_of(index), id_of(index), view, (image_of(other), id_of(other)), float(mixing.weights[index, view]))


class ViewDataset(ImageDataset):
    """A map dataset of (rendered view, label, index[, target]): item ``i`` is sample ``i`` in view ``view_of(i)``.

    ``targets`` [N, V, C] (the teacher's log-probabilities per view), when given, adds the row of the very view
    that was rendered, so a student's batch carries the teacher's output for what it sees. ``mixing`` (partners
    as indices into ``samples``) mixes views as the teacher saw them; a mixed view has no one hard label, so its
    label is -1 (taught by the teacher alone, as an unlabeled image)."""

    def __init__(self, samples: Sequence[Sample], renderer: ViewRenderer, view_of: Callable[[int], int],
                 targets: torch.Tensor | None = None, images: Callable[[int], Any] | None = None,
                 mixing: ViewMixing | None = None):
        super().__init__(samples, renderer, images)  # the renderer is the transform, given the view
        self.view_of = view_of
        self.targets = targets
        self.mixing = mixing

    def __getitem__(self, index: int):
        view = self.view_of(index)
        mixed = self.mixing is not None and self.mixing.mixed(index, view)
        image = render_view(self.transform, self.image, lambda i: self.samples[i].id, index, view, self.mixing)
        item = (image, -1 if mixed else self.samples[index].label, index)
        return item if self.targets is None else item + (self.targets[index, view],)


def cycling_views(count: int, epoch: int) -> Callable[[int], int]:
    """The student's view of each sample in ``epoch``: every image goes through all ``count`` views in ``count`` epochs,
    and each epoch mixes views (image ``i`` starts at view ``i mod count``), the centre view included."""
    return lambda index: (epoch + index) % count


@dataclass
class SoftTargets:
    """What a student is trained on besides its dataset: the teacher's log-probabilities ``log_probs`` [N, V, C] of
    the images ``ids`` in each of ``spec.count`` views, and ``unlabeled`` images (label -1) to train on as well.

    Made by the pipeline (``zoo.pipeline.distill``) from an ensemble; ``finetune`` knows only these numbers."""

    ids: list[str]
    log_probs: np.ndarray
    spec: ViewSpec
    unlabeled: list[Sample]
    mixing: ViewMixing | None = None  # partners as rows of ``ids``

    def mixing_for(self, samples: Sequence[Sample]) -> ViewMixing | None:
        """``mixing`` for ``samples`` (in their order, as ``rows_for``), partners as indices into ``samples``."""
        from zoo.errors import UserInputError

        if self.mixing is None:
            return None
        rows = self._rows(samples)
        place = np.full(len(self.ids), -1, dtype=np.int64)
        place[rows] = np.arange(len(samples))
        partners, weights = self.mixing.partners[rows], self.mixing.weights[rows]
        mapped = np.where(partners >= 0, place[np.maximum(partners, 0)], -1)
        lost = (partners >= 0) & (mapped < 0)
        if lost.any():
            i = int(np.argwhere(lost)[0][0])
            raise UserInputError(f"training image {samples[i].id} was mixed, for its teacher, with an image that is no longer "
                                 f"in the training set ({self.ids[int(partners[lost][0])]}): run `zoo distill` again into a new --out")
        return ViewMixing(mapped, weights)

    def rows_for(self, samples: Sequence[Sample]) -> torch.Tensor:
        """The teacher's rows [len(samples), V, C] of ``samples``, in their order; every one must have a row."""
        return torch.from_numpy(np.ascontiguousarray(self.log_probs[self._rows(samples)], dtype=np.float32))

    def _rows(self, samples: Sequence[Sample]) -> list[int]:
        """Each sample's row in ``ids``; every one must have a row."""
        from zoo.errors import UserInputError

        row = {sample_id: i for i, sample_id in enumerate(self.ids)}
        missing = [s.id for s in samples if s.id not in row]
        if missing:
            raise UserInputError(f"{len(missing)} training image(s) have no teacher targets, e.g. {missing[0]}; the teacher's "
                                 "targets were computed for other images: run `zoo distill` again into a new --out")
        return [row[s.id] for s in samples]
