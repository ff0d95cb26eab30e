"""Training parity with torchvision: the same small Faster R-CNN, from the same
weights, trained on the same batches of real aerial photographs by torchvision and
by lucid_jax, over several seeds, and scored on held-out photographs.

    python benchmarks/bench_training_parity.py [--images DIR] [--seeds 5] [--steps 500] [--out DIR]
    python benchmarks/bench_training_parity.py --small --out DIR   # the mechanics, about a minute

The architecture is a twin built on both sides: one torchvision ``Bottleneck`` per
stage at the widths of ``faster_rcnn_mini_fpn`` (16, 32, 64, 128; a 16-channel stem),
a 64-channel FPN with P6, and everything else as torchvision's ``FasterRCNN`` has it
(``TORCHVISION_FASTER_RCNN``: three anchors of 32..512 pixels on P2..P6, 2000 training
proposals, RoIAlign without the half-pixel offset, 512 sampled RoIs) with a 256-wide
box head. A module of our own on torchvision's blocks is needed because torchvision's
``ResNet`` fixes the stem at 64 channels; at these widths a step takes under half a second
on 2 cores, against several for the standard-width ResNet: five seeds per side take
35 minutes. ``--norm batch`` trains BatchNorm, ``--norm group`` uses GroupNorm
in the body and the FPN (torch's ``nn.GroupNorm`` with our group counts).

Per seed: torchvision builds the twin with ``torch.manual_seed(seed)`` and its own
initialisation; the weights are converted into ours (``state_dict.
from_torchvision_faster_rcnn``) and checked equal, tensor by tensor. The training
windows (random square crops of the training photographs, flipped with p = 0.5) are
drawn once per (seed, step) and given to both sides, normalised the same way; each
side runs its own stages on the padded batch (torchvision's transform would only
normalise again). Both train with SGD, momentum 0.9, weight decay 1e-4 on every
parameter, and the same learning rate at every step: linear warmup then cosine, from
``lucid_jax.optim.learning_rate_schedule``. Only the samplers' random draws differ.

Held out: pieces of a training photograph's bottom (in distribution) and whole
photographs of two other sites (cross-site); see ``_neon.py``. Both sides' detections
are scored by pycocotools against one ground-truth file per set. Written to --out:
results.json (every seed's AP, AP50, losses and time), ground truth files,
loss_curves.png (both sides' training loss per seed, smoothed) and every run's
trained weights in Lucid's names (SIDE_seedN.safetensors). torchvision's trained
weights are also scored through our predict, which tells training apart from scoring.

``--ours-model`` (with ``--sides ours``) trains our side alone on another model, from
our own initialisation: the twin (``twin-own-init``), the twin with the mini model's
proposal and RoI counts (``twin-mini-counts``), or ``faster_rcnn_mini_fpn`` itself
(``mini``, ``mini-no-dropout``). It tells which setting costs the mini model accuracy.
"""

import argparse
import contextlib
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import _common as C  # noqa: E402

WIDTHS = (16, 32, 64, 128)
STEM_WIDTH = 16
FPN_CHANNELS = 64
REPRESENTATION = 256
MAX_BOXES = 160  # boxes per training window, padded (a 416-pixel window of these photographs holds under 100)
SMOOTH = 25  # steps in the curves' moving average
_PREDICT: dict = {}  # our jitted predict, one per model: compiled once for every seed


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", default=None, help="folder of the NEON photographs (default: fetch into ~/.cache)")
    p.add_argument("--out", default="training_parity", help="folder for results.json and loss_curves.png")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--steps", type=int, default=500, help="per run; 5 seeds x 2 sides take 35 min at 500 on 2 cores")
    p.add_argument("--size", type=int, default=416, help="square training window and canvas, pixels")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--norm", choices=("batch", "group"), default="batch")
    p.add_argument("--sides", default="torchvision,ours", help="comma list of the sides to train")
    p.add_argument(
        "--ours-model",
        choices=OURS_MODELS,
        default="twin",
        help="our side's model; any but twin starts from our own initialisation (jax.random.key(seed)) "
        "and trains our side alone: a diagnosis of which setting costs accuracy",
    )
    p.add_argument(
        "--small", action="store_true", help="synthetic photographs, 2 seeds, 6 steps at 128: mechanics only"
    )
    args = p.parse_args(argv)
    if args.ours_model != "twin" and args.sides != "ours":
        p.error(f"--ours-model {args.ours_model} has no torchvision twin: add --sides ours")
    if args.small:
        args.seeds, args.steps, args.size, args.warmup = 2, 6, 128, 2
    return args


