"""faiss_rqmoe: RQ-MoE (Residual Quantization via Mixture of Experts) as a drop-in FAISS index.

Public names: IndexRQMoE, index_factory, read_index, write_index, RQMoE,
RQMoEConfig, train_rqmoe.
"""
from .factory import index_factory
from .index import IndexRQMoE
from .io import read_index, write_index
from .model import RQMoE, RQMoEConfig
from .train import TrainHistory, train_rqmoe

__all__ = ["IndexRQMoE", "index_factory", "read_index", "write_index", "RQMoE", "RQMoEConfig",
           "TrainHistory", "train_rqmoe"]
__version__ = "0.1.0"
