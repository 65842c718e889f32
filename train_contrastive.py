"""Stage 2 of MoCa: heterogeneous contrastive fine-tuning (InfoNCE with hard negatives, task-aware batches).

    python train_contrastive.py --model_name_or_path runs/cpt --dataset data/contrastive \
        --output_dir runs/cl --per_device_train_batch_size 64 --grad_cache_chunk_size 16 --bf16
    torchrun --nproc_per_node 8 train_contrastive.py ...        # or: accelerate launch train_contrastive.py ...

`--model_name_or_path` is a MoCa checkpoint (e.g. the output of train_cpt.py) or a causal VLM (made bidirectional
here). Each `--dataset` is one task: a Hub name, a folder saved by `datasets.save_to_disk`, a folder of parquet/jsonl
files, or one such file, with rows `{"query_text", "query_image", "pos_text", "pos_image", "neg_text": [...],
"neg_image": [...]}`; a folder holding `tasks.json` stands for all the tasks it names. `--dataset_config` (a JSON
file `{task: {"query_prompt", "document_prompt", "weight"}}`, by default the `tasks.json` of such a folder) gives
each task its prompts and mixing weight. The global batch is `per_device_train_batch_size` times the number of
processes; every global batch comes from one task. Every `TrainingArguments` flag works (`--max_steps`,
`--save_steps`, `--resume_from_checkpoint`, `--push_to_hub`, `--deepspeed`, `--fsdp`, ...). Each saved folder is a
MoCa checkpoint (`AutoModel.from_pretrained(dir, trust_remote_code=True)`) with a model card; with LoRA, the
checkpoints hold the adapter and the final model is merged into full weights with `--merge_lora`.
"""

import contextlib
import dataclasses
import functools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
from torch.utils.data import DataLoader
from transformers import AutoConfig, HfArgumentParser, Trainer, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint, seed_worker

from moca import MoCaModel
from moca.contrastive import (
    ContrastiveCollator,
    MultiTaskDataset,
    TaskBatchSampler,
    TaskSpec,
    contrastive_loss,
    drop_rows_without_positive,
    grad_cache_step,
)
from moca.cpt import DATA_FILE_BUILDERS
from moca.model_card import write_model_card

logger = logging.getLogger(__name__)

TASKS_FILE = "tasks.json"
# The language model's attention and MLP projections; the vision tower keeps its weights.
DEFAULT_LORA_TARGET_MODULES = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclass
class ContrastiveArguments:
    model_name_or_path: str = field(metadata={"help": "A MoCa checkpoint or a causal VLM (Hub name or folder)."})
    dataset: list[str] = field(
        metadata={
            "help": "One or more tasks: Hub names, datasets folders, parquet/jsonl files or folders of them; "
            "a folder with tasks.json stands for all its tasks."
        }
    )
    dataset_config: str | None = field(
        default=None,
        metadata={
            "help": "JSON file {task: {query_prompt, document_prompt, weight}} (default: the tasks.json of a "
            "--dataset folder)."
        },
    )
    dataset_split: str = field(default="train", metadata={"help": "Split of Hub and saved datasets."})
    temperature: float = field(default=0.03, metadata={"help": "InfoNCE temperature (paper: 0.03)."})
    num_hard_negatives: int = field(default=2, metadata={"help": "Hard negatives per query (paper: 2)."})
    task_aware_batching: bool = field(
        default=True, metadata={"help": "Draw every global batch from one task (--no_task_aware_batching: mix)."}
    )
    grad_cache_chunk_size: int | None = field(
        default=None,
        metadata={"help": "GradCache: encode at most this many inputs at once; memory no longer limits the batch."},
    )
    matryoshka_dims: list[int] | None = field(
        default=None, metadata={"help": "Also train truncated embeddings of these sizes (Matryoshka loss)."}
    )
    lora_r: int | None = field(default=None, metadata={"help": "LoRA rank; full fine-tuning when unset."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling numerator."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Module names, or one regular expression (default: the language model's projections)."},
    )
    merge_lora: bool = field(default=False, metadata={"help": "Save the final model with LoRA merged into it."})
    max_length: int | None = field(default=1024, metadata={"help": "Longest input in tokens; longer text is cut."})
    bidirectional: bool = field(
        default=True,
        metadata={"help": "Starting from a causal VLM: make it bidirectional (--no_bidirectional: keep it causal)."},
    )
    pooling: str | None = field(
        default=None,
        metadata={"help": "Starting from a causal VLM: mean or last (default: mean when bidirectional, else last)."},
    )
    dtype: str = field(default="float32", metadata={"help": "Weights dtype: float32, bfloat16 or float16."})
    attn_implementation: str | None = field(
        default=None, metadata={"help": "sdpa (default), eager or flash_attention_2."}
    )


