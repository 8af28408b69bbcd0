"""The image processor against Meta's `VariableSizeImageTransform` (bit for bit), its inputs, errors and save/load."""

from __future__ import annotations

import base64
import http.server
import io
import json
import re
import struct
import threading
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from modeling_llama4.image_processing_llama4 import Llama4ImageProcessor, best_tile_grid

preprocess = pytest.importorskip("llama_models.llama4.preprocess")
chat_format = pytest.importorskip("llama_models.llama4.chat_format")

TILE = 56  # small tiles keep the 16-tile canvases cheap; the algorithm does not depend on the tile size

SIZES = [
    (1, 1),
    (3, 5),
    (1, 1000),
    (1000, 1),
    (56, 112),  # exactly 1 x 2 tiles
    (224, 224),  # exactly 4 x 4 tiles
    (55, 57),
    (100, 37),
    (300, 200),
    (12, 700),
    (2000, 3000),
]
MODES = ["RGB", "RGBA", "L", "P", "CMYK", "LA", "1", "I;16", "P+transparency"]


def make_image(height: int, width: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Seeded noise (the hardest content for a resize to agree on) in any PIL mode."""
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 2**16, (height, width), dtype=np.uint16))
    image = Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA")
    if mode == "P+transparency":
        image = image.convert("P")
        image.info["transparency"] = 0
        return image
    return image if mode == "RGBA" else image.convert(mode)


def meta_pixels(
    image: Image.Image, tile_size: int, max_patches: int = 16, resize_to_max_canvas: bool = False
) -> tuple[torch.Tensor, tuple[int, int]]:
    """What Meta's `ChatFormat._encode_content` makes of one image: its tiles, then a global view if several."""
    image = chat_format.convert_image_to_rgb(image.copy())
    tiles, grid = preprocess.VariableSizeImageTransform(tile_size)(
        image, max_num_chunks=max_patches, resize_to_max_canvas=resize_to_max_canvas
    )
    if tiles.shape[0] > 1:
        global_view = preprocess.ResizeNormalizeImageTransform(tile_size, tile_size)(image)
        tiles = torch.cat([tiles, global_view[None]])
    return tiles, grid


@pytest.fixture(scope="module")
def processor() -> Llama4ImageProcessor:
    return Llama4ImageProcessor(size={"height": TILE, "width": TILE})


def assert_matches_meta(output, image: Image.Image, tile_size: int = TILE, **meta_kwargs) -> None:
    tiles, grid = meta_pixels(image, tile_size, **meta_kwargs)
    assert output["aspect_ratios"].tolist() == [list(grid)]
    assert output["pixel_values"].dtype == torch.float32
    assert torch.equal(output["pixel_values"], tiles)


# Parity with Meta.


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("height", "width"), SIZES)
def test_matches_meta(processor, height, width, mode):
    image = make_image(height, width, mode, seed=height * 7 + width)
    assert_matches_meta(processor(image), image)


@pytest.mark.parametrize(("height", "width"), [(336, 672), (480, 640), (1344, 1344), (4000, 100), (17, 2500)])
def test_matches_meta_at_full_tile_size(height, width):
    image = make_image(height, width, seed=1)
    assert_matches_meta(Llama4ImageProcessor()(image), image, tile_size=336)


@pytest.mark.parametrize("max_patches", [1, 2, 5, 9])
@pytest.mark.parametrize("resize_to_max_canvas", [False, True])
def test_matches_meta_with_other_tilings(processor, max_patches, resize_to_max_canvas):
    for height, width in [(30, 200), (150, 90), (500, 500), (7, 7)]:
        image = make_image(height, width, seed=width)
        output = processor(image, max_patches=max_patches, resize_to_max_canvas=resize_to_max_canvas)
        assert_matches_meta(output, image, max_patches=max_patches, resize_to_max_canvas=resize_to_max_canvas)


