# Copyright 2026 The modeling_llama4 Authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Image processor for Llama 4: Meta's variable-size tiling, pixel for pixel.

Each image is fitted without distortion into the best canvas of `rows x cols` tiles (`rows * cols <= max_patches`),
padded with black at the bottom and right, normalised and cut into tiles row by row. An image that takes more than
one tile also gets a global view, the whole image squeezed into one tile, after its tiles.

This is `VariableSizeImageTransform` (`llama_models/llama4/preprocess.py`) plus the RGB conversion and global view
of Meta's `ChatFormat` (`chat_format.py`), with the same arithmetic: Meta hands PIL images to torchvision, which
resizes them with `PIL.Image.resize`, so resizing here is PIL's bilinear filter on the 8-bit RGB image and
torchvision is not needed. The output equals Meta's bit for bit. transformers' built-in processor picks the same
tiles but normalises in bfloat16 (pixels off by up to ~1/255) and computes the resize scale in float32, which for
some shapes resizes to one row or column fewer than Meta.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
import urllib.request
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache, partial

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.image_utils import PILImageResampling, SizeDict
from transformers.processing_utils import ImagesKwargs, Unpack
from transformers.utils import TensorType

__all__ = ["Llama4ImageProcessor", "Llama4ImageProcessorKwargs"]

ImageLike = Image.Image | np.ndarray | torch.Tensor | str | os.PathLike | bytes

# Channel counts an array may have: grayscale, RGB, RGBA.
_ARRAY_CHANNELS = (1, 3, 4)
# Most bytes read from an image URL, and the seconds to wait for them: a compressed image this large is far past
# what the tiles can show, and the download stops there instead of filling memory.
MAX_URL_BYTES = 64 * 2**20
URL_TIMEOUT_S = 30.0


