# Sophia-H as in the paper (App. C.1, Sec. 3.4): Hutchinson estimate on 32 sequences every 10 steps
# (32 must be a multiple of the number of GPUs).
# Cost: none by itself; included by config/train_gpt2_*_sophiah.py, which states its cost.
optimizer_name = "sophiah"
weight_decay = 0.2
beta1 = 0.96
beta2 = 0.99
rho = 0.01
hess_interval = 10
hess_batch_size = 32