def test_tile_grid_matches_meta_for_many_shapes():
    """The canvas choice alone, over a grid of shapes around tile multiples and extreme aspect ratios."""
    meta = preprocess.VariableSizeImageTransform(TILE)
    resolutions = torch.tensor(meta.find_supported_resolutions(max_num_chunks=16, patch_size=TILE))
    lengths = [1, 2, 27, 28, 55, 56, 57, 111, 112, 113, 167, 168, 200, 224, 225, 400, 897, 5000]
    for height in lengths:
        for width in lengths:
            canvas_width, canvas_height = meta.get_best_fit((width, height), resolutions)
            assert best_tile_grid((width, height), TILE, 16) == (canvas_height // TILE, canvas_width // TILE)


# Batches and input types.


def test_batch_concatenates_images_in_order(processor):
    images = [make_image(300, 200, seed=0), make_image(20, 20, seed=1), make_image(50, 400, "RGBA", seed=2)]
    output = processor(images)
    expected = [meta_pixels(image, TILE) for image in images]
    assert torch.equal(output["pixel_values"], torch.cat([tiles for tiles, _ in expected]))
    assert output["aspect_ratios"].dtype == torch.long
    assert output["aspect_ratios"].tolist() == [list(grid) for _, grid in expected]


def test_nested_batch_and_repeated_image_are_flattened(processor):
    first, second = make_image(90, 60, seed=3), make_image(200, 120, seed=4)
    flat = processor([first, second, first])
    nested = processor([[first, second], [first]])
    assert torch.equal(nested["pixel_values"], flat["pixel_values"])
    assert nested["aspect_ratios"].tolist() == flat["aspect_ratios"].tolist()


def test_arrays_and_tensors_equal_the_pil_image(processor):
    rgb = np.random.default_rng(5).integers(0, 256, (70, 130, 3), dtype=np.uint8)
    rgba = np.random.default_rng(6).integers(0, 256, (70, 130, 4), dtype=np.uint8)
    expected_rgb = processor(Image.fromarray(rgb))["pixel_values"]
    expected_gray = processor(Image.fromarray(rgb[..., 0]))["pixel_values"]
    expected_rgba = processor(Image.fromarray(rgba))["pixel_values"]
    chw = torch.from_numpy(rgb).permute(2, 0, 1)
    same_as_rgb = [
        rgb,
        rgb.astype(np.float32) / 255,
        rgb.astype(np.float64) / 255,
        np.moveaxis(rgb, -1, 0),  # CxHxW array: the last axis cannot be channels
        chw,
        chw.float() / 255,
        chw[None],  # a stacked batch of one
    ]
    for image in same_as_rgb:
        assert torch.equal(processor(image)["pixel_values"], expected_rgb), type(image)
    for image in [rgb[..., 0], rgb[..., :1], torch.from_numpy(rgb[..., 0]), chw[:1]]:
        assert torch.equal(processor(image)["pixel_values"], expected_gray)
    for image in [rgba, torch.from_numpy(rgba).permute(2, 0, 1)]:
        assert torch.equal(processor(image)["pixel_values"], expected_rgba)


def test_paths_and_bytes_equal_the_pil_image(processor, tmp_path):
    image = make_image(80, 150, "RGBA", seed=7)
    path = tmp_path / "image.png"
    image.save(path)
    expected = processor(image)["pixel_values"]
    for source in [path, str(path), path.read_bytes()]:
        assert torch.equal(processor(source)["pixel_values"], expected)


def test_return_tensors_and_defaults(processor):
    image = make_image(40, 90, seed=8)
    as_numpy = processor(image, return_tensors="np")
    assert isinstance(as_numpy["pixel_values"], np.ndarray) and as_numpy["pixel_values"].dtype == np.float32
    assert np.array_equal(as_numpy["pixel_values"], processor(image, return_tensors="pt")["pixel_values"].numpy())
    default = Llama4ImageProcessor()
    assert default.size["height"] == default.size["width"] == 336
    assert default.max_patches == 16
    assert default(image)["pixel_values"].shape == (1, 3, 336, 336)


def test_threads_do_not_change_the_result(processor):
    images = [make_image(300, 500, seed=seed) for seed in range(4)]
    threaded = processor(images)["pixel_values"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        serial = processor(images)["pixel_values"]
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(threaded, serial)


# Errors.


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("bad_image", "message"),
    [
        ("no/such/image.png", "does not exist"),
        ({"image": "x"}, "got dict"),
        (None, "got NoneType"),
        (3.5, "got float"),
        ([[make_image(5, 5)]], "got list"),  # nested two levels deep
        (b"definitely not an image", "not a readable image"),
        (png_bytes(make_image(64, 64))[:200], "cannot be decoded"),  # truncated
        (Image.new("RGB", (0, 7)), "empty"),
        (np.zeros((0, 5, 3), dtype=np.uint8), "empty"),
        (np.zeros((5, 5, 2), dtype=np.uint8), "1, 3 or 4 channels"),
        (np.zeros((5, 5, 5), dtype=np.uint8), "1, 3 or 4 channels"),
        (np.zeros((5, 5), dtype=np.uint16), "uint8 or float"),
        (np.full((5, 5, 3), 2.0), r"\[0, 1\]"),
        (np.full((5, 5, 3), np.nan, dtype=np.float32), r"\[0, 1\]"),
        (np.zeros((1, 2, 5, 5, 3), dtype=np.uint8), "2-D or 3-D"),
    ],
)
def test_bad_image_raises_value_error_naming_it(processor, monkeypatch, bad_image, message):
    # Meta's preprocess.py sets this PIL-wide flag on import; without it PIL raises on truncated data.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)
    with pytest.raises(ValueError, match=message) as error:
        processor([make_image(10, 10), bad_image])
    assert "Image 1 of the batch" in str(error.value)


def test_truncated_and_corrupt_files_raise_value_error(processor, monkeypatch, tmp_path):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)
    buffer = io.BytesIO()
    make_image(200, 200, seed=9).save(buffer, format="JPEG")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(buffer.getvalue()[:2000])
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    for path, message in [(truncated, "cannot be decoded"), (not_an_image, "not a readable image")]:
        with pytest.raises(ValueError, match=message):
            processor(str(path))


