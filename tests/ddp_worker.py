"""Run by `accelerate launch` from test_distributed.py: train, then dump this rank's parameters.

A separate script (not a forked test function) because GNU OpenMP's thread pool, already
started by earlier tests in the pytest process, deadlocks in forked children.
"""

import json
import sys
from pathlib import Path

from accelerate import PartialState
from safetensors.torch import save_file

from compinv.methods import METHODS
from compinv.training import prepare


def main() -> None:
    cfg = METHODS[sys.argv[1]].config_class(**json.loads(sys.argv[2])).resolved()
    trainer = prepare(cfg, Path(cfg.out))
    trainer.run()
    rank = PartialState().process_index
    params = {f"p{i}": p.detach().clone() for i, p in enumerate(trainer.method.parameters())}
    save_file(params, str(Path(cfg.out) / f"rank{rank}.safetensors"))


if __name__ == "__main__":
    main()