# --- data ---------------------------------------------------------------------------


def small_split(size: int) -> dict:
    """Synthetic stand-ins for the photographs (shapes on noise), split as ``_neon.split``."""
    from lucid_jax.data import ShapesDataset

    def photos(n, image_size, seed):
        data = ShapesDataset(num_examples=n, image_size=image_size, min_objects=4, max_objects=8, seed=seed)
        return [
            (d["image"], d["boxes"].astype(np.float32), d["labels"].astype(np.int32))
            for d in map(data.__getitem__, range(n))
        ]

    return {
        "train": photos(2, 2 * size, 0),
        "in_distribution": photos(2, size, 1),
        "cross_site": photos(2, size - 16, 2),  # smaller than the canvas: padded, as the 400-pixel photographs are
    }


def training_batch(regions, seed: int, step: int, batch: int, size: int) -> dict:
    """Step ``step``'s windows: each a random square crop of a region (chosen with
    probability proportional to its area), flipped with p = 0.5; boxes padded.

    Returns:
      {"images": [B, 3, S, S] float32 in [0, 1], "boxes": [B, MAX_BOXES, 4],
      "labels": [B, MAX_BOXES] int32, "valid": [B, MAX_BOXES] bool}.
    """
    import _neon

    rng = np.random.default_rng([seed, step])
    areas = np.array([r[0].shape[0] * r[0].shape[1] for r in regions], np.float64)
    out = {
        "images": np.zeros((batch, 3, size, size), np.float32),
        "boxes": np.zeros((batch, MAX_BOXES, 4), np.float32),
        "labels": np.zeros((batch, MAX_BOXES), np.int32),
        "valid": np.zeros((batch, MAX_BOXES), bool),
    }
    for i in range(batch):
        image, boxes, labels = regions[rng.choice(len(regions), p=areas / areas.sum())]
        y0 = int(rng.integers(0, image.shape[0] - size + 1))
        x0 = int(rng.integers(0, image.shape[1] - size + 1))
        window, kept, keep = _neon.crop(image, boxes, y0, x0, size, size)
        if rng.random() < 0.5:
            window = window[:, ::-1]
            kept = np.stack([size - kept[:, 2], kept[:, 1], size - kept[:, 0], kept[:, 3]], -1)
        if len(kept) > MAX_BOXES:
            raise ValueError(f"a window holds {len(kept)} boxes, more than MAX_BOXES = {MAX_BOXES}")
        out["images"][i] = window.transpose(2, 0, 1) / np.float32(255)
        out["boxes"][i, : len(kept)] = kept
        out["labels"][i, : len(kept)] = labels[keep]
        out["valid"][i, : len(kept)] = True
    return out


def held_out_batches(pieces, size: int, batch: int):
    """The held-out images, normalised and zero-padded onto size x size canvases.

    Yields:
      (images [b, 3, S, S] float32, image_sizes [b, 2] int32, indices into ``pieces``).
    """
    for start in range(0, len(pieces), batch):
        chunk = pieces[start : start + batch]
        images = np.zeros((len(chunk), 3, size, size), np.float32)
        sizes = np.zeros((len(chunk), 2), np.int32)
        for i, (image, _, _) in enumerate(chunk):
            h, w = image.shape[:2]
            images[i, :, :h, :w] = C.normalised(image.transpose(2, 0, 1)[None] / np.float32(255))[0]
            sizes[i] = h, w
        yield images, sizes, range(start, start + len(chunk))


def coco_ground_truth(pieces, num_classes: int) -> dict:
    """One COCO ground-truth dict for a held-out set (image ids = indices)."""
    annotations = []
    for index, (_, boxes, labels) in enumerate(pieces):
        for box, label in zip(boxes.tolist(), labels.tolist()):
            w, h = box[2] - box[0], box[3] - box[1]
            annotations.append(
                dict(
                    id=len(annotations) + 1,
                    image_id=index,
                    category_id=label,
                    bbox=[box[0], box[1], w, h],
                    area=w * h,
                    iscrowd=0,
                )
            )
    images = [dict(id=i, height=int(p[0].shape[0]), width=int(p[0].shape[1])) for i, p in enumerate(pieces)]
    categories = [dict(id=c, name=str(c)) for c in range(1, num_classes)]
    return dict(images=images, annotations=annotations, categories=categories)


