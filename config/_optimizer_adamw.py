# AdamW as tuned in the paper (App. C.1).
# Cost: none by itself; included by config/train_*_adamw.py, which state their cost.
optimizer_name = "adamw"
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
