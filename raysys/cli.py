"""`raysys` subcommands: synth, prepare, train, tune, predict, evaluate, serve, demo."""

from __future__ import annotations

import argparse
import json
import logging
import sys

# Flags shared by train/tune: CLI name -> config key.
RECIPE_FLAGS = {
    "--data": ("data.data", str, "folder/URI of .dcm files, or a prepared cache"),
    "--labels": ("data.labels", str, "RSNA ID,Label CSV"),
    "--windows": ("data.windows", str, "comma-separated windows, names or CENTER/WIDTH"),
    "--image-size": ("data.image_size", int, "square input size in pixels"),
    "--val-fraction": ("data.val_fraction", float, "share of patients held out for validation"),
    "--folds": ("data.folds", int, "k-fold split (0 = single split)"),
    "--fold": ("data.fold", int, "which fold validates"),
    "--seed": ("data.seed", int, "seed for split, balancing and augmentation"),
    "--neg-ratio": ("data.neg_ratio", float, "negatives kept per positive each epoch"),
    "--max-error-fraction": ("data.max_error_fraction", float, "fail above this share of unreadable files"),
    "--weights": ("model.weights", str, "none, imagenet, or a local state dict / checkpoint dir"),
    "--aux-logits": ("model.aux_logits", str, "true/false: InceptionV3 aux head (needs >= 299 px)"),
    "--epochs": ("train.epochs", int, "epochs"),
    "--batch-size": ("train.batch_size", int, "images per worker per step"),
    "--lr": ("train.lr", float, "Adam learning rate"),
    "--decay": ("train.decay", float, "per-epoch learning-rate decay"),
    "--workers": ("train.workers", int, "data-parallel workers"),
    "--gpus-per-worker": ("train.gpus_per_worker", float, "GPUs per worker (0 = CPU)"),
    "--cpus-per-worker": ("train.cpus_per_worker", float, "CPUs reserved per worker"),
    "--storage-path": ("train.storage_path", str, "local folder or s3:// URI for runs"),
    "--name": ("train.name", str, "run name; the same name resumes"),
    "--max-failures": ("train.max_failures", int, "worker-group restarts"),
    "--amp": ("train.amp", str, "auto, bf16 or off"),
    "--max-steps-per-epoch": ("train.max_steps_per_epoch", int, "cap steps per epoch (smoke tests)"),
}


def _add_recipe_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    parser.add_argument("--config", help="YAML config; flags override it")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="any config value")
    for flag, (key, kind, text) in RECIPE_FLAGS.items():
        if flag not in skip:
            parser.add_argument(flag, dest=key, type=kind, default=None, help=text,
                                metavar=flag.lstrip("-").upper().replace("-", "_"))


def _recipe_config(args: argparse.Namespace):
    from raysys.config import load_config

    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects SECTION.KEY=VALUE, got {item!r}")
        overrides[key] = value
    for key, _, _ in RECIPE_FLAGS.values():
        value = getattr(args, key, None)
        if value is not None:
            overrides[key] = value
    try:
        return load_config(args.config, overrides)
    except ValueError as e:
        raise SystemExit(f"config error: {e}") from None


def cmd_synth(args: argparse.Namespace) -> None:
    from raysys.phantom import PhantomConfig, write_dataset

    cfg = PhantomConfig(studies=args.studies, seed=args.seed, size=args.size, quirks=args.quirks)
    frame = write_dataset(args.out, cfg)
    positives = {name: int(frame[name].sum()) for name in ("any", "epidural", "intraparenchymal",
                                                            "intraventricular", "subarachnoid", "subdural")}
    print(json.dumps({"out": str(args.out), "slices": len(frame), "studies": args.studies, "positives": positives}))


def cmd_prepare(args: argparse.Namespace) -> None:
    import ray

    from raysys.data import prepare

    ray.init(address=args.address, ignore_reinit_error=True)
    stats = prepare(
        args.data, args.out, labels=args.labels, windows=args.windows, size=args.image_size,
        max_error_fraction=args.max_error_fraction,
    )
    print(json.dumps(stats))


def _init_ray(address: str | None) -> None:
    import ray

    from raysys.data import keep_worker_processes

    if not ray.is_initialized():
        keep_worker_processes()
        ray.init(address=address)


def cmd_train(args: argparse.Namespace) -> None:
    from raysys.train import fit

    cfg = _recipe_config(args)
    _init_ray(args.address)
    result = fit(cfg)
    print(json.dumps({"run_dir": str(result.run_dir), "best_checkpoint": result.best_checkpoint,
                      "val_weighted_log_loss": result.best_metrics["val_weighted_log_loss"],
                      "epochs": int(result.history["epoch"].max())}))


def cmd_tune(args: argparse.Namespace) -> None:
    from raysys.tune import SweepConfig, sweep

    cfg = _recipe_config(args)
    try:
        sweep_cfg = SweepConfig(num_samples=args.num_samples, max_epochs=args.max_epochs, grace_period=args.grace_period,
                                lr_min=args.lr_min, lr_max=args.lr_max, decay_min=args.decay_min,
                                decay_max=args.decay_max)
    except ValueError as e:
        raise SystemExit(f"config error: {e}") from None
    if args.workers_per_trial:
        cfg = cfg.replace(**{"train.workers": args.workers_per_trial})
    _init_ray(args.address)
    result = sweep(cfg, sweep_cfg, out=args.out, name=args.sweep_name)
    print(result.trials.to_string(index=False))
    print(json.dumps({"sweep_dir": str(result.sweep_dir), "best": str(result.best_dir)}))


