"""Write docs/hooks.md from the hook specs' docstrings (the specs are the reference)."""

import inspect
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from peft_kernel import hookspecs  # noqa: E402

OUT = pathlib.Path(__file__).resolve().parent.parent / "docs" / "hooks.md"


def render() -> str:
    lines = ["# Hook reference", "",
             "Generated from `peft_kernel/hookspecs.py` by `scripts/gen_hook_docs.py`; edit the docstrings, "
             "not this file.", "", inspect.getdoc(hookspecs), ""]
    for name, fn in inspect.getmembers(hookspecs, inspect.isfunction):
        if not name.startswith("peft_kernel_"):
            continue
        opts = getattr(fn, "peft_kernel_spec", {}) or {}
        flags = ", ".join(k for k, v in opts.items() if v is True)
        lines += [f"## `{name}{inspect.signature(fn)}`", ""]
        if flags:
            lines += [f"*Options: {flags}*", ""]
        lines += [inspect.getdoc(fn) or "", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
