"""Fine-tune Llama 4 with LoRA (per-expert LoRA on the routed experts) on a JSONL chat dataset, with Trainer.

Each line of the dataset is ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}, ...]}``.
Conversations are rendered with the tokenizer's chat template; the loss is on the assistant turns only (labels are
-100 elsewhere). The adapter (with the tokenizer or processor) is saved to ``OUTPUT/adapter``; it loads with plain
PEFT or transformers calls once ``modeling_llama4`` is imported (``PeftModel.from_pretrained``, ``load_adapter``)
and in ``examples/chat.py`` / ``llama4-demo`` with ``--adapter OUTPUT/adapter``.

``--merge`` also writes a merged checkpoint to ``OUTPUT/merged`` (in bf16 from an int4 base, dequantized first), and
with ``--requantize`` an int4 copy of it to ``OUTPUT/merged-int4``. The merged folder is an ordinary Llama 4
checkpoint: it opens in ``examples/chat.py``, ``llama4-demo`` and vLLM (``vllm serve OUTPUT/merged``).

End to end on the built-in tiny multimodal model and a generated dataset (24 training steps: 2-3 minutes on a
2-core CPU); without ``--output`` everything goes to a new temporary folder, named at the end::

    python examples/finetune_lora.py --model tiny --make-demo-data --output /tmp/lora --merge
    python examples/chat.py --model tiny --adapter /tmp/lora/adapter --prompt "What is the capital of Peru?"

On a checkpoint directory (HF layout, with its tokenizer), multimodal or text-only, bf16 or int4::

    python examples/finetune_lora.py --model path/to/Llama-4-Scout --data chat.jsonl --output out --dtype bfloat16

On several GPUs with FSDP2 (one unit per decoder layer; the adapter is gathered and written once)::

    accelerate launch --config_file examples/accelerate_fsdp2.yaml examples/finetune_lora.py --model ... --data ...
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

# torch, transformers and PEFT load in the functions that use them, so that ``--help`` answers at once.
if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger("finetune_lora")

TARGETS = ["experts", "q_proj", "k_proj", "v_proj", "o_proj", "shared_expert.gate_proj", "shared_expert.up_proj"]
TARGETS += ["shared_expert.down_proj"]
NOT_TARGETED = r".*vision_model.*"  # the vision tower's attention is also named q_proj, ...: leave it frozen
DTYPES = ["float32", "bfloat16"]
DEMO_DATA_FILE = "chat.jsonl"


def make_demo_data(path: Path, conversations: int = 64, seed: int = 0) -> None:
    """Write a small JSONL chat dataset: capital-city questions, some with a system prompt and a second turn."""
    capitals = {"France": "Paris", "Japan": "Tokyo", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo"}
    capitals |= {"Egypt": "Cairo", "Chile": "Santiago", "Canada": "Ottawa"}
    rng = random.Random(seed)
    with path.open("w") as file:
        for _ in range(conversations):
            country, other = rng.sample(sorted(capitals), 2)
            messages = [{"role": "system", "content": "Answer in one sentence."}] if rng.random() < 0.5 else []
            messages += [
                {"role": "user", "content": f"What is the capital of {country}?"},
                {"role": "assistant", "content": f"The capital of {country} is {capitals[country]}."},
            ]
            if rng.random() < 0.5:
                messages += [
                    {"role": "user", "content": f"And of {other}?"},
                    {"role": "assistant", "content": f"The capital of {other} is {capitals[other]}."},
                ]
            file.write(json.dumps({"messages": messages}) + "\n")


def render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], generation_prompt: bool = False) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_conversation(tokenizer: PreTrainedTokenizerBase, messages: list[dict], max_length: int) -> dict:
    """``input_ids`` of the whole conversation and ``labels`` equal to them on assistant turns, -100 elsewhere.

    Each assistant turn spans from the end of the conversation so far plus the generation prompt to the end of the
    conversation including that turn (the template renders every prefix as a prefix of the whole).
    """
    input_ids = render(tokenizer, messages)
    labels = [-100] * len(input_ids)
    for turn, message in enumerate(messages):
        if message["role"] == "assistant":
            start = len(render(tokenizer, messages[:turn], generation_prompt=True))
            end = len(render(tokenizer, messages[: turn + 1]))
            labels[start:end] = input_ids[start:end]
    return {"input_ids": input_ids[:max_length], "labels": labels[:max_length]}


def collate(pad_token_id: int):
    """Right-pad a batch: ``input_ids``/``attention_mask``/``labels`` ``[B, L]`` (labels -100 on padding)."""

    import torch

    def collate_fn(examples: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(example["input_ids"]) for example in examples)

        def pad(key: str, value: int) -> torch.Tensor:
            return torch.tensor([e[key] + [value] * (length - len(e[key])) for e in examples])

        mask = [[1] * len(e["input_ids"]) + [0] * (length - len(e["input_ids"])) for e in examples]
        return {
            "input_ids": pad("input_ids", pad_token_id),
            "labels": pad("labels", -100),
            "attention_mask": torch.tensor(mask),
        }

    return collate_fn


def is_multimodal(path: str) -> bool:
    """Whether the checkpoint has a vision tower (a ``Llama4Config``), else it is text-only."""
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(path), "vision_config", None) is not None


def load_model_and_tokenizer(path: str, dtype: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A checkpoint folder (or Hub id) with its tokenizer; its quantization config, if any, applies (QLoRA)."""
    from transformers import AutoTokenizer

    return auto_model_class(path).from_pretrained(path, dtype=dtype), AutoTokenizer.from_pretrained(path)


