import faiss
import pytest

from faiss_rqmoe import RQMoEConfig, index_factory
from faiss_rqmoe.description import parse_description


@pytest.mark.parametrize("description, fields, nlist, hnsw_m", [
    ("RQMoE8x8", {"M": 8, "nbits": 8}, 0, 0),
    ("IVF1024,RQMoE8x8", {"M": 8, "nbits": 8}, 1024, 0),
    ("IVF4096_HNSW32,RQMoE16x8", {"M": 16, "nbits": 8}, 4096, 32),
    ("RQMoE8x8_N4L2H256", {"M": 8, "nbits": 8, "n_experts": 4, "n_layers": 2, "hidden": 256}, 0, 0),
    ("IVF64,RQMoE8x6_N2_L1_H64_E32_qinco",
     {"M": 8, "nbits": 6, "n_experts": 2, "n_layers": 1, "hidden": 64, "instr_dim": 32,
      "condition": "reconstruction"}, 64, 0),
    ("RQMoE4x8_rq", {"M": 4, "nbits": 8, "condition": "none"}, 0, 0),
])
def test_grammar(description, fields, nlist, hnsw_m):
    assert parse_description(description) == (fields, nlist, hnsw_m)


def test_factory_builds_the_configured_index():
    index = index_factory(96, "IVF256_HNSW16,RQMoE16x8_N2L3H128", faiss.METRIC_INNER_PRODUCT,
                          nprobe=8, nshort=50, encode_beam=4, max_epochs=3)
    assert index.encode_beam == 4
    assert index.config == RQMoEConfig(96, 16, 8, n_experts=2, n_layers=3, hidden=128)
    assert (index.nlist, index.hnsw_m, index.nprobe, index.nshort) == (256, 16, 8, 50)
    assert index.metric_type == faiss.METRIC_INNER_PRODUCT and index.d == 96
    assert index.train_options == {"max_epochs": 3} and not index.is_trained
    assert not index.auto_architecture


def test_training_and_adding_take_their_own_candidate_counts():
    index = index_factory(32, "RQMoE4x6", encode_candidates=16, train_encode_candidates=8, max_epochs=2)
    assert index.encode_candidates == 16
    assert index.train_options == {"train_encode_candidates": 8, "max_epochs": 2}
    assert index.auto_architecture  # no N/L/H in the description: the size follows device and data


@pytest.mark.parametrize("description, token", [
    ("RQMoE8x8_Z7", "Z7"),
    ("IVFabc,RQMoE8x8", "IVFabc"),
    ("OPQ16,IVF1024,RQMoE8x8", "OPQ16"),
    ("PCA64,RQMoE8x8", "PCA64"),
    ("RQMoE8", "RQMoE8"),
])
def test_bad_strings_name_the_token_and_show_the_grammar(description, token):
    with pytest.raises(ValueError) as info:
        index_factory(64, description)
    assert repr(token) in str(info.value) and "Grammar" in str(info.value)


def test_bad_values_and_metric():
    with pytest.raises(ValueError, match="nbits"):
        index_factory(64, "RQMoE8x20")
    with pytest.raises(ValueError, match="metric"):
        index_factory(64, "RQMoE8x8", metric=7)


@pytest.mark.parametrize("beam", [0, 2.5, False])
def test_factory_rejects_a_bad_encode_beam(beam):
    with pytest.raises(ValueError, match="encode_beam must be an integer >= 1"):
        index_factory(16, "RQMoE4x4", encode_beam=beam)


def test_a_pretrained_index_keeps_training_and_adding_apart():
    """A TrainConfig's candidate count goes to training, the index's own keyword to adding, whichever way
    the pretrained codec is asked for."""
    from faiss_rqmoe import TrainConfig

    index = index_factory(128, "IVF1024,RQMoE8x8", pretrained="sift",
                          train_config=TrainConfig(train_encode_candidates=8))
    assert index.train_config.train_encode_candidates == 8
    assert index.encode_candidates == "auto"
    index = index_factory(128, "IVF1024,RQMoE8x8", pretrained="sift", encode_candidates=4,
                          train_encode_candidates=8)
    assert (index.encode_candidates, index.train_config.train_encode_candidates) == (4, 8)
    with pytest.raises(ValueError, match="not both"):
        index_factory(128, "IVF1024,RQMoE8x8", pretrained="sift", train_config=TrainConfig(),
                      train_encode_candidates=8)
