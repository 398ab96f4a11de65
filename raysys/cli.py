"""`raysys` subcommands: synth, prepare, train, train-sequence, tune, predict, evaluate, serve, demo.

Every default lives in raysys/config.py: a flag left out keeps the configuration's value, and
every local path a flag names is made absolute there, once.
"""

from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger("raysys")


def _print_json(obj) -> None:
    """A command's one result line on stdout: strict JSON (NaN and infinities as null), as parsers expect."""
    from raysys.storage import to_json

    print(to_json(obj, indent=None), flush=True)


# Flag tables: CLI flag -> (config key, type, help). A flag's default is always None ("keep the config's").
RECIPE_FLAGS = {
    "--data": ("data.data", str, "folder/URI of .dcm files, or a prepared cache"),
    "--labels": ("data.labels", str, "RSNA ID,Label CSV (local path or URI)"),
    "--windows": ("data.windows", str, "comma-separated windows, names or CENTER/WIDTH"),
    "--image-size": ("data.image_size", int, "square input size in pixels"),
    "--val-fraction": ("data.val_fraction", float, "share of patients held out for validation"),
    "--folds": ("data.folds", int, "k-fold split (0 = single split)"),
    "--fold": ("data.fold", int, "which fold validates"),
    "--seed": ("data.seed", int, "seed for split, balancing and augmentation"),
    "--neg-ratio": ("data.neg_ratio", float, "negatives kept per positive each epoch"),
    "--neighbors": ("data.neighbors", int, "2.5D: slices on each side of the same series as extra channels"),
    "--max-error-fraction": ("data.max_error_fraction", float, "fail above this share of unreadable files"),
    "--weights": ("model.weights", str, "none, imagenet, or a state dict / checkpoint dir (path or URI)"),
    "--aux-logits": ("model.aux_logits", str, "true/false: InceptionV3 aux head (needs >= 299 px)"),
    "--epochs": ("train.epochs", int, "epochs"),
    "--batch-size": ("train.batch_size", int, "images per worker per step"),
    "--lr": ("train.lr", float, "Adam learning rate"),
    "--decay": ("train.decay", float, "per-epoch learning-rate decay"),
    "--workers": ("train.workers", int, "data-parallel workers"),
    "--gpus-per-worker": ("train.gpus_per_worker", float, "GPUs per worker (0 = CPU)"),
    "--cpus-per-worker": ("train.cpus_per_worker", float, "CPUs reserved per worker"),
    "--storage-path": ("train.storage_path", str, "local folder or s3:// URI; the run is <storage-path>/<name>"),
    "--name": ("train.name", str, "run name; the same name resumes"),
    "--max-failures": ("train.max_failures", int, "worker-group restarts"),
    "--amp": ("train.amp", str, "training step precision: auto (bf16 on CUDA from batch 256), bf16 or off"),
    "--compile": ("train.compile", str, "torch.compile the training step: off, default, reduce-overhead (CUDA "
                  "graphs), max-autotune, or aot_eager (traces without generating code: a quick check)"),
    "--max-steps-per-epoch": ("train.max_steps_per_epoch", int, "cap steps per epoch (smoke tests)"),
    "--pin-memory": ("train.pin_memory", str, "true/false: batches in page-locked memory for the copy to the GPU"),
    "--mlflow-uri": ("train.mlflow_uri", str, "MLflow tracking URI or folder (pip install 'raysys[mlflow]')"),
    "--mlflow-experiment": ("train.mlflow_experiment", str, "MLflow experiment name"),
}
PREPARE_FLAGS = {flag: RECIPE_FLAGS[flag] for flag in
                 ("--data", "--labels", "--windows", "--image-size", "--max-error-fraction")}
