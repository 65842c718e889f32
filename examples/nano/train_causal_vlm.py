"""Teach a (tiny) VLM briefly as a *causal* model, so that it stands in for a pre-trained VLM.

MoCa starts from a VLM that already reads images and text. The nano pipeline's random tiny backbone has
not, so this step trains it with the ordinary next-token loss on captions, documents and texts
(`{"text": ..., "images": [...]}` rows, "<image>" placeholders) and saves it in the backbone's standard
format, ready for `MoCaModel.from_backbone`.

    python examples/nano/train_causal_vlm.py --model_name_or_path tiny-vlm --dataset nano/cpt --output_dir vlm --max_steps 200
"""

from dataclasses import dataclass, field

import torch
from datasets import load_from_disk
from transformers import AutoModelForImageTextToText, HfArgumentParser, Trainer, TrainingArguments

from moca import MoCaProcessor


@dataclass
class CausalArguments:
    model_name_or_path: str = field(metadata={"help": "VLM checkpoint (Hub name or folder)"})
    dataset: str = field(metadata={"help": "datasets folder of {'text', 'images'} rows"})
    max_length: int = field(default=256, metadata={"help": "tokens per sample; longer ones are truncated"})


class CaptionCollator:
    """Next-token labels on text tokens only: image, padding and vision marker positions are ignored."""

    def __init__(self, processor: MoCaProcessor, max_length: int):
        self.processor = processor
        self.max_length = max_length
        self.eos_token_id = processor.tokenizer.eos_token_id

    def __call__(self, rows):
        texts = [row["text"] for row in rows]
        images = [row["images"] or [] for row in rows]
        batch = self.processor(text=texts, images=images if any(images) else None, truncation=True,
                               max_length=self.max_length, padding_side="right")  # fmt: skip
        if self.eos_token_id is not None:
            batch = self._append_eos(batch)
        labels = batch["input_ids"].clone()
        ignore = (batch["attention_mask"] == 0) | (batch["mm_token_type_ids"] != 0)
        for token_id in (self.processor.vision_start_token_id, self.processor.vision_end_token_id):
            ignore |= batch["input_ids"] == token_id
        labels[ignore] = -100
        batch["labels"] = labels
        return batch

    def _append_eos(self, batch):
        """The end-of-text id after each text that `max_length` did not cut (as the text + eos string, cut at
        `max_length`, once gave): appended as an id, since written into the text it is tokenized as plain text."""
        lengths = batch["attention_mask"].sum(dim=1)
        ended = (lengths < self.max_length).nonzero().squeeze(-1)
        width = int((lengths + (lengths < self.max_length)).max())
        for name in ("input_ids", "attention_mask", "mm_token_type_ids"):
            pad = self.processor.tokenizer.pad_token_id if name == "input_ids" else 0
            batch[name] = torch.nn.functional.pad(batch[name], (0, width - batch[name].shape[1]), value=pad)
        batch["input_ids"][ended, lengths[ended]] = self.eos_token_id
        batch["attention_mask"][ended, lengths[ended]] = 1
        return batch


def main():
    parser = HfArgumentParser((CausalArguments, TrainingArguments))
    args, training_args = parser.parse_args_into_dataclasses()
    training_args.remove_unused_columns = False
    processor = MoCaProcessor.from_pretrained(args.model_name_or_path)
    model = AutoModelForImageTextToText.from_pretrained(args.model_name_or_path, dtype=torch.float32)
    dataset = load_from_disk(args.dataset)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=CaptionCollator(processor, args.max_length),
    )
    trainer.train()
    trainer.save_state()  # trainer_state.json: the loss history, for reports
    # The standard VLM layout (weights, tokenizer, image processor), not a MoCa checkpoint.
    model.save_pretrained(training_args.output_dir)
    processor.tokenizer.save_pretrained(training_args.output_dir)
    processor.image_processor.save_pretrained(training_args.output_dir)


if __name__ == "__main__":
    main()
