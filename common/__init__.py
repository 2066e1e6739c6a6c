"""Shared pieces of the training scripts: config, data, models, rollouts, rewards, tracking, checkpoints."""