SWEEP_FLAGS = {
    "--storage-path": ("sweep.storage_path", str, "local folder or s3:// URI; the sweep is <storage-path>/<name>"),
    "--name": ("sweep.name", str, "sweep name; the same name resumes"),
    "--num-samples": ("sweep.num_samples", int, "trials"),
    "--max-epochs": ("sweep.max_epochs", int, "epochs of a trial ASHA never stops"),
    "--grace-period": ("sweep.grace_period", int, "epochs before ASHA may stop a trial"),
    "--reduction-factor": ("sweep.reduction_factor", int, "ASHA keeps the best 1/rf at each rung"),
    "--workers-per-trial": ("sweep.workers_per_trial", int, "data-parallel workers per trial (0 = --workers)"),
    "--lr-min": ("sweep.lr_min", float, "learning rate, log-uniform from"),
    "--lr-max": ("sweep.lr_max", float, "... to"),
    "--decay-min": ("sweep.decay_min", float, "per-epoch decay, uniform from"),
    "--decay-max": ("sweep.decay_max", float, "... to"),
}
SEQUENCE_FLAGS = {
    "--checkpoint": ("sequence.cnn", str, "the trained CNN checkpoint directory or URI (a run's or sweep's best)"),
    **{flag: RECIPE_FLAGS[flag] for flag in ("--data", "--labels", "--val-fraction", "--folds", "--fold", "--seed",
                                             "--max-error-fraction", "--workers", "--gpus-per-worker",
                                             "--cpus-per-worker", "--storage-path", "--name", "--max-failures",
                                             "--mlflow-uri", "--mlflow-experiment")},
    "--epochs": ("sequence.epochs", int, "passes over the training series"),
    "--lr": ("sequence.lr", float, "AdamW learning rate"),
    "--decay": ("sequence.decay", float, "per-epoch learning-rate decay"),
    "--weight-decay": ("sequence.weight_decay", float, "AdamW weight decay"),
    "--hidden": ("sequence.hidden", int, "GRU width per direction"),
    "--dropout": ("sequence.dropout", float, "dropout on the projected slice inputs"),
    "--features": ("sequence.features", str, "true/false: read the CNN's pooled features besides its logits"),
    "--batch-size": ("sequence.batch_size", int, "series per step"),
}
INFERENCE_FLAGS = {
    "--batch-size": ("batch_size", int, "images per forward pass"),
    "--actors": ("actors", int, "model replicas in the actor pool"),
    "--gpus": ("gpus_per_actor", float, "GPUs per actor (0 = CPU)"),
    "--cpus-per-actor": ("cpus_per_actor", float, "CPUs (torch threads) per CPU actor"),
    "--tta": ("tta", str, "none or hflip"),
}
SERVE_FLAGS = {
    "--host": ("host", str, "interface to listen on"),
    "--port": ("port", int, "HTTP port"),
    "--replicas": ("replicas", int, "model replicas"),
    "--cpus-per-replica": ("cpus_per_replica", float, "CPUs (and torch threads) per replica"),
    "--gpus-per-replica": ("gpus_per_replica", float, "GPUs per replica"),
    "--max-batch-size": ("max_batch_size", int, "images per micro-batch"),
    "--batch-wait-ms": ("batch_wait_ms", float, "how long a micro-batch waits to fill"),
    "--max-body-bytes": ("max_body_bytes", int, "largest request body"),
    "--max-files": ("max_files", int, "most files in one multipart request"),
    "--max-image-side": ("max_image_side", int, "most rows/columns a DICOM header may claim"),
    "--max-image-bytes": ("max_image_bytes", int, "most decoded pixel bytes a DICOM header may claim"),
    "--token-file": ("token_file", str, "file on every node holding the bearer token (else the node's RAYSYS_API_TOKEN)"),
}


def _add_flags(parser: argparse.ArgumentParser, table: dict) -> None:
    for flag, (key, kind, text) in table.items():
        parser.add_argument(flag, dest=key, type=kind, default=None, help=text,
                            metavar=flag.lstrip("-").upper().replace("-", "_"))


def _given(args: argparse.Namespace, table: dict) -> dict:
    """The flags of `table` that were given: {config key: value}."""
    return {key: getattr(args, key) for key, _, _ in table.values() if getattr(args, key, None) is not None}


def _add_config_flags(parser: argparse.ArgumentParser, *tables: dict) -> None:
    parser.add_argument("--config", help="YAML config (sections data, augment, model, train, sweep, sequence); flags override it")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="any config value")
    merged = {}
    for table in tables:
        merged.update(table)
    _add_flags(parser, merged)
    parser.set_defaults(flag_table=merged)


