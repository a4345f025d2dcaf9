"""xpnet: a neural-network framework with manual backpropagation, written once against the
Python Array API so that the same code trains on NumPy (CPU), CuPy (CUDA) and array-api-strict.
"""

from . import distributed
from .arch import ArchError, from_arch
from .backend import Device, DeviceError, available_devices, get_device
from .conv import AvgPool2D, Conv2D, GlobalAvgPool2D, MaxPool2D
from .gradcheck import GradcheckReport, gradcheck
from .initializers import he_normal, he_uniform, xavier_normal, xavier_uniform, zeros
from .layers import (
    Dense,
    Dropout,
    Flatten,
    Layer,
    LeakyReLU,
    ReLU,
    Residual,
    Sigmoid,
    Softmax,
    Tanh,
    layer_registry,
    register_layer,
)
from .losses import (
    BinaryCrossEntropy,
    Loss,
    MeanSquaredError,
    SoftmaxCrossEntropy,
    get_loss,
    loss_registry,
    register_loss,
)
from .metrics import Accuracy, BinaryAccuracy, Metric, metric_registry, register_metric
from .model import Sequential, cnn, mlp
from .normalization import BatchNorm
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
    optimizer_registry,
    register_optimizer,
)
from .parameters import Parameter, ParameterStore
from .registry import Registry
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
    "distributed",
    "cnn",
    "from_arch",
    "ArchError",
    "Residual",
    "BatchNorm",
    "Conv2D",
    "MaxPool2D",
    "AvgPool2D",
    "GlobalAvgPool2D",
    "Parameter",
    "ParameterStore",
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
    "Registry",
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
    "layer_registry",
    "loss_registry",
    "metric_registry",
    "mlp",
    "optimizer_registry",
    "predict",
    "register_layer",
    "register_loss",
    "register_metric",
    "register_optimizer",
    "xavier_normal",
    "xavier_uniform",
    "zeros",
]
