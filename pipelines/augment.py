"""Augmentations of the Fashion-MNIST job, for :class:`kdcache.data.views.AugmentedViews`.

An augmentation is an object with ``draw(rng, **kwargs) -> int64 [R, P]`` (parameters
from a :class:`kdcache.data.views.ViewRandom`) and ``apply(images, params, **kwargs)``
(vectorised numpy); it is named by import path, e.g.
``Augmentation("pipelines.augment:shift_flip", {"max_shift": 2})``.

Shape legend: R images, H x W pixels, P parameters.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class ShiftFlip:
    """Random translation by up to ``max_shift`` pixels on each axis (zero fill) and a
    horizontal flip with probability 1/2: the standard light augmentation of small-image
    classification (e.g. He et al., "Deep Residual Learning", CVPR 2016, sec. 4.2, with
    zero padding in place of their 4-pixel pad and crop).

    Parameters per image (P = 3): ``dy``, ``dx`` in ``-max_shift..max_shift`` (the image
    moves down / right by that many pixels) and ``flip`` in {0, 1} (mirror left-right
    first, then shift).
    """

    def draw(self, rng: Any, *, max_shift: int = 2, flip: bool = True) -> np.ndarray:
        """int64 [R, 3]: (dy, dx, flip) per image, three draws of ``rng``.

        Raises:
            ValueError: ``max_shift`` < 0.
        """
        if max_shift < 0:
            raise ValueError(f"max_shift must be >= 0, got {max_shift}")
        dy = rng.integers(-max_shift, max_shift + 1)
        dx = rng.integers(-max_shift, max_shift + 1)
        flips = rng.integers(0, 2) if flip else np.zeros(rng.num_rows, np.int64)
        return np.stack([dy, dx, flips], axis=1).astype(np.int64)

    def apply(
        self, images: np.ndarray, params: np.ndarray, *, max_shift: int = 2, flip: bool = True
    ) -> np.ndarray:
        """Shift and flip each image by its parameters.

        Args:
            images: [R, H, W] any dtype (uint8 pixels here); may be read-only.
            params: int64 [R, 3] from :meth:`draw` (|dy|, |dx| <= max_shift).

        Returns:
            A new array [R, H, W] of the images' dtype; pixels shifted in from outside
            are 0.

        Raises:
            ValueError: images are not [R, H, W], params not [R, 3], or a shift exceeds
                ``max_shift``.
        """
        images = np.asarray(images)
        params = np.asarray(params, dtype=np.int64)
        if images.ndim != 3 or params.shape != (len(images), 3):
            raise ValueError(
                f"expected images [R, H, W] and params [R, 3], got {images.shape} and "
                f"{params.shape}"
            )
        s = int(max_shift)
        if len(params) and int(np.abs(params[:, :2]).max()) > s:
            raise ValueError(f"a shift in params exceeds max_shift={s}")
        r, h, w = images.shape
        padded = np.zeros((r, h + 2 * s, w + 2 * s), images.dtype)
        padded[:, s : s + h, s : s + w] = images
        dy, dx, flips = params[:, 0], params[:, 1], params[:, 2].astype(bool)
        rows = np.arange(h)[None, :] - dy[:, None] + s  # [R, H]
        x = np.arange(w)[None, :] - dx[:, None]  # [R, W], source column before the flip
        cols = np.where(flips[:, None], w - 1 - x, x) + s
        return padded[np.arange(r)[:, None, None], rows[:, :, None], cols[:, None, :]]


#: The Fashion-MNIST augmentation: ``Augmentation("pipelines.augment:shift_flip", ...)``.
shift_flip = ShiftFlip()