def _config(args: argparse.Namespace):
    from raysys.config import load_config

    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects SECTION.KEY=VALUE, got {item!r}")
        overrides[key] = value
    overrides.update(_given(args, args.flag_table))
    try:
        return load_config(args.config, overrides)
    except ValueError as e:
        raise SystemExit(f"config error: {e}") from None


def _require(cfg, command: str, *keys: str) -> None:
    """Refuse, before Ray starts, a run missing what it cannot do without, naming the flag."""
    from raysys.config import InputError

    flags = {"data.data": "--data (a folder or URI of .dcm files, or a prepared cache)",
             "data.labels": "--labels (the RSNA ID,Label CSV)",
             "sequence.cnn": "--checkpoint (the trained CNN checkpoint)"}
    missing = [flags[key] for key in keys for section, name in [key.split(".")] if not getattr(getattr(cfg, section), name)]
    if missing:
        raise InputError(f"raysys {command}: missing {' and '.join(missing)}")


def _section(cls, args: argparse.Namespace, table: dict):
    """InferenceConfig / ServeConfig from the given flags; defaults from config.py."""
    from raysys.config import build_config

    try:
        return build_config(cls, _given(args, table), cls.__name__)
    except ValueError as e:
        raise SystemExit(f"config error: {e}") from None


def cmd_synth(args: argparse.Namespace) -> None:
    from raysys.storage import resolve
    from raysys.synthetic import PhantomConfig, write_dataset

    cfg = PhantomConfig(studies=args.studies, seed=args.seed, size=args.size, quirks=args.quirks)
    out = resolve(args.out)
    frame = write_dataset(out, cfg)
    positives = {name: int(frame[name].sum()) for name in ("any", "epidural", "intraparenchymal",
                                                            "intraventricular", "subarachnoid", "subdural")}
    _print_json({"out": out, "slices": len(frame), "studies": args.studies, "positives": positives})


def cmd_prepare(args: argparse.Namespace) -> None:
    from raysys.data import prepare
    from raysys.runtime import init_ray

    cfg = _config(args)
    _require(cfg, "prepare", "data.data")
    init_ray(args.address)
    _print_json(prepare(cfg.data, args.out))


def cmd_train(args: argparse.Namespace) -> None:
    """Train; the run directory gets metrics.csv, curves.png and index.html (the run as one page)."""
    from raysys.runtime import init_ray
    from raysys.train import SCORE, fit

    cfg = _config(args)
    _require(cfg, "train", "data.data", "data.labels")
    init_ray(args.address)
    _print_fit(fit(cfg), SCORE, "train")


def cmd_train_sequence(args: argparse.Namespace) -> None:
    """Train the sequence stage; its run directory gets metrics.csv, curves.png and index.html, as train's."""
    from raysys.runtime import init_ray
    from raysys.train import SCORE
    from raysys.train_sequence import fit_sequence

    cfg = _config(args)
    _require(cfg, "train-sequence", "data.data", "data.labels", "sequence.cnn")
    init_ray(args.address)
    _print_fit(fit_sequence(cfg), SCORE, "train-sequence")


def _print_fit(result, score: str, command: str) -> None:
    """A finished run's page (index.html in its run directory, one log line), then the run as one JSON line:
    where it is, its best checkpoint and score, the epochs run."""
    from raysys.report import run_page

    log.info("report: %s", run_page(result, command))
    _print_json({"run_dir": result.run_dir, "best_checkpoint": result.best_checkpoint,
                 score: result.best_metrics[score], "epochs": int(result.history["epoch"].max())})


def cmd_tune(args: argparse.Namespace) -> None:
    """Sweep; the sweep directory gets trials.csv, sweep.png, best/ and index.html (the sweep as one page)."""
    from raysys.report import sweep_page
    from raysys.runtime import init_ray
    from raysys.tune import sweep

    if args.stage == "sequence":
        _sequence_flags(args)
    cfg = _config(args)
    _require(cfg, "tune", "data.data", "data.labels", *(("sequence.cnn",) if args.stage == "sequence" else ()))
    init_ray(args.address)
    result = sweep(cfg, stage=args.stage)
    log.info("report: %s", sweep_page(result, stage=args.stage))
    print(result.trials.drop(columns=["checkpoint"]).to_string(index=False))
    _print_json({"sweep_dir": result.sweep_dir, "best": result.best_dir})


