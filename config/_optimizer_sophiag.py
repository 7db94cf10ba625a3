# Sophia-G as in the paper (App. C.1): GNB estimate on half of the 480-sequence batch every 10 steps.
# Cost: none by itself; included by config/train_gpt2_*_sophiag.py, which states its cost.
optimizer_name = "sophiag"
weight_decay = 0.2
beta1 = 0.96
beta2 = 0.99
rho = 0.05
hess_interval = 10
hess_batch_size = 240