@dataclass
class ContrastiveTrainingArguments(TrainingArguments):
    # Where the paper (1e-5) and the released scripts (2e-5) differ, this project follows the paper, as train_cpt.py
    # does: it is the setting the published results are described with. A tiny model needs a far larger rate.
    learning_rate: float = field(default=1e-5, metadata={"help": "Peak learning rate (paper: 1e-5)."})
    warmup_steps: float = field(default=0.05, metadata={"help": "Warmup steps, or a fraction of training if < 1."})
    # Rows are raw text and images, turned into tensors by the collator: keep every column.
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep raw columns for the collator."})


# ---------------------------------------------------------------------------------------------------------------
# Data


def _keep_images_encoded(dataset: datasets.Dataset) -> datasets.Dataset:
    """Image columns stay bytes/paths until the collator decodes them (where a bad image is caught and counted)."""
    for name, feature in dataset.features.items():
        if isinstance(feature, datasets.Image):
            dataset = dataset.cast_column(name, datasets.Image(decode=False))
        elif isinstance(feature, datasets.List) and isinstance(feature.feature, datasets.Image):
            dataset = dataset.cast_column(name, datasets.List(datasets.Image(decode=False)))
    return dataset


def load_task(source: str, split: str = "train") -> tuple[datasets.Dataset, str | None]:
    """One task's rows and the folder relative image paths are read from (None for the Hub)."""
    path = Path(source)
    if path.is_file():
        builder = DATA_FILE_BUILDERS.get(path.suffix)
        if builder is None:
            raise ValueError(f"Data file {source}: unsupported format {path.suffix!r} (use parquet or jsonl).")
        dataset, image_root = datasets.load_dataset(builder, data_files=str(path), split="train"), str(path.parent)
    elif path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists()):
        dataset, image_root = datasets.load_from_disk(str(path)), str(path)
        if isinstance(dataset, datasets.DatasetDict):
            dataset = dataset[split]
    elif path.is_dir():
        files = sorted(str(f) for f in path.iterdir() if f.suffix in DATA_FILE_BUILDERS)
        if not files:
            raise ValueError(f"Data folder {source}: no saved dataset and no parquet/jsonl files.")
        builder = DATA_FILE_BUILDERS[Path(files[0]).suffix]
        dataset, image_root = datasets.load_dataset(builder, data_files=files, split="train"), str(path)
    else:
        dataset, image_root = datasets.load_dataset(source, split=split), None
    return _keep_images_encoded(dataset), image_root


def load_tasks(sources: list[str], dataset_config: str | None = None, split: str = "train") -> list[TaskSpec]:
    """The tasks named by `--dataset`, each validated, with its prompts and weight from the task config."""
    if not sources:
        raise ValueError("No dataset given: pass one or more --dataset.")
    expanded = []
    for source in sources:
        tasks_file = Path(source) / TASKS_FILE
        if tasks_file.is_file():
            dataset_config = dataset_config or str(tasks_file)
            expanded += [str(Path(source) / name) for name in json.loads(tasks_file.read_text())]
        else:
            expanded.append(source)
    config = json.loads(Path(dataset_config).read_text()) if dataset_config else {}

    tasks = []
    for source in expanded:
        name = Path(source).stem if Path(source).exists() else source
        settings = config.get(name, config.get(source, {}))
        unknown = set(settings) - {"query_prompt", "document_prompt", "weight"}
        if unknown:
            raise ValueError(f"{dataset_config}: task {name!r} has unknown settings {sorted(unknown)}")
        dataset, image_root = load_task(source, split)
        tasks.append(TaskSpec(name=name, dataset=drop_rows_without_positive(dataset, name), image_root=image_root,
                              **settings))  # fmt: skip
    weights = [task.weight for task in tasks]
    if any(w is not None for w in weights) and any(w is None for w in weights):
        missing = [task.name for task in tasks if task.weight is None]
        raise ValueError(f"Weights are given for some tasks but not for {missing}: give all or none.")
    return tasks


