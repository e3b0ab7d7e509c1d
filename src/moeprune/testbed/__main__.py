"""`python -m moeprune.testbed [NAME ...]`: build (or find) testbed models and print their reports."""

from __future__ import annotations

import argparse
import json
import sys

from moeprune.errors import MoepruneError

from .train import TESTBEDS, get_testbed, summarise_report


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m moeprune.testbed", description=__doc__)
    ap.add_argument(
        "names", nargs="*", default=list(TESTBEDS),
        help=f"testbeds to build (default: all of {list(TESTBEDS)})",
    )
    ap.add_argument("--cache-dir", default=None, help="default: $MOEPRUNE_CACHE or ~/.cache/moeprune")
    ap.add_argument("--rebuild", action="store_true", help="retrain even if a cached model exists")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = ap.parse_args(argv)
    for name in args.names:
        try:
            path = get_testbed(name, args.cache_dir, rebuild=args.rebuild, threads=args.threads)
        except MoepruneError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        report = json.loads((path / "testbed_report.json").read_text())
        print(path)
        print(summarise_report(report))


if __name__ == "__main__":
    main()