def test_image_over_max_image_pixels_is_rejected_before_decoding(monkeypatch, tmp_path):
    processor = Llama4ImageProcessor(size={"height": TILE, "width": TILE}, max_image_pixels=50 * 50)
    processor(make_image(50, 50))
    with pytest.raises(ValueError, match="max_image_pixels"):
        processor(make_image(50, 51))
    with pytest.raises(ValueError, match="max_image_pixels"):
        processor(np.zeros((100, 100, 3), dtype=np.uint8))
    path = tmp_path / "big.png"
    make_image(60, 60).save(path)
    opened = Image.open(path)
    with pytest.raises(ValueError, match="max_image_pixels"):
        processor(opened)
    assert opened.tile  # still not decoded
    # PIL's own decompression-bomb error (above 2 x PIL.Image.MAX_IMAGE_PIXELS) also becomes a ValueError.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ValueError, match="too large for PIL"):
        Llama4ImageProcessor()(str(path))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": {"height": 56, "width": 112}}, "square"),
        ({"max_patches": 0}, "max_patches"),
        ({"max_image_pixels": 0}, "max_image_pixels"),
        ({"do_resize": False}, "do_resize"),
        ({"do_convert_rgb": False}, "do_convert_rgb"),
    ],
)
def test_unsupported_settings_raise(processor, kwargs, message):
    with pytest.raises(ValueError, match=message):
        processor(make_image(10, 10), **kwargs)


def test_empty_batch_raises(processor):
    with pytest.raises(ValueError, match="No images"):
        processor([])


# Save / load.


