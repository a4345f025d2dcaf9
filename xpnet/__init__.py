"""xpnet: a neural-network framework with manual backpropagation, written once against the
Python Array API so that the same code trains on NumPy (CPU), CuPy (CUDA) and array-api-strict.
"""

from .backend import Device, DeviceError, available_devices, get_device
from .gradcheck import GradcheckReport, gradcheck
from .initializers import he_normal, he_uniform, xavier_normal, xavier_uniform, zeros
from .layers import Dense, Dropout, Flatten, Layer, LeakyReLU, ReLU, Sigmoid, Softmax, Tanh
from .losses import BinaryCrossEntropy, Loss, MeanSquaredError, SoftmaxCrossEntropy, get_loss
from .metrics import Accuracy, BinaryAccuracy, Metric
from .model import Sequential, mlp
from .optim import (
    SGD,
    Adam,
    AdamW,
    Constant,
    CosineDecay,
    ExponentialDecay,
    Momentum,
    Optimizer,
    Schedule,
    StepDecay,
    Warmup,
    clip_by_global_norm,
    get_optimizer,
)
from .train import (
    Callback,
    EarlyStopping,
    History,
    TrainingDiverged,
    TrainingState,
    evaluate,
    fit,
    predict,
    train_validation_split,
)

__version__ = "0.1.0"

__all__ = [
    "Accuracy",
    "Adam",
    "AdamW",
    "BinaryAccuracy",
    "BinaryCrossEntropy",
    "Callback",
    "Constant",
    "CosineDecay",
    "Dense",
    "Device",
    "DeviceError",
    "Dropout",
    "EarlyStopping",
    "ExponentialDecay",
    "Flatten",
    "GradcheckReport",
    "History",
    "Layer",
    "LeakyReLU",
    "Loss",
    "MeanSquaredError",
    "Metric",
    "Momentum",
    "Optimizer",
    "ReLU",
    "SGD",
    "Schedule",
    "Sequential",
    "Sigmoid",
    "Softmax",
    "SoftmaxCrossEntropy",
    "StepDecay",
    "Tanh",
    "TrainingDiverged",
    "TrainingState",
    "Warmup",
    "available_devices",
    "clip_by_global_norm",
    "evaluate",
    "fit",
    "get_device",
    "get_loss",
    "train_validation_split",
    "get_optimizer",
    "gradcheck",
    "he_normal",
    "he_uniform",
    "mlp",
    "predict",
    "xavier_normal",
    "xavier_uniform",
    "zeros",
]
