"""faiss_rqmoe: RQ-MoE (Residual Quantization via Mixture of Experts) as a drop-in FAISS index.

Public names: IndexRQMoE, index_factory, read_index, write_index,
serialize_index, deserialize_index, clone_index, pretrained (a shipped codec
by name), RQMoE (the network), Engine and Execution (its fast inference),
RQMoEConfig, Condition, TrainConfig, TrainHistory, train_rqmoe.

Importing the package hooks faiss's write_index, read_index,
serialize_index, deserialize_index, clone_index and ParameterSpace so that
they accept an IndexRQMoE (``faiss_hooks``; FAISS_RQMOE_FAISS_HOOKS=0 turns
this off).
"""
from . import faiss_hooks
from .config import Condition, RQMoEConfig
from .engine import Engine, Execution
from .factory import index_factory
from .index import IndexRQMoE
from .io import clone_index, deserialize_index, read_index, serialize_index, write_index
from .model import RQMoE
from .pretrained_codecs import load as pretrained
from .train import TrainConfig, TrainHistory, train_rqmoe

__all__ = ["IndexRQMoE", "index_factory", "read_index", "write_index", "serialize_index",
           "deserialize_index", "clone_index", "pretrained", "RQMoE", "Engine", "Execution",
           "RQMoEConfig", "Condition", "TrainConfig", "TrainHistory", "train_rqmoe"]
__version__ = "0.2.0"

faiss_hooks.install_unless_disabled()