# ---------------------------------------------------------------------------------------------------------------
# Model


def load_model(args: ContrastiveArguments) -> MoCaModel:
    kwargs = {"dtype": getattr(torch, args.dtype), "attn_implementation": args.attn_implementation}
    if AutoConfig.from_pretrained(args.model_name_or_path, trust_remote_code=False).model_type == "moca":
        model = MoCaModel.from_pretrained(args.model_name_or_path, **kwargs)
    else:
        model = MoCaModel.from_backbone(
            args.model_name_or_path, bidirectional=args.bidirectional, pooling=args.pooling, **kwargs
        )
    if args.matryoshka_dims:
        bad = [dim for dim in args.matryoshka_dims if not 0 < dim <= model.config.hidden_size]
        if bad:
            raise ValueError(f"--matryoshka_dims {bad} are outside 1..{model.config.hidden_size} (the hidden size)")
        model.config.matryoshka_dims = sorted(set(args.matryoshka_dims), reverse=True)
    return model


def add_lora(model: MoCaModel, args: ContrastiveArguments):
    from peft import LoraConfig, get_peft_model

    targets = args.lora_target_modules or DEFAULT_LORA_TARGET_MODULES
    if isinstance(targets, list) and len(targets) == 1:
        targets = targets[0]  # peft reads a single string as a regular expression
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=targets)  # fmt: skip
    model = get_peft_model(model, config)
    model.print_trainable_parameters()
    return model


# ---------------------------------------------------------------------------------------------------------------
# Trainer


def keep_rank_slices(prepared: DataLoader, sampler: TaskBatchSampler) -> DataLoader:
    """Undo accelerate's re-sharding of a dataloader whose batch sampler is already rank-aware.

    The sampler gives each process its slice of the same global batch; accelerate's shard wrapper would hand out
    whole batches round-robin (other tasks on other processes, and a fraction of the batches). Making the wrapper a
    passthrough is what the Trainer does for its own rank-aware batch sampler.
    """
    shard = getattr(prepared, "batch_sampler", None)
    if shard is not None and getattr(shard, "batch_sampler", None) is sampler:
        shard.num_processes, shard.process_index = 1, 0
        # The Trainer sets the epoch through the wrapper, also after `skip_first_batches` wraps it once more on
        # resuming; without this the wrapper would not pass it on and a resumed run would replay epoch 0's order.
        shard.set_epoch = sampler.set_epoch
    return prepared


