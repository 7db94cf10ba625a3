# SOAP (Vyas et al. 2024, "SOAP: Improving and Stabilizing Shampoo using Adam"; pytorch-optimizer's
# implementation): Adam run in the eigenbasis of Shampoo's preconditioner, refreshed every 10 steps,
# on every matrix (the 1-D gains and biases get plain Adam); betas and refresh frequency are the
# package's defaults, decoupled weight decay 0.1 as AdamW's here. Not in the Sophia paper.
# Cost: none by itself; included by config/train_*_soap.py, which state their cost.
optimizer_name = "soap"
weight_decay = 0.1
beta1 = 0.95
beta2 = 0.95
precondition_frequency = 10