# `raysys tune` flags that set the CNN's training; with --stage sequence the CNN is already trained.
CNN_ONLY_FLAGS = ("--windows", "--image-size", "--neg-ratio", "--neighbors", "--weights", "--aux-logits", "--amp",
                  "--compile", "--max-steps-per-epoch", "--pin-memory")


def _sequence_flags(args: argparse.Namespace) -> None:
    """`raysys tune --stage sequence`: --batch-size is the sequence stage's (series per step); the CNN's own
    flags are refused, by name, instead of being silently ignored."""
    from raysys.config import InputError

    given = [flag for flag in CNN_ONLY_FLAGS if getattr(args, RECIPE_FLAGS[flag][0], None) is not None]
    if given:
        raise InputError(f"raysys tune --stage sequence: {', '.join(given)} set the CNN's training, which "
                         "--checkpoint already holds; the sequence stage's settings are --set sequence.KEY=VALUE")
    batch = getattr(args, RECIPE_FLAGS["--batch-size"][0])
    if batch is not None:
        setattr(args, RECIPE_FLAGS["--batch-size"][0], None)
        args.set.append(f"{SEQUENCE_FLAGS['--batch-size'][0]}={batch}")


def cmd_predict(args: argparse.Namespace) -> None:
    from raysys import storage
    from raysys.config import InferenceConfig
    from raysys.predict import predict_folder, submission
    from raysys.runtime import init_ray

    cfg = _section(InferenceConfig, args, INFERENCE_FLAGS)
    init_ray(args.address)
    # Unreadable files are listed in errors.csv beside the submission (with a sample, its images without a row too).
    preds = predict_folder(args.checkpoint, args.data, cfg, run_dir=storage.parent(args.out))
    frame = submission(preds, args.out, checkpoint=args.checkpoint, sample_submission=args.sample_submission,
                       allow_missing=args.allow_missing)
    rate = len(preds.frame) / preds.seconds if preds.seconds else 0.0
    _print_json({"out": args.out, "images": len(preds.frame), "rows": len(frame),
                 "unreadable": len(preds.errors), "images_per_s": round(rate, 1)})


def cmd_evaluate(args: argparse.Namespace) -> None:
    """Score labelled data; --out gets metrics.json, roc.png, calibration.png, errors.csv and index.html."""
    from raysys.config import InferenceConfig
    from raysys.predict import evaluate_predictions, predict_folder
    from raysys.report import evaluate_page
    from raysys.runtime import init_ray

    cfg = _section(InferenceConfig, args, INFERENCE_FLAGS)
    init_ray(args.address)
    preds = predict_folder(args.checkpoint, args.data, cfg, run_dir=args.out)
    metrics = evaluate_predictions(preds, args.labels, args.checkpoint, args.out)
    log.info("report: %s", evaluate_page(args.out, metrics, checkpoint=args.checkpoint, data=args.data))
    shown = {k: metrics[k] for k in ("n_images", "weighted_log_loss", "prior_weighted_log_loss")}
    if "cnn" in metrics:  # a sequence checkpoint: its CNN alone beside it
        shown["cnn_weighted_log_loss"] = metrics["cnn"]["weighted_log_loss"]
    _print_json(shown)


def cmd_serve(args: argparse.Namespace) -> None:
    import time

    from ray import serve

    from raysys.config import ServeConfig
    from raysys.runtime import init_ray
    from raysys.serve import build_app

    cfg = _section(ServeConfig, args, SERVE_FLAGS)
    init_ray(args.address)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(args.checkpoint, cfg), name="raysys", route_prefix="/")
    log.info("serving %s at http://%s:%d/v1/predict (Ctrl-C stops)", args.checkpoint, cfg.host, cfg.port)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log.info("stopping")
    finally:
        serve.shutdown()


def _resolve_paths(args: argparse.Namespace) -> None:
    """Paths outside the config sections (checkpoint, out, workdir, ...) are made absolute here, once."""
    from raysys.storage import resolve

    for name in ("checkpoint", "data", "out", "labels", "sample_submission", "workdir"):
        if getattr(args, name, None):
            setattr(args, name, resolve(getattr(args, name)))


