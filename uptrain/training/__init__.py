"""Uptraining: continue pre-training a converted model for α of the original steps (see train.py)."""
from uptrain.training.train import TrainResult, train

__all__ = ["train", "TrainResult"]
