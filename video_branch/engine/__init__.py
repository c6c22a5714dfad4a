"""The engine: rollout, sampling, decode + reward (scoring), the training phases, the policy under DeepSpeed,
evaluation, checkpoints, logging and the trainer that runs them in order."""
