"""FlexUNet: the one place that builds the model, and its cost without building it.

With L = ``num_layers`` levels (the last is the bridge), level i has ``base_filters * 2**i``
filters, kernel ``max(3, k0 - 2*i)`` and dilation ``max(1, d0 - i)``. The encoder block is
Conv -> [BN] -> Dropout(rate * i) -> Conv -> [BN], with a 2x2 max-pool after every level but the
bridge; the decoder mirrors it after a 2x2 stride-2 transposed conv and the skip concatenation.
"""

from __future__ import annotations

from dataclasses import dataclass

from flexunet.config import ModelConfig


def level_filters(model: ModelConfig, level: int) -> int:
    return model.base_filters * 2**level


def level_kernel(model: ModelConfig, level: int) -> int:
    return max(3, model.base_kernels[0] - 2 * level)


def level_dilation(model: ModelConfig, level: int) -> int:
    return max(1, model.dilation[0] - level)


@dataclass(frozen=True)
class Cost:
    """What a configuration costs, computed from its shape alone."""

    params: int
    flops: int  # one forward pass of one image (2 FLOPs per multiply-add)
    activation_bytes: int  # float32 outputs of every layer for one image

    def train_bytes(self, batch_size: int) -> int:
        """Rough training memory: weights, gradients and two Adam slots, plus activations
        kept for the backward pass and their gradients."""
        return 4 * 4 * self.params + 2 * batch_size * self.activation_bytes


def estimate_cost(model: ModelConfig) -> Cost:
    """Parameter count (exactly what Keras reports), FLOPs and activation size, without Keras."""
    h, w, c = model.input_shape
    params = flops = acts = 0
    bn = 4 if model.normalization else 0  # gamma, beta, moving mean, moving variance

    def conv(cin: int, cout: int, k: int, hh: int, ww: int) -> None:
        nonlocal params, flops, acts
        params += k * k * cin * cout + cout + bn * cout
        flops += 2 * k * k * cin * cout * hh * ww
        acts += cout * hh * ww * (2 if bn else 1)

    levels = model.num_layers
    cin = c
    for i in range(levels):
        f, k = level_filters(model, i), level_kernel(model, i)
        hh, ww = h >> i, w >> i
        conv(cin, f, k, hh, ww)
        conv(f, f, k, hh, ww)
        cin = f
    for i in reversed(range(levels - 1)):
        f, k = level_filters(model, i), level_kernel(model, i)
        hh, ww = h >> i, w >> i
        params += 2 * 2 * cin * f + f
        flops += 2 * 4 * cin * f * (hh // 2) * (ww // 2)
        acts += 3 * f * hh * ww  # upsampled map and the concatenation
        conv(2 * f, f, k, hh, ww)
        conv(f, f, k, hh, ww)
        cin = f
    out = model.num_classes
    params += cin * out + out
    flops += 2 * cin * out * h * w
    acts += out * h * w
    return Cost(params=params, flops=flops, activation_bytes=4 * acts)


def count_params(model: ModelConfig) -> int:
    """The number of parameters :func:`build` would create."""
    return estimate_cost(model).params


def build(model: ModelConfig, seed: int | None = None):  # -> keras.Model; Keras imported here
    """Build FlexUNet as the config defines it (uncompiled). With ``dropout_seed_fixing``,
    every Dropout layer is seeded with ``seed``, as the seed project does."""
    import keras
    from keras import layers

    def block(x, level: int, name: str):
        f, k, d = level_filters(model, level), level_kernel(model, level), level_dilation(model, level)
        conv = dict(kernel_size=k, dilation_rate=d, padding="same", activation=model.activation,
                    kernel_initializer="he_normal")
        x = layers.Conv2D(f, name=f"{name}_conv1", **conv)(x)
        if model.normalization:
            x = layers.BatchNormalization(name=f"{name}_bn1")(x)
        rate = model.dropout_rate * level
        if rate > 0:
            dropout_seed = seed if model.dropout_seed_fixing else None
            x = layers.Dropout(rate, seed=dropout_seed, name=f"{name}_dropout")(x)
        x = layers.Conv2D(f, name=f"{name}_conv2", **conv)(x)
        if model.normalization:
            x = layers.BatchNormalization(name=f"{name}_bn2")(x)
        return x

    inputs = keras.Input(shape=model.input_shape, name="image")
    x = layers.Rescaling(1.0 / 255.0, name="input_normalize")(inputs) if model.input_normalize else inputs
    skips = []
    for i in range(model.num_layers):
        x = block(x, i, f"enc{i}")
        if i < model.num_layers - 1:
            skips.append(x)
            x = layers.MaxPooling2D(pool_size=2, name=f"enc{i}_pool")(x)
    for i in reversed(range(model.num_layers - 1)):
        x = layers.Conv2DTranspose(level_filters(model, i), kernel_size=2, strides=2, padding="same",
                                   name=f"dec{i}_up")(x)
        x = layers.Concatenate(name=f"dec{i}_concat")([x, skips[i]])
        x = block(x, i, f"dec{i}")
    activation = "softmax" if model.num_classes > 1 else "sigmoid"
    outputs = layers.Conv2D(model.num_classes, 1, activation=activation, name="head")(x)
    return keras.Model(inputs, outputs, name="flexunet")
