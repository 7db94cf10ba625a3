# The CPU quick start with Sophia-H (Hutchinson estimate on 4 of the 12 sequences every 10 steps).
# Cost: a few minutes on 2 CPU cores.
include("train_shakespeare_char.py")
out_dir = "out-shakespeare-char-sophiah"
optimizer_name = "sophiah"
rho = 0.01  # the paper's value for Sophia-H
hess_batch_size = 4
# learning_rate 5e-4 (the quick start's): best of the sweep 1.25e-4, 2.5e-4, 5e-4, 1e-3 (docs/RESULTS.md)