def auto_model_class(path: str) -> type:
    """``AutoModelForImageTextToText`` for a multimodal checkpoint, ``AutoModelForCausalLM`` for a text-only one."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if is_multimodal(path) else AutoModelForCausalLM


def save_merged(model: PeftModel, path: str, output: Path, requantize_group_size: int | None) -> None:
    """Merge the adapters and write the checkpoint with the base's tokenizer or processor to ``output/merged``: in
    the base's dtype, or in bf16 from an int4 base (dequantized first). With ``requantize_group_size`` also write an
    int4 copy to ``output/merged-int4``."""
    import torch

    from modeling_llama4.quantization_int4 import Llama4Int4Config

    base = model.get_base_model()
    int4_base = getattr(base, "hf_quantizer", None) is not None
    if int4_base:
        logger.info("dequantizing the int4 experts to bf16 before merging")
        base.dequantize(dtype=torch.bfloat16)
    merged = model.merge_and_unload()
    if int4_base:
        merged = merged.to(torch.bfloat16)
    save_preprocessing(path, output / "merged")
    merged.save_pretrained(output / "merged")
    logger.info("merged checkpoint saved to %s", output / "merged")
    if requantize_group_size:
        quantization = Llama4Int4Config(group_size=requantize_group_size)
        int4 = auto_model_class(path).from_pretrained(
            output / "merged", dtype=torch.bfloat16, quantization_config=quantization
        )
        save_preprocessing(path, output / "merged-int4")
        int4.save_pretrained(output / "merged-int4")
        logger.info("merged int4 checkpoint saved to %s", output / "merged-int4")


def save_preprocessing(path: str, output: Path) -> None:
    """The base checkpoint's processor (multimodal) or tokenizer (text-only), next to what is saved."""
    from transformers import AutoProcessor, AutoTokenizer

    (AutoProcessor if is_multimodal(path) else AutoTokenizer).from_pretrained(path).save_pretrained(output)