class ContrastiveTrainer(Trainer):
    """Trainer with InfoNCE over the global batch, task-aware batches, GradCache, and MoCa checkpoints with a card."""

    def __init__(self, *args, contrastive_args: ContrastiveArguments, tasks: list[TaskSpec], **kwargs):
        super().__init__(*args, **kwargs)
        self.contrastive_args = contrastive_args
        self.tasks = tasks
        # The loss is a mean over the batch's queries, never normalised by a token count.
        self.model_accepts_loss_kwargs = False

    def get_train_dataloader(self) -> DataLoader:
        weights = [task.weight for task in self.tasks]
        sampler = TaskBatchSampler(
            self.train_dataset.task_sizes,
            global_batch_size=self.args.per_device_train_batch_size * self.args.world_size,
            num_replicas=self.args.world_size,
            rank=self.args.process_index,
            weights=weights if weights[0] is not None else None,
            task_aware=self.contrastive_args.task_aware_batching,
            drop_last=self.args.dataloader_drop_last,
            seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
        )
        dataloader = DataLoader(
            self.train_dataset,
            batch_sampler=sampler,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
            persistent_workers=self.args.dataloader_persistent_workers and self.args.dataloader_num_workers > 0,
            prefetch_factor=self.args.dataloader_prefetch_factor,
            worker_init_fn=functools.partial(
                seed_worker, num_workers=self.args.dataloader_num_workers, rank=self.args.process_index
            ),
        )
        return keep_rank_slices(self.accelerator.prepare(dataloader), sampler)

    def _loss(self, embeddings: torch.Tensor, num_queries: int) -> torch.Tensor:
        return contrastive_loss(
            embeddings[:num_queries],
            embeddings[num_queries:],
            temperature=self.contrastive_args.temperature,
            matryoshka_dims=self.contrastive_args.matryoshka_dims,
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        embeddings = torch.cat([model(**chunk).embeddings for chunk in inputs["chunks"]])
        loss = self._loss(embeddings, inputs["num_queries"])
        return (loss, {"embeddings": embeddings}) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not self.contrastive_args.grad_cache_chunk_size:
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        inputs = self._prepare_inputs(inputs)
        scale = 1.0 / self.current_gradient_accumulation_steps

        @contextlib.contextmanager
        def defer_gradient_sync():
            # DDP/FSDP: no all-reduce; DeepSpeed: accumulate without an optimizer step, until the last chunk.
            synced = self.accelerator.sync_gradients
            self.accelerator.gradient_state._set_sync_gradients(False)
            try:
                with self.accelerator.no_sync(model):
                    yield
            finally:
                self.accelerator.gradient_state._set_sync_gradients(synced)

        backward_kwargs = {"scale_wrt_gas": False} if self.is_deepspeed_enabled else {}
        with self.compute_loss_context_manager():
            return grad_cache_step(
                lambda chunk: model(**chunk).embeddings,
                inputs["chunks"],
                lambda embeddings: self._loss(embeddings, inputs["num_queries"]) * scale,
                backward=lambda surrogate: self.accelerator.backward(surrogate, **backward_kwargs),
                no_sync=defer_gradient_sync,
            )

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        skipped = getattr(self.data_collator, "skipped_rows", None)
        if "loss" in logs and skipped is not None:
            logs["skipped_rows"] = sum(skipped.values())  # this process's count, from the collator in this process
        super().log(logs, start_time)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict)
        output_dir = output_dir or self.args.output_dir
        # A LoRA checkpoint holds the adapter alone: no MoCa checkpoint to describe.
        if self.args.should_save and (Path(output_dir) / "config.json").exists():
            self.create_model_card(output_dir=output_dir)

    def _card_settings(self) -> dict:
        # Data sources and the starting model may be local paths: the card names only Hub ids (above).
        private = ("dataset", "dataset_config", "model_name_or_path")
        return {k: v for k, v in dataclasses.asdict(self.contrastive_args).items() if k not in private}

    def create_model_card(self, output_dir: str | None = None, **kwargs) -> None:
        """The MoCa card (also what `--push_to_hub` uploads), in place of the Trainer's generic one."""
        model = self.accelerator.unwrap_model(self.model)
        base = getattr(model, "get_base_model", lambda: model)()
        hub_names = [task.name for task in self.tasks if not Path(task.name).exists() and task.name.count("/") == 1]
        source = self.contrastive_args.model_name_or_path
        write_model_card(
            base,
            output_dir or self.args.output_dir,
            model_id=self.args.hub_model_id if self.args.push_to_hub else None,
            base_model=source if not Path(source).exists() and source.count("/") == 1 else None,
            datasets=hub_names or None,
            training_args=[self._card_settings(), self.args],
            tags=["contrastive", *(["lora"] if base is not model else [])],
        )


def main(argv: list[str] | None = None) -> ContrastiveTrainer:
    parser = HfArgumentParser((ContrastiveArguments, ContrastiveTrainingArguments))
    args, training_args = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=training_args.get_process_log_level()
    )
    if training_args.ddp_find_unused_parameters is None:
        # A text-only batch leaves the vision tower without gradients on its process.
        training_args.ddp_find_unused_parameters = True
    set_seed(training_args.seed)

    model = load_model(args)
    processor = model.processor
    if args.lora_r:
        model = add_lora(model, args)
    with training_args.main_process_first(desc="loading and validating the data"):
        tasks = load_tasks(args.dataset, args.dataset_config, split=args.dataset_split)
    collator = ContrastiveCollator(
        processor,
        tasks,
        num_hard_negatives=args.num_hard_negatives,
        max_length=args.max_length,
        chunk_size=args.grad_cache_chunk_size,
    )
    trainer = ContrastiveTrainer(
        model=model,
        args=training_args,
        train_dataset=MultiTaskDataset(tasks),
        data_collator=collator,
        contrastive_args=args,
        tasks=tasks,
    )

    resume = training_args.resume_from_checkpoint
    if resume == "last":
        resume = get_last_checkpoint(training_args.output_dir)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_state()  # trainer_state.json: the loss history, for reports
    if args.lora_r and args.merge_lora:
        trainer.model = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
    trainer.save_model()  # also pushes to the Hub with --push_to_hub
    return trainer


if __name__ == "__main__":
    main()
