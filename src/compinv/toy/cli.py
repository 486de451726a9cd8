"""`compinv toy …` commands; `compinv.cli` registers them with `add_toy_commands`.

Heavy imports (torch) happen inside the commands so that `compinv --help` stays instant.
"""

from __future__ import annotations

import argparse

from compinv.errors import CompinvError


def _cmd_train_classifier(args: argparse.Namespace) -> None:
    if args.version == 2:
        from compinv.toy.classifier_v2 import load_pattern_classifier, record_metrics, train_pattern_classifier
        from compinv.toy.metrics_v2 import classifier_accuracy

        steps = train_pattern_classifier(args.out, steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                                         lr=args.lr, resume=args.resume, checkpoint_every=args.checkpoint_every)
        scores = classifier_accuracy(load_pattern_classifier(args.out), args.eval_renders) if args.eval_renders else {}
        if scores:
            record_metrics(args.out, scores, args.eval_renders)
        print(f"v2 classifier after {steps} steps in {args.out} ("
              + (", ".join(f"{k} {v:.4f}" for k, v in scores.items()) or "not evaluated") + ")")
        return
    from compinv.toy.classifier import train_classifier

    run = train_classifier(args.out, steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                           lr=args.lr, resume=args.resume, checkpoint_every=args.checkpoint_every,
                           eval_renders=args.eval_renders)
    scores = ", ".join(f"{k} {v:.4f}" for k, v in run.metrics.items()) or "not evaluated"
    print(f"classifier after {run.steps} steps in {run.out} ({scores})")


def _cmd_train_model(args: argparse.Namespace) -> None:
    if args.version == 2:
        return _train_model_v2(args)
    from compinv.toy.model import ToyModelSettings, train_toy_model

    v2_only = [f for f, v in (("--clip-steps", args.clip_steps), ("--clip-batch-size", args.clip_batch_size),
                              ("--stop-after", args.stop_after), ("--timestep-sampling", args.timestep_sampling))
               if v is not None]
    if v2_only:
        raise CompinvError(f"{', '.join(v2_only)}: only for --version 2")
    defaults = ToyModelSettings()
    settings = ToyModelSettings(vae_steps=_or(args.vae_steps, defaults.vae_steps), steps=_or(args.steps, defaults.steps),
                                batch_size=_or(args.batch_size, defaults.batch_size),
                                vae_batch_size=_or(args.vae_batch_size, defaults.vae_batch_size), seed=args.seed,
                                lr=_or(args.lr, defaults.lr))
    run = train_toy_model(args.out, settings, resume=args.resume, checkpoint_every=args.checkpoint_every)
    print(f"toy model in {run.out} after {run.seconds / 60:.1f} min of this run "
          f"(autoencoder PSNR {run.vae_psnr:.1f} dB); load it with StableDiffusionPipeline.from_pretrained")


def _train_model_v2(args: argparse.Namespace) -> None:
    import dataclasses

    from compinv.toy.model_v2 import ToyModelV2Settings, train_toy_model_v2

    d = ToyModelV2Settings()
    clip = dataclasses.replace(d.clip, steps=_or(args.clip_steps, d.clip.steps),
                               batch_size=_or(args.clip_batch_size, d.clip.batch_size))
    settings = dataclasses.replace(
        d, clip=clip, vae_steps=_or(args.vae_steps, d.vae_steps), steps=_or(args.steps, d.steps),
        batch_size=_or(args.batch_size, d.batch_size), vae_batch_size=_or(args.vae_batch_size, d.vae_batch_size),
        seed=args.seed, lr=_or(args.lr, d.lr), timestep_sampling=_or(args.timestep_sampling, d.timestep_sampling))
    run = train_toy_model_v2(args.out, settings, resume=args.resume, checkpoint_every=args.checkpoint_every,
                             stop_after=args.stop_after)
    state = run.state
    retrieval = state.get("retrieval")
    done = f"phase {state['phase']}, step {state['step']}"
    print(f"toy model v2 run in {args.out} ({done}) after {run.seconds / 60:.1f} min of this run"
          + (f"; CLIP held-out retrieval {retrieval['text_to_image']:.3f} text->image" if retrieval else "")
          + (f"; autoencoder PSNR {state['vae_psnr']:.1f} dB" if "vae_psnr" in state else ""))


def _or(value, default):
    return default if value is None else value


def _cmd_evaluate_model(args: argparse.Namespace) -> None:
    import json

    from compinv.artifacts import atomic_write_text
    from compinv.toy.ablation import GUIDANCE_SCALE, evaluate_toy_model, evaluate_toy_model_v2, toy_version
    from compinv.toy.model import load_toy_model

    args.guidance_scale = _or(args.guidance_scale, GUIDANCE_SCALE)
    pipe = load_toy_model(args.model)
    if toy_version(pipe) == 2:
        from compinv.toy.classifier_v2 import load_pattern_classifier

        scores = evaluate_toy_model_v2(pipe, load_pattern_classifier(args.classifier), args.n, args.seed,
                                       block_padding=args.block_padding, identity_images=args.identity_images,
                                       guidance_scale=args.guidance_scale)
    else:
        from compinv.toy.classifier import load_classifier

        scores = evaluate_toy_model(pipe, load_classifier(args.classifier), args.n, args.seed,
                                    block_padding=args.block_padding, guidance_scale=args.guidance_scale)
    for key, value in scores.items():
        print(f"{key:<26}{value:.3f}" if isinstance(value, float) else f"{key:<26}{value}")
    if args.out:
        atomic_write_text(args.out, json.dumps({"model": args.model or "shipped", "block_padding": args.block_padding,
                                                 "guidance_scale": args.guidance_scale, **scores}, indent=2))