def test_save_and_load_keep_the_settings(tmp_path):
    processor = Llama4ImageProcessor(size={"height": 28, "width": 28}, max_patches=4, max_image_pixels=10**6)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "Llama4ImageProcessor"
    assert saved["size"] == {"height": 28, "width": 28} and saved["max_patches"] == 4
    loaded = Llama4ImageProcessor.from_pretrained(tmp_path)
    assert loaded.size["height"] == loaded.size["width"] == 28
    assert (loaded.max_patches, loaded.max_image_pixels) == (4, 10**6)
    image = make_image(100, 40, seed=10)
    assert torch.equal(loaded(image)["pixel_values"], processor(image)["pixel_values"])


def test_loads_the_config_transformers_writes(tmp_path):
    """Official checkpoints carry the built-in processor's `preprocessor_config.json`; it must load unchanged."""
    from transformers.models.llama4 import Llama4ImageProcessor as BuiltinImageProcessor

    BuiltinImageProcessor(size={"height": 56, "width": 56}, max_patches=9).save_pretrained(tmp_path)
    loaded = Llama4ImageProcessor.from_pretrained(tmp_path)
    assert (loaded.size["height"], loaded.max_patches) == (56, 9)
    image = make_image(300, 100, seed=11)
    assert_matches_meta(loaded(image), image, max_patches=9)


def test_auto_image_processor_gives_ours(tmp_path):
    from transformers import AutoImageProcessor
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING

    import modeling_llama4  # noqa: F401  (registers the Auto classes)

    registered = [cls for mapping in IMAGE_PROCESSOR_MAPPING._extra_content.values() for cls in mapping.values()]
    if Llama4ImageProcessor not in registered:
        pytest.skip("modeling_llama4 does not register Llama4ImageProcessor with AutoImageProcessor yet")
    Llama4ImageProcessor(size={"height": 28, "width": 28}).save_pretrained(tmp_path)
    assert type(AutoImageProcessor.from_pretrained(tmp_path)) is Llama4ImageProcessor


# transformers' built-in processor, for reference.


@pytest.mark.parametrize(
    ("height", "width"),
    [
        (56, 112),
        (20, 20),
        (1000, 90),
        pytest.param(
            300,
            200,
            marks=pytest.mark.xfail(
                reason="the built-in computes the resize scale in float32 and resizes to 251 rows, Meta to 252",
                strict=False,
            ),
        ),
    ],
)
def test_builtin_processor_is_close_to_meta(height, width):
    """The built-in picks the same tiles, but resizes tensors with torchvision and normalises in bfloat16."""
    from transformers.models.llama4 import Llama4ImageProcessor as BuiltinImageProcessor

    image = make_image(height, width, seed=height)
    tiles, grid = meta_pixels(image, TILE)
    output = BuiltinImageProcessor(size={"height": TILE, "width": TILE})(image, return_tensors="pt")
    assert output["aspect_ratios"].tolist() == [list(grid)]
    difference = (output["pixel_values"].float() - tiles).abs()
    assert difference.max() < 0.02 and difference.mean() < 0.005


def test_chat_image_path_over_max_image_pixels_is_rejected_before_decoding(monkeypatch, tmp_path):
    """A chat's `{"type": "image", "path"}` part is checked by its header: the 13000 x 13000 PNG is never decoded."""
    from modeling_llama4 import build_processor

    path = tmp_path / "huge.png"
    Image.new("L", (13_000, 13_000)).save(path)
    processor = build_processor(tile_size=TILE)

    def refuse_decoding(image):
        raise AssertionError("the image was decoded before its size was checked")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse_decoding)
    messages = [{"role": "user", "content": [{"type": "image", "path": str(path)}, {"type": "text", "text": "?"}]}]
    with pytest.raises(ValueError, match=r"13000x13000 = 169000000 pixels, more than `max_image_pixels` = 100000000"):
        processor.apply_chat_template(messages, tokenize=True, return_dict=True)


# Image sources of a chat (`{"type": "image", "url" | "path" | "base64" | "image"}`): the header is checked first.


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares its size and holds no pixel data: opening it reads the size, decoding it fails."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def chat_processor():
    from modeling_llama4 import build_processor

    return build_processor(tile_size=TILE)