def coco_scores(ground_truth_path: Path, detections: list[dict]) -> dict:
    """pycocotools' AP (0.50:0.95) and AP50 of the detections."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ground_truth_path))
        if not detections:
            return {"AP": 0.0, "AP50": 0.0, "detections": 0}
        evaluation = COCOeval(gt, gt.loadRes(detections), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return {"AP": float(evaluation.stats[0]), "AP50": float(evaluation.stats[1]), "detections": len(detections)}


def as_coco(index, boxes, scores, labels) -> list[dict]:
    return [
        dict(image_id=int(index), category_id=int(c), bbox=[b[0], b[1], b[2] - b[0], b[3] - b[1]], score=float(s))
        for b, s, c in zip(np.asarray(boxes, np.float64).tolist(), np.asarray(scores).tolist(), np.asarray(labels))
    ]


# --- the twin on both sides ---------------------------------------------------------


def torchvision_twin(num_classes: int, norm: str, seed: int):
    """torchvision's FasterRCNN on a body of one ``Bottleneck`` per stage at ``WIDTHS``,
    initialised by torch as its ResNet is (He normal convolutions, unit norms)."""
    import torch
    from torch import nn
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.resnet import Bottleneck
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    from lucid_jax.models.group_norm import num_groups

    def norm_layer(channels):
        return nn.BatchNorm2d(channels) if norm == "batch" else nn.GroupNorm(num_groups(channels), channels)

    class Body(nn.Module):
        """torchvision ResNet's layout and names (conv1, bn1, layer1..4) at our widths."""

        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, STEM_WIDTH, 7, 2, 3, bias=False)
            self.bn1 = norm_layer(STEM_WIDTH)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            channels = STEM_WIDTH
            for i, width in enumerate(WIDTHS):
                stride = 1 if i == 0 else 2
                down = nn.Sequential(nn.Conv2d(channels, 4 * width, 1, stride, bias=False), norm_layer(4 * width))
                block = Bottleneck(channels, width, stride, down, norm_layer=norm_layer)
                setattr(self, f"layer{i + 1}", nn.Sequential(block))
                channels = 4 * width
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    torch.manual_seed(seed)
    backbone = BackboneWithFPN(
        Body(),
        return_layers={f"layer{i}": str(i - 1) for i in range(1, 5)},
        in_channels_list=[4 * w for w in WIDTHS],
        out_channels=FPN_CHANNELS,
        extra_blocks=LastLevelMaxPool(),
        norm_layer=None if norm == "batch" else norm_layer,
    )
    return FasterRCNN(
        backbone,
        num_classes=None,
        box_head=TwoMLPHead(FPN_CHANNELS * 7 * 7, REPRESENTATION),
        box_predictor=FastRCNNPredictor(REPRESENTATION, num_classes),
    )


def ours_twin(num_classes: int, norm: str, **overrides):
    """Our side of the twin; ``overrides`` replace its RPN and RoI-head settings."""
    from lucid_jax.models import TORCHVISION_FASTER_RCNN, build_resnet_fpn_faster_rcnn

    return build_resnet_fpn_faster_rcnn(
        (1, 1, 1, 1),
        num_classes,
        **{**TORCHVISION_FASTER_RCNN, "norm_mode": norm, **overrides},
        widths=WIDTHS,
        stem_width=STEM_WIDTH,
        fpn_channels=FPN_CHANNELS,
        representation_size=REPRESENTATION,
    )


# --ours-model: the twin, and the settings that tell why the mini model trails it
OURS_MODELS = ("twin", "twin-own-init", "twin-mini-counts", "mini", "mini-no-dropout")
MINI_COUNTS = dict(rpn_pre_nms_top_n=(600, 300), rpn_post_nms_top_n=(300, 100), box_batch_size_per_image=128)


def ours_model(name: str, num_classes: int, norm: str):
    """Our side's detector for ``--ours-model``: the twin; the twin with the mini
    model's proposal and RoI counts; or ``faster_rcnn_mini_fpn`` (with or without its
    box head's dropout)."""
    from lucid_jax.models import get_model

    if name in ("twin", "twin-own-init"):
        return ours_twin(num_classes, norm)
    if name == "twin-mini-counts":
        return ours_twin(num_classes, norm, **MINI_COUNTS)
    dropout = {"dropout_rate": 0.0} if name == "mini-no-dropout" else {}
    return get_model("faster_rcnn_mini_fpn", num_classes=num_classes, norm_mode=norm, **dropout)


