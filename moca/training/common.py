"""What both training stages share: arguments, model-or-backbone loading, the data loader, the MoCa model
card, and the run itself (resume, train, save)."""

import functools
import json
import logging
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Sampler
from transformers import AutoConfig, HfArgumentParser, Trainer, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint, seed_worker

from ..model_card import write_model_card
from ..modeling_moca import DTYPES

logger = logging.getLogger(__name__)


@dataclass
class ModelDataArguments:
    """The flags every stage, evaluation and the CLI name alike."""

    model_name_or_path: str = field(metadata={"help": "A MoCa checkpoint or a causal VLM (Hub name or folder)."})
    dataset: list[str] = field(
        metadata={"help": "One or more data sources: Hub names, save_to_disk folders, parquet/jsonl files or "
                          "folders of them."}
    )
    split: str = field(default="train", metadata={"help": "Split of Hub and saved datasets.", "aliases": ["--dataset_split"]})
    image_dir: str | None = field(
        default=None,
        metadata={"help": "Folder relative image paths are read under (default: the folder of each data source)."},
    )
    max_length: int = field(default=2048, metadata={"help": "Longest input in tokens; longer text is cut."})
    min_image_tokens: int | None = field(
        default=None,
        metadata={"help": "Fewest visual tokens an image is resized to (default: the MoCa checkpoint's bound; from a "
                          "causal VLM the release's 256, i.e. min_pixels 256*28*28 on Qwen2/2.5-VL). Saved with the model."},
    )
    max_image_tokens: int | None = field(
        default=None,
        metadata={"help": "Most visual tokens an image is resized to (default: the MoCa checkpoint's bound; from a "
                          "causal VLM the release's 1024, i.e. max_pixels 1024*28*28). Saved with the model."},
    )
    dtype: str = field(default="float32", metadata={"help": "Weights dtype.", "choices": list(DTYPES)})
    attn_implementation: str | None = field(
        default=None, metadata={"help": "sdpa (default), eager or flash_attention_2."}
    )


@dataclass
class MoCaTrainingArguments(TrainingArguments):
    """TrainingArguments with the defaults of the release's scripts where the Trainer's differ."""

    # The release trains each stage for one epoch with gradients clipped at norm 5 (the Trainer: 3 and 1.0).
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs (the release: 1)."})
    max_grad_norm: float = field(default=5.0, metadata={"help": "Gradient clipping norm (the release: 5.0)."})
    # Rows are raw text and images, turned into tensors by the collator: keep every column.
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep raw columns for the collator."})


def torch_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r}: use one of {list(DTYPES)}.")
    return DTYPES[name]


def is_moca_checkpoint(name_or_path: str) -> bool:
    """A MoCa checkpoint (continue from it) rather than a causal VLM (build MoCa from it)?"""
    return AutoConfig.from_pretrained(name_or_path, trust_remote_code=False).model_type == "moca"


def hub_id(name_or_path: str | None) -> str | None:
    """The name when it is a Hub id (`owner/name`, not a local path): what a model card may cite."""
    if name_or_path and not Path(name_or_path).exists() and name_or_path.count("/") == 1:
        return name_or_path
    return None


def arguments_from_file(argv: list[str]) -> list[str]:
    """`RECIPE.json [--flag value ...]` -> the recipe's settings as flags, then the ones given after it (which win,
    as a later flag does). A recipe is a JSON object `{flag: value}`: lists become several values, booleans
    `true`/`false`. (HfArgumentParser reads a JSON file only alone, without flags to override it.)"""
    if not argv or not argv[0].endswith(".json"):
        return argv
    path = Path(argv[0])
    if not path.is_file():
        raise ValueError(f"Argument file {path}: no such file.")
    try:
        settings = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"Argument file {path}: not valid JSON ({error}).") from error
    if not isinstance(settings, dict):
        raise ValueError(f"Argument file {path}: expected a JSON object of flags, got {type(settings).__name__}.")
    flags = []
    for name, value in settings.items():
        values = value if isinstance(value, list) else [value]
        flags += [f"--{name}", *(json.dumps(v) if isinstance(v, bool) else str(v) for v in values)]
    return flags + argv[1:]