@pytest.fixture
def http_server():
    """`serve(path, body)` → a URL on a local HTTP server (127.0.0.1, this test only) that answers with ``body``
    (without a body: a URL that answers 404)."""
    bodies: dict[str, bytes] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = bodies.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def serve(path: str, body: bytes | None = None) -> str:
        if body is not None:
            bodies[path] = body
        return f"http://127.0.0.1:{server.server_address[1]}{path}"

    yield serve
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@pytest.mark.parametrize("source", ["data_url", "base64", "url", "path", "pil"])
def test_huge_chat_image_is_refused_by_its_header_from_every_source(
    source, chat_processor, monkeypatch, tmp_path, http_server
):
    """A 13000 x 13000 image is refused before any pixel is decoded, whichever way the chat gives it."""
    huge = png_header(13_000, 13_000)
    (tmp_path / "huge.png").write_bytes(huge)
    parts = {
        "data_url": lambda: {"url": data_url(huge)},
        "base64": lambda: {"base64": base64.b64encode(huge).decode()},
        "url": lambda: {"url": http_server("/huge.png", huge)},
        "path": lambda: {"path": str(tmp_path / "huge.png")},
        "pil": lambda: {"image": Image.open(io.BytesIO(huge))},
    }
    with warnings.catch_warnings():  # PIL warns on opening an image this large; the processor then refuses it
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        part = parts[source]()

    def refuse_decoding(image):
        raise AssertionError("the image was decoded before its size was checked")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse_decoding)
    messages = [{"role": "user", "content": [{"type": "image", **part}, {"type": "text", "text": "?"}]}]
    with pytest.raises(ValueError, match=r"13000x13000 = 169000000 pixels, more than `max_image_pixels`"):
        chat_processor.apply_chat_template(messages, tokenize=True, return_dict=True)


def test_data_url_base64_and_url_equal_the_pil_image(processor, http_server):
    image = make_image(80, 150, "RGBA", seed=7)
    expected = processor(image)["pixel_values"]
    encoded = png_bytes(image)
    for source in [data_url(encoded), base64.b64encode(encoded).decode(), http_server("/a.png", encoded)]:
        assert torch.equal(processor(source)["pixel_values"], expected)


def test_url_reads_at_most_max_url_bytes(processor, http_server, monkeypatch):
    from modeling_llama4 import image_processing_llama4

    monkeypatch.setattr(image_processing_llama4, "MAX_URL_BYTES", 1000)
    url = http_server("/big.png", png_bytes(make_image(100, 100, seed=3)))
    with pytest.raises(ValueError, match=rf"image URL '{re.escape(url)}' holds more than 1,000 bytes"):
        processor(url)
    missing = http_server("/other.png", b"").replace("/other.png", "/missing.png")
    with pytest.raises(ValueError, match=rf"image URL '{re.escape(missing)}' could not be fetched \(HTTP Error 404"):
        processor(missing)


@pytest.mark.parametrize(
    "source, message",
    [
        (Image.open(io.BytesIO(png_header(20, 20))), r"Image 0 of the batch: the image data cannot be decoded"),
        (data_url(png_header(20, 20)[:30]), r"data URL 'data:image/png;base64,.*' is not a readable image"),
        (base64.b64encode(b"not an image").decode(), r"base64 string 'bm90IGFuIGltYWdl' is not a readable image"),
        ("data:image/png,rawbytes", r"data URL 'data:image/png,rawbytes' is not base64-encoded"),
        ("data:image/png;base64,@@@", r"data URL 'data:image/png;base64,@@@' holds invalid base64"),
    ],
    ids=["header-only PIL image", "header-only data URL", "base64 of text", "data URL not base64", "bad base64"],
)
def test_unreadable_sources_raise_value_error_naming_them(processor, monkeypatch, source, message):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)
    with pytest.raises(ValueError, match=message):
        processor(source)
