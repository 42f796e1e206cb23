"""Training half: recipe schema, trainer loop, methods (Diffusion-DPO, KL-regularized reward
fine-tuning), rollouts, preference data and its order, checkpoints. Never imports evaluation."""
