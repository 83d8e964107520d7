"""`cafe` command line: `cafe demo`, `cafe data`, `cafe pretrain`, `cafe train`, `cafe sweep`, `cafe eval`,
`cafe tiny`, `cafe scenes`.

Every subcommand takes `--config FILE` and any number of `--set section.key=value`."""
from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from cafe.config import ConfigError, load_config, with_absolute_paths

COMMANDS = {
    "demo": "the whole flow on the embedded default: scenes, data, training, evaluation",
    "scenes": "draw the embedded scenes data set into data.raw_dir",
    "tiny": "build the tiny offline checkpoint at model.checkpoint",
    "data": "convert OneVision-layout input into training Parquet (+ quarantine)",
    "pretrain": "train model.checkpoint with the LM-only stage of model.pretrain_config, when it is missing",
    "train": "train with Ray TorchTrainer + DeepSpeed; logs to MLflow",
    "sweep": "Ray Tune sweep over tune.search_space; one MLflow child run per trial under a parent run",
    "eval": "score --checkpoint (default: output_dir/model) on eval.suites: retrieval, MMEB, POPE, generation",
}

RESUME_HINTS = {
    command: "The same command continues it from the last checkpoint (train.checkpoint_every: how often one is kept)."
    for command in ("train", "pretrain", "demo")
} | {"sweep": "`cafe sweep --resume` with the same config continues it; finished trials are kept."}


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="cafe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", help="YAML experiment config (default: built-in defaults)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override, e.g. loss.con_weight=0.5")
        p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else in-process)")
        if name == "sweep":
            p.add_argument("--resume", action="store_true",
                           help="continue an interrupted sweep; finished trials are kept")
        if name == "eval":
            p.add_argument("--checkpoint", help="model directory to score")
            p.add_argument("--suite", help="comma-separated suites to score (default: every one in eval.suites)")
            p.add_argument("--subset", help="comma-separated MMEB subsets (default: every subset found)")
            p.add_argument("--step", type=int, default=0,
                           help="MLflow step to log at (e.g. the checkpoint's training step)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        cfg = with_absolute_paths(load_config(args.config, args.set))
    except (ConfigError, OSError) as err:
        print(f"cafe: config error: {err}", file=sys.stderr)
        return 2
    from cluster.session import init_ray, keep_local_ray_on_loopback

    keep_local_ray_on_loopback(args.address)
    from cafe.logs import quiet_libraries
    from cafe.model import check_weight_files
    from cluster import jobs  # heavy imports only once the config is known to be valid
    from evaluation.suites import prepare_tasks
    from trainers.run import InputError, TrainingStopped
    from trainers.tracking import RunConflict

    quiet_libraries()

    if args.command == "scenes":
        print(json.dumps(jobs.prepare_scenes(cfg), indent=2))
        return 0
    if args.command == "tiny":
        print(jobs.ensure_checkpoint(cfg))
        return 0
    if args.command == "eval":
        if args.subset:
            cfg.eval.mmeb_subsets = args.subset.split(",")
        checkpoint = Path(args.checkpoint or Path(cfg.output_dir, "model")).resolve()
        try:  # user errors are one line, before Ray or MLflow start
            if not (checkpoint / "config.json").is_file():
                raise FileNotFoundError(f"--checkpoint {checkpoint} is not a model directory (no config.json); "
                                        "train one first (`cafe train`) or pass an HF checkpoint directory")
            check_weight_files(checkpoint)
            args.tasks = prepare_tasks(cfg.eval, cfg.data.eval_dir,
                                       suites=args.suite.split(",") if args.suite else None)
            args.checkpoint_dir = checkpoint
        except (ValueError, FileNotFoundError) as err:
            print(f"cafe eval: {err}", file=sys.stderr)
            return 2
    try:
        check_inputs(args.command, cfg)
    except ValueError as err:  # ConfigError and InputError: the user's to fix
        print(f"cafe {args.command}: {err}", file=sys.stderr)
        return 2
    try:
        init_ray(cfg, args.address)
        signal.signal(signal.SIGTERM, _stop)  # `ray job stop` sends SIGTERM: end like Ctrl-C (after Ray's own handler)
        run_command(args, cfg, jobs)
    except (RunConflict, InputError) as err:  # found once MLflow or the run folder is read, after Ray has started
        print(f"cafe {args.command}: {err}", file=sys.stderr)
        return 2
    except TrainingStopped as err:
        print(f"cafe {args.command}: {err}; its MLflow run is marked FAILED and nothing was exported", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ncafe {args.command}: stopped; its MLflow run is marked KILLED. {RESUME_HINTS.get(args.command, '')}",
              file=sys.stderr)
        return 130
    return 0


def _stop(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_command(args: argparse.Namespace, cfg, jobs) -> None:
    if args.command == "pretrain":
        print(jobs.pretrain(cfg))
    elif args.command == "demo":
        result = jobs.demo(cfg)
        print_demo(result)
    elif args.command == "data":
        print(jobs.run_data(cfg).to_json())
    elif args.command == "sweep":
        print_sweep(jobs.sweep(cfg, resume=args.resume), cfg)
    elif args.command == "train":
        print(jobs.run_train(cfg))
    elif args.command == "eval":
        print(json.dumps(jobs.run_eval(cfg, args.checkpoint_dir, tasks=args.tasks, step=args.step), indent=2))
        print(f"report: {Path(cfg.output_dir) / 'scorecard'}")


def check_inputs(command: str, cfg) -> None:
    """What a command needs that can be checked before Ray or MLflow start (raises ValueError)."""
    if command == "sweep":
        from tuning.sweep import check_sweep

        check_sweep(cfg)
    elif command == "train":
        from trainers.run import check_training_inputs

        check_training_inputs(cfg)
    elif command == "pretrain" and not cfg.model.pretrain_config:
        raise ValueError("model.pretrain_config is empty; set it to a stage config such as configs/base.yaml")


def print_demo(result: dict) -> None:
    print(f"\nCAFe demo finished: the base, then the base fine-tuned with CAFe for {result['steps']} steps\n")
    print(result["comparison"])
    print(f"\nGreedy captions of held-out scenes:\n\n{result['captions']}\n")
    print(f"  base model    : {result['base']}")
    print(f"  CAFe model    : {result['model']}")
    print(f"  training data : {result['train_dir']}")
    print(f"  reports       : {result['reports']['base']}, {result['reports']['cafe']}")
    print(f"  MLflow        : {result['tracking_uri']} (run {result['run_id']}); "
          f"view with: mlflow ui --backend-store-uri {result['tracking_uri']} --host 127.0.0.1")


def print_sweep(result, cfg) -> None:
    print(f"\nsweep {result.name} finished: {len(result.summary.trials)} trials")
    for path in result.files:
        if path.suffix == ".md":
            print(path.read_text())
    print(f"  report  : {next(p for p in result.files if p.suffix == '.html')}")
    print(f"  MLflow  : {cfg.tracking.tracking_uri}, experiment {cfg.tracking.experiment!r}, parent run "
          f"{result.parent_run_id} (children tagged cafe.sweep={result.name}); the page is under the parent's "
          "artifacts, sweep/sweep.html")


if __name__ == "__main__":
    raise SystemExit(main())
