"""Run under ``accelerate launch``: train a few steps, then every process writes its own weights
(``rank<k>.safetensors``) and the first batch it drew, so the test can compare processes."""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from imagen.config import load_stage_config
from imagen.trainer import Trainer

config_path, run_dir, data_root, out = sys.argv[1:5]
config = load_stage_config(config_path, [f"data.root={data_root}", "training.batch_size=4", "training.max_steps=3",
                                         "sampling.steps=2", "training.sample_guidance=[1]"])
trainer = Trainer.from_config(config, run_dir)
network = trainer.accelerator.unwrap_model(trainer.network)
initial = {f"initial.{k}": v.detach().clone().contiguous() for k, v in network.state_dict().items()}
first_batch, _ = trainer.next_batch()
trainer.train()
rank = trainer.accelerator.process_index
save_file({**initial, **{f"model.{k}": v.contiguous() for k, v in network.state_dict().items()},
           **{f"ema.{k}": v.contiguous() for k, v in trainer.ema.network.state_dict().items()},
           "first_batch": first_batch.contiguous(), "world": torch.tensor(trainer.accelerator.num_processes)},
          str(Path(out) / f"rank{rank}.safetensors"))
