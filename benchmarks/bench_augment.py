"""Training recipes compared on real photographs: one factor at a time from a baseline
(norm, augmentation, steps, image size, model), each run through ``lucid-jax train``
and scored by ``lucid-jax eval`` on held-out photographs.

    python benchmarks/bench_augment.py --neon [--seeds 2] [--variants "baseline;--norm-mode group"] [--work DIR]
    python benchmarks/bench_augment.py --images DIR [--held-out NAME,...] [--variants ...]

``--neon`` uses the NEON tree crowns of the DeepForest sample data (``_neon.py``
fetches them with pip) and two held-out sets: ``in_distribution``, pieces of the
bottom of a training photograph that training never sees, and ``cross_site``, whole
photographs of two sites never trained on. ``--images DIR`` takes your own large
annotated photographs as VOC pairs, ``NAME.xml`` beside ``NAME.png`` (or .jpg); the
photographs named in ``--held-out`` become the ``cross_site`` set, whole.

Training photographs are cut into tiles of mixed orientation (landscape, portrait
and square, as a real collection has), keeping a box when at least half of it lies
inside its tile, and written as a VOC folder with one split per set. Every variant is
the baseline's flags followed by its own (the last value of a flag wins), run once
per seed. Printed and written to WORK/recipes.json: per variant, the mean and spread
(standard deviation over seeds) of COCO AP50 and AP on each held-out set, and the
seconds a run took. recipes.json is written after every run, and a later invocation
with the same ``--work`` keeps the (variant, seed) runs it holds: the study can be
run in parts, and more seeds added to one variant (``--variants baseline --seeds 3``).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))  # _neon beside this script
from _neon import crop, read_voc_boxes  # noqa: E402

# (height, width) of the training tiles, taken in turn: landscape, portrait, square.
TILE_SHAPES = ((320, 480), (480, 320), (400, 400))


# The baseline every variant starts from: the mini detector from scratch at 416 pixels,
# batch 2, 600 steps, BatchNorm, flips; the optimiser and schedule are the command
# line's defaults (AdamW 1e-3, warmup, cosine).
BASELINE = (
    "--model", "faster_rcnn_mini_fpn", "--image-size", "416", "--batch-size", "2", "--steps", "600",
    "--norm-mode", "batch", "--augment", "flip",
)  # fmt: skip
# One factor at a time; "name=flags" where the name differs from the flags.
STUDY = (
    "baseline",
    "--norm-mode group",
    "--augment flip,color",
    "--augment jitter",
    "--augment jitter,color",
    "SGD=--optimizer sgd --lr 0.02 --warmup-steps 100",
    "--steps 2000",
    "--image-size 256",
    "--image-size 640",
)


def photo_sources(description: str) -> argparse.ArgumentParser:
    """A parser with the photographs' flags the benchmarks on real photographs share:
    ``--neon`` or ``--images DIR``, ``--photos`` and ``--held-out``."""
    p = argparse.ArgumentParser(description=description)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--neon", action="store_true", help="the NEON photographs of the DeepForest sample data")
    source.add_argument("--images", help="folder of NAME.xml + NAME.png/.jpg photographs")
    p.add_argument("--photos", default=None, help="with --neon: where they are kept (default: ~/.cache/lucid_jax/neon)")
    p.add_argument("--held-out", default="", help="with --images: comma-separated NAMEs held out (default: the last)")
    return p


def parse_args(argv=None):
    p = photo_sources(__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=";".join(STUDY), help="';'-separated flag sets added to the baseline's")
    p.add_argument("--baseline", default=" ".join(BASELINE), help="the flags every run starts from")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--work", default=None, help="where the VOC folder and the runs go (default: a temporary folder)")
    return p.parse_args(argv)


def variant_flags(variant: str) -> tuple[str, list[str]]:
    """(name, flags) of a variant: "baseline", "FLAGS" or "NAME=FLAGS"."""
    name, _, flags = variant.partition("=") if "=" in variant.split("--")[0] else ("", "", variant)
    flags = flags.strip()
    if flags == "baseline":
        return "baseline", []
    return (name.strip() or flags), flags.split()


def tile_origins(length: int, tile: int) -> list[int]:
    """Tile starts covering [0, length) with tiles of ``tile`` (the last one flush with the end)."""
    if length <= tile:
        return [0]
    count = int(np.ceil(length / tile))
    return [int(round(i * (length - tile) / (count - 1))) for i in range(count)]


def cut_tiles(image: np.ndarray, boxes: np.ndarray, names: list[str], shape: tuple[int, int]):
    """Tiles of ``shape`` covering the image, each with the boxes mostly inside it, moved and clipped."""
    h, w = image.shape[:2]
    th, tw = min(shape[0], h), min(shape[1], w)
    for y0 in tile_origins(h, th):
        for x0 in tile_origins(w, tw):
            tile, kept, keep = crop(image, boxes, y0, x0, th, tw)
            yield tile, kept, [n for n, k in zip(names, keep) if k]


def write_xml(path: Path, filename: str, height: int, width: int, boxes: np.ndarray, names: list[str]) -> None:
    objects = "".join(
        f"<object><name>{n}</name><difficult>0</difficult><bndbox><xmin>{x1 + 1:.0f}</xmin><ymin>{y1 + 1:.0f}</ymin>"
        f"<xmax>{x2:.0f}</xmax><ymax>{y2:.0f}</ymax></bndbox></object>"
        for (x1, y1, x2, y2), n in zip(np.round(boxes), names)
    )
    path.write_text(
        f"<annotation><filename>{filename}</filename><size><width>{width}</width><height>{height}</height>"
        f"<depth>3</depth></size>{objects}</annotation>"
    )


def tiles_of(photos, stem_prefix: str):
    """Training tiles of every orientation from each (image, boxes, names) photograph."""
    turn = 0
    for index, (image, boxes, names) in enumerate(photos):
        k = 0
        for _ in range(len(TILE_SHAPES)):  # each photograph gives tiles of every orientation
            for tile in cut_tiles(image, boxes, names, TILE_SHAPES[turn % len(TILE_SHAPES)]):
                yield f"{stem_prefix}{index}_{k:03d}", tile
                k += 1
            turn += 1


def write_voc(root: Path, sets: dict) -> dict:
    """Write a VOC folder with one split per set.

    Args:
      sets: {split: [(stem, (image [H, W, 3] uint8, boxes [M, 4], names))]}.

    Returns:
      {split: (images, boxes)}.
    """
    from PIL import Image

    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, pieces in sets.items():
        stems = []
        for stem, (image, boxes, names) in pieces:
            Image.fromarray(np.ascontiguousarray(image)).save(root / "JPEGImages" / f"{stem}.png")
            write_xml(root / "Annotations" / f"{stem}.xml", f"{stem}.png", *image.shape[:2], boxes, names)
            stems.append(stem)
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(stems) + "\n")
        counts[split] = (len(pieces), sum(len(p[1][1]) for p in pieces))
    return counts


def build_voc(source: Path, root: Path, held_out: list[str]) -> dict:
    """Tiles of your photographs in ``train``, the ``held_out`` ones whole in ``cross_site``
    (default: the last photograph); returns {split: (images, boxes)}."""
    from lucid_jax.data import load_image

    photos = sorted(p for p in source.glob("*.xml"))
    images = {p.stem: next(source.glob(f"{p.stem}.[pj][np]g"), None) for p in photos}
    photos = [p for p in photos if images[p.stem] is not None]
    if not photos:
        raise SystemExit(f"no NAME.xml beside NAME.png or NAME.jpg in {source}")
    held = held_out or [photos[-1].stem]
    train, whole = [], []
    for xml in photos:
        image, (boxes, names) = load_image(images[xml.stem]), read_voc_boxes(xml)
        (whole if xml.stem in held else train).append((xml.stem, (image, boxes, names)))
    train_tiles = []
    for stem, photo in train:
        train_tiles += [(f"{stem}_{k}", tile) for k, tile in tiles_of([photo], "")]
    return write_voc(root, {"train": train_tiles, "cross_site": whole})


def build_neon_voc(photos: Path, root: Path) -> dict:
    """The NEON split of ``_neon.split``: training tiles, in-distribution pieces, cross-site photographs."""
    import _neon

    data = _neon.split(_neon.fetch_photos(photos))

    def named(items):
        return [(image, boxes, ["tree"] * len(boxes)) for image, boxes, _ in items]

    return write_voc(
        root,
        {
            "train": list(tiles_of(named(data["train"]), "train")),
            "in_distribution": [(f"piece{i:02d}", p) for i, p in enumerate(named(data["in_distribution"]))],
            "cross_site": [(f"site{i}", p) for i, p in enumerate(named(data["cross_site"]))],
        },
    )


def cli(*args) -> str:
    proc = subprocess.run([sys.executable, "-m", "lucid_jax.cli", *map(str, args)], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"lucid-jax {' '.join(map(str, args[:1]))} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def main(argv=None):
    args = parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_augment_"))
    voc = work / "voc"
    results = earlier_runs(work / "recipes.json", args.baseline)  # before anything is written
    if args.neon:
        counts = build_neon_voc(Path(args.photos or Path.home() / ".cache" / "lucid_jax" / "neon"), voc)
    else:
        counts = build_voc(Path(args.images), voc, [n for n in args.held_out.split(",") if n])
    held_out = [split for split in counts if split != "train"]
    print(f"# bench_augment: baseline {args.baseline}; {args.seeds} seed(s) per variant")
    for split, (n, boxes) in counts.items():
        print(f"{split}: {n} image(s), {boxes} boxes")
    done = {(r["variant"], r["seed"]) for r in results}
    for variant in (v for v in args.variants.split(";") if v.strip()):
        name, flags = variant_flags(variant)
        for seed in range(args.seeds):
            if (name, seed) in done:
                print(f"{name}, seed {seed}: scored by an earlier invocation, kept", flush=True)
                continue
            run = work / "runs" / f"{name.replace(' ', '_').replace('-', '').replace(',', '+')}_seed{seed}"
            print(f"training {name}, seed {seed} ...", flush=True)
            start = time.perf_counter()
            cli(
                "train",
                "--data",
                f"voc:{voc}",
                *args.baseline.split(),
                *flags,
                "--seed",
                seed,
                "--out",
                run,
                "--no-progress",
            )
            seconds = time.perf_counter() - start
            scores = {}
            for split in held_out:
                scored = cli("eval", "--data", f"voc:{voc}", "--split", split, "--checkpoint", run, "--no-progress")
                metrics = json.loads(scored)
                scores[split] = {"AP": metrics["AP"], "AP50": metrics["AP50"]}
            results.append({"variant": name, "seed": seed, "train_seconds": round(seconds), "held_out": scores})
            print("  " + ", ".join(f"{s} AP50 {v['AP50']:.3f} AP {v['AP']:.3f}" for s, v in scores.items()), flush=True)
            # after every run: an interrupted study keeps what it measured, and a later one goes on from it
            (work / "recipes.json").write_text(
                json.dumps({"counts": counts, "baseline": args.baseline, "runs": results}, indent=1)
            )
    print_table(results, held_out)
    return results


def earlier_runs(path: Path, baseline: str) -> list[dict]:
    """The runs a previous invocation in the same WORK folder scored, when it had the same baseline."""
    if not path.exists():
        return []
    earlier = json.loads(path.read_text())
    if earlier["baseline"] != baseline:
        raise SystemExit(f"{path} holds runs of another baseline ({earlier['baseline']}); use another --work")
    return earlier["runs"]


def print_table(results: list[dict], held_out: list[str]) -> None:
    """Per variant: mean ± standard deviation over seeds of each held-out set's AP50 and AP."""
    names = list(dict.fromkeys(r["variant"] for r in results))
    header = ["variant", "seeds"] + [f"{s} {k}" for s in held_out for k in ("AP50", "AP")] + ["train s"]
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for name in names:
        runs = [r for r in results if r["variant"] == name]
        cells = [f"`{name}`", str(len(runs))]
        for split in held_out:
            for key in ("AP50", "AP"):
                v = np.array([r["held_out"][split][key] for r in runs])
                cells.append(f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if len(v) > 1 else f"{v[0]:.3f}")
        cells.append(f"{np.mean([r['train_seconds'] for r in runs]):.0f}")
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
