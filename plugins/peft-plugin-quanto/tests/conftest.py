import os
import sys

# The repository runs pytest with --import-mode=importlib, which does not put test folders
# on sys.path; the test modules import their helpers from this folder.
sys.path.insert(0, os.path.dirname(__file__))
