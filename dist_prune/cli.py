"""`dist-prune`: the command line.

    dist-prune run CONFIG [key.sub=value ...]     prune on Ray workers, register in MLflow
                                                  (--dry-run: check everything, start nothing)
    dist-prune config CONFIG [key.sub=value ...]  the resolved config, as YAML
    dist-prune sweep CONFIG key=v1,v2 [...]       every combination, as Ray Tune trials
    dist-prune pull models:/NAME@ALIAS DIR        fetch a registered model, verified, in the dense
                                                  HF layout (--keep-compressed: as stored)
    dist-prune decompress EXPORT DIR              a compressed export's dense HF layout
    dist-prune register DIR --model-name NAME     register an export made earlier
    dist-prune keys                               every config key, its default and meaning
    dist-prune submit CONFIG [key.sub=value ...] --address http://HEAD:8265 [--no-wait]
                                                  run the job on a Ray cluster (Ray Jobs API)
    dist-prune status|logs|stop JOB, dist-prune jobs   follow and control submitted jobs

Overrides as Hydra / OmegaConf write them: `key.sub=value`, `key.sub=null`, `~key.sub` (back to
its default; `~section` resets a section); `+key.sub=value` is refused (the schema is closed).

A user mistake prints one line `dist-prune: error: ...` and exits with code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dist_prune import __version__
from dist_prune.errors import UserError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dist-prune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"dist-prune {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="prune a model as a config describes")
    run.add_argument("config", nargs="?", help="YAML job file (omit for the defaults)")
    run.add_argument("overrides", nargs="*", metavar="key.sub=value",
                     help="config overrides: key.sub=value, key.sub=null, ~key.sub (its default)")
    run.add_argument("--dry-run", action="store_true",
                     help="check the config, model, data, export directory and registry as the driver "
                          "does, start nothing, and print what the job would run")
    seed = run.add_argument_group("Sparse-NEFT names (aliases of config keys)")
    seed.add_argument("--pruning_ratio", type=float, help="= prune.sparsity")
    seed.add_argument("--pruning_method", choices=("l1", "l2"),
                      help="= prune.method=magnitude with prune.norm=l1|l2")
    seed.add_argument("--pruning_interval", type=int,
                      help="= prune.schedule=cubic with prune.interval (prune gradually while tuning)")
    seed.add_argument("--neftune_alpha", type=float, help="= finetune.neftune.alpha")
    seed.add_argument("--dynamic_alpha", action="store_true", default=None,
                      help="= finetune.neftune.dynamic=true")

    config = commands.add_parser("config", help="print the resolved config as YAML (a job file)")
    config.add_argument("config", nargs="?", help="YAML job file (omit for the defaults)")
    config.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")

    sweep = commands.add_parser("sweep", help="run every combination of config values (Ray Tune)")
    sweep.add_argument("config", nargs="?", help="YAML job file or sweep file (base + grid)")
    sweep.add_argument("items", nargs="*", metavar="key.sub=v1,v2",
                       help="grid axes (comma-separated values) and plain overrides")

    pull = commands.add_parser("pull", help="download a registered model into a directory")
    pull.add_argument("uri", help="models:/NAME@ALIAS, models:/NAME/VERSION, models:/NAME/latest or models:/MODEL_ID")
    pull.add_argument("dir", help="destination directory (must not exist or be empty)")
    stored = pull.add_mutually_exclusive_group()
    stored.add_argument("--keep-compressed", action="store_true",
                        help="keep a compressed export (export.format sparse-*) as it is stored, which no "
                             "model loader reads; by default it is decompressed into the dense HF layout")
    stored.add_argument("--decompress", action="store_true",
                        help="the default (accepted so that scripts written before it was still run)")
    pull.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI "
                                             "or sqlite:///mlflow.db)")

    decompress = commands.add_parser("decompress", help="write the dense HF layout of a compressed export")
    decompress.add_argument("export", help="a dist-prune export in export.format sparse-bitmask or sparse-24-bitmask")
    decompress.add_argument("dir", help="destination directory (must not exist)")

    register = commands.add_parser("register", help="register an existing export directory in MLflow")
    register.add_argument("dir", help="a dist-prune export (verified before anything is logged)")
    register.add_argument("--model-name", required=True, help="registered model name")
    register.add_argument("--alias", default="candidate", help="alias set on the new version")
    register.add_argument("--experiment", default="dist-prune", help="MLflow experiment")
    register.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI "
                                                 "or sqlite:///mlflow.db)")

    commands.add_parser("keys", help="list every config key with its default and meaning")

    from launch.jobs import add_parsers  # submit, status, logs, stop, jobs

    add_parsers(commands)
    return parser


def _file_and_overrides(path: str | None, items: list[str]) -> tuple[str | None, list[str]]:
    """`run a=b` or `run ~a` without a config file: the first positional is an override, not a path."""
    if path is not None and ("=" in path or (path.startswith("~") and "/" not in path)):
        return None, [path, *items]
    return path, list(items)


def _split_config_and_overrides(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """The config file and overrides of `run`. Alias flags become overrides placed after the
    positional ones, so they win."""
    path, overrides = _file_and_overrides(args.config, args.overrides)
    if args.pruning_ratio is not None:
        overrides.append(f"prune.sparsity={args.pruning_ratio}")
    if args.pruning_method is not None:
        overrides += ["prune.method=magnitude", f"prune.norm={args.pruning_method}"]
    if args.pruning_interval is not None:
        overrides += ["prune.schedule=cubic", f"prune.interval={args.pruning_interval}"]
    if args.neftune_alpha is not None:
        overrides.append(f"finetune.neftune.alpha={args.neftune_alpha}")
    if args.dynamic_alpha:
        overrides.append("finetune.neftune.dynamic=true")
    return path, overrides


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        # each command imports what it runs, here: `--help`, `register` and `jobs` start without
        # torch or Ray (seconds each)
        if args.command == "run":
            from dist_prune.config import load_config
            from dist_prune.job import run

            path, overrides = _split_config_and_overrides(args)
            if args.dry_run:
                from dist_prune.job import dry_run

                print(dry_run(load_config(path, overrides)))
            else:
                run(load_config(path, overrides))
        elif args.command == "config":
            from dist_prune.config import config_yaml, load_config
            from dist_prune.redact import env_secrets, redact_uri, scrub

            path, overrides = _file_and_overrides(args.config, args.overrides)
            cfg = load_config(path, overrides, check_paths=False)  # the file may be a cluster's job
            if cfg.registry.tracking_uri:
                cfg.registry.tracking_uri = redact_uri(cfg.registry.tracking_uri)
            print(scrub(config_yaml(cfg), env_secrets()), end="")
        elif args.command == "sweep":
            from dist_prune.sweep import run_sweep

            run_sweep(*_file_and_overrides(args.config, args.items))
        elif args.command == "pull":
            from dist_prune.registry import pull

            print(pull(args.uri, Path(args.dir), tracking_uri=args.tracking_uri, keep_compressed=args.keep_compressed))
        elif args.command == "decompress":
            from dist_prune.io.decompress import decompress_export
            from dist_prune.io.destination import check_new_directory

            dst = check_new_directory(Path(args.dir))
            dst.parent.mkdir(parents=True, exist_ok=True)
            print(decompress_export(Path(args.export), dst))
        elif args.command == "register":
            from dist_prune.registry import register_directory

            registered = register_directory(Path(args.dir), tracking_uri=args.tracking_uri,
                                            experiment=args.experiment, model_name=args.model_name,
                                            alias=args.alias)
            print(f"registered {registered.uri} ({registered.alias_uri})")
        elif args.command == "keys":
            from dist_prune.config import describe_keys
            from dist_prune.methods import describe_methods  # imports torch: only this command

            for key, default, help in describe_keys():
                print(f"{key:<34} {default:<22} {help}")
            print("\nprune.method:")
            for line in describe_methods():
                print(f"  {line}")
        elif args.command in ("submit", "status", "logs", "stop", "jobs"):
            from launch.jobs import main as job_command

            return job_command(args)
    except UserError as e:
        print(f"dist-prune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dist-prune: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
