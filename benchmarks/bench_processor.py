"""Processor speed: our tokenizer vs Meta's (tiktoken), our image processor vs transformers', same inputs, same run.

Tokenizer: encode throughput (MB/s of UTF-8 text) on a few MB of mixed text (Python source and English prose from
the installed transformers package, plus seeded multilingual text with digits and emoji), cut into documents. Two
comparisons: the user-facing calls (`tokenizer(docs)` vs Meta's `Tokenizer.encode` per document) and the bare
batch encoders (`tokenizers` `encode_batch` vs tiktoken `encode_ordinary_batch`). The ids are checked equal.

Image processor: images/s of `modeling_llama4.image_processing_llama4.Llama4ImageProcessor` vs transformers'
`Llama4ImageProcessor` (torchvision backend) on the same PIL images (336 px tiles, up to 16 tiles).

Ratios are ours/theirs in throughput: > 1 means we are faster.

    python benchmarks/bench_processor.py [--mb 3] [--images 16] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image
from timing import best_times, timed

from modeling_llama4.image_processing_llama4 import Llama4ImageProcessor as OurImageProcessor
from modeling_llama4.tokenization_llama4 import build_tokenizer, default_tokenizer_model_path

SENTENCES = [
    "The committee will publish its final report on the 3rd of March, after 1,250 interviews.",
    "Le gouvernement a annoncé une réforme des retraites très contestée à Paris.",
    "Die Ergebnisse der Studie wurden im Jahr 2024 in einer Fachzeitschrift veröffentlicht.",
    "El tren de alta velocidad conecta Madrid y Barcelona en menos de tres horas.",
    "Москва является крупнейшим городом России по численности населения.",
    "東京は日本の首都であり、世界で最も人口の多い都市圏の一つです。",
    "北京是中国的首都，也是全国的政治和文化中心。",
    "서울은 대한민국의 수도이며 한강이 도시를 가로질러 흐릅니다.",
    "القاهرة هي عاصمة مصر وأكبر مدينة في العالم العربي.",
    "भारत की राजधानी नई दिल्ली है और यह एक बहुत बड़ा शहर है।",
    "Η Αθήνα είναι η πρωτεύουσα της Ελλάδας και μία από τις αρχαιότερες πόλεις.",
    "Launch at 09:45 🚀, coffee ☕ x3, total = 4,096.75 USD (+12.5%) ✅",
]


def build_corpus(megabytes: float, seed: int = 0) -> list[str]:
    """About `megabytes` MB of documents: two thirds transformers' own source files, one third multilingual text."""
    budget = int(megabytes * 1e6)
    documents, size = [], 0
    for path in sorted(Path(transformers.__file__).parent.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        documents.append(text)
        size += len(text.encode())
        if size >= budget * 2 // 3:
            break
    rng = random.Random(seed)
    while size < budget:
        paragraph = " ".join(rng.choice(SENTENCES) for _ in range(rng.randint(3, 12)))
        document = "\n\n".join(paragraph for _ in range(rng.randint(1, 4)))
        documents.append(document)
        size += len(document.encode())
    return documents


def bench_tokenizer(megabytes: float, repeats: int) -> None:
    from llama_models.llama4.tokenizer import Tokenizer

    documents = build_corpus(megabytes)
    size_mb = sum(len(d.encode()) for d in documents) / 1e6
    ours = build_tokenizer(default_tokenizer_model_path())
    meta = Tokenizer(default_tokenizer_model_path())
    print(f"tokenizer: {len(documents)} documents, {size_mb:.2f} MB")

    ours_ids = ours(documents, add_special_tokens=False)["input_ids"]
    meta_ids = [meta.encode(d, bos=False, eos=False) for d in documents]
    mismatches = sum(a != b for a, b in zip(ours_ids, meta_ids))
    print(f"  ids equal to Meta's on {len(documents) - mismatches}/{len(documents)} documents")

    rows = [
        (
            "tokenizer(docs) vs Meta Tokenizer.encode",
            lambda: ours(documents, add_special_tokens=False),
            lambda: [meta.encode(d, bos=False, eos=False) for d in documents],
        ),
        (
            "tokenizers encode_batch vs tiktoken encode_ordinary_batch",
            lambda: ours.backend_tokenizer.encode_batch(documents, add_special_tokens=False),
            lambda: meta.model.encode_ordinary_batch(documents),
        ),
    ]
    for name, ours_fn, theirs_fn in rows:
        ours_mbs, theirs_mbs = (size_mb / t for t in best_times([timed(ours_fn), timed(theirs_fn)], repeats))
        print(f"  {name}: ours {ours_mbs:.2f} MB/s, theirs {theirs_mbs:.2f} MB/s, ratio {ours_mbs / theirs_mbs:.2f}")


def bench_image_processor(num_images: int, repeats: int) -> None:
    from transformers.models.llama4 import Llama4ImageProcessor as TheirImageProcessor

    rng = np.random.default_rng(0)
    images = []
    for _ in range(num_images):
        height, width = (int(n) for n in rng.integers(200, 1400, size=2))
        images.append(Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)))
    size = {"height": 336, "width": 336}
    ours = OurImageProcessor(size=size, max_patches=16)
    theirs = TheirImageProcessor(size=size, max_patches=16)
    ours_out, theirs_out = ours(images, return_tensors="pt"), theirs(images, return_tensors="pt")
    same_grid = torch.equal(ours_out["aspect_ratios"], theirs_out["aspect_ratios"])
    tiles = ours_out["pixel_values"].shape[0]
    print(f"image processor: {num_images} images, {tiles} tiles of 336 px, same tile grids: {same_grid}")
    ours_ips, theirs_ips = (
        num_images / t
        for t in best_times(
            [timed(lambda: ours(images, return_tensors="pt")), timed(lambda: theirs(images, return_tensors="pt"))],
            repeats,
        )
    )
    print(f"  images/s: ours {ours_ips:.1f}, transformers {theirs_ips:.1f}, ratio {ours_ips / theirs_ips:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--mb", type=float, default=3.0, help="size of the text corpus in MB")
    parser.add_argument("--images", type=int, default=16, help="number of images")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (best is kept)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, torch threads {args.threads}")
    bench_tokenizer(args.mb, args.repeats)
    bench_image_processor(args.images, args.repeats)


if __name__ == "__main__":
    main()
