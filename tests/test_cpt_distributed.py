"""Two processes on CPU (gloo) run train_cpt.py: whole budget batches per process, same weights after a step."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from cpt_rows import make_rows, write_jsonl


REPO_ROOT = Path(__file__).resolve().parents[1]

WORKER = """
import json, os, sys
sys.path.insert(0, {repo!r})
from safetensors.torch import save_file
import train_cpt

out_dir = sys.argv[1]
trainer = train_cpt.main(sys.argv[2:])
rank = int(os.environ["RANK"])
shard = trainer.get_train_dataloader().batch_sampler  # accelerate's per-process view of the budget sampler
# The loader's batches are (epoch, index) pairs (the epoch travels with each row to the collator).
record = {{"mine": [[index for _, index in b] for b in shard], "all": shard.batch_sampler.batches,
          "steps": trainer.state.global_step, "logs": trainer.state.log_history}}
with open(f"{{out_dir}}/rank{{rank}}.json", "w") as f:
    json.dump(record, f)
weights = {{name: p.detach().contiguous() for name, p in trainer.model.named_parameters()}}
save_file(weights, f"{{out_dir}}/rank{{rank}}.safetensors")
"""


def test_two_processes_train_and_agree(tiny_vlm_dir, tmp_path):
    data = write_jsonl(make_rows(16, seed=11), tmp_path / "data")
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER.format(repo=str(REPO_ROOT)))
    # --standalone: torchrun binds its rendezvous store to port 0 and the workers join that store, so no port is
    # picked beforehand that a parallel test could take.
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
        str(worker), str(tmp_path),
        "--model_name_or_path", tiny_vlm_dir, "--min_image_tokens", "1", "--max_image_tokens", "16", "--dataset", str(data), "--output_dir", str(tmp_path / "run"),
        "--max_steps", "2", "--token_budget", "300", "--max_length", "256", "--learning_rate", "1e-3",
        "--ddp_backend", "gloo", "--use_cpu", "true", "--report_to", "none", "--logging_steps", "1",
        "--save_strategy", "no", "--disable_tqdm", "true",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]

    records = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    all_batches = records[0]["all"]
    assert records[1]["all"] == all_batches and len(all_batches) >= 4
    # Each process gets whole batches of the sampler, round-robin, the same number each, none shared.
    mine = [record["mine"] for record in records]
    assert len(mine[0]) == len(mine[1]) == -(-len(all_batches) // 2)
    assert mine[0][0] in all_batches and mine[1][0] in all_batches and mine[0][0] != mine[1][0]
    assert not set(map(tuple, mine[0][: len(all_batches) // 2])) & set(map(tuple, mine[1][: len(all_batches) // 2]))
    assert records[0]["steps"] == records[1]["steps"] == 2
    assert any("mlm_loss" in entry for entry in records[0]["logs"])

    weights = [load_file(tmp_path / f"rank{rank}.safetensors") for rank in (0, 1)]
    initial = load_file(next((Path(tiny_vlm_dir)).glob("*.safetensors")))
    for name, tensor in weights[0].items():
        torch.testing.assert_close(weights[1][name], tensor, rtol=0, atol=0, msg=name)
    # Training did move the weights.
    embed = weights[0]["moca.model.language_model.embed_tokens.weight"]
    assert not torch.equal(embed, initial["model.embed_tokens.weight"])