def own_init(model, size: int, seed: int) -> dict:
    """Our initialisation of ``model``, from ``jax.random.key(seed)``, as NumPy arrays."""
    import jax
    import jax.numpy as jnp

    variables = model.init(jax.random.key(seed), jnp.zeros((1, 3, size, size), jnp.float32))
    return jax.tree_util.tree_map(np.asarray, dict(variables))


def ours_from(tv, model, size: int) -> dict:
    """torchvision's weights in our model, checked equal tensor by tensor."""
    import flax
    import jax
    import jax.numpy as jnp

    from lucid_jax import state_dict

    template = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 3, size, size), jnp.float32))
    template = jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype), template)
    theirs = state_dict.from_torchvision_faster_rcnn(tv.state_dict())
    variables = state_dict.from_state_dict(template, theirs, strict=False, model=model)
    ours = state_dict.to_state_dict(variables, model=model)
    for name, value in theirs.items():
        if not np.array_equal(ours[name], value):
            raise RuntimeError(f"{name} differs after the conversion")
    # every parameter came from torchvision: the counts agree (our unused classifier aside)
    flat = flax.traverse_util.flatten_dict(variables["params"])
    ours_count = sum(v.size for path, v in flat.items() if path[:3] != ("backbone", "net", "fc"))
    theirs_count = sum(p.numel() for p in tv.parameters())
    if ours_count != theirs_count:
        raise RuntimeError(f"{ours_count} parameters here, {theirs_count} in torchvision's twin")
    return variables


def lr_table(args) -> np.ndarray:
    """The learning rate at every step, the one schedule both sides follow."""
    from lucid_jax.optim import learning_rate_schedule

    schedule = learning_rate_schedule(args.lr, schedule="cosine", total_steps=args.steps, warmup_steps=args.warmup)
    return np.array([float(schedule(i)) for i in range(args.steps)], np.float64)


LOSS_NAMES = ("rpn_cls_loss", "rpn_reg_loss", "roi_cls_loss", "roi_reg_loss")
TV_LOSS_NAMES = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg")


def train_torchvision(tv, args, regions, lrs, seed):
    """torchvision's stages trained on the shared windows; per step the four losses."""
    import torch
    from torchvision.models.detection.image_list import ImageList

    params = [p for p in tv.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=float(lrs[0]), momentum=0.9, weight_decay=1e-4)
    torch.manual_seed(seed)  # the samplers' draws
    tv.train()
    curve = []
    for step in progress(range(args.steps), f"torchvision seed {seed}"):
        batch = training_batch(regions, seed, step, args.batch_size, args.size)
        x = torch.from_numpy(C.normalised(batch["images"]))
        targets = [
            {"boxes": torch.from_numpy(b[v]), "labels": torch.from_numpy(lab[v]).long()}
            for b, lab, v in zip(batch["boxes"], batch["labels"], batch["valid"])
        ]
        for group in optimizer.param_groups:
            group["lr"] = float(lrs[step])
        images = ImageList(x, [(args.size, args.size)] * len(x))
        features = tv.backbone(images.tensors)
        proposals, rpn_losses = tv.rpn(images, features, targets)
        _, roi_losses = tv.roi_heads(features, proposals, images.image_sizes, targets)
        losses = {**rpn_losses, **roi_losses}
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()
        curve.append([float(losses[k].detach()) for k in TV_LOSS_NAMES])
    return np.array(curve)


def predict_torchvision(tv, pieces, args) -> list[dict]:
    import torch
    from torchvision.models.detection.image_list import ImageList

    tv.eval()
    detections = []
    with torch.inference_mode():
        for images, sizes, indices in held_out_batches(pieces, args.size, args.batch_size):
            image_list = ImageList(torch.from_numpy(images), [tuple(map(int, s)) for s in sizes])
            features = tv.backbone(image_list.tensors)
            proposals, _ = tv.rpn(image_list, features)
            results, _ = tv.roi_heads(features, proposals, image_list.image_sizes)
            for index, r in zip(indices, results):
                detections += as_coco(index, r["boxes"].numpy(), r["scores"].numpy(), r["labels"].numpy())
    return detections


def ours_trainer(model, variables, args):
    """(optimizer, jitted step), built once: every seed reuses the compiled step."""
    from lucid_jax.optim import build_optimizer, param_labels
    from lucid_jax.train import make_train_step

    labels = param_labels(variables["params"])  # every stage trains; only the unused classifier is frozen
    tx = build_optimizer(
        variables["params"],
        optimizer="sgd",
        learning_rate=args.lr,
        momentum=0.9,
        weight_decay=1e-4,
        labels=labels,
        schedule="cosine",
        total_steps=args.steps,
        warmup_steps=args.warmup,
    )
    return tx, make_train_step(model, frozen=labels)