def _cmd_write_concepts(args: argparse.Namespace) -> None:
    from compinv.toy.concepts import write_concepts

    out = write_concepts(args.out, seed=args.seed)
    print(f"wrote the toy concepts and concepts.json to {out}")


def add_toy_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `toy train-classifier`, `toy train-model` and `toy write-concepts` to the main parser's subcommands."""
    toy = subparsers.add_parser("toy", help="the toy world: attribute classifier, toy concepts")
    commands = toy.add_subparsers(dest="toy_command", required=True)

    train = commands.add_parser("train-classifier", help="train the toy world's attribute classifier",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    train.add_argument("--out", default="toy-classifier", help="folder for the weights and classifier.json")
    train.add_argument("--version", type=int, choices=(1, 2), default=1,
                       help="toy world: 1 (colours and shapes) or 2 (with patterns, 48 px)")
    train.add_argument("--steps", type=int, default=3000, help="optimisation steps (fresh renders each)")
    train.add_argument("--batch-size", type=int, default=128)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--lr", type=float, default=3e-3, help="peak AdamW lr (warm-up, then cosine)")
    train.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    train.add_argument("--checkpoint-every", type=int, default=250, help="steps between saves; 0: end only")
    train.add_argument("--eval-renders", type=int, default=4000,
                       help="held-out renders scored at the end; 0 skips the evaluation")
    train.set_defaults(func=_cmd_train_classifier)

    model = commands.add_parser("train-model", help="train the toy text-to-image model (SD format)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    model.add_argument("--out", default="toy-model", help="run folder; the pipeline goes to OUT/model")
    model.add_argument("--version", type=int, choices=(1, 2), default=1,
                       help="1: the shipped model (text encoder trained with the UNet); 2: the v2 world "
                            "(48 px, patterns) and a toy CLIP pretrained contrastively, then frozen (docs/toy-v2.md)")
    model.add_argument("--clip-steps", type=int, default=None, help="v2: toy CLIP steps (phase 1; default 3000)")
    model.add_argument("--clip-batch-size", type=int, default=None, help="v2: scene-caption pairs per CLIP step (128)")
    model.add_argument("--vae-steps", type=int, default=None, help="autoencoder steps (v1: 1200, v2: 1500)")
    model.add_argument("--steps", type=int, default=None, help="UNet steps (v1: 4000, with the text encoder; v2: 4100)")
    model.add_argument("--batch-size", type=int, default=None, help="scenes per UNet step (64)")
    model.add_argument("--vae-batch-size", type=int, default=None, help="scenes per autoencoder step (v1: 32, v2: 16)")
    model.add_argument("--seed", type=int, default=0)
    model.add_argument("--lr", type=float, default=None, help="peak AdamW lr of the UNet phase (6e-4; warm-up, cosine)")
    model.add_argument("--timestep-sampling", choices=("uniform", "logit-normal"), default=None,
                       help="v2: how the UNet phase draws diffusion timesteps (uniform, as SD)")
    model.add_argument("--stop-after", choices=("clip", "vae"), default=None,
                       help="v2: end after this phase (continue later with --resume)")
    model.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    model.add_argument("--checkpoint-every", type=int, default=100, help="steps between saves; 0: end only")
    model.set_defaults(func=_cmd_train_model)

    evaluate = commands.add_parser("evaluate-model", help="score a toy model on held-out captions",
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    evaluate.add_argument("--model", default=None, help="toy model folder, or a shipped one: v1 (default), v2")
    evaluate.add_argument("--n", type=int, default=400, help="held-out captions, one image each")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--block-padding", action="store_true",
                          help="cross-attention ignores the padding after <|endoftext|> (renormalised "
                               "over the rest): does the model read its words or a pooled summary?")
    evaluate.add_argument("--guidance-scale", type=float, default=None,
                          help="classifier-free guidance of every image (default: 3, the toy benchmarks' and demo's)")
    evaluate.add_argument("--classifier", default=None,
                          help="classifier folder (default: the shipped one of the model's toy world, v1 or v2)")
    evaluate.add_argument("--identity-images", type=int, default=20,
                          help="v2: images of each toy concept described in words (the identity bar)")
    evaluate.add_argument("--out", default=None, help="also write the scores to this JSON file")
    evaluate.set_defaults(func=_cmd_evaluate_model)

    concepts = commands.add_parser("write-concepts", help="write the 3 toy concepts, 5 images each")
    concepts.add_argument("out", help="folder to write (one subfolder per concept)")
    concepts.add_argument("--seed", type=int, default=0)
    concepts.set_defaults(func=_cmd_write_concepts)
