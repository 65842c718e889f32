"""Stage 2 of MoCa: heterogeneous contrastive fine-tuning (InfoNCE with hard negatives, task-aware batches).

    python train_contrastive.py --model_name_or_path runs/cpt --dataset data/contrastive \
        --output_dir runs/cl --per_device_train_batch_size 64 --grad_cache_chunk_size 16 --bf16
    python train_contrastive.py --model_name_or_path runs/cpt --dataset moca-embed/MoCa-CL-Pairs \
        --subsets visrag_ind ImageNet_1K MSCOCO_i2t --image_dir data/ --output_dir runs/cl ...
    torchrun --nproc_per_node 8 train_contrastive.py ...        # or: accelerate launch train_contrastive.py ...

`--model_name_or_path` is a MoCa checkpoint (e.g. the output of train_cpt.py) or a causal VLM (made bidirectional
here). Each `--dataset` is one task: a Hub name, a folder saved by `datasets.save_to_disk`, a folder of parquet/jsonl
files, or one such file, with rows `{"query_text", "query_image", "pos_text", "pos_image", "neg_text": [...],
"neg_image": [...]}`; a folder holding `tasks.json` stands for all the tasks it names. `--dataset_config` (a JSON
file `{task: {"query_prompt", "document_prompt", "weight"}}`, by default the `tasks.json` of such a folder; a file
task is named by its stem or its file name) gives each task its prompts and mixing weight.

The release's data is read as it is stored: with `--subsets`, each subset of a `--dataset` is one task, from the
Hub (`moca-embed/MoCa-CL-Pairs`: visrag_ind, tevatron_colpali, ImageNet_1K, MSCOCO_i2t, ...; `intfloat/mmE5-synthetic`:
Classification, Retrieval, VQA) or from a local folder holding one subfolder (saved dataset, parquet files) or one
data file per subset; with several `--dataset`, name a subset's dataset as `DATASET:SUBSET`. Rows in the release's
layout (`qry, qry_image_path, pos_text, pos_image_path, neg_text, neg_image_path`, the `neg_*` cells strings holding
a Python list literal) are read without a conversion step: the literals are parsed (never evaluated), Phi-3-V's
`<|image_1|>` becomes Qwen's image marker and is removed where a row has no image, and image paths are relative to
`--image_dir` (the folder holding `images/`, as the release's `scripts/prepare_images.sh` lays it out; for a local
folder of subsets, by default that folder). A row whose `neg_*` cell is no list literal is skipped and counted.

Hard negatives follow the release by default: each row gives the first `--num_hard_negatives` of its list (a short
list padded with its last), and each query is scored against every positive of the global batch and its own hard
negatives. `--negative_selection random` draws them per row and epoch instead (seeded, so a resumed run draws the
same); `--negatives batch` scores every query against every hard negative of the global batch.

The global batch is `per_device_train_batch_size` times the number of processes; every global batch comes from one
task. Every `TrainingArguments` flag works (`--max_steps`, `--save_steps`, `--resume_from_checkpoint`,
`--push_to_hub`, `--deepspeed`, `--fsdp`, ...; `--resume_from_checkpoint last`: the newest complete checkpoint of
`--output_dir`, exact: the resumed run is the uninterrupted one). A row that cannot be trained on is a counted skip
naming task, row and field; the run ends with a `skipped rows: N` line and the count per reason, and a non-finite
loss stops it with its step.
The tasks' prompts are saved in the checkpoint's config: named `TASK/query` and `TASK/document`, and as its
`query_prompt` / `document_prompt` when all tasks share one.
Each saved folder is a MoCa checkpoint (`AutoModel.from_pretrained(dir, trust_remote_code=True)`) with a model card;
with LoRA, the checkpoints hold the adapter and the final model is merged into full weights with `--merge_lora`.
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
    record_task_prompts,
)


def main(argv: list[str] | None = None) -> ContrastiveTrainer:
    args, training_args = parse_arguments((ContrastiveArguments, ContrastiveTrainingArguments), argv)

    model = load_contrastive_model(args)
    processor, moca_config = model.processor, model.config
    if args.lora_r:
        model = add_lora(model, args)
    data_seed = training_args.data_seed if training_args.data_seed is not None else training_args.seed
    with training_args.main_process_first(desc="loading and validating the data"):
        tasks = load_tasks(args.dataset, args.dataset_config, split=args.split, image_root=args.image_dir,
                           subsets=args.subsets, seed=data_seed)  # fmt: skip
    record_task_prompts(moca_config, tasks)
    collator = ContrastiveCollator(
        processor,
        tasks,
        num_hard_negatives=args.num_hard_negatives,
        max_length=args.max_length,
        chunk_size=args.grad_cache_chunk_size,
        negative_selection=args.negative_selection,
        seed=data_seed,
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