def cmd_predict(args: argparse.Namespace) -> None:
    from raysys.predict import predict, submission

    _init_ray(args.address)
    preds = predict(args.checkpoint, args.data, batch_size=args.batch_size, actors=args.actors,
                    gpus_per_actor=args.gpus, tta=args.tta, max_error_fraction=1.0)
    frame = submission(preds, args.out, checkpoint=args.checkpoint, sample_submission=args.sample_submission,
                       allow_missing=args.allow_missing)
    rate = len(preds.frame) / preds.seconds if preds.seconds else 0.0
    print(json.dumps({"out": str(args.out), "images": len(preds.frame), "rows": len(frame),
                      "unreadable": len(preds.errors), "images_per_s": round(rate, 1)}))


def cmd_evaluate(args: argparse.Namespace) -> None:
    from raysys.predict import evaluate, predict

    _init_ray(args.address)
    preds = predict(args.checkpoint, args.data, batch_size=args.batch_size, actors=args.actors,
                    gpus_per_actor=args.gpus, tta=args.tta, max_error_fraction=1.0, run_dir=args.out)
    metrics = evaluate(preds, args.labels, args.checkpoint, args.out)
    print(json.dumps({k: metrics[k] for k in ("n_images", "weighted_log_loss", "prior_weighted_log_loss")}))


def cmd_serve(args: argparse.Namespace) -> None:
    import time

    from ray import serve

    from raysys.serve import build_app

    _init_ray(args.address)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_app(args.checkpoint, replicas=args.replicas, cpus_per_replica=args.cpus_per_replica,
                        gpus_per_replica=args.gpus_per_replica,
                        max_batch_size=args.max_batch_size), name="raysys", route_prefix="/")
    print(f"raysys serving {args.checkpoint} at http://{args.host}:{args.port}/v1/predict (Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        serve.shutdown()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="raysys", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write a synthetic head-CT dataset (DICOMs + labels.csv)")
    p.add_argument("out")
    p.add_argument("--studies", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--quirks", action="store_true", help="inject RSNA's file defects")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("prepare", help="decode + window DICOMs once into a Parquet cache")
    p.add_argument("--data", required=True)
    p.add_argument("--labels")
    p.add_argument("--out", required=True)
    p.add_argument("--windows", default="brain,subdural,soft_tissue")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--max-error-fraction", type=float, default=0.001)
    p.add_argument("--address", default=None, help="Ray address (default: start or join a local Ray)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train InceptionV3 with Ray Train (resumes a run of the same name)")
    _add_recipe_flags(p)
    p.add_argument("--address", default=None, help="Ray address (default: start or join a local Ray)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("tune", help="sweep lr and decay with Ray Tune (ASHA); export the best checkpoint")
    _add_recipe_flags(p, skip=("--name", "--epochs", "--lr", "--decay"))
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--max-epochs", type=int, default=8)
    p.add_argument("--grace-period", type=int, default=1)
    p.add_argument("--workers-per-trial", type=int, default=None)
    p.add_argument("--lr-min", type=float, default=1e-5)
    p.add_argument("--lr-max", type=float, default=3e-3)
    p.add_argument("--decay-min", type=float, default=0.5)
    p.add_argument("--decay-max", type=float, default=1.0)
    p.add_argument("--out", default="runs/sweeps", help="folder of sweeps")
    p.add_argument("--name", dest="sweep_name", default="sweep", help="sweep name; the same name resumes")
    p.add_argument("--address", default=None)
    p.set_defaults(func=cmd_tune)

    def inference_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--checkpoint", required=True, help="checkpoint directory (e.g. a sweep's best/)")
        p.add_argument("--data", required=True, help="folder/URI of .dcm files")
        p.add_argument("--batch-size", type=int, default=32)
        p.add_argument("--actors", type=int, default=1, help="model replicas in the actor pool")
        p.add_argument("--gpus", type=float, default=0.0, help="GPUs per actor (0 = CPU)")
        p.add_argument("--tta", choices=["none", "hflip"], default="none")
        p.add_argument("--address", default=None)

    p = sub.add_parser("predict", help="score a folder of DICOMs into a Kaggle submission")
    inference_flags(p)
    p.add_argument("--out", required=True, help="submission CSV")
    p.add_argument("--sample-submission", help="Kaggle sample CSV: output has exactly its IDs, in its order")
    p.add_argument("--allow-missing", action="store_true", help="fill unreadable/missing images with the prior")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("evaluate", help="metrics.json, roc.png and calibration.png on labelled data")
    inference_flags(p)
    p.add_argument("--labels", required=True)
    p.add_argument("--out", default="evaluation", help="report folder")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("serve", help="host a checkpoint behind HTTP with Ray Serve")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs (and torch threads) per replica")
    p.add_argument("--gpus-per-replica", type=float, default=0.0)
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--address", default=None)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="the whole system on built-in synthetic data")
    p.add_argument("--studies", type=int, default=None)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--workdir", default="demo-out")
    p.set_defaults(func=lambda a: __import__("raysys.demo", fromlist=["main"]).main(a))

    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    sys.exit(main())
