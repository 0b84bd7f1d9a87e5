import os
import sys

# test helpers (toy_quant) are imported as plain modules
sys.path.insert(0, os.path.dirname(__file__))
