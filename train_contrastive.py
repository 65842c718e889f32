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

from moca.training.common import parse_arguments, run
from moca.training.contrastive import (
    ContrastiveArguments,
    ContrastiveCollator,
    ContrastiveTrainer,
    ContrastiveTrainingArguments,
    MultiTaskDataset,
    add_lora,
    load_contrastive_model,
    load_tasks,
)


def main(argv: list[str] | None = None) -> ContrastiveTrainer:
    args, training_args = parse_arguments((ContrastiveArguments, ContrastiveTrainingArguments), argv)

    model = load_contrastive_model(args)
    processor = model.processor
    if args.lora_r:
        model = add_lora(model, args)
    with training_args.main_process_first(desc="loading and validating the data"):
        tasks = load_tasks(args.dataset, args.dataset_config, split=args.split, image_root=args.image_dir)
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

    def merge_lora(trainer):
        if args.lora_r and args.merge_lora:
            trainer.model = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()

    return run(trainer, training_args, before_save=merge_lora)


if __name__ == "__main__":
    main()
