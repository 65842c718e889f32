"""Stage 1 of MoCa: modality-aware continual pre-training (masked text + masked image patches, bidirectional).

    python train_cpt.py --model_name_or_path Qwen/Qwen2.5-VL-3B-Instruct --dataset rows.parquet \
        --output_dir runs/cpt --max_steps 1000 --bf16
    torchrun --nproc_per_node 8 train_cpt.py ...        # or: accelerate launch train_cpt.py ...

`--model_name_or_path` is a causal VLM (the heads start from its lm_head and middle layer) or a MoCa checkpoint
(with `cpt_heads.safetensors` when it was written by this script). Every `TrainingArguments` flag works
(`--max_steps`, `--save_steps`, `--resume_from_checkpoint`, `--push_to_hub`, `--report_to`, ...). Each saved
folder is a plain MoCa embedding checkpoint (`AutoModel.from_pretrained(dir, trust_remote_code=True)`) plus
the CPT heads; the Trainer's checkpoints add optimizer, scheduler and RNG states for resuming
(`--resume_from_checkpoint DIR`, or `last` for the newest complete checkpoint in `--output_dir`; one whose
writing was cut short is skipped). A new run refuses an `--output_dir` that holds another run's checkpoints
(`--overwrite_output_dir` to reuse it), and a non-finite loss stops the run with its step.

Data: rows `{"text", "images"}` (the layout of the release's CPT sets, `moca-embed/dclm_20b`, ...: `text` with
`<|vision_start|><|image_pad|><|vision_end|>` markers, `images` a list of encoded images; paths are read under
`--image_dir`). Every row is validated once before training; the rows skipped are counted by reason and the run
ends with a `skipped rows: N` line.

Micro-batches are built by `--token_budget` (equivalent tokens, padding included), not by a number of rows:
`--per_device_train_batch_size` is refused; `--gradient_accumulation_steps` multiplies them as usual. A row's cost
is what the collator keeps of it after truncation to `--max_length` (text tokens + 4 x image tokens).
Masks are drawn afresh each epoch from (`--seed`, epoch, row), so a resumed run sees the same masks as an
uninterrupted one; masked patches get one shared Gaussian vector per micro-batch (`--mae_noise shared`, the
release) or a draw each (`--mae_noise per_patch`).
"""

from moca.training.common import flag_given, parse_arguments, run
from moca.training.cpt import (
    CPTArguments,
    CPTCollator,
    CPTTrainer,
    CPTTrainingArguments,
    load_cpt_dataset,
    load_cpt_model,
    prepare_cpt_dataset,
)


def main(argv: list[str] | None = None) -> CPTTrainer:
    if flag_given(argv, "--per_device_train_batch_size"):
        raise ValueError("CPT micro-batches are built by compute: set --token_budget, not --per_device_train_batch_size.")
    args, training_args = parse_arguments((CPTArguments, CPTTrainingArguments), argv)

    model = load_cpt_model(args)
    processor = model.add_mask_token()
    with training_args.main_process_first(desc="loading and validating the data"):
        dataset = load_cpt_dataset(args.dataset, split=args.split, image_root=args.image_dir)
        dataset, skipped = prepare_cpt_dataset(
            dataset, processor, args.max_length, num_proc=args.preprocessing_num_workers
        )
    collator = CPTCollator(
        processor,
        text_mask_ratio=args.text_mask_ratio,
        image_mask_ratio=args.image_mask_ratio,
        max_length=args.max_length,
        shift_labels=args.shift_labels,
        seed=training_args.seed,
        mae_noise=args.mae_noise,
    )
    trainer = CPTTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=collator,
        token_budget=args.token_budget,
        skipped_rows=skipped,
        model_name_or_path=args.model_name_or_path,
    )
    return run(trainer, training_args)


if __name__ == "__main__":
    main()
