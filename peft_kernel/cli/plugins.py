"""``peft-kernel plugins``: the installed plugins and what each provides."""

from __future__ import annotations

import json

from ._common import print_table


def add_parser(sub) -> None:
    parser = sub.add_parser("plugins", help="list installed plugins, the methods and backends they provide",
                            description="List the installed plugins and the methods, quantization backends and "
                                        "combination types each provides; broken plugins are shown with the reason.")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..plugins import manager

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
    table = []
    for row in rows:
        provides = ", ".join(row["methods"] + row["backends"] + row["combinations"]) or "-"
        table.append((row["name"], row["distribution"] or "-", row["version"] or "-", provides,
                      ("BROKEN: " + row["error"]) if row["error"] else "ok"))
    print_table(table, ("plugin", "distribution", "version", "provides", "status"))
    return 0
