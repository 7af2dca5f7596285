import torch

from channel.bench_entropy import _streams
from common.profile import parse_profile
from common.quant.pca import PCACodec, TensorBasis
from common.plan import kv_codec


def test_uniform_codes_split_into_one_stream_per_channel():
    keys, values = torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    for spec in ("int4:g32", "int2:k=token:v=channel", "int3:g8"):
        codec = kv_codec(parse_profile(spec), 0)
        payload = codec.encode(keys, values)
        symbols, ids, bits, other = _streams(codec, payload, tuple(keys.shape))
        assert symbols.numel() == ids.numel() == 2 * keys.numel()
        assert int(symbols.max()) < 2**bits and int(ids.max()) == 2 * 2 * 16 - 1
        assert torch.bincount(ids).unique().tolist() == [40]  # every channel holds every token
        assert 0 < other < payload.numel()  # scales and offsets beside the codes


def test_pca_codes_stream_per_component():
    dim = 8
    basis = TensorBasis(torch.zeros(dim), torch.eye(dim), torch.linspace(2, 0.1, dim))
    codec = PCACodec(basis, basis, torch.tensor([3, 2, 1, 0, 0, 0, 0, 0] * 2))
    keys, values = torch.randn(1, 1, 5, dim), torch.randn(1, 1, 5, dim)
    symbols, ids, bits, other = _streams(codec, codec.encode(keys, values), tuple(keys.shape))
    assert (bits, other) == (3, 0)
    assert sorted(set(ids.tolist())) == [0, 1, 2, 8, 9, 10] and symbols.numel() == 6 * 5
    assert int(symbols[ids == 2].max()) <= 1  # a one-bit component
