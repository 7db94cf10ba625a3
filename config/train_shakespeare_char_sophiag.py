# The CPU quick start with Sophia-G (it is the quick start itself); for scripts/compare.py.
# Cost: a few minutes on 2 CPU cores.
include("train_shakespeare_char.py")
out_dir = "out-shakespeare-char-sophiag"
