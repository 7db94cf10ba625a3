# AdamW as tuned in the paper (App. C.1).
# Cost: none by itself; included by config/train_gpt2_*_adamw.py, which states its cost.
optimizer_name = "adamw"
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
