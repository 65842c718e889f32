"""What both training stages share: arguments, model-or-backbone loading, the data loader, the MoCa model
card, and the run itself (resume, train, save)."""

import contextlib
import fcntl
import functools
import json
import logging
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Sampler
from transformers import HfArgumentParser, PreTrainedConfig, Trainer, TrainingArguments, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, seed_worker

from ..configuration_moca import is_moca_config_dict
from ..model_card import write_model_card
from ..modeling_moca import DTYPES
from ..processing_moca import MAX_ASPECT_RATIO, count_image_placeholders

logger = logging.getLogger(__name__)

# The names people also write for the dtypes (the Trainer's own --bf16/--fp16 flags).
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


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
    dtype: str = field(
        default="float32",
        metadata={"help": f"Weights dtype: {', '.join(DTYPES)} (or {', '.join(DTYPE_ALIASES)})."},
    )
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
    # transformers 5 dropped the flag; a second run into a folder of another run's checkpoints is refused without it.
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Train into an --output_dir that holds another run's checkpoints (they stay until rotated)."},
    )


def dtype_name(name: str) -> str:
    """The dtype's name in `DTYPES`, also from an alias (`bf16`)."""
    name = DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise ValueError(f"--dtype {name}: use one of {', '.join(DTYPES)} (or {', '.join(DTYPE_ALIASES)}).")
    return name


def torch_dtype(name: str | None) -> torch.dtype | None:
    return None if name is None else DTYPES[dtype_name(name)]


def is_moca_checkpoint(name_or_path: str) -> bool:
    """A MoCa checkpoint (continue from it) rather than a causal VLM (build MoCa from it)?"""
    return is_moca_config_dict(PreTrainedConfig.get_config_dict(name_or_path)[0])


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
        if getattr(model_arguments, "dtype", None) is not None:
            model_arguments.dtype = dtype_name(model_arguments.dtype)
        if getattr(model_arguments, "dtype", None) in ("bfloat16", "float16") and not (training_args.bf16 or training_args.fp16):
            raise ValueError(
                f"--dtype {model_arguments.dtype} without --bf16/--fp16 trains half-precision weights directly: AdamW "
                "updates at learning rates near 1e-5 round away. Keep --dtype float32 and add --bf16 (mixed precision)."
            )
    if training_args.ddp_find_unused_parameters is None:
        # A text-only batch leaves the vision tower (and the MAE head) without gradients on its process.
        training_args.ddp_find_unused_parameters = True
    refuse_another_runs_output_dir(training_args)  # before loading anything; `run` checks again under its lock
    set_seed(training_args.seed)
    return (*arguments, training_args)


def flag_given(argv: list[str] | None, flag: str) -> bool:
    """Whether `flag` is on the command line or in its recipe file."""
    args = arguments_from_file(sys.argv[1:] if argv is None else list(argv))
    return any(arg == flag or arg.startswith(flag + "=") for arg in args)


# ---------------------------------------------------------------------------------------------------------------
# Rules every training input obeys, checked per row before a batch is built (a bad row is a counted skip)
# ---------------------------------------------------------------------------------------------------------------

def text_problem(processor, text: str, num_images: int) -> tuple[str, str] | None:
    """`(reason, detail)` when the text cannot go with `num_images` images, else None: placeholders that do not
    match the images (a placeholder with no image at all included). Control tokens written in the text (such as a
    literal `<|video_pad|>`) are no problem: the processor tokenizes them as plain text, as `encode` does."""
    placeholders = count_image_placeholders(text)
    if placeholders and placeholders != num_images:
        return f"{placeholders} image placeholders but {num_images} images", ""
    return None


def image_problem(processor, position: int, width: int, height: int) -> tuple[str, str] | None:
    """`(reason, detail)` when the image processor would refuse an image of this size, else None."""
    if processor.resized_size(width, height) is None:
        return f"image {position} aspect ratio over {MAX_ASPECT_RATIO}", f"{width}x{height}"
    return None


def with_image_token_bounds(model, args: ModelDataArguments):
    """`model`, its processor set to `--min_image_tokens`/`--max_image_tokens` (unset: the model's own bounds);
    training needs the processor, so a checkpoint without processor files is refused here."""
    if model.processor is None:
        raise ValueError(f"{args.model_name_or_path} has no processor files: training needs its tokenizer and image processor.")
    model.processor.set_image_token_bounds(args.min_image_tokens, args.max_image_tokens)
    return model


# ---------------------------------------------------------------------------------------------------------------
# The output folder and its checkpoints
# ---------------------------------------------------------------------------------------------------------------

RUN_LOCK_FILE = ".moca_run.lock"
_CHECKPOINT_PATTERN = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
# The Trainer's `_save_checkpoint` writes the weights first and `trainer_state.json` last: a checkpoint without
# either was cut short while being written.
TRAINER_STATE_FILE = "trainer_state.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")