def train_ours(model, variables, trainer, args, regions, seed):
    """Our train step on the same windows; per step the four losses, and the final variables."""
    import jax

    from lucid_jax.train import create_train_state

    tx, step_fn = trainer
    state = create_train_state(model, variables, tx)
    key = jax.random.key(seed)
    curve = []
    for step in progress(range(args.steps), f"lucid_jax seed {seed}"):
        batch = training_batch(regions, seed, step, args.batch_size, args.size)
        batch["images"] = C.normalised(batch["images"])
        state, metrics = step_fn(state, batch, jax.random.fold_in(key, step))
        curve.append([float(metrics[k]) for k in LOSS_NAMES])
    return np.array(curve), {
        "params": state.params,
        **({"batch_stats": state.batch_stats} if state.batch_stats else {}),
    }


def predict_ours(model, variables, pieces, args) -> list[dict]:
    from lucid_jax.inference import make_predict_fn

    predict = _PREDICT.setdefault(id(model), make_predict_fn(model))
    detections = []
    for images, sizes, indices in held_out_batches(pieces, args.size, args.batch_size):
        out = predict(variables, images, sizes)
        for i, index in enumerate(indices):
            keep = np.asarray(out["valid"][i])
            detections += as_coco(index, *(np.asarray(out[k][i])[keep] for k in ("boxes", "scores", "labels")))
    return detections


def save_weights(model, variables, path: Path) -> None:
    """A run's trained weights in Lucid's names (torchvision's converted), for later scoring."""
    from lucid_jax import state_dict, state_dict_files

    state_dict_files.save_state_dict_file(state_dict.to_state_dict(variables, model=model), path)


def progress(iterable, description):
    from tqdm import tqdm

    return tqdm(iterable, desc=description, leave=False, disable=not sys.stderr.isatty())


# --- report -------------------------------------------------------------------------


