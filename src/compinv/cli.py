"""Command line: parse flags into the config dataclasses, call the Python API, say where results went.

Heavy imports (torch, diffusers) happen inside the commands so that `compinv --help` is instant.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from compinv.config import GenerateConfig
from compinv.errors import CompinvError
from compinv.evaluation.cli import add_evaluation_commands
from compinv.options import add_arguments, build_config, flag_for
from compinv.toy.cli import add_toy_commands


def _cmd_make_tiny_model(args: argparse.Namespace) -> None:
    from compinv.models import save_tiny_model

    out = save_tiny_model(args.out, size=args.size, seed=args.seed)
    print(f"wrote a random {args.size} SD-1.x-shaped pipeline to {out}")


def _cmd_train(args: argparse.Namespace) -> None:
    from compinv.methods import METHODS
    from compinv.training import train

    result = train(build_config(METHODS[args.method].config_class, args, args.config))
    print(f"learned {'embedding' if result.artifact.is_file() else 'weights'}: {result.artifact}")


def _cmd_train_layout(args: argparse.Namespace) -> None:
    from compinv.layout_training import train_layout_model
    from compinv.spatial.options import LayoutTrainConfig

    out = train_layout_model(build_config(LayoutTrainConfig, args, args.config))
    print(f"layout model: {out} (use it with `compinv generate --layout learned --layout-model {out}`)")


def _cmd_generate(args: argparse.Namespace) -> None:
    from compinv.generate import generate

    paths = generate(build_config(GenerateConfig, args, args.config))
    print(f"wrote {len(paths)} image(s) and generation.json to {paths[0].parent}")


def _cmd_inspect(args: argparse.Namespace) -> None:
    from compinv.inspection import inspect_run

    print(inspect_run(args.run, model=args.model, prompt=args.prompt, out=args.out,
                      steps=args.steps, seeds=args.seeds,
                      guidance_scale=args.guidance_scale).summary())


def _cmd_demo(args: argparse.Namespace) -> None:
    from compinv.demo import QUICK, DemoSize, run_demo

    size = QUICK if args.quick else DemoSize(ti_steps=args.ti_steps)
    report = run_demo(Path(args.out), concept=args.concept, size=size, model=args.model)
    print(f"demo finished; open {report.resolve()}")


class _Parser(argparse.ArgumentParser):
    """Usage mistakes end like every other bad input: one `error:` line naming the flag, exit 2
    (argparse would print the whole usage first). Sub-commands inherit this class."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="compinv", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    tiny = sub.add_parser("make-tiny-model", help="write a tiny random SD-shaped pipeline folder")
    tiny.add_argument("out", help="folder to create")
    tiny.add_argument("--size", default="tiny", choices=["tiny", "mid"])
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=_cmd_make_tiny_model)

    train = sub.add_parser("train", help="learn a concept")
    methods = train.add_subparsers(dest="method", required=True)
    from compinv.methods import METHODS

    for method in METHODS.values():
        parser_ = methods.add_parser(method.name, help=method.help, description=method.help,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        parser_.add_argument("--config", help="YAML or JSON file with the same keys; flags override it")
        add_arguments(parser_, method.config_class)
        parser_.set_defaults(func=_cmd_train)
    from compinv.spatial.options import LayoutTrainConfig

    layout = methods.add_parser("layout", help="learn a layout distribution from layouts the model "
                                               "proposes (for --layout learned)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    layout.add_argument("--config", help="YAML or JSON file with the same keys; flags override it")
    add_arguments(layout, LayoutTrainConfig)
    layout.set_defaults(func=_cmd_train_layout)

    gen = sub.add_parser("generate", help="generate images with learned concepts")
    gen.add_argument("--config", help="YAML or JSON file with the same keys; flags override it")
    add_arguments(gen, GenerateConfig)
    gen.set_defaults(func=_cmd_generate)

    inspect = sub.add_parser("inspect", help="will a learned concept compose? its vectors against "
                                             "the vocabulary, and with --prompt its attention share",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    inspect.add_argument("run", help="out folder of a `compinv train` run")
    inspect.add_argument("--model", help="base model (default: the run's, from its config.json)")
    inspect.add_argument("--prompt", help="prompt to measure attention on; '{}' marks the concept, "
                                          "e.g. 'a photo of {} and a backpack'")
    inspect.add_argument("--out", help="folder for inspection.json and the pictures (default: RUN/inspect)")
    inspect.add_argument("--steps", type=int, default=25, help="denoising steps")
    inspect.add_argument("--seeds", type=int, default=2, help="images averaged over")
    inspect.add_argument("--guidance-scale", type=float, default=7.5)
    inspect.set_defaults(func=_cmd_inspect)

    demo = sub.add_parser("demo", help="learn a toy concept with and without compositional inversion "
                                       "on the shipped toy model; write an HTML report",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    demo.add_argument("--out", default="demo-output", help="folder for the runs, images and report.html")
    demo.add_argument("--concept", default="striped-diamond",
                      help="a toy concept of the model's world (v1: striped-diamond, dotted-ring, two-tone-heart; "
                           "v2 also checked-star, striped-cross, dotted-triangle)")
    demo.add_argument("--ti-steps", type=int, default=300, help="Textual Inversion steps per variant")
    demo.add_argument("--quick", action="store_true", help="reduced mode: 10 steps, 2 prompts x 2 seeds")
    demo.add_argument("--model", default=None, help="toy model folder, or a shipped one: v1, v2 (default: v1)")
    demo.set_defaults(func=_cmd_demo)

    add_toy_commands(sub)
    add_evaluation_commands(sub)
    return parser


def _quiet_libraries() -> None:
    """Keep stderr for our warnings and errors: the libraries' load bars and notices drown them."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(format="%(levelname)s: %(message)s", level=logging.INFO)
    logging.getLogger("compinv").setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed
        return int(exc.code or 0)
    try:
        args.func(args)
    except CompinvError as exc:
        print(f"error: {exc.render(flag_for)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; resume with --resume latest", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
