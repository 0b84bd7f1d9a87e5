"""Helpers of the contrib tests: where contrib lives and how to import its scripts."""

import importlib.util
import sys
from pathlib import Path

CONTRIB = Path(__file__).resolve().parents[2] / "contrib"


def load(relative: str, name: str):
    """Import a contrib file as a module (contrib is a folder of scripts, not a package)."""
    path = CONTRIB / relative
    if name in sys.modules:
        return sys.modules[name]
    sys.path.insert(0, str(path.parent))  # its own imports (lora_lstm, separable_conv3d) resolve
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