def checkpoints(output_dir: str | Path) -> list[Path]:
    """The Trainer's `checkpoint-N` folders in `output_dir`, newest (highest N) first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [path for path in folder.iterdir() if path.is_dir() and _CHECKPOINT_PATTERN.match(path.name)]
    return sorted(found, key=lambda path: int(_CHECKPOINT_PATTERN.match(path.name).group(1)), reverse=True)


def missing_checkpoint_files(checkpoint: str | Path) -> list[str]:
    """What a checkpoint lacks of what a finished write leaves (empty when it is complete)."""
    checkpoint = Path(checkpoint)
    missing = [] if any((checkpoint / name).is_file() for name in WEIGHT_FILES) else [" or ".join(WEIGHT_FILES)]
    return missing + ([] if (checkpoint / TRAINER_STATE_FILE).is_file() else [TRAINER_STATE_FILE])


def last_complete_checkpoint(output_dir: str | Path) -> str | None:
    """The newest checkpoint whose writing finished; the newer ones that were cut short are logged and skipped."""
    for checkpoint in checkpoints(output_dir):
        missing = missing_checkpoint_files(checkpoint)
        if not missing:
            return str(checkpoint)
        logger.warning(f"Skipping {checkpoint}: its writing did not finish (no {', '.join(missing)}).")
    return None


def resolve_resume(training_args: TrainingArguments) -> str | None:
    """The checkpoint to resume from: `--resume_from_checkpoint DIR` (which must be complete), or `last`."""
    resume = training_args.resume_from_checkpoint
    if resume == "last":
        return last_complete_checkpoint(training_args.output_dir)
    if resume is not None:
        missing = missing_checkpoint_files(resume)
        if missing:
            raise ValueError(
                f"--resume_from_checkpoint {resume}: not a complete checkpoint (no {', '.join(missing)}); "
                "`--resume_from_checkpoint last` picks the newest complete one."
            )
    return resume


def refuse_another_runs_output_dir(training_args: TrainingArguments) -> None:
    """A fresh run into a folder that holds another run's checkpoints (or its final state) would mix the two runs'
    checkpoints and overwrite its model: refused unless resumed or `--overwrite_output_dir`."""
    if training_args.resume_from_checkpoint is not None or training_args.overwrite_output_dir:
        return
    output_dir = Path(training_args.output_dir)
    found = [path.name for path in checkpoints(output_dir)]
    found += [TRAINER_STATE_FILE] if (output_dir / TRAINER_STATE_FILE).is_file() else []
    if found:
        shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        raise ValueError(
            f"--output_dir {output_dir} holds another run ({shown}): pass --resume_from_checkpoint last to continue "
            "it, --overwrite_output_dir to train into it anyway, or another --output_dir."
        )


@contextlib.contextmanager
def output_dir_lock(output_dir: str | Path):
    """Held while a run writes into `output_dir`: a second run into it stops at once instead of interleaving its
    checkpoints. An OS file lock, so a killed run leaves none behind."""
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / RUN_LOCK_FILE
    with open(lock, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"--output_dir {folder}: another run is writing into it (it holds {lock}).") from None
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)


class MoCaTrainer(Trainer):
    """What both stages' Trainers add to the stock one: a batch-sampler data loader and the MoCa model card."""

    card_tags: tuple[str, ...] = ()
    # True when each process counts only the rows it skipped itself (summed over processes at the end); False
    # when every process counts the same rows (validation of the whole data before training).
    skips_counted_per_process: bool = True

    def __init__(self, *args, model_name_or_path: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_name_or_path = model_name_or_path
        # The first step whose loss was not finite (0: none yet), kept on the device so that checking it costs no
        # host sync per step; read where the Trainer syncs anyway: at logging steps, before a checkpoint, at the end.
        # (The Trainer's `logging_nan_inf_filter` would log the average of earlier losses in its place.)
        self._first_nonfinite_step: torch.Tensor | None = None

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._first_nonfinite_step is None:
            self._first_nonfinite_step = torch.zeros((), dtype=torch.long, device=loss.device)
        seen = torch.isfinite(loss).all() | self._first_nonfinite_step.gt(0)
        # The optimizer step this micro-batch belongs to, counted from 1 as the logs count.
        self._first_nonfinite_step = torch.where(seen, self._first_nonfinite_step, self.state.global_step + 1)
        return loss

    def stop_on_nonfinite_loss(self) -> None:
        """Raise, on every process, when any process has had a non-finite loss (every process calls this)."""
        if self._first_nonfinite_step is None:
            return
        steps = self.accelerator.gather(self._first_nonfinite_step.reshape(1))
        bad = steps[steps.gt(0)]
        if len(bad):
            raise FloatingPointError(
                f"Non-finite loss (nan or inf) at step {int(bad.min())}: training stopped before saving it. The "
                "checkpoints of earlier steps are intact; lower --learning_rate, check that step's data or the "
                "starting weights."
            )

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: every process gets here at the same step
            self.stop_on_nonfinite_loss()
        super().log(logs, start_time)

    def _save_checkpoint(self, model, trial) -> None:
        self.stop_on_nonfinite_loss()  # never write a checkpoint of diverged weights
        super()._save_checkpoint(model, trial)

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
    """Train (resuming from `--resume_from_checkpoint DIR`, or `last`: the newest complete checkpoint in
    `--output_dir`), then save the trainer state (the loss history, for reports) and the model (pushed with
    `--push_to_hub`). The main process holds `--output_dir`'s lock throughout: one run writes into a folder at a time."""
    holding = output_dir_lock(training_args.output_dir) if training_args.process_index == 0 else contextlib.nullcontext()
    with holding:
        refuse_another_runs_output_dir(training_args)  # again: a run may have finished in it since the arguments
        trainer.train(resume_from_checkpoint=resolve_resume(training_args))
        if isinstance(trainer, MoCaTrainer):
            trainer.stop_on_nonfinite_loss()  # the last steps, when no log or checkpoint came after them
            trainer.log_skipped_rows()
        trainer.save_state()
        if before_save is not None:
            before_save(trainer)
        trainer.save_model()
    return trainer