def build_parser() -> argparse.ArgumentParser:
    """The command line (standard library only: ``--help`` answers before torch loads)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint folder or Hub id, or tiny (the built-in model)")
    parser.add_argument("--data", type=Path, help="JSONL chat dataset")
    parser.add_argument(
        "--make-demo-data",
        type=Path,
        nargs="?",
        const=True,
        metavar="PATH",
        help=f"write a demo dataset to PATH (default: OUTPUT/{DEMO_DATA_FILE}) and train on it",
    )
    parser.add_argument(
        "--output", type=Path, help="folder for adapter/, merged/, trainer/ (default: a new temporary folder)"
    )
    parser.add_argument("--merge", action="store_true", help="also write a merged checkpoint to OUTPUT/merged")
    parser.add_argument(
        "--requantize", type=int, metavar="GROUP_SIZE", help="with --merge: also write an int4 copy (merged-int4)"
    )
    parser.add_argument("--rank", type=int, default=8, help="default: %(default)s")
    parser.add_argument("--alpha", type=int, default=16, help="default: %(default)s")
    parser.add_argument("--dropout", type=float, default=0.0, help="default: %(default)s")
    parser.add_argument("--targets", nargs="+", default=TARGETS, help="default: %(default)s")
    parser.add_argument("--train-router", action="store_true", help="train the routers too (modules_to_save)")
    parser.add_argument("--epochs", type=float, default=3.0, help="default: %(default)s")
    parser.add_argument("--lr", type=float, default=1e-2, help="default: %(default)s")
    parser.add_argument("--batch-size", type=int, default=8, help="default: %(default)s")
    parser.add_argument("--max-length", type=int, default=256, help="default: %(default)s")
    parser.add_argument(
        "--dtype", choices=DTYPES, default="float32", help="weights (bfloat16: with autocast; default: %(default)s)"
    )
    parser.add_argument("--bf16", action="store_const", const="bfloat16", dest="dtype", help=argparse.SUPPRESS)
    parser.add_argument(
        "--device", choices=["auto", "cpu"], default="auto", help="auto: Trainer's choice (default: %(default)s)"
    )
    parser.add_argument("--save-steps", type=int, help="save Trainer checkpoints every N steps to OUTPUT/trainer")
    parser.add_argument("--resume", action="store_true", help="resume from the last checkpoint in OUTPUT/trainer")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    parser.add_argument(
        "--seed", type=int, default=42, help="seeds the adapters' initialisation and the training (default: 42)"
    )
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1
    if args.data is None and args.make_demo_data is None:
        parser.error("give --data or --make-demo-data")
    if args.requantize and not args.merge:
        parser.error("--requantize needs --merge")
    if args.merge and distributed:
        parser.error("--merge needs the whole model in one process: merge OUTPUT/adapter in a one-process run")
    if args.output is None and (distributed or args.resume):
        parser.error("--output is needed with several processes and with --resume (they share one folder)")
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if args.output is None:
        args.output = Path(tempfile.mkdtemp(prefix="finetune_lora-"))
    if args.make_demo_data is not None:
        if args.make_demo_data is True:  # the flag without a path
            args.make_demo_data = args.output / DEMO_DATA_FILE
        args.make_demo_data.parent.mkdir(parents=True, exist_ok=True)
        make_demo_data(args.make_demo_data)
        args.data = args.make_demo_data
    finetune(args)


def finetune(args: argparse.Namespace) -> None:
    """Train the adapters on ``args.data``; save them (and the merged checkpoint with ``--merge``) to
    ``args.output``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments, set_seed

    import modeling_llama4  # noqa: F401  (registers Llama 4 with the Auto classes, and expert LoRA with PEFT)
    from modeling_llama4.tiny import ensure_tiny_checkpoint

    path = str(ensure_tiny_checkpoint()) if args.model == "tiny" else args.model
    model, tokenizer = load_model_and_tokenizer(path, args.dtype)
    lora = LoraConfig(
        r=args.rank,
        lora_alpha=args.alpha,
        lora_dropout=args.dropout,
        target_modules=args.targets,
        exclude_modules=NOT_TARGETED,
        modules_to_save=["router"] if args.train_router else None,
        task_type="CAUSAL_LM",
    )
    set_seed(args.seed)  # the adapters are initialised here, before Trainer seeds the training
    model = get_peft_model(model, lora)
    model.print_trainable_parameters()

    conversations = [json.loads(line)["messages"] for line in args.data.read_text().splitlines() if line.strip()]
    dataset = [tokenize_conversation(tokenizer, messages, args.max_length) for messages in conversations]
    logger.info(
        "%d conversations, %d assistant tokens", len(dataset), sum(t != -100 for e in dataset for t in e["labels"])
    )
    training_args = TrainingArguments(
        output_dir=str(args.output / "trainer"),
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        logging_steps=5,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        report_to=[],
        bf16=args.dtype == "bfloat16",
        use_cpu=args.device == "cpu",
        dataloader_pin_memory=args.device != "cpu" and torch.accelerator.is_available(),  # else torch warns
        # transformers >= 5.24's names (``gradient_checkpointing*`` are deprecated aliases that warn)
        activation_checkpointing=args.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        remove_unused_columns=False,
        seed=args.seed,
    )
    trainer = Trainer(
        model=model, args=training_args, train_dataset=dataset, data_collator=collate(tokenizer.pad_token_id)
    )
    trainer.train(resume_from_checkpoint=args.resume or None)

    trainer.save_model(str(args.output / "adapter"))  # under FSDP gathered from every process, written by one
    if not trainer.is_world_process_zero():
        return
    save_preprocessing(path, args.output / "adapter")
    logger.info("adapter saved to %s", args.output / "adapter")
    if args.merge:
        save_merged(model, path, args.output, args.requantize)
    logger.info(
        "done; outputs in %s. Chat with the adapter: python examples/chat.py --model %s --adapter %s",
        args.output,
        args.model,
        args.output / "adapter",
    )


if __name__ == "__main__":
    main()
