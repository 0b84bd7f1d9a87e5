import os
import sys

# The repository runs pytest with --import-mode=importlib, which does not put test folders
# on sys.path; the test modules import gptq_layers from this folder.
sys.path.insert(0, os.path.dirname(__file__))

# Pack test layers with GPTQModel's pure-Python packer instead of JIT-compiling its C++
# packing extension (about two minutes on a 2-core machine). Must be set before gptqmodel
# is imported.
os.environ.setdefault("GPTQMODEL_DISABLE_PACK_EXT", "1")