def draw_curves(runs: list[dict], path: Path) -> None:
    """Both sides' total training loss against the step, one line per seed (moving average)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"torchvision": "tab:orange", "lucid_jax": "tab:blue"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = [("total", None), ("RPN (objectness + box)", (0, 1)), ("RoI head (class + box)", (2, 3))]
    for ax, (title, columns) in zip(axes, panels):
        for run in runs:
            curve = np.asarray(run["losses"])
            y = curve.sum(-1) if columns is None else curve[:, list(columns)].sum(-1)
            k = min(SMOOTH, len(y))
            smooth = np.convolve(y, np.ones(k) / k, mode="valid")
            ax.plot(
                np.arange(len(smooth)) + k,
                smooth,
                color=colours[run["side"]],
                alpha=0.8,
                lw=1.2,
                label=f"{run['side']} seed {run['seed']}",
            )
        ax.set_title(f"{title} loss, moving average of {SMOOTH} steps" if len(runs[0]["losses"]) > SMOOTH else title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(runs: list[dict], held_out: str) -> dict:
    """Per side: mean and standard deviation over seeds of AP and AP50 on one held-out set."""
    out = {}
    for side in ("torchvision", "lucid_jax"):
        scores = [r["held_out"][held_out] for r in runs if r["side"] == side]
        if scores:
            ap50 = np.array([s["AP50"] for s in scores])
            ap = np.array([s["AP"] for s in scores])
            spread = float(ap50.std(ddof=1)) if len(ap50) > 1 else 0.0
            out[side] = {"AP50_mean": float(ap50.mean()), "AP50_std": spread, "AP_mean": float(ap.mean())}
    return out


def main(argv=None):
    args = parse_args(argv)
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.small:
        data = small_split(args.size)
    else:
        import _neon

        folder = _neon.fetch_photos(args.images or Path.home() / ".cache" / "lucid_jax" / "neon")
        data = _neon.split(folder, piece=args.size)
    num_classes = 1 + int(max(labels.max() for _, _, labels in data["train"]))
    held_out = {name: data[name] for name in ("in_distribution", "cross_site")}
    for name, pieces in held_out.items():
        (out / f"{name}_ground_truth.json").write_text(json.dumps(coco_ground_truth(pieces, num_classes)))
    print(
        f"training regions {len(data['train'])}; held out: "
        + ", ".join(f"{n} {len(p)} images, {sum(len(b) for _, b, _ in p)} boxes" for n, p in held_out.items()),
        flush=True,
    )
    lrs = lr_table(args)
    sides = [s.strip() for s in args.sides.split(",")]
    model = ours_model(args.ours_model, num_classes, args.norm)
    runs, trainer = [], None
    for seed in range(args.seeds):
        if args.ours_model == "twin":
            tv = torchvision_twin(num_classes, args.norm, seed)
            variables = ours_from(tv, model, args.size)  # before torchvision trains: the same start
        else:
            variables = own_init(model, args.size, seed)
        for side in sides:
            start = time.perf_counter()
            if side == "torchvision":
                losses = train_torchvision(tv, args, data["train"], lrs, seed)
                train_s = time.perf_counter() - start
                found = {name: predict_torchvision(tv, p, args) for name, p in held_out.items()}
                # the trained torchvision weights scored by our predict too: separates training from scoring
                converted = ours_from(tv, model, args.size)
                crossed = {name: predict_ours(model, converted, p, args) for name, p in held_out.items()}
            elif side == "ours":
                trainer = trainer or ours_trainer(model, variables, args)
                losses, trained = train_ours(model, variables, trainer, args, data["train"], seed)
                train_s = time.perf_counter() - start
                found = {name: predict_ours(model, trained, p, args) for name, p in held_out.items()}
            else:
                raise SystemExit(f"--sides: unknown side {side!r} (torchvision, ours)")
            scores = {name: coco_scores(out / f"{name}_ground_truth.json", d) for name, d in found.items()}
            run = {
                "side": "lucid_jax" if side == "ours" else "torchvision",
                "seed": seed,
                "train_seconds": round(train_s, 1),
                "held_out": scores,
                "final_loss": float(losses[-SMOOTH:].sum(-1).mean()),
                "losses": losses.round(5).tolist(),
            }
            save_weights(
                model, converted if side == "torchvision" else trained, out / f"{run['side']}_seed{seed}.safetensors"
            )
            if side == "torchvision":
                run["held_out_by_our_predict"] = {
                    name: coco_scores(out / f"{name}_ground_truth.json", d) for name, d in crossed.items()
                }
            runs.append(run)
            print(
                f"{run['side']:>11} seed {seed}: train {train_s:7.1f} s, final loss {run['final_loss']:.3f}, "
                + ", ".join(f"{n} AP {s['AP']:.3f} AP50 {s['AP50']:.3f}" for n, s in scores.items()),
                flush=True,
            )
            if "held_out_by_our_predict" in run:
                print(
                    "   the same weights through our predict: "
                    + ", ".join(
                        f"{n} AP {s['AP']:.3f} AP50 {s['AP50']:.3f}" for n, s in run["held_out_by_our_predict"].items()
                    ),
                    flush=True,
                )
    draw_curves(runs, out / "loss_curves.png")
    result = {
        "config": dict(vars(args)),
        "summary": {name: summary(runs, name) for name in held_out},
        "runs": runs,
    }
    (out / "results.json").write_text(json.dumps(result, indent=1))
    rows = []
    for run in runs:
        s = run["held_out"]
        rows.append(
            [
                run["side"],
                run["seed"],
                f"{s['in_distribution']['AP']:.3f}",
                f"{s['in_distribution']['AP50']:.3f}",
                f"{s['cross_site']['AP']:.3f}",
                f"{s['cross_site']['AP50']:.3f}",
                f"{run['train_seconds']:.0f}",
            ]
        )
    C.print_table(rows, ["side", "seed", "in-dist AP", "in-dist AP50", "cross-site AP", "cross-site AP50", "train s"])
    for name, s in result["summary"].items():
        if {"torchvision", "lucid_jax"} <= set(s):
            tv, ours = s["torchvision"], s["lucid_jax"]
            bar = tv["AP50_mean"] - tv["AP50_std"]
            verdict = "met" if ours["AP50_mean"] >= bar else "NOT met"
            print(
                f"{name}: lucid_jax AP50 {ours['AP50_mean']:.3f} ± {ours['AP50_std']:.3f}, torchvision "
                f"{tv['AP50_mean']:.3f} ± {tv['AP50_std']:.3f}; "
                f"goal (ours >= torchvision's mean - its std = {bar:.3f}) {verdict}"
            )
    print(f"wrote {out / 'results.json'} and {out / 'loss_curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
