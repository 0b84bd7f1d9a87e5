"""pytest plugin of the conformance kit (registered through the ``pytest11`` entry point).

It stays import-light: it adds the ``conformance`` marker and, in the report header,
the peft-kernel plugins that the run will see.
"""

from __future__ import annotations


def pytest_configure(config):
    config.addinivalue_line("markers", "conformance: peft-kernel method contract tests")


def pytest_report_header(config):
    from importlib import metadata

    names = sorted(f"{ep.name}" for ep in metadata.entry_points(group="peft_kernel"))
    return f"peft-kernel plugins: {', '.join(names) or 'none'}"
