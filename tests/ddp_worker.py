"""Run by `accelerate launch` from test_distributed.py: train, then dump this rank's parameters.

A separate script (not a forked test function) because GNU OpenMP's thread pool, already
started by earlier tests in the pytest process, deadlocks in forked children.
"""

import json
import sys
from pathlib import Path

from accelerate import PartialState
from safetensors.torch import save_file

from compinv.config import CustomDiffusionConfig, TrainConfig
from compinv.methods import custom_diffusion, textual_inversion

METHODS = {"textual-inversion": (TrainConfig, textual_inversion.build_trainer),
           "custom-diffusion": (CustomDiffusionConfig, custom_diffusion.build_trainer)}


def main() -> None:
    config_class, build_trainer = METHODS[sys.argv[1]]
    cfg = config_class(**json.loads(sys.argv[2]))
    trainer = build_trainer(cfg, Path(cfg.out))
    trainer.run()
    rank = PartialState().process_index
    params = {f"p{i}": p.detach().clone() for i, p in enumerate(trainer.method.parameters())}
    save_file(params, str(Path(cfg.out) / f"rank{rank}.safetensors"))


if __name__ == "__main__":
    main()
