# Lion as in the paper (App. C.1, after Chen et al. 2023).
# Cost: none by itself; included by config/train_gpt2_*_lion.py, which states its cost.
optimizer_name = "lion"
weight_decay = 0.2
beta1 = 0.95
beta2 = 0.98
