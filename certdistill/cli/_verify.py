"""``certdistill verify`` (VNN-COMP instances) and ``certdistill export`` (ONNX out)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from certdistill.cli._args import UsageError, check_suffix, int_tuple, positive_float

__all__ = ["add_export_parser", "add_verify_parser", "run_export", "run_verify"]


def add_verify_parser(commands, parents) -> None:
    parser = commands.add_parser(
        "verify",
        parents=parents,
        help="decide a VNN-LIB property of an ONNX network (VNN-COMP instances)",
        description="Decide whether a VNN-LIB property holds for an ONNX network, by complete "
        "verification. Prints sat (a counterexample exists; it is checked on the "
        "network), unsat (the property holds), timeout or unknown as its last line. "
        "With --instances, runs a VNN-COMP instances file (onnx,vnnlib,timeout per "
        "row, paths relative to it) and writes onnx,vnnlib,result,seconds.",
    )
    parser.add_argument("model", nargs="?", help="the .onnx network")
    parser.add_argument("property", nargs="?", help="the .vnnlib property (.vnnlib.gz too)")
    parser.add_argument(
        "--timeout",
        type=positive_float,
        default=300.0,
        help="seconds for the property (default 300)",
    )
    parser.add_argument(
        "--results-file",
        help="write the VNN-COMP results file there (the answer, and for sat the counterexample)",
    )
    parser.add_argument(
        "--instances", help="a VNN-COMP instances .csv instead of one model and property"
    )
    parser.add_argument(
        "--output", help="with --instances: the results .csv (onnx,vnnlib,result,seconds)"
    )
    parser.add_argument(
        "--results-dir", help="with --instances: one results file per instance in this folder"
    )
    parser.add_argument(
        "--no-batch",
        action="store_true",
        help="with --instances: verify the instances one at a time",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    parser.set_defaults(handler=run_verify)


def run_verify(args: argparse.Namespace) -> int:
    """Run ``certdistill verify``."""
    from certdistill.certification.vnncomp import verify, verify_instances

    if args.instances is not None:
        if args.model is not None or args.property is not None:
            raise UsageError("give either MODEL PROPERTY or --instances, not both")
        if args.results_file is not None:
            raise UsageError(
                "--results-file is for one property; use --results-dir with --instances"
            )
        output = None if args.output is None else check_suffix(args.output, (".csv",), "--output")

        def report(row) -> None:
            if not args.quiet:
                print(
                    f"{row.onnx},{row.vnnlib},{row.outcome.result},{row.outcome.seconds:.2f}",
                    file=sys.stderr,
                    flush=True,
                )

        rows = verify_instances(
            args.instances,
            output=output,
            results_dir=args.results_dir,
            batch=not args.no_batch,
            on_result=report,
        )
        counts = {
            name: sum(r.outcome.result == name for r in rows)
            for name in ("sat", "unsat", "timeout", "unknown")
        }
        total = sum(r.outcome.seconds for r in rows)
        print(
            f"{len(rows)} instances: "
            + ", ".join(f"{v} {k}" for k, v in counts.items())
            + f"; {total:.1f} s"
        )
        if output is not None:
            print(f"results: {output}")
        return 0
    if args.model is None or args.property is None:
        raise UsageError("give MODEL.onnx and PROPERTY.vnnlib (or --instances FILE)")
    if args.output is not None or args.results_dir is not None:
        raise UsageError("--output and --results-dir go with --instances")
    outcome = verify(args.model, args.property, timeout=args.timeout, verbose=int(not args.quiet))
    if args.results_file is not None:
        Path(args.results_file).write_text(outcome.results_text())
    print(f"{outcome.seconds:.2f} s", file=sys.stderr)
    print(outcome.result)
    return 0


def add_export_parser(commands, parents) -> None:
    parser = commands.add_parser(
        "export",
        parents=parents,
        help="write a saved model's network as ONNX",
        description="Write the network of a fitted teacher or student (.joblib or .cdsafe) as "
        "an ONNX file that takes the same rows as predict_proba and outputs logits "
        "and probabilities. Certifying the file gives the same certificates as "
        "certifying the model.",
    )
    parser.add_argument("model", help="the saved model (.joblib or .cdsafe)")
    parser.add_argument("output", help="the .onnx file to write")
    parser.add_argument(
        "--input-shape",
        type=int_tuple,
        default=None,
        help="shape of one input row (default: the model's own)",
    )
    parser.set_defaults(handler=run_export)


def run_export(args: argparse.Namespace) -> int:
    """Run ``certdistill export``."""
    from certdistill.cli._data_io import load_model
    from certdistill.io.onnx_export import export_onnx

    output = check_suffix(args.output, (".onnx",), "output")
    model = load_model(args.model)
    path = export_onnx(model, output, input_shape=args.input_shape)
    print(
        f"wrote {path} ({type(model).__name__}, {model.n_features_in_} features, "
        f"{len(model.classes_)} classes)"
    )
    return 0
