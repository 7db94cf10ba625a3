# Lion as in the paper (App. C.1, after Chen et al. 2023).
# Cost: none by itself; included by config/train_*_lion.py, which state their cost.
optimizer_name = "lion"
weight_decay = 0.2
beta1 = 0.95
beta2 = 0.98
