"""The full ResNet-101 detector: parameter count, Lucid's names, the seed's shapes, export.

These are the only tests that build the real ResNet-101 FPN; the rest use a tiny
configuration.
"""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lucid_jax
from lucid_jax import state_dict
from lucid_jax.models import faster_rcnn_resnet_101_fpn
from lucid_jax.state_dict_files import StateDictError

# Lucid faster_rcnn_resnet_101_fpn(num_classes=21)'s state-dict keys and shapes, lucid-dl 2.8.5
REFERENCE = os.path.join(os.path.dirname(__file__), "..", "data", "lucid_state_dict_keys.tsv")


def _reference_keys():
    out = {}
    with open(REFERENCE) as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            key, shape = line.rstrip("\n").split("\t")
            out[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return out


@pytest.fixture(scope="module")
def model():
    return faster_rcnn_resnet_101_fpn(num_classes=21)


@pytest.fixture(scope="module")
def variables(model):
    x = jnp.zeros((1, 3, 224, 224), jnp.float32)
    return jax.jit(model.init)(jax.random.key(1), x)


def test_parameter_count_is_lucids_unique_count(model):
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 3, 224, 224)))
    unique = lucid_jax.count_params(shapes["params"])
    assert unique == 62_498_494
    # Lucid's documented 62,508,030 counts its stem twice (backbone.net.stem and backbone.stem).
    stem = lucid_jax.count_params(shapes["params"]["backbone"]["net"]["stem"])
    assert stem == 9_536
    reference = _reference_keys()
    lucid_params = {k: math.prod(s) for k, s in reference.items() if k.endswith((".weight", ".bias"))}
    assert sum(lucid_params.values()) == 62_508_030 == unique + stem
    assert sum(n for k, n in lucid_params.items() if k.startswith("backbone.stem.")) == stem
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(shapes["params"]))


def test_state_dict_has_exactly_lucids_keys_and_shapes(model, variables):
    flat = state_dict.to_state_dict(variables, model=model)
    reference = _reference_keys()
    assert len(reference) == 561
    assert set(flat) == set(reference), set(flat) ^ set(reference)
    wrong = {k: (flat[k].shape, reference[k]) for k in reference if flat[k].shape != reference[k]}
    assert not wrong, wrong
    np.testing.assert_array_equal(flat["backbone.stem.0.weight"], flat["backbone.net.stem.0.weight"])


def test_state_dict_round_trip_is_exact(model, variables):
    flat = state_dict.to_state_dict(variables, model=model)
    back = state_dict.from_state_dict(variables, flat, strict=True, model=model)
    same = jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))), variables, back)
    assert all(jax.tree_util.tree_leaves(same))
    # a Lucid dict carries its stem twice and BN counters; both are accepted
    flat["backbone.net.layer1.0.conv1.bn.num_batches_tracked"] = np.array(3)
    state_dict.from_state_dict(variables, flat, strict=True, model=model)


@pytest.mark.parametrize("size", [224, 512])
def test_seed_example_shapes(model, variables, size):
    x = jax.random.normal(jax.random.key(0), (1, 3, size, size))
    out = jax.jit(lambda v, x: model.apply(v, x, method="forward_with_proposals"))(variables, x)
    cls_logits, bbox_deltas = out["cls_logits"], out["bbox_deltas"]
    print(cls_logits.shape, bbox_deltas.shape)
    assert cls_logits.shape == (1, 300, 21)
    assert bbox_deltas.shape == (1, 300, 4)
    assert np.isfinite(np.asarray(cls_logits)).all() and np.isfinite(np.asarray(bbox_deltas)).all()
    # random weights still give a full set of distinct proposals inside the image
    valid = np.asarray(out["proposal_valid"][0])
    props = np.asarray(out["proposals"][0])
    assert valid.sum() == 300
    assert (props >= 0).all() and (props <= size).all()
    assert len(np.unique(props.round(3), axis=0)) == 300
    # bbox_deltas are the per-class deltas of each RoI's best foreground class
    best = np.asarray(cls_logits[0, :, 1:]).argmax(-1) + 1
    np.testing.assert_array_equal(np.asarray(out["class_deltas"][0])[np.arange(300), best], np.asarray(bbox_deltas[0]))


def test_backbone_net_is_resnet101_classifier(model, variables):
    net = model.backbone.net
    assert tuple(net.stage_sizes) == (3, 4, 23, 3)
    sub = {c: variables[c]["backbone"]["net"] for c in variables}
    assert lucid_jax.count_params(sub["params"]) == 44_549_160
    x = jax.random.normal(jax.random.key(3), (2, 3, 64, 64))
    logits = jax.jit(net.apply)(sub, x)
    assert logits.shape == (2, 1000)
    assert np.isfinite(np.asarray(logits)).all()
    assert not np.allclose(np.asarray(logits[0]), np.asarray(logits[1]))


def test_mismatched_backbone_num_classes_names_key_and_shapes(variables):
    flat = state_dict.backbone_state_dict(variables)
    flat["fc.weight"] = np.zeros((10, 2048), np.float32)
    flat["fc.bias"] = np.zeros((10,), np.float32)
    with pytest.raises(
        StateDictError, match=r"fc\.weight: state dict has shape \(10, 2048\), model expects \(1000, 2048\)"
    ):
        state_dict.load_backbone(variables, flat)


@pytest.mark.parametrize("method", ["__call__", "predict"])
def test_full_model_exports_for_cpu_cuda_tpu(model, method):
    x = jax.ShapeDtypeStruct((1, 3, 512, 512), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    fn = jax.jit(lambda v, x: model.apply(v, x, method=method))
    exported = jax.export.export(fn, platforms=("cpu", "cuda", "tpu"))(shapes, x)
    assert set(exported.platforms) == {"cpu", "cuda", "tpu"}
    text = exported.mlir_module()
    assert "custom_call" not in text or "callback" not in text
