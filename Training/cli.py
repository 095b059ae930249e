"""Command line of the training package: cache, train, export, grid, report.

``kantumorseg-train --config X.yaml [--override key=value ...]`` and
``kantumorseg-export RUN_DIR -o Resources/Models/kanunet2d_brats.safetensors`` are the
installed entry points; ``python -m Training {cache,train,export,grid,report}`` reaches all five.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _train_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", type=Path, help="YAML config (missing keys take the study's defaults)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="set one config value, e.g. train.epochs=2 (repeatable)")
    return parser


def _export_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("run_dir", type=Path, help="a finished run directory (config.yaml, best.pt, results.json)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="weights file to write (.safetensors)")
    parser.add_argument("--name", default="", help="model name stored in the card")
    parser.add_argument("--member", type=Path, action="append", default=[], metavar="WEIGHTS",
                        help="an exported model to ship as a --confidence ensemble member (float16, beside the output; repeatable)")
    return parser


def _run(func) -> int:
    from KANTumorSegLib.errors import KANTumorSegError

    try:
        func()
    except (KANTumorSegError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def _train(args) -> None:
    from .config import load_config

    if args.config is not None and not args.config.exists():
        raise FileNotFoundError(f"Config file {args.config} does not exist.")
    config = load_config(args.config, args.override)
    from .train import train

    run_dir = train(config)
    print(run_dir)


def _export(args) -> None:
    from .export import export_run

    card = export_run(args.run_dir, args.output, args.name)
    print(f"{args.output} ({card['weights_dtype']}, sha256 {card['sha256'][:12]}...)")
    if args.member:
        from .export import add_members

        card = add_members(args.output, args.member)
        print(f"members: {', '.join(card['confidence_members'])} (float16)")


def train_main(argv: list[str] | None = None) -> int:
    args = _train_parser(argparse.ArgumentParser(prog="kantumorseg-train", description="Train a KANU-Net 2D")).parse_args(argv)
    return _run(lambda: _train(args))


def export_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kantumorseg-export", description="Export a run as safetensors + model card")
    args = _export_parser(parser).parse_args(argv)
    return _run(lambda: _export(args))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m Training", description="KANTumorSeg training pipeline")
    commands = parser.add_subparsers(dest="command", required=True)
    _train_parser(commands.add_parser("train", help="train one run"))
    _export_parser(commands.add_parser("export", help="export a run to safetensors + model card"))
    cache = commands.add_parser("cache", help="build the 8-bit slice cache of the training cases and stage it for a GPU")
    cache.add_argument("--root", type=Path, default=Path("../shared/data/brats_samples"), help="the shared BraTS samples")
    cache.add_argument("--cache", type=Path, default=Path(".cache/slices_q8"), help="cache folder (data.cache)")
    cache.add_argument("--stage", type=Path, default=None,
                       help="also hard-link the training caches into STAGE/part1, part2, ... "
                            "(each fits one device call: Training/scripts/device_run.sh)")
    cache.add_argument("--ranges", default="slice", help="intensity ranges to cache, comma-separated: slice, volume")
    cache.add_argument("--test", action="store_true", help="cache and stage the test cases too (for train.test on the device)")
    grid = commands.add_parser("grid", help="run the experiment grid as parallel processes")
    grid.add_argument("--config", type=Path, required=True, help="grid YAML (base config, seeds, cells)")
    grid.add_argument("--jobs", type=int, default=4, help="runs at a time")
    grid.add_argument("--gpus", type=int, default=0, help="spread the runs over this many GPUs (0: leave CUDA_VISIBLE_DEVICES alone)")
    grid.add_argument("--only", default="", help="comma-separated cell names to run (default: all)")
    grid.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="set for every run (repeatable)")
    report = commands.add_parser("report", help="tables and figures from finished runs")
    report.add_argument("runs", type=Path, help="folder of run directories")
    # No default folder: a report over other runs must not silently replace the committed figures.
    report.add_argument("--figures", type=Path, default=None, help="write the PNG figures into this folder")
    report.add_argument("--tables", type=Path, default=None, help="write the markdown tables here")
    report.add_argument("--overlay-model", type=Path, default=None, help="weights file for Fig. 3")
    report.add_argument("--overlay-case", type=Path, default=None, help="BraTS case folder for Fig. 3")
    args = parser.parse_args(argv)
    if args.command == "train":
        return _run(lambda: _train(args))
    if args.command == "export":
        return _run(lambda: _export(args))
    if args.command == "cache":
        from .data import stage_cache

        return _run(lambda: print(stage_cache(args.root, args.cache, args.stage, tuple(args.ranges.split(",")), test=args.test)))
    if args.command == "grid":
        from .grid import run_grid

        return _run(lambda: run_grid(args.config, args.jobs, [c for c in args.only.split(",") if c], args.override,
                                      args.gpus))
    from .report import overlay_figure, write_report

    def report() -> None:
        overlay = args.overlay_model is not None and args.overlay_case is not None
        if overlay and args.figures is None:
            raise ValueError("--overlay-model and --overlay-case draw Fig. 3 into --figures; give that folder too.")
        write_report(args.runs, args.figures, args.tables)
        if overlay:
            overlay_figure(args.overlay_model, args.overlay_case, args.figures / "fig3_overlay.png")

    return _run(report)
