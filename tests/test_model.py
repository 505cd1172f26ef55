from __future__ import annotations

import keras
import numpy as np
import pytest

from flexunet.config import ModelConfig
from flexunet.errors import ConfigError
from flexunet.model import build, count_params, estimate_cost


def _cfg(**kw) -> ModelConfig:
    base = dict(image_width=64, image_height=64, num_classes=2, image_channels=1, base_filters=4,
                num_layers=4)
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("kw", [
    {},
    {"base_kernels": (11, 11), "num_layers": 5, "image_channels": 3, "normalization": True, "dropout_rate": 0.04},
    {"num_classes": 4, "dilation": (3, 3), "base_filters": 6},
    {"num_classes": 1, "input_normalize": False, "image_width": 32, "image_height": 64},
])
def test_cheap_parameter_count_matches_keras(kw: dict) -> None:
    config = _cfg(**kw)
    assert count_params(config) == build(config).count_params()


def test_levels_follow_the_flexunet_definition() -> None:
    config = _cfg(base_filters=8, base_kernels=(11, 11), dilation=(3, 3), num_layers=5, dropout_rate=0.05)
    network = build(config)
    for level, (filters, kernel, dilation) in enumerate([(8, 11, 3), (16, 9, 2), (32, 7, 1), (64, 5, 1),
                                                          (128, 3, 1)]):
        conv = network.get_layer(f"enc{level}_conv1")
        assert conv.filters == filters and conv.kernel_size == (kernel, kernel)
        assert conv.dilation_rate == (dilation, dilation)
        if level:
            assert network.get_layer(f"enc{level}_dropout").rate == pytest.approx(0.05 * level)
    # Pooling after every level but the bridge; the decoder mirrors with the level's kernel.
    assert [layer.name for layer in network.layers if "pool" in layer.name] == [f"enc{i}_pool" for i in range(4)]
    assert network.get_layer("dec1_conv1").kernel_size == (9, 9)
    assert network.get_layer("dec1_up").strides == (2, 2)
    assert isinstance(network.get_layer("input_normalize"), keras.layers.Rescaling)
    assert network.get_layer("head").activation.__name__ == "softmax"
    assert build(_cfg(num_classes=1)).get_layer("head").activation.__name__ == "sigmoid"


def test_softmax_output_shape_and_sum() -> None:
    network = build(_cfg(num_classes=3))
    out = network.predict(np.random.default_rng(0).integers(0, 255, (2, 64, 64, 1)).astype("float32"), verbose=0)
    assert out.shape == (2, 64, 64, 3)
    np.testing.assert_allclose(out.sum(-1), 1.0, rtol=1e-5)


def test_sizes_not_divisible_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"image_width: 96 is not divisible by 2\*\*\(num_layers-1\) = 64"):
        _cfg(image_width=96, num_layers=7)


def test_cost_grows_with_size_but_params_do_not() -> None:
    small, large = estimate_cost(_cfg()), estimate_cost(_cfg(image_width=128, image_height=128))
    assert small.params == large.params
    assert large.flops == pytest.approx(4 * small.flops, rel=0.01)
    assert large.train_bytes(4) > small.train_bytes(4)


def test_seed_settings_at_512_cost() -> None:
    seed = ModelConfig(image_width=512, image_height=512, num_classes=2, image_channels=3, base_filters=16,
                       base_kernels=(11, 11), num_layers=8, dropout_rate=0.04)
    cost = estimate_cost(seed)
    # 126.8M parameters (the deep levels have 3x3 kernels); about 182 GFLOPs per 512 px image.
    assert cost.params == 126_809_218
    assert 150e9 < cost.flops < 200e9
