# The CPU quick start's model and budget with Lion (betas and weight decay as in the paper).
# Cost: a few minutes on 2 CPU cores.
include("train_shakespeare_char.py")
include("_optimizer_lion.py")
out_dir = "out-shakespeare-char-lion"
learning_rate = 5e-4  # best of the sweep 1.25e-4, 2.5e-4, 5e-4, 1e-3 (docs/RESULTS.md)
min_lr = 5e-5
