"""Run by `accelerate launch` from test_distributed.py: train TI, dump this rank's vectors.

A separate script (not a forked test function) because GNU OpenMP's thread pool, already
started by earlier tests in the pytest process, deadlocks in forked children.
"""

import json
import sys
from pathlib import Path

from accelerate import PartialState
from safetensors.torch import save_file

from compinv.config import TrainConfig
from compinv.methods.textual_inversion import build_trainer


def main() -> None:
    cfg = TrainConfig(**json.loads(sys.argv[1]))
    trainer = build_trainer(cfg, Path(cfg.out))
    trainer.run()
    rank = PartialState().process_index
    save_file({"v": trainer.method.learned_vectors()}, str(Path(cfg.out) / f"rank{rank}.safetensors"))


if __name__ == "__main__":
    main()