class Llama4ImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    max_patches (`int`, *optional*, defaults to 16):
        The most tiles an image is cut into (Meta's `max_num_chunks`), not counting the global view.
    resize_to_max_canvas (`bool`, *optional*, defaults to `False`):
        Pick the canvas that allows the largest upscaling instead of the smallest one, and do not cap upscaling at
        the tile size. Meta's chat format leaves this off.
    max_image_pixels (`int`, *optional*, defaults to 100_000_000):
        Images with more pixels (width x height) than this are rejected before they are decoded, as a guard
        against decompression bombs.
    """

    max_patches: int
    resize_to_max_canvas: bool
    max_image_pixels: int


class Llama4ImageProcessor(BaseImageProcessor):
    r"""
    Llama 4 image processor: splits each image into tiles of `size` pixels plus a global view, as Meta does.

    Returns a `BatchFeature` with
    - `pixel_values`: float32 `[total_tiles, 3, tile, tile]`, every image's tiles in order; an image split into
      `rows x cols > 1` tiles contributes `rows * cols` tiles, row by row, then its global view; a one-tile image
      contributes that tile alone.
    - `aspect_ratios`: int64 `[num_images, 2]`, the `(rows, cols)` tile grid of each image.

    Inputs may be PIL images of any mode, numpy arrays (`HxWxC` or `HxW`), torch tensors (`CxHxW` or `HxW`),
    uint8 or float in [0, 1], paths to image files or encoded image bytes: one image, a list of images, or a list
    of lists (one per sample, flattened in order). RGBA is composited on white, every other mode goes through
    `PIL.Image.convert("RGB")` (Meta's `convert_image_to_rgb`). EXIF orientation is not applied, as in Meta's.

    Args:
        size (`dict[str, int]`, *optional*, defaults to `{"height": 336, "width": 336}`):
            The tile size; must be square (Meta's `vision_args.image_size`).
        max_patches (`int`, *optional*, defaults to 16):
            The most tiles an image is cut into, not counting the global view.
        resize_to_max_canvas (`bool`, *optional*, defaults to `False`):
            See [`Llama4ImageProcessorKwargs`].
        max_image_pixels (`int`, *optional*, defaults to 100_000_000):
            Largest accepted image, in pixels (10,000 x 10,000); larger ones raise a `ValueError` before decoding.
        resample (`PILImageResampling`, *optional*, defaults to `BILINEAR`):
            PIL filter for both resizes (Meta: bilinear).
        do_rescale (`bool`, *optional*, defaults to `True`), rescale_factor (`float`, *optional*, defaults to 1/255):
            Rescale 8-bit pixels to [0, 1]: divides by `1 / rescale_factor`, as `ToTensor` divides by 255.
        do_normalize (`bool`, *optional*, defaults to `True`), image_mean, image_std (defaults to 0.5 each):
            Normalise each channel to `(x - mean) / std`.
    """

    valid_kwargs = Llama4ImageProcessorKwargs
    model_input_names = ["pixel_values"]

    size = {"height": 336, "width": 336}
    max_patches = 16
    resize_to_max_canvas = False
    max_image_pixels = 100_000_000
    resample = PILImageResampling.BILINEAR
    do_resize = True
    do_convert_rgb = True
    do_rescale = True
    do_normalize = True
    image_mean = [0.5, 0.5, 0.5]
    image_std = [0.5, 0.5, 0.5]

    def __init__(self, **kwargs: Unpack[Llama4ImageProcessorKwargs]):
        super().__init__(**kwargs)
        self._set_attributes(**kwargs)

    def preprocess(self, images: ImageLike | list, **kwargs: Unpack[Llama4ImageProcessorKwargs]) -> BatchFeature:
        """Tile one image or a batch; keyword arguments override the processor's settings for this call."""
        return super().preprocess(images, **kwargs)

    def fetch_images(self, image_url_or_urls):
        """Open every string source (path, http(s) URL, ``data:`` URL, base64) without decoding it.

        The base class decodes them in full here (for a chat's ``{"type": "image", "url" | "path" | "base64"}``
        parts and ``images=`` strings), before an oversized image could be refused by its header; `preprocess`
        checks ``max_image_pixels`` on the header first. Other entries are passed on and checked there.
        """
        if isinstance(image_url_or_urls, (list, tuple)):
            return [self.fetch_images(item) for item in image_url_or_urls]
        if isinstance(image_url_or_urls, str):
            return _open_image(image_url_or_urls)
        return image_url_or_urls

    def _validate_preprocess_kwargs(
        self,
        size: SizeDict | None = None,
        max_patches: int | None = None,
        resample: int | None = None,
        do_resize: bool | None = None,
        do_convert_rgb: bool | None = None,
        max_image_pixels: int | None = None,
        **kwargs,
    ):
        """Reject settings Meta's tiling cannot honour, before any image is touched."""
        super()._validate_preprocess_kwargs(size=size, resample=resample, do_resize=do_resize, **kwargs)
        if size.height is None or size.height != size.width:
            raise ValueError(f"Llama 4 tiles are square: `size` must be {{'height': S, 'width': S}}, got {size}")
        if not isinstance(max_patches, int) or max_patches < 1:
            raise ValueError(f"`max_patches` must be a positive integer, got {max_patches!r}")
        if not isinstance(max_image_pixels, int) or max_image_pixels < 1:
            raise ValueError(f"`max_image_pixels` must be a positive integer, got {max_image_pixels!r}")
        if not isinstance(resample, int):
            raise ValueError(f"`resample` must be a PIL resampling filter (`PILImageResampling`), got {resample!r}")
        if not do_resize:
            raise ValueError("Llama 4 always resizes images onto its tile canvas; `do_resize=False` is not supported")
        if do_convert_rgb is False:
            raise ValueError("Llama 4 always converts images to RGB; `do_convert_rgb=False` is not supported")

    def _prepare_image_like_inputs(self, images, *args, max_image_pixels: int, **kwargs) -> list[Image.Image]:
        """Flatten the batch and turn every entry into a decoded RGB PIL image, naming the entry that fails.

        Entries are decoded on threads, each distinct object once: an object repeated in the batch must not be
        lazily loaded by two threads at a time.
        """
        flat = _flatten_batch(images)
        if not flat:
            raise ValueError("No images were given")

        def load(index: int) -> Image.Image:
            try:
                return load_rgb_image(flat[index], max_image_pixels)
            except ValueError as error:
                raise ValueError(f"Image {index} of the batch: {error}") from error

        first_index = {}
        for index, image in enumerate(flat):
            first_index.setdefault(id(image), index)
        loaded = dict(zip(first_index, _thread_map(load, list(first_index.values()))))
        return [loaded[id(image)] for image in flat]

    def _preprocess(
        self,
        images: list[Image.Image],
        size: SizeDict,
        max_patches: int,
        resize_to_max_canvas: bool,
        resample: int,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: tuple[float, ...],
        image_std: tuple[float, ...],
        return_tensors: str | TensorType | None = None,
        device: str | torch.device | None = None,
        **kwargs,
    ) -> BatchFeature:
        """Tile every image into one preallocated `pixel_values` tensor."""
        tile_size = size.height
        max_upscaling = None if resize_to_max_canvas else tile_size
        grids = [best_tile_grid(image.size, tile_size, max_patches, resize_to_max_canvas) for image in images]
        num_tiles = [rows * cols + (rows * cols > 1) for rows, cols in grids]

        def to_pixel_values(pixels: torch.Tensor, out: torch.Tensor) -> None:
            _rescale_and_normalize(pixels, out, do_rescale, rescale_factor, do_normalize, image_mean, image_std)

        def write_tiles(image: Image.Image, rows: int, cols: int, out: torch.Tensor) -> None:
            tiles = _tile_without_distortion(image, rows, cols, tile_size, resample, max_upscaling)
            to_pixel_values(tiles, out.view(rows, cols, 3, tile_size, tile_size))

        def write_global_view(image: Image.Image, out: torch.Tensor) -> None:
            to_pixel_values(_global_view(image, tile_size, resample), out)

        # Each image gives one or two independent jobs, each writing its own slice of `pixel_values`. They run on
        # threads: PIL releases the GIL while resizing, which is most of the work.
        pixel_values = torch.empty(sum(num_tiles), 3, tile_size, tile_size)
        jobs = []
        for image, (rows, cols), out in zip(images, grids, pixel_values.split(num_tiles)):
            jobs.append(partial(write_tiles, image, rows, cols, out[: rows * cols]))
            if rows * cols > 1:
                jobs.append(partial(write_global_view, image, out[-1]))
        _thread_map(lambda job: job(), jobs)

        data = {"pixel_values": pixel_values, "aspect_ratios": torch.tensor(grids, dtype=torch.long)}
        if device is not None:
            data = {name: value.to(device) for name, value in data.items()}
        if return_tensors is None or TensorType(return_tensors) == TensorType.PYTORCH:
            return BatchFeature(data=data, tensor_type=TensorType.PYTORCH)
        return BatchFeature(
            data={name: value.cpu().numpy() for name, value in data.items()}, tensor_type=return_tensors
        )


# Tile grid and resized size: Meta's `find_supported_resolutions`, `get_best_fit`, `resize_without_distortion`.


@lru_cache(maxsize=16)
def _tile_grids(max_patches: int) -> torch.Tensor:
    """Every `(cols, rows)` with `cols * rows <= max_patches`, int64 `[N, 2]`, in Meta's order.

    Meta groups the grids by aspect ratio, larger tile counts first; the order decides which of two equally good
    canvases wins, so it is kept.
    """
    by_ratio: dict[float, list[tuple[int, int]]] = {}
    for count in range(max_patches, 0, -1):
        for cols in (c for c in range(1, count + 1) if count % c == 0):
            by_ratio.setdefault(cols / (count // cols), []).append((cols, count // cols))
    return torch.tensor([grid for grids in by_ratio.values() for grid in grids])


def best_tile_grid(
    image_size: tuple[int, int], tile_size: int, max_patches: int, resize_to_max_canvas: bool = False
) -> tuple[int, int]:
    """The `(rows, cols)` tile grid whose canvas fits a `(width, height)` image best (Meta's `get_best_fit`).

    Each canvas allows scaling the image by `min(canvas_width / width, canvas_height / height)` without distortion.
    The smallest such scale that is at least 1 wins (the largest with `resize_to_max_canvas`); if every canvas
    needs downscaling, the mildest downscaling wins. Ties go to the smallest canvas, which pads least. Scales are
    float32, as in Meta's code, so that float ties resolve the same way.
    """
    width, height = image_size
    grids = _tile_grids(max_patches)  # [N, 2] (cols, rows)
    canvases = grids * tile_size
    scales = torch.minimum(canvases[:, 0] / width, canvases[:, 1] / height)
    upscaling = scales[scales >= 1]
    if len(upscaling) > 0:
        selected = upscaling.max() if resize_to_max_canvas else upscaling.min()
    else:
        selected = scales.max()
    candidates = grids[scales == selected]
    cols, rows = candidates[torch.argmin(candidates[:, 0] * candidates[:, 1])].tolist()
    return rows, cols


def size_without_distortion(
    image_size: tuple[int, int], canvas_size: tuple[int, int], max_upscaling: int | None
) -> tuple[int, int]:
    """The `(width, height)` to resize a `(width, height)` image to so it fits the canvas with its aspect ratio.

    With `max_upscaling`, a side shorter than that is not stretched past it, so small images are upscaled at most
    to the tile size (Meta's `resize_without_distortion` and `get_max_res_without_distortion`).
    """
    width, height = image_size
    target_width, target_height = canvas_size
    if max_upscaling is not None:
        target_width = min(max(width, max_upscaling), target_width)
        target_height = min(max(height, max_upscaling), target_height)
    scale_w, scale_h = target_width / width, target_height / height
    if scale_w < scale_h:
        new_width, new_height = target_width, min(math.floor(height * scale_w), target_height)
    else:
        new_width, new_height = min(math.floor(width * scale_h), target_width), target_height
    return max(new_width, 1), max(new_height, 1)


# Pixels.


def _resize(image: Image.Image, size: tuple[int, int], resample: int) -> Image.Image:
    """`PIL.Image.resize`, skipped when the size already matches (as torchvision's `resize` does)."""
    return image if image.size == size else image.resize(size, resample)


def _tile_without_distortion(
    image: Image.Image, rows: int, cols: int, tile_size: int, resample: int, max_upscaling: int | None
) -> torch.Tensor:
    """Resize `image` onto a black canvas of `rows x cols` tiles, top left; uint8 view `[rows, cols, 3, S, S]`."""
    canvas_width, canvas_height = cols * tile_size, rows * tile_size
    resized_size = size_without_distortion(image.size, (canvas_width, canvas_height), max_upscaling)
    resized = _resize(image, resized_size, resample)
    canvas = np.zeros((canvas_height, canvas_width, 3), dtype=np.uint8)
    canvas[: resized.height, : resized.width] = np.asarray(resized)
    # [rows * S, cols * S, 3] -> [rows, cols, 3, S, S]: tiles row by row, channels first.
    return torch.from_numpy(canvas).view(rows, tile_size, cols, tile_size, 3).permute(0, 2, 4, 1, 3)


def _global_view(image: Image.Image, tile_size: int, resample: int) -> torch.Tensor:
    """The whole image squeezed into one tile (Meta's `ResizeNormalizeImageTransform`), uint8 `[3, S, S]`."""
    resized = _resize(image, (tile_size, tile_size), resample)
    return torch.from_numpy(np.array(resized)).permute(2, 0, 1)


def _rescale_and_normalize(
    pixels: torch.Tensor,
    out: torch.Tensor,
    do_rescale: bool,
    rescale_factor: float,
    do_normalize: bool,
    image_mean: tuple[float, ...],
    image_std: tuple[float, ...],
) -> None:
    """Write `(pixels / 255 - mean) / std` into the float32 `out`, channels at dim -3.

    The operations are those of torchvision's `ToTensor` (convert, then divide; not multiply by 1/255) and
    `Normalize`, so the float32 results are bit-identical to Meta's. Converting first and then working in place
    is also several times faster than dividing straight from the strided uint8 view.
    """
    out.copy_(pixels)
    if do_rescale:
        out.div_(1 / rescale_factor)
    if do_normalize:
        mean = torch.tensor(image_mean, dtype=out.dtype).view(-1, 1, 1)
        std = torch.tensor(image_std, dtype=out.dtype).view(-1, 1, 1)
        out.sub_(mean).div_(std)


def _thread_map(function: Callable, items: list) -> list:
    """`[function(item) for item in items]` on as many threads as torch uses; the first error is raised."""
    workers = min(len(items), torch.get_num_threads())
    if workers <= 1:
        return [function(item) for item in items]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(function, items))


# Inputs.


def _flatten_batch(images) -> list:
    """One image, a list of images, a list of per-sample lists, or a stacked 4-D array/tensor -> a flat list."""
    if isinstance(images, (list, tuple)):
        return [image for item in images for image in (item if isinstance(item, (list, tuple)) else [item])]
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return list(images)
    return [images]


def load_rgb_image(image: ImageLike, max_image_pixels: int) -> Image.Image:
    """Open, check, decode and convert one input to an RGB PIL image; `ValueError` on anything unusable.

    The size is checked before decoding, so an oversized file is rejected without being decompressed.
    """
    if isinstance(image, (str, os.PathLike, bytes)):
        image = _open_image(image)
    elif isinstance(image, (np.ndarray, torch.Tensor)):
        image = _array_to_image(image)
    elif not isinstance(image, Image.Image):
        raise ValueError(
            "expected a PIL image, a numpy array, a torch tensor, a path to an image file or encoded image bytes, "
            f"got {type(image).__name__}"
        )
    width, height = image.size
    if width == 0 or height == 0:
        raise ValueError(f"the image is empty ({width}x{height} pixels)")
    if width * height > max_image_pixels:
        raise ValueError(
            f"the image has {width}x{height} = {width * height} pixels, more than `max_image_pixels` = "
            f"{max_image_pixels}; raise `max_image_pixels` if the image is trusted"
        )
    try:
        image.load()
    except Exception as error:  # PIL raises OSError, SyntaxError, struct.error, ... on corrupt data
        raise ValueError(f"the image data cannot be decoded ({type(error).__name__}: {error})") from error
    return convert_to_rgb(image)


def convert_to_rgb(image: Image.Image) -> Image.Image:
    """RGBA composited on white; every other mode through `Image.convert("RGB")` (Meta's `convert_image_to_rgb`).

    Note that, as in Meta's code, only RGBA is composited: the alpha of LA, PA or a transparent palette is dropped.
    """
    if image.mode == "RGB":
        return image
    if image.mode == "RGBA":
        rgb = Image.new("RGB", image.size, (255, 255, 255))
        rgb.paste(image, mask=image.getchannel("A"))
        return rgb
    return image.convert("RGB")


def _open_image(source: str | os.PathLike | bytes) -> Image.Image:
    """Open (not decode) an image file, URL, ``data:`` URL, base64 string or encoded bytes; `ValueError` naming the
    source for anything PIL cannot identify."""
    file, description = _image_file(source)
    try:
        with warnings.catch_warnings():
            # Our `max_image_pixels` check runs right after opening and replaces PIL's warning threshold.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(file)
    except Image.DecompressionBombError as error:
        raise ValueError(f"{description} is too large for PIL ({error}); raise PIL.Image.MAX_IMAGE_PIXELS") from error
    except (OSError, SyntaxError) as error:  # includes PIL.UnidentifiedImageError
        raise ValueError(f"{description} is not a readable image ({error})") from error


def _image_file(source: str | os.PathLike | bytes) -> tuple[str | os.PathLike | io.BytesIO, str]:
    """What `Image.open` reads for ``source`` (a path, or the bytes in memory) and how errors name it.

    Strings are, in this order: an existing file, an ``http(s)://`` URL (at most `MAX_URL_BYTES` are read), a
    ``data:`` URL, or base64-encoded image bytes (as transformers' ``load_image`` reads them).
    """
    if isinstance(source, bytes):
        return io.BytesIO(source), f"{len(source)} bytes of image data"
    if not isinstance(source, str) or os.path.isfile(source):
        if not os.path.isfile(source):
            raise ValueError(f"file {os.fspath(source)!r} does not exist")
        return source, f"file {os.fspath(source)!r}"
    if source.startswith(("http://", "https://")):
        return io.BytesIO(_download(source)), f"image URL {source!r}"
    shown = source if len(source) <= 60 else f"{source[:40]}...{source[-10:]}"
    if source.startswith("data:"):
        header, _, payload = source.partition(",")
        if not header.endswith(";base64"):
            raise ValueError(f"data URL {shown!r} is not base64-encoded (expected 'data:image/...;base64,...')")
        return io.BytesIO(_decode_base64(payload, f"data URL {shown!r}")), f"data URL {shown!r}"
    try:
        data = base64.b64decode(source, validate=True)
    except binascii.Error:
        raise ValueError(
            f"file {shown!r} does not exist (strings are read as paths to image files, http(s) URLs, data: URLs "
            "or base64-encoded images)"
        ) from None
    return io.BytesIO(data), f"base64 string {shown!r}"


def _decode_base64(payload: str, description: str) -> bytes:
    try:
        return base64.b64decode(payload, validate=True)
    except binascii.Error as error:
        raise ValueError(f"{description} holds invalid base64 ({error})") from error


def _download(url: str) -> bytes:
    """The body of ``url``, refused when it holds more than `MAX_URL_BYTES` (read no further than that)."""
    try:
        with urllib.request.urlopen(url, timeout=URL_TIMEOUT_S) as response:
            data = response.read(MAX_URL_BYTES + 1)
    except (OSError, ValueError) as error:  # URLError, HTTPError, timeouts; ValueError: a malformed URL
        raise ValueError(f"image URL {url!r} could not be fetched ({error})") from error
    if len(data) > MAX_URL_BYTES:
        raise ValueError(f"image URL {url!r} holds more than {MAX_URL_BYTES:,} bytes, the most read for one image")
    return data


def _array_to_image(array: np.ndarray | torch.Tensor) -> Image.Image:
    """A numpy array (`HxWxC`, `HxW`) or tensor (`CxHxW`, `HxW`), uint8 or float in [0, 1], as a PIL image.

    Layouts are read as channels-last for arrays and channels-first for tensors, falling back to the other when
    the expected axis is not 1, 3 or 4 channels. Floats are rounded to the nearest 8-bit value, so `x / 255`
    round-trips exactly and the result equals processing the 8-bit image.
    """
    channels_first = isinstance(array, torch.Tensor)
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu()
        array = (array.float() if array.is_floating_point() else array).numpy()
    if array.ndim == 3:
        first, last = array.shape[0] in _ARRAY_CHANNELS, array.shape[-1] in _ARRAY_CHANNELS
        if first and (channels_first or not last):
            array = np.moveaxis(array, 0, -1)
        elif not last:
            raise ValueError(f"expected 1, 3 or 4 channels (HxWxC or CxHxW), got an array of shape {array.shape}")
        if array.shape[-1] == 1:
            array = array[..., 0]
    elif array.ndim != 2:
        raise ValueError(f"expected a 2-D or 3-D image array, got shape {tuple(array.shape)}")
    if array.size == 0:
        raise ValueError(f"the image is empty (array of shape {array.shape})")
    if np.issubdtype(array.dtype, np.floating):
        if not (np.isfinite(array).all() and array.min() >= 0 and array.max() <= 1):
            raise ValueError("float images must have values in [0, 1]")
        array = np.rint(array * 255).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ValueError(f"expected uint8 or float pixels, got {array.dtype}")
    return Image.fromarray(np.ascontiguousarray(array))
