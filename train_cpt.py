"""Stage 1 of MoCa: modality-aware continual pre-training (masked text + masked image patches, bidirectional).

    python train_cpt.py --model_name_or_path Qwen/Qwen2.5-VL-3B-Instruct --dataset rows.parquet \
        --output_dir runs/cpt --max_steps 1000 --bf16
    torchrun --nproc_per_node 8 train_cpt.py ...        # or: accelerate launch train_cpt.py ...

`--model_name_or_path` is a causal VLM (the heads start from its lm_head and middle layer) or a MoCa checkpoint
(with `cpt_heads.safetensors` when it was written by this script). Every `TrainingArguments` flag works
(`--max_steps`, `--save_steps`, `--resume_from_checkpoint`, `--push_to_hub`, `--report_to`, ...). Each saved
folder is a plain MoCa embedding checkpoint (`AutoModel.from_pretrained(dir, trust_remote_code=True)`) plus
the CPT heads; the Trainer's checkpoints add optimizer, scheduler and RNG states for resuming
(`--resume_from_checkpoint DIR`, or `last` for the newest checkpoint in `--output_dir`).

Micro-batches are built by `--token_budget` (equivalent tokens, padding included), not by
`--per_device_train_batch_size`, which is ignored; `--gradient_accumulation_steps` multiplies them as usual.
Masks are drawn per row from `--seed`, so a resumed run sees the same masks as an uninterrupted one.
"""

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import AutoConfig, HfArgumentParser, Trainer, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from moca import MoCaForContinualPretraining
from moca.cpt import BudgetBatchSampler, CPTCollator, load_cpt_dataset, prepare_cpt_dataset
from moca.model_card import write_model_card


logger = logging.getLogger(__name__)


@dataclass
class CPTArguments:
    model_name_or_path: str = field(metadata={"help": "A causal VLM (Hub name or folder) or a MoCa checkpoint."})
    dataset: list[str] = field(
        metadata={"help": "One or more data sources: Hub names, datasets folders, parquet or jsonl files."}
    )
    dataset_split: str = field(default="train", metadata={"help": "Split of Hub and saved datasets."})
    text_mask_ratio: float = field(default=0.4, metadata={"help": "Share of text tokens replaced by <|mask|>."})
    image_mask_ratio: float = field(default=0.5, metadata={"help": "Share of merged visual tokens masked."})
    mae_loss_weight: float = field(default=0.5, metadata={"help": "w in loss = mlm_loss + w * mae_loss."})
    shift_labels: bool = field(
        default=False,
        metadata={"help": "Predict a masked token from the position before it (the paper's text); the original "
                          "release does not shift (default)."},
    )
    max_length: int = field(default=2048, metadata={"help": "Longest sequence in tokens; longer text is cut."})
    token_budget: int = field(
        default=12800,
        metadata={"help": "Equivalent tokens per micro-batch (an image token counts as 4 text tokens, padding as 1)."},
    )
    dtype: str = field(default="float32", metadata={"help": "Weights dtype: float32, bfloat16 or float16."})
    attn_implementation: str | None = field(
        default=None, metadata={"help": "sdpa (default), eager or flash_attention_2."}
    )
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes validating rows."})


@dataclass
class CPTTrainingArguments(TrainingArguments):
    # The paper's settings at 3B scale (warmup 0.1 of training); a tiny model needs a far larger learning rate.
    learning_rate: float = field(default=2e-6, metadata={"help": "Peak learning rate (paper: 2e-6)."})
    warmup_steps: float = field(default=0.1, metadata={"help": "Warmup steps, or a fraction of training if < 1."})
    # Rows are raw text and images, turned into tensors by the collator: keep every column.
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep raw columns for the collator."})