def build_parser() -> argparse.ArgumentParser:
    """The `raysys` command line: one subcommand per job, each with its handler as `func`."""
    parser = argparse.ArgumentParser(prog="raysys", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    address = {"default": None, "help": "Ray address (default: start or join a local Ray)"}

    from raysys.synthetic import PhantomConfig

    p = sub.add_parser("synth", help="write a synthetic head-CT dataset (DICOMs + labels.csv)")
    p.add_argument("out")
    p.add_argument("--studies", type=int, default=PhantomConfig.studies)
    p.add_argument("--seed", type=int, default=PhantomConfig.seed)
    p.add_argument("--size", type=int, default=PhantomConfig.size)
    p.add_argument("--quirks", action="store_true", help="inject RSNA's file defects")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("prepare", help="decode + window DICOMs once into a Parquet cache")
    _add_config_flags(p, PREPARE_FLAGS)
    p.add_argument("--out", required=True, help="cache folder or URI")
    p.add_argument("--address", **address)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train InceptionV3 with Ray Train (resumes a run of the same name)")
    _add_config_flags(p, RECIPE_FLAGS)
    p.add_argument("--address", **address)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("train-sequence", help="train the study-context stage (a BiGRU over each series) on a "
                       "trained CNN's outputs with Ray Train; resumes a run of the same name")
    _add_config_flags(p, SEQUENCE_FLAGS)
    p.add_argument("--address", **address)
    p.set_defaults(func=cmd_train_sequence)

    p = sub.add_parser("tune", help="sweep lr and decay with Ray Tune (ASHA); export the best checkpoint")
    recipe = {k: v for k, v in RECIPE_FLAGS.items() if k not in ("--name", "--storage-path", "--epochs", "--lr",
                                                                   "--decay")}
    _add_config_flags(p, recipe, SWEEP_FLAGS,
                      {"--checkpoint": ("sequence.cnn", str, "with --stage sequence: the trained CNN checkpoint")})
    p.add_argument("--stage", choices=("cnn", "sequence"), default="cnn",
                   help="sweep CNN trainings (default) or the sequence stage on --checkpoint's outputs")
    p.add_argument("--address", **address)
    p.set_defaults(func=cmd_tune)

    def inference_parser(name: str, text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text)
        p.add_argument("--checkpoint", required=True, help="checkpoint directory or URI (e.g. a sweep's best/)")
        p.add_argument("--data", required=True, help="folder/URI of .dcm files")
        _add_flags(p, INFERENCE_FLAGS)
        p.add_argument("--address", **address)
        return p

    p = inference_parser("predict", "score a folder of DICOMs into a Kaggle submission")
    p.add_argument("--out", required=True, help="submission CSV")
    p.add_argument("--sample-submission", help="Kaggle sample CSV: output has exactly its IDs, in its order")
    p.add_argument("--allow-missing", action="store_true", help="fill unreadable/missing images with the prior")
    p.set_defaults(func=cmd_predict)

    p = inference_parser("evaluate", "metrics.json, roc.png, calibration.png and index.html on labelled data")
    p.add_argument("--labels", required=True)
    p.add_argument("--out", default="evaluation", help="report folder")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("serve", help="host a checkpoint behind HTTP with Ray Serve")
    p.add_argument("--checkpoint", required=True)
    _add_flags(p, SERVE_FLAGS)
    p.add_argument("--address", **address)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="the whole system on built-in synthetic data")
    p.add_argument("--studies", type=int, default=None)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--workdir", default="demo-out")
    p.set_defaults(func=lambda a: __import__("raysys.demo", fromlist=["main"]).main(a))
    return parser


def main(argv: list[str] | None = None) -> None:
    from raysys.runtime import configure_logging, plain_output

    plain_output()
    configure_logging()
    args = build_parser().parse_args(argv)
    _resolve_paths(args)
    from raysys.config import InputError

    try:
        args.func(args)
    except InputError as e:  # the user's input, not a bug: the message says what and how to fix it
        log.error("%s", e)
        raise SystemExit(1) from None


if __name__ == "__main__":
    sys.exit(main())
