"""Masked training (ntksap_jax.train) and presets (ntksap_jax.presets), on the offline digits set."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ntksap_jax import apply_masks, count_kept, get_model, ntksap_scorer, prune
from ntksap_jax.masks import count_total
from ntksap_jax.scores import random_scorer
from ntksap_jax.data import load
from ntksap_jax.model import as_model
from ntksap_jax.presets import PRESETS, get_preset, list_presets
from ntksap_jax.optim import MaskedState, make_schedule, masked, sgd
from ntksap_jax.steps import (
    TrainState,
    create_train_state,
    evaluate,
    init_model,
    pruned_weights_are_zero,
    train_step,
)
from ntksap_jax.train import train

SHAPE = (8, 8, 1)


@pytest.fixture(scope="module")
def digits():
    return load("digits")


@pytest.fixture(scope="module")
def mlp():
    return get_model("mlp", 10)


def _random_mask(params, density=0.1, seed=1):
    return prune(random_scorer(), params, density=density, key=jax.random.key(seed)).masks


def _pruned_values(params, masks):
    """All param entries where the mask is 0, concatenated."""
    vals = jax.tree.map(lambda m, p: None if m is None else np.asarray(p)[np.asarray(m) == 0], masks, params,
                        is_leaf=lambda x: x is None)
    return np.concatenate([v for v in jax.tree.leaves(vals)])


# ------------------------------------------------------------------------------------------------
# Pruned weights stay exactly zero


def test_pruned_weights_stay_exactly_zero_under_momentum_and_weight_decay(digits, mlp):
    variables, _ = init_model(mlp, SHAPE, seed=0)
    masks = _random_mask(variables["params"])
    kw = dict(epochs=3, batch_size=64, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
              schedule="step", milestones=(2,), progress=False)
    result = train(mlp, variables, masks, digits, **kw)
    params = result.state.params
    assert pruned_weights_are_zero(params, masks)
    assert np.all(_pruned_values(params, masks) == 0.0)
    # it trained: the kept weights moved, and every kept kernel entry is non-zero
    kernel0 = np.asarray(variables["params"]["dense_0"]["kernel"])
    kept0 = np.asarray(masks["dense_0"]["kernel"]) != 0
    assert not np.array_equal(np.asarray(params["dense_0"]["kernel"])[kept0], kernel0[kept0])
    nonzero = sum(int(np.count_nonzero(np.asarray(params[k]["kernel"]))) for k in ("dense_0", "dense_1", "fc"))
    assert nonzero == count_kept(masks)
    assert result.history[-1]["density"] == pytest.approx(count_kept(masks) / count_total(masks))
    # the optimiser state carries the very mask it was given
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), result.state.masks, masks))

    # The check can fail: the same loop with an UNMASKED optimiser moves pruned weights (their
    # gradients are non-zero although the weights are 0).
    state = TrainState.create(apply_fn=as_model(mlp).apply, params=apply_masks(variables["params"], masks),
                              tx=sgd(0.1, momentum=0.9, nesterov=True, weight_decay=5e-4), batch_stats={})
    assert pruned_weights_are_zero(state.params, masks)
    for batch in digits.train_batches(64, seed=0, epoch=0):
        state, _ = train_step(state, batch)
    assert not pruned_weights_are_zero(state.params, masks)
    assert np.count_nonzero(_pruned_values(state.params, masks)) > 0.9 * (count_total(masks) - count_kept(masks))


def test_gradient_only_masking_is_not_enough(digits, mlp):
    """Masking gradients alone keeps pruned weights at 0 only while the optimiser state is 0 there.

    From a fresh state it happens to work (``wd · 0 = 0`` and the momentum buffer stays 0), but a
    momentum buffer that is non-zero on pruned entries (momentum built up before the mask was
    applied or tightened, e.g. iterative pruning, or a state restored from a denser mask) keeps
    moving them, and weight decay does not bring them back to exactly 0. ``masked`` zeroes the
    final updates and holds in every case.
    """
    variables, _ = init_model(mlp, SHAPE, seed=0)
    params0 = variables["params"]
    masks = _random_mask(params0)
    inner = sgd(0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    batches = list(digits.train_batches(64, seed=0, epoch=0))[:4]

    def grads_at(params, batch):
        def loss(p):
            logits = mlp.apply({"params": p}, batch["image"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        return jax.grad(loss)(params)

    mask_grads = lambda g: jax.tree.map(lambda m, x: x if m is None else x * m, masks, g,  # noqa: E731
                                        is_leaf=lambda x: x is None)

    def run(params, opt_state, tx, grad_mask):
        for batch in batches:
            g = grads_at(params, batch)
            if grad_mask:
                g = mask_grads(g)
            updates, opt_state = tx.update(g, opt_state, params)
            params = optax.apply_updates(params, updates)
        return params

    start = apply_masks(params0, masks)
    # fresh state: gradient-only masking happens to keep the zeros
    assert pruned_weights_are_zero(run(start, inner.init(start), inner, grad_mask=True), masks)

    # momentum built up on the dense network, then the mask is applied (weights zeroed)
    dense_params, dense_state = params0, inner.init(params0)
    for batch in batches[:2]:
        updates, dense_state = inner.update(grads_at(dense_params, batch), dense_state, dense_params)
        dense_params = optax.apply_updates(dense_params, updates)
    pruned = apply_masks(dense_params, masks)
    grad_only = run(pruned, dense_state, inner, grad_mask=True)
    assert not pruned_weights_are_zero(grad_only, masks)
    assert np.count_nonzero(_pruned_values(grad_only, masks)) > 0.9 * (count_total(masks) - count_kept(masks))
    tx = masked(inner, masks)
    carried = MaskedState(inner_state=dense_state, masks=tx.init(pruned).masks)
    assert pruned_weights_are_zero(run(pruned, carried, tx, grad_mask=False), masks)


# ------------------------------------------------------------------------------------------------
# Resume


def _metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_resume_is_bit_identical(digits, tmp_path):
    kw = dict(epochs=4, batch_size=64, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
              schedule="step", milestones=(2,), seed=3, progress=False)

    def fresh():  # new objects every time, as after a process restart
        model = get_model("mlp", 10)
        variables, _ = init_model(model, SHAPE, seed=0)
        return model, variables, _random_mask(variables["params"]), load("digits")

    model, variables, masks, ds = fresh()
    full = train(model, variables, masks, ds, out_dir=str(tmp_path / "full"), **kw)

    part = str(tmp_path / "part")
    model, variables, masks, ds = fresh()
    first = train(model, variables, masks, ds, out_dir=part, stop_after=2, **kw)
    assert first.epoch == 2 and [r["epoch"] for r in _metrics(part)] == [1, 2]
    assert sorted(int(d) for d in os.listdir(os.path.join(part, "checkpoints")) if d.isdigit()) == [1, 2]
    # a row written after the last checkpoint (a crash between the two) must not survive the resume
    with open(os.path.join(part, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"epoch": 3, "train_loss": -1.0}) + "\n")

    with pytest.raises(ValueError, match="resume=True"):
        train(*fresh(), out_dir=part, **kw)
    with pytest.raises(ValueError, match="another config.*lr"):
        train(*fresh(), out_dir=part, resume=True, **{**kw, "lr": 0.05})
    model, variables, _, ds = fresh()
    with pytest.raises(ValueError, match="different mask"):
        train(model, variables, _random_mask(variables["params"], seed=2), ds, out_dir=part, resume=True, **kw)

    model, variables, masks, ds = fresh()
    resumed = train(model, variables, masks, ds, out_dir=part, resume=True, **kw)
    assert resumed.epoch == 4 and int(resumed.state.step) == int(full.state.step) == 4 * ds.steps_per_epoch(64)
    same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
                        (full.state.params, full.state.opt_state), (resumed.state.params, resumed.state.opt_state))
    assert jax.tree.all(same)
    rows = _metrics(part)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    strip = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    assert [strip(r) for r in rows] == [strip(r) for r in _metrics(str(tmp_path / "full"))]
    assert [strip(r) for r in resumed.history] == [strip(r) for r in rows]
    assert rows[2]["lr"] == pytest.approx(0.01) and rows[1]["lr"] == pytest.approx(0.1)
    assert pruned_weights_are_zero(resumed.state.params, masks)

    # resuming a finished run trains nothing and writes nothing new
    again = train(*fresh(), out_dir=part, resume=True, **kw)
    assert again.epoch == 4 and len(_metrics(part)) == 4
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), again.state.params, full.state.params))


# ------------------------------------------------------------------------------------------------
# Schedules and the optimiser


def test_step_schedule_matches_multisteplr():
    spe = 7
    lr = make_schedule("step", 0.1, epochs=10, steps_per_epoch=spe, milestones=(3, 6, 6), gamma=0.1)
    # torch MultiStepLR(milestones=[3, 6, 6], gamma=0.1), scheduler.step() once per epoch:
    # epochs 0-2: 0.1, 3-5: 0.01, 6-9: 0.0001 (a repeated milestone drops twice)
    expected = {0: 0.1, 1: 0.1, 2: 0.1, 3: 0.01, 4: 0.01, 5: 0.01, 6: 1e-4, 7: 1e-4, 8: 1e-4, 9: 1e-4}
    for epoch, value in expected.items():
        for step in (epoch * spe, epoch * spe + spe - 1):
            assert float(lr(step)) == pytest.approx(value, rel=1e-6), (epoch, step)
    warm = make_schedule("step", 0.4, epochs=10, steps_per_epoch=4, milestones=(5,), warmup_epochs=2)
    assert [float(warm(s)) for s in (0, 3, 7, 8, 19, 20)] == pytest.approx([0.05, 0.2, 0.4, 0.4, 0.4, 0.04])


def test_cosine_schedule_endpoints():
    lr = make_schedule("cosine", 0.1, epochs=5, steps_per_epoch=10)
    assert float(lr(0)) == pytest.approx(0.1)
    assert float(lr(25)) == pytest.approx(0.05, rel=1e-6)
    assert float(lr(50)) == pytest.approx(0.0, abs=1e-9) and float(lr(60)) == pytest.approx(0.0, abs=1e-9)
    assert float(lr(10)) == pytest.approx(0.05 * (1 + math.cos(math.pi * 10 / 50)), rel=1e-6)
    warm = make_schedule("cosine", 0.1, epochs=5, steps_per_epoch=10, warmup_epochs=1)
    assert [float(warm(s)) for s in (0, 9, 10, 50)] == pytest.approx([0.01, 0.1, 0.1, 0.0], abs=1e-7)


@pytest.mark.parametrize("kwargs, match", [
    (dict(kind="linear"), "unknown schedule 'linear'; allowed: step, cosine, constant"),
    (dict(base_lr=0.0), "base_lr"),
    (dict(milestones=(0,)), "milestones"),
    (dict(kind="cosine", milestones=(3,)), "milestones apply to the 'step' schedule only"),
    (dict(warmup_epochs=10), "warmup_epochs"),
])
def test_schedule_errors(kwargs, match):
    args = dict(kind="step", base_lr=0.1, epochs=10, steps_per_epoch=5)
    with pytest.raises(ValueError, match=match):
        make_schedule(**{**args, **kwargs})


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_matches_pytorch_formula(nesterov):
    """torch.optim.SGD: d = g + wd·θ; buf = μ·buf + d (buf = d first); step = d + μ·buf (Nesterov) or buf."""
    lr, mu, wd = 0.1, 0.9, 0.01
    sched = lambda count: jnp.where(count < 2, lr, lr / 10)  # noqa: E731  (the lr changes after momentum)
    tx = sgd(sched, momentum=mu, nesterov=nesterov, weight_decay=wd)
    theta, state = jnp.array([1.0, -2.0]), None
    state = tx.init(theta)
    ref_theta, buf = np.array([1.0, -2.0]), None
    for t, g in enumerate([np.array([0.5, 0.25]), np.array([-1.0, 2.0]), np.array([0.3, 0.1])]):
        updates, state = tx.update(jnp.asarray(g, jnp.float32), state, theta)
        theta = optax.apply_updates(theta, updates)
        d = g + wd * ref_theta
        buf = d if buf is None else mu * buf + d
        step = d + mu * buf if nesterov else buf
        ref_theta = ref_theta - (lr if t < 2 else lr / 10) * step
        np.testing.assert_allclose(np.asarray(theta), ref_theta, rtol=1e-6)


def test_bad_arguments(digits, mlp):
    variables, _ = init_model(mlp, SHAPE, seed=0)
    with pytest.raises(ValueError, match="momentum"):
        sgd(0.1, momentum=1.0)
    with pytest.raises(ValueError, match="nesterov=True needs momentum > 0"):
        sgd(0.1, momentum=0.0, nesterov=True)
    with pytest.raises(ValueError, match="epochs must be a positive integer; got 0"):
        train(mlp, variables, None, digits, epochs=0, batch_size=64, lr=0.1)
    with pytest.raises(ValueError, match="resume=True needs the out_dir"):
        train(mlp, variables, None, digits, epochs=1, batch_size=64, lr=0.1, resume=True)
    with pytest.raises(ValueError, match="stop_after must be <= epochs=2"):
        train(mlp, variables, None, digits, epochs=2, batch_size=64, lr=0.1, stop_after=3)


# ------------------------------------------------------------------------------------------------
# Evaluation


@pytest.mark.parametrize("batch_size", [64, 7, 1000])
def test_eval_counts_each_test_example_once(digits, mlp, batch_size):
    variables, _ = init_model(mlp, SHAPE, seed=4)
    state = create_train_state(mlp, variables, None, sgd(0.1))
    # train briefly so that the accuracy is neither ~0.1 nor ~1
    for batch in list(digits.train_batches(64, seed=0, epoch=0))[:3]:
        state, _ = train_step(state, batch)
    got = evaluate(state, digits, batch_size=batch_size, top5=True)

    (full,) = list(digits.eval_batches(digits.info.num_test))  # the whole test set, no padding
    assert full["mask"].all() and len(full["label"]) == 360
    logits = mlp.apply({"params": state.params}, full["image"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, full["label"])
    top1 = np.mean(np.argmax(np.asarray(logits), -1) == full["label"])
    top5 = np.mean([label in row for label, row in zip(full["label"], np.argsort(-np.asarray(logits), -1)[:, :5])])
    assert got["count"] == 360
    assert got["top1"] == top1 and got["top5"] == top5
    assert 0.2 < top1 < 0.99
    assert got["loss"] == pytest.approx(float(loss.mean()), rel=1e-5)


# ------------------------------------------------------------------------------------------------
# Accuracy on digits


def test_dense_and_ntksap_mlp_accuracy_on_digits(digits):
    """mlp-digits preset, seed 0. Measured (seeds 0, 1, 2; data seed = init seed): dense 97.8, 98.1,
    97.8 % test top-1; NTK-SAP (T=20, R=1, 100 inputs) at 10% density 96.9, 97.5, 97.5 % (a random
    10% mask: 96.9, 97.2, 97.5 %). Floors: 95% dense (the acceptance bar), 94% pruned."""
    p = get_preset("mlp-digits")
    model = p.build_model()
    variables, prune_key = init_model(model, p.input_shape, seed=0)
    dense = train(model, variables, None, digits, seed=0, progress=False, **p.train_kwargs())
    assert dense.history[-1]["test_top1"] >= 0.95
    assert dense.history[-1]["test_count"] == 360

    score = ntksap_scorer(model, p.input_shape, **p.scorer_kwargs())
    pruned = prune(score, variables["params"], density=0.1, iterations=p.ntksap_iterations, key=prune_key)
    assert count_kept(pruned.masks) == round(0.1 * count_total(pruned.masks))
    sparse = train(model, variables, pruned.masks, digits, seed=0, progress=False, **p.train_kwargs())
    assert sparse.history[-1]["test_top1"] >= 0.94
    assert sparse.history[-1]["density"] == pytest.approx(0.1, abs=1e-6)
    assert pruned_weights_are_zero(sparse.state.params, pruned.masks)


# ------------------------------------------------------------------------------------------------
# Presets


def test_presets():
    assert list_presets() == ("resnet20-cifar10", "vgg16-cifar100", "resnet18-tinyimagenet", "resnet50-imagenet",
                              "mlp-digits", "lenet300-mnist5k", "lenet5-mnist5k", "resnet20-narrow-mnist5k")
    r20 = get_preset("resnet20-cifar10")  # the official scripts/run.sh
    assert (r20.epochs, r20.batch_size, r20.lr, r20.momentum, r20.weight_decay, r20.milestones, r20.gamma) == (
        160, 128, 0.1, 0.9, 1e-4, (80, 120), 0.1)
    assert (r20.ntksap_iterations, r20.ntksap_samples, r20.ntksap_num_inputs) == (20, 5, 100)
    for name, p in PRESETS.items():
        assert p.name == name and p.optimizer == "sgd"
        model = p.build_model()
        assert model.num_classes == p.num_classes
        make_schedule(p.schedule, p.lr, p.epochs, 10, p.milestones, p.gamma, p.warmup_epochs)
        assert set(p.train_kwargs()) <= set(train.__code__.co_varnames)
        if name != "resnet20-cifar10":
            assert (p.ntksap_samples, p.ntksap_num_inputs) == (1, 10 * p.num_classes)
    assert get_preset("resnet50-imagenet").top5 and not get_preset("mlp-digits").top5


def test_bad_preset_name_lists_the_names():
    with pytest.raises(ValueError) as e:
        get_preset("resnet20-cifar100")
    for name in PRESETS:
        assert name in str(e.value)


def test_training_keeps_no_model_alive():
    """init_model's compiled init is held per Model, weakly: a dropped Model (and the NNX module it holds,
    with all its variables) is freed, unlike under the process-wide lru_caches this replaced."""
    import gc
    import weakref

    from flax import nnx

    from ntksap_jax.model import from_nnx
    from ntksap_jax.steps import init_model

    class Tiny(nnx.Module):
        def __init__(self, *, rngs):
            self.fc = nnx.Linear(4, 3, rngs=rngs)

        def __call__(self, x):
            return self.fc(x.reshape(x.shape[0], -1))

    spec = from_nnx(lambda rngs: Tiny(rngs=rngs), input_shape=(4,))
    variables, _ = init_model(spec, (4,), seed=0)
    assert variables["params"]["fc"]["kernel"].shape == (4, 3)
    ref = weakref.ref(spec)
    del spec
    gc.collect()
    assert ref() is None