class CPTTrainer(Trainer):
    """Trainer with token-budget batches, MLM and MAE losses logged apart, and MoCa checkpoints."""

    def __init__(self, *args, token_budget: int, skipped_rows: dict | None = None, model_name_or_path: str | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.token_budget = token_budget
        self.model_name_or_path = model_name_or_path
        self.skipped_rows = skipped_rows or {}
        # Summed loss parts and the number of micro-batches that had them, since the last log.
        self._loss_parts = torch.zeros(4, device=self.args.device)

    def get_train_dataloader(self) -> DataLoader:
        dataset = self.train_dataset
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        sampler = BudgetBatchSampler(dataset["length"], dataset["cost"], self.token_budget, seed=seed)
        dataloader = DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
            persistent_workers=self.args.dataloader_persistent_workers and self.args.dataloader_num_workers > 0,
            prefetch_factor=self.args.dataloader_prefetch_factor,
        )
        # No worker seeding: the collator draws its masks from per-row generators, not from global RNG.
        # accelerate gives each process whole micro-batches (round-robin) and the same number of them.
        return self.accelerator.prepare(dataloader)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        if model.training:
            with torch.no_grad():
                for slot, part in enumerate((outputs.mlm_loss, outputs.mae_loss)):
                    if part is not None:
                        self._loss_parts[2 * slot] += part.detach().float()
                        self._loss_parts[2 * slot + 1] += 1
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: every process gets here at the same step
            totals = self.accelerator.reduce(self._loss_parts.clone(), reduction="sum").tolist()
            self._loss_parts.zero_()
            for slot, name in enumerate(("mlm_loss", "mae_loss")):
                if totals[2 * slot + 1]:
                    logs[name] = round(totals[2 * slot] / totals[2 * slot + 1], 4)
            if self.skipped_rows is not None:
                logs["skipped_rows"] = sum(self.skipped_rows.values())
                self.skipped_rows = None  # logged once: it does not change during training
        super().log(logs, start_time)

    def create_model_card(self, output_dir: str | None = None, **kwargs) -> None:
        """The MoCa card (also what `--push_to_hub` uploads), in place of the Trainer's generic one."""
        model = self.accelerator.unwrap_model(self.model)
        source = self.model_name_or_path
        write_model_card(
            model.moca,
            output_dir or self.args.output_dir,
            model_id=self.args.hub_model_id if self.args.push_to_hub else None,
            base_model=source if source and not Path(source).exists() and source.count("/") == 1 else None,
            training_args=[self.args],
            tags=["continual-pretraining"],
        )

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # The backbone and the heads are saved apart (see `MoCaForContinualPretraining.save_pretrained`).
        (model or self.model).load_checkpoint(resume_from_checkpoint)


def load_model(args: CPTArguments) -> MoCaForContinualPretraining:
    dtype = getattr(torch, args.dtype)
    kwargs = dict(mae_loss_weight=args.mae_loss_weight, dtype=dtype, attn_implementation=args.attn_implementation)
    if AutoConfig.from_pretrained(args.model_name_or_path, trust_remote_code=False).model_type == "moca":
        return MoCaForContinualPretraining.from_pretrained(args.model_name_or_path, **kwargs)
    return MoCaForContinualPretraining.from_backbone(args.model_name_or_path, **kwargs)


def main(argv: list[str] | None = None) -> CPTTrainer:
    parser = HfArgumentParser((CPTArguments, CPTTrainingArguments))
    cpt_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=training_args.get_process_log_level()
    )
    if training_args.ddp_find_unused_parameters is None:
        # A text-only batch leaves the vision tower and the MAE head without gradients on its process.
        training_args.ddp_find_unused_parameters = True
    set_seed(training_args.seed)

    model = load_model(cpt_args)
    processor = model.add_mask_token()
    with training_args.main_process_first(desc="loading and validating the data"):
        dataset = load_cpt_dataset(cpt_args.dataset, split=cpt_args.dataset_split)
        dataset, skipped = prepare_cpt_dataset(
            dataset, processor, cpt_args.max_length, num_proc=cpt_args.preprocessing_num_workers
        )
    collator = CPTCollator(
        processor,
        text_mask_ratio=cpt_args.text_mask_ratio,
        image_mask_ratio=cpt_args.image_mask_ratio,
        max_length=cpt_args.max_length,
        shift_labels=cpt_args.shift_labels,
        seed=training_args.seed,
    )
    trainer = CPTTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=collator,
        token_budget=cpt_args.token_budget,
        skipped_rows=dict(skipped),
        model_name_or_path=cpt_args.model_name_or_path,
    )

    resume = training_args.resume_from_checkpoint
    if resume == "last":
        resume = get_last_checkpoint(training_args.output_dir)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()  # also pushes to the Hub with --push_to_hub
    trainer.save_state()  # trainer_state.json: the loss history, for reports
    return trainer


if __name__ == "__main__":
    main()