def parse_arguments(argument_classes: tuple, argv: list[str] | None):
    """Parse (flags, or a recipe file followed by flags), set up logging and seeds: the start of both scripts."""
    argv = arguments_from_file(sys.argv[1:] if argv is None else list(argv))
    *arguments, training_args = HfArgumentParser(argument_classes).parse_args_into_dataclasses(args=argv)
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=training_args.get_process_log_level()
    )
    for model_arguments in arguments:
        if getattr(model_arguments, "dtype", None) in ("bfloat16", "float16") and not (training_args.bf16 or training_args.fp16):
            raise ValueError(
                f"--dtype {model_arguments.dtype} without --bf16/--fp16 trains half-precision weights directly: AdamW "
                "updates at learning rates near 1e-5 round away. Keep --dtype float32 and add --bf16 (mixed precision)."
            )
    if training_args.ddp_find_unused_parameters is None:
        # A text-only batch leaves the vision tower (and the MAE head) without gradients on its process.
        training_args.ddp_find_unused_parameters = True
    set_seed(training_args.seed)
    return (*arguments, training_args)


def flag_given(argv: list[str] | None, flag: str) -> bool:
    """Whether `flag` is on the command line or in its recipe file."""
    args = arguments_from_file(sys.argv[1:] if argv is None else list(argv))
    return any(arg == flag or arg.startswith(flag + "=") for arg in args)


class MoCaTrainer(Trainer):
    """What both stages' Trainers add to the stock one: a batch-sampler data loader and the MoCa model card."""

    card_tags: tuple[str, ...] = ()
    # True when each process counts only the rows it skipped itself (summed over processes at the end); False
    # when every process counts the same rows (validation of the whole data before training).
    skips_counted_per_process: bool = True

    def __init__(self, *args, model_name_or_path: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_name_or_path = model_name_or_path

    def batch_sampler_dataloader(self, batch_sampler: Sampler, seed_workers: bool = True) -> DataLoader:
        """The train data loader over `batch_sampler`, with the Trainer's data-loader settings."""
        args = self.args
        return DataLoader(
            self.train_dataset,
            batch_sampler=batch_sampler,
            collate_fn=self.data_collator,
            num_workers=args.dataloader_num_workers,
            pin_memory=args.dataloader_pin_memory,
            persistent_workers=args.dataloader_persistent_workers and args.dataloader_num_workers > 0,
            prefetch_factor=args.dataloader_prefetch_factor,
            worker_init_fn=functools.partial(seed_worker, num_workers=args.dataloader_num_workers, rank=args.process_index)
            if seed_workers else None,
        )  # fmt: skip

    @property
    def data_seed(self) -> int:
        return self.args.data_seed if self.args.data_seed is not None else self.args.seed

    def skipped_rows_by_reason(self) -> Counter:
        """This process's rows that training skipped, counted by reason (each stage's Trainer fills it in)."""
        return Counter()

    def log_skipped_rows(self) -> Counter:
        """One line `skipped rows: N`, then the count per reason, summed over processes; returns the counts."""
        counts = self.skipped_rows_by_reason()
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed and self.skips_counted_per_process:
            per_process = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(per_process, dict(counts))
            counts = sum((Counter(part) for part in per_process), Counter())
        if self.is_world_process_zero():
            logger.warning(f"skipped rows: {sum(counts.values())}")
            for reason, count in counts.most_common():
                logger.warning(f"  {count} {reason}")
        return counts

    def card_model(self):
        """The MoCa model the card describes."""
        return self.accelerator.unwrap_model(self.model)

    def card_settings(self) -> list:
        return [self.args]

    def card_datasets(self) -> list[str] | None:
        return None

    def create_model_card(self, output_dir: str | None = None, **trainer_card_kwargs) -> None:
        """The MoCa card (also what `--push_to_hub` uploads), in place of the Trainer's generic one (whose
        arguments, such as `model_name`, it does not use)."""
        write_model_card(
            self.card_model(),
            output_dir or self.args.output_dir,
            model_id=self.args.hub_model_id if self.args.push_to_hub else None,
            base_model=hub_id(self.model_name_or_path),
            datasets=self.card_datasets(),
            training_args=self.card_settings(),
            tags=list(self.card_tags),
        )


def run(trainer: Trainer, training_args: TrainingArguments, before_save=None) -> Trainer:
    """Train (resuming from `--resume_from_checkpoint DIR`, or `last`: the newest checkpoint in `--output_dir`),
    then save the trainer state (the loss history, for reports) and the model (pushed with `--push_to_hub`)."""
    resume = training_args.resume_from_checkpoint
    if resume == "last":
        resume = get_last_checkpoint(training_args.output_dir)
    trainer.train(resume_from_checkpoint=resume)
    if isinstance(trainer, MoCaTrainer):
        trainer.log_skipped_rows()
    trainer.save_state()
    if before_save is not None:
        before_save(trainer)
    trainer.save_model()
    return trainer
