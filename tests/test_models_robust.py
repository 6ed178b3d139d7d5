"""Robustness of nncjax.models: a batch of the wrong shape or dtype raises InputError naming
the expected shape (before: Flax's ScopeParamShapeError, a ZeroDivisionError, a JAX TypeError, or a
silently wrong answer: 28 x 27 images were classified, complex frames lost their imaginary part,
MiniLM embedded out-of-vocabulary ids and positions beyond 512 as NaN)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from nncjax import InputError, models
from nncjax.models.base import check_batch, checked_apply

BAD_ARRAYS = {
    "fashion_cnn": ("images", (2, 28, 28), [(0, 28, 28), (2, 28, 27), (28, 28), (2, 28, 28, 1)]),
    "digits_mlp": ("images", (2, 64), [(0, 64), (2, 63), (64,), (2, 8, 8)]),
    "crepe": ("frames", (2, 1024), [(0, 1024), (2, 1000), (1024,)]),
}


@pytest.mark.parametrize("name", sorted(BAD_ARRAYS))
def test_array_models_refuse_wrong_shapes_and_dtypes(name):
    m = models.get(name)
    what, good, shapes = BAD_ARRAYS[name]
    assert m.apply(m.params, np.zeros(good, np.float32)).shape[0] == good[0]
    assert m.apply.__name__ == "apply" and "InputError" in m.apply.__doc__
    spec = "\\(B, " + ", ".join(map(str, good[1:])) + "\\)"
    for shape in shapes:
        with pytest.raises(InputError, match=f"{what} must be a real numeric array of shape {spec}.*got shape"):
            m.apply(m.params, np.zeros(shape, np.float32))
    for bad in (np.zeros(good, bool), np.zeros(good, np.complex64), np.full(good, "a"), None):
        with pytest.raises(InputError, match=f"{what} must be a real numeric array of shape {spec}"):
            m.apply(m.params, bad)
    # under jit the shape check still runs (shapes are static)
    with pytest.raises(InputError, match=spec):
        jax.jit(m.apply)(m.params, np.zeros(shapes[1], np.float32))
    np.testing.assert_allclose(np.asarray(jax.jit(m.apply)(m.params, np.ones(good, np.float32))),
                               np.asarray(m.apply(m.params, np.ones(good, np.float32))), rtol=1e-5, atol=1e-6)


def test_digits_loss_checks_images_and_labels():
    from nncjax.models import digits_mlp
    m = models.get("digits_mlp")
    x, y = digits_mlp.load_digits_split("test")
    assert np.isfinite(float(digits_mlp.loss(m.params, x, y)))
    for args, match in (((x, y[:-1]), "labels must be an integer array of shape \\(360,\\)"),
                        ((x, y.astype(np.float32)), "labels must be an integer array"),
                        ((x[:, :63], y), "images must be a real numeric array of shape \\(B, 64\\)")):
        with pytest.raises(InputError, match=match):
            digits_mlp.loss(m.params, *args)


def test_minilm_refuses_bad_token_batches():
    from nncjax.models import minilm
    m = models.get("minilm")
    ids, mask = np.full((2, 8), 1037, np.int32), np.ones((2, 8), np.int32)
    assert m.apply(m.params, {"input_ids": ids, "attention_mask": mask.astype(bool)}).shape == (2, 384)
    bad = [
        (ids, "must be a mapping with 'input_ids' and 'attention_mask'"),
        ({"input_ids": ids}, "must be a mapping"),
        ({"input_ids": ids.astype(np.float32), "attention_mask": mask}, "input_ids must be an integer array of shape"),
        ({"input_ids": ids[0], "attention_mask": mask[0]}, "input_ids must be an integer array of shape \\(B, T\\)"),
        ({"input_ids": ids, "attention_mask": mask[:, :7]}, "one shape \\(B, T\\) with T <= 512"),
        ({"input_ids": np.ones((1, 600), np.int32), "attention_mask": np.ones((1, 600), np.int32)}, "T <= 512"),
        ({"input_ids": ids * 0 + 10**6, "attention_mask": mask}, "token ids in \\[0, 30522\\)"),
        ({"input_ids": ids * 0 - 1, "attention_mask": mask}, "token ids"),
        ({"input_ids": ids, "attention_mask": mask * 2}, "attention_mask must hold only 0 and 1"),
        ({"input_ids": ids, "attention_mask": mask.astype(np.float32)}, "attention_mask must be an integer or bool"),
    ]
    for batch, match in bad:
        with pytest.raises(InputError, match=match):
            minilm.apply(m.params, batch)
    # traced: shapes and dtypes checked, values not read
    with pytest.raises(InputError, match="T <= 512"):
        jax.jit(m.apply)(m.params, {"input_ids": ids, "attention_mask": mask[:, :7]})
    assert jax.jit(m.apply)(m.params, {"input_ids": ids, "attention_mask": mask}).shape == (2, 384)


def test_check_batch_and_checked_apply():
    assert check_batch([[1, 2]], "x", ("B", 2)).shape == (1, 2)
    for x, match in (([[1], [1, 2]], "got list"), (np.zeros((2, 3)), "got shape \\(2, 3\\)"),
                     (np.zeros(2, np.complex64), "got dtype complex64")):
        with pytest.raises(InputError, match="x must be a real numeric array of shape \\(B, 2\\)"):
            check_batch(x, "x", ("B", 2))
    with pytest.raises(InputError, match="got dtype float32"):
        check_batch(np.zeros(2, np.float32), "ids", ("B",), "iu")
    f = checked_apply(lambda x: check_batch(x, "x", ("B",)))(lambda p, x: p * x)
    assert f(2.0, np.ones(3)).tolist() == [2.0, 2.0, 2.0]
    with pytest.raises(InputError, match="shape \\(B,\\)"):
        f(2.0, np.ones((3, 1)))


def test_layer_statistics_see_the_layers_after_apply_was_compiled():
    """GPTQ moments trace ``apply.__wrapped__`` to intercept Dense / Conv calls; once the compiled apply
    had run, tracing the wrapper itself replayed a cached trace and no layer was seen (InputError: 'the
    model called no flax.linen.Dense ...'), so GPTQ and bias correction failed on the shipped models."""
    from nncjax._layer_stats import unwrap_jit
    from nncjax.quantize.gptq import input_moments

    m = models.get("digits_mlp")
    x = np.random.default_rng(0).uniform(0, 16, (8, 64)).astype(np.float32)
    m.apply(m.params, x)  # compiles and caches the trace
    h = input_moments(m.apply, m.params, x)
    assert len(h) >= 2 and all(np.all(np.isfinite(np.asarray(v))) for v in h.values())
    with pytest.raises(InputError, match="images must be"):  # the traced function keeps the check
        unwrap_jit(m.apply)(m.params, np.zeros((2, 63), np.float32))
    assert m.apply.lower(m.params, x).compile() is not None


def test_fashion_train_step_checks_its_arguments():
    import optax

    from nncjax.models import fashion_cnn

    v = models.get("fashion_cnn").params
    tx = optax.sgd(0.01)
    step, state = fashion_cnn.make_train_step(tx), tx.init(v["params"])
    x, y = np.zeros((4, 28, 28), np.uint8), np.array([0, 1, 2, 9])
    bad = [((v, state, x, np.array([0, 1, 2, 10])), r"labels must be class indices in \[0, 10\)"),  # was a NaN loss
           ((v, state, x, np.array([0, 1, -1, 3])), "class indices"),
           ((v, state, x, y[:3]), r"labels must be an integer array of shape \(4,\)"),
           ((v, state, x, y.astype(np.float32)), "labels must be an integer array"),
           ((v, state, x[:, :, :27], y), r"images must be a real numeric array of shape \(B, 28, 28\)"),
           (({"params": v["params"]}, state, x, y), "batch_stats")]
    for args, match in bad:
        with pytest.raises(InputError, match=match):
            step(*args)
    v2, _, loss = step(v, state, x, y)
    assert np.isfinite(float(loss)) and set(v2) == {"params", "batch_stats"}
