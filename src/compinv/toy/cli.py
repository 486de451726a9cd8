"""`compinv toy …` commands; `compinv.cli` registers them with `add_toy_commands`.

Heavy imports (torch) happen inside the commands so that `compinv --help` stays instant.
"""

from __future__ import annotations

import argparse


def _cmd_train_classifier(args: argparse.Namespace) -> None:
    from compinv.toy.classifier import train_classifier

    run = train_classifier(args.out, steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                           lr=args.lr, resume=args.resume, checkpoint_every=args.checkpoint_every,
                           eval_renders=args.eval_renders)
    scores = ", ".join(f"{k} {v:.4f}" for k, v in run.metrics.items()) or "not evaluated"
    print(f"classifier after {run.steps} steps in {run.out} ({scores})")


def _cmd_write_concepts(args: argparse.Namespace) -> None:
    from compinv.toy.concepts import write_concepts

    out = write_concepts(args.out, seed=args.seed)
    print(f"wrote the toy concepts and concepts.json to {out}")


def add_toy_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `toy train-classifier` and `toy write-concepts` to the main parser's subcommands."""
    toy = subparsers.add_parser("toy", help="the toy world: attribute classifier, toy concepts")
    commands = toy.add_subparsers(dest="toy_command", required=True)

    train = commands.add_parser("train-classifier", help="train the toy world's attribute classifier",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    train.add_argument("--out", default="toy-classifier", help="folder for the weights and classifier.json")
    train.add_argument("--steps", type=int, default=3000, help="optimisation steps (fresh renders each)")
    train.add_argument("--batch-size", type=int, default=128)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--lr", type=float, default=3e-3, help="peak AdamW lr (warm-up, then cosine)")
    train.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    train.add_argument("--checkpoint-every", type=int, default=250, help="steps between saves; 0: end only")
    train.add_argument("--eval-renders", type=int, default=4000,
                       help="held-out renders scored at the end; 0 skips the evaluation")
    train.set_defaults(func=_cmd_train_classifier)

    concepts = commands.add_parser("write-concepts", help="write the 3 toy concepts, 5 images each")
    concepts.add_argument("out", help="folder to write (one subfolder per concept)")
    concepts.add_argument("--seed", type=int, default=0)
    concepts.set_defaults(func=_cmd_write_concepts)
