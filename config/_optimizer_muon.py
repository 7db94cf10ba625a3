# Muon (torch.optim.Muon, Nesterov momentum 0.95) for the hidden matrices, AdamW (0.9, 0.95) for
# embeddings, gains and biases; Muon's LR is scaled to match AdamW's update RMS (Moonshot), so
# one peak LR and decoupled weight decay 0.1 drive both. Not in the Sophia paper.
# Cost: none by itself; included by config/train_*_muon.py, which state their cost.
optimizer_name = "muon"
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
muon_momentum = 0.95
