"""Fine-tune Llama 4 with LoRA (per-expert LoRA on the routed experts) on a JSONL chat dataset, with Trainer.

Each line of the dataset is ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}, ...]}``.
Conversations are rendered with the tokenizer's chat template; the loss is on the assistant turns only (labels are
-100 elsewhere). The adapter is saved to ``OUTPUT/adapter``; ``--merge`` also writes a merged checkpoint to
``OUTPUT/merged``.

End to end on a tiny random model and a generated dataset (< 1 minute on CPU)::

    python examples/finetune_lora.py --model tiny --make-demo-data /tmp/chat.jsonl --output /tmp/lora --merge

On a checkpoint directory (HF layout, with its tokenizer)::

    python examples/finetune_lora.py --model path/to/Llama-4-Scout --data chat.jsonl --output out --bf16
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase, Trainer, TrainingArguments

import modeling_llama4
from modeling_llama4.lora_experts import register_expert_lora

logger = logging.getLogger("finetune_lora")

TARGETS = ["experts", "q_proj", "k_proj", "v_proj", "o_proj", "shared_expert.gate_proj", "shared_expert.up_proj"]
TARGETS += ["shared_expert.down_proj"]
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    intermediate_size_mlp=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_local_experts=4,
    num_experts_per_tok=1,
    initializer_range=0.2,
)


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


def load_model_and_tokenizer(model: str, dtype: torch.dtype) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """A checkpoint directory with its tokenizer, or ``"tiny"``: a tiny random model with Meta's tokenizer."""
    if model != "tiny":
        return AutoModelForCausalLM.from_pretrained(model, dtype=dtype), AutoTokenizer.from_pretrained(model)
    tokenizer = modeling_llama4.build_tokenizer(modeling_llama4.default_tokenizer_model_path())
    config = modeling_llama4.Llama4TextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY,
    )
    torch.manual_seed(0)
    return modeling_llama4.Llama4ForCausalLM(config).to(dtype), tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help='checkpoint directory, or "tiny"')
    parser.add_argument("--data", type=Path, help="JSONL chat dataset")
    parser.add_argument("--make-demo-data", type=Path, metavar="PATH", help="write a demo dataset there and use it")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--merge", action="store_true", help="also write a merged checkpoint to OUTPUT/merged")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=int, default=16)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--targets", nargs="+", default=TARGETS)
    parser.add_argument("--train-router", action="store_true", help="train the routers too (modules_to_save)")
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--bf16", action="store_true", help="bf16 weights and autocast")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if args.make_demo_data:
        make_demo_data(args.make_demo_data)
        args.data = args.make_demo_data
    if args.data is None:
        parser.error("give --data or --make-demo-data")

    model, tokenizer = load_model_and_tokenizer(args.model, torch.bfloat16 if args.bf16 else torch.float32)
    lora = LoraConfig(
        r=args.rank,
        lora_alpha=args.alpha,
        lora_dropout=args.dropout,
        target_modules=args.targets,
        modules_to_save=["router"] if args.train_router else None,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, register_expert_lora(lora))
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
        save_strategy="no",
        report_to=[],
        bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        remove_unused_columns=False,
    )
    trainer = Trainer(
        model=model, args=training_args, train_dataset=dataset, data_collator=collate(tokenizer.pad_token_id)
    )
    trainer.train()

    model.save_pretrained(args.output / "adapter")
    tokenizer.save_pretrained(args.output / "adapter")
    logger.info("adapter saved to %s", args.output / "adapter")
    if args.merge:
        merged = model.merge_and_unload()
        merged.save_pretrained(args.output / "merged")
        tokenizer.save_pretrained(args.output / "merged")
        logger.info("merged checkpoint saved to %s", args.output / "merged")


if __name__ == "__main__":
    main()
