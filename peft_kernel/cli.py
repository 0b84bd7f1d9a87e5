"""The ``peft-kernel`` command line."""

from __future__ import annotations

import argparse
import json
import sys


def _plugins(args) -> int:
    from .plugins import manager

    records = manager().plugin_info()
    rows = [
        {
            "name": r.name, "distribution": r.distribution, "version": r.version, "methods": r.methods,
            "backends": r.backends, "combinations": r.combinations, "hooks": r.hooks, "error": r.error,
        }
        for r in records
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = ("plugin", "distribution", "version", "provides", "status")
    table = [header]
    for row in rows:
        provides = ", ".join(row["methods"] + row["backends"] + row["combinations"]) or "-"
        table.append((row["name"], row["distribution"] or "-", row["version"] or "-", provides,
                      ("BROKEN: " + row["error"]) if row["error"] else "ok"))
    widths = [max(len(str(r[i])) for r in table) for i in range(len(header))]
    for i, row in enumerate(table):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peft-kernel", description="Parameter-efficient fine-tuning, plugin-based.")
    sub = parser.add_subparsers(dest="command", required=True)
    plugins = sub.add_parser("plugins", help="list installed plugins, the methods and backends they provide")
    plugins.add_argument("--json", action="store_true", help="machine-readable output")
    plugins.set_defaults(func=_plugins)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
