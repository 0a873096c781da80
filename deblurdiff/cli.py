"""Command line: deblur image files and folders.

    python -m deblurdiff INPUT... -o OUT_DIR [options]

Every input file (folders are searched recursively for images) is written to
``OUT_DIR/<name>.png``. Inputs are never overwritten, outputs always stay inside
``OUT_DIR`` and existing files there are kept unless ``--overwrite`` is given.
Unreadable inputs are reported and skipped; the exit status is then 1. Missing
weights or invalid options end the run with exit status 2.

Running one image with given options is :mod:`deblurdiff.service`, shared with the web app.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from . import image_io, service
from .image_io import InvalidInputError
from .service import (
    DEFAULT_SAMPLER,
    DEFAULT_TILING,
    TILING_CHOICES,
    UNTRAINED_LABEL,
    UNTRAINED_WARNING,
    is_untrained,
    make_options,
    png_metadata,
    restore,
    safe_stem,
)

EXIT_OK = 0
EXIT_SOME_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

#: File name extensions picked up when a folder is given (explicit files are always tried).
IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pnm"}
    | {".heic", ".heif", ".avif"}
)


# --------------------------------------------------------------------------
# Inputs and outputs
# --------------------------------------------------------------------------


@dataclass
class InputItem:
    path: Path
    display: str


def collect_inputs(arguments: Sequence[str]) -> tuple[list[InputItem], list[tuple[str, str]]]:
    """Files named directly, plus images found recursively in folders (sorted).

    Returns ``(items, problems)``: problems are ``(argument, message)`` pairs for
    arguments that do not exist. Duplicates (the same resolved file) are dropped.
    """
    items: list[InputItem] = []
    problems: list[tuple[str, str]] = []
    seen: set[Path] = set()

    def add(path: Path, display: str):
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            items.append(InputItem(path, display))

    for arg in arguments:
        path = Path(arg)
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix.lower() in IMAGE_EXTENSIONS
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                problems.append((arg, f"no images found in the folder {arg!r} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})"))
            for p in found:
                add(p, str(p))
        elif path.exists():
            add(path, arg)
        else:
            problems.append((arg, f"{arg!r} does not exist"))
    return items, problems


def plan_outputs(items: Sequence[InputItem], out_dir: Path, *, suffix: str = "", overwrite: bool = False) -> list[Path]:
    """One ``OUT_DIR/<name>.png`` per input: unique, inside ``out_dir``, never an input file.

    An existing file is kept (a ``-1``, ``-2``… name is used) unless ``overwrite``.
    """
    out_root = out_dir.resolve()
    # Compared without case: on case-insensitive file systems X.png is x.png.
    inputs = {str(item.path.resolve()).casefold() for item in items}
    taken: set[str] = set()
    outputs = []
    for item in items:
        stem = safe_stem(item.path.name) + suffix
        n = 0
        while True:
            name = f"{stem}.png" if n == 0 else f"{stem}-{n}.png"
            candidate = out_root / name
            key = name.casefold()  # case-insensitive file systems
            clash = key in taken or str(candidate.resolve()).casefold() in inputs or (candidate.exists() and not overwrite)
            if not clash and candidate.resolve().parent == out_root:
                break
            n += 1
        taken.add(key)
        outputs.append(candidate)
    return outputs


def check_out_dir(out_dir: Path, arguments: Sequence[str]) -> str | None:
    """A message when ``out_dir`` cannot be used, else None."""
    resolved = out_dir.resolve()
    for arg in arguments:
        if Path(arg).exists() and Path(arg).resolve() == resolved:
            kind = "folder" if Path(arg).is_dir() else "file"
            return (
                f"The output folder {str(out_dir)!r} is the input {kind} {arg!r} itself; "
                "choose a separate output folder (inputs are never overwritten)."
            )
    if out_dir.exists() and not out_dir.is_dir():
        return f"The output path {str(out_dir)!r} exists and is not a folder."
    return None


# --------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m deblurdiff",
        description=(
            "Deblur photos with DeblurDiff. Each INPUT (an image file, or a folder searched "
            "recursively for images) is written to OUT_DIR/<name>.png."
        ),
        epilog=(
            "Weights: --model, or the DEBLURDIFF_MODEL environment variable (a diffusers folder, a "
            "Hub repo id, or the official model.pth, converted when loaded), else the authors' "
            "checkpoint, downloaded and converted once (--no-download: never). Exit status: 0 all "
            "images written, 1 some inputs failed (reported, the others are written), 2 unusable "
            "options or weights."
        ),
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files and/or folders")
    parser.add_argument("-o", "--output-dir", required=True, metavar="OUT_DIR", help="folder for the results (created if needed)")
    parser.add_argument(
        "--steps",
        default=service.DEFAULT_STEPS,
        help=f"denoising steps, {service.MIN_STEPS}-{service.MAX_STEPS} (default {service.DEFAULT_STEPS})",
    )
    parser.add_argument(
        "--seed",
        default=None,
        help=f"random seed, {service.MIN_SEED}-{service.MAX_SEED}; default: a random one (printed, and stored in each PNG)",
    )
    parser.add_argument(
        "--guidance",
        default=service.DEFAULT_GUIDANCE,
        help=f"classifier-free guidance scale, {service.MIN_GUIDANCE:g}-{service.MAX_GUIDANCE:g} (default {service.DEFAULT_GUIDANCE:g}: no guidance)",
    )
    parser.add_argument("--prompt", default=None, help="text prompt (default: empty)")
    parser.add_argument("--negative-prompt", default=None, help="negative prompt, used when --guidance > 1 (default: the model's)")
    parser.add_argument("--no-color-fix", dest="color_fix", action="store_false", help="do not match the output's colours to the input's")
    parser.add_argument("--tiled", choices=TILING_CHOICES, default=DEFAULT_TILING, help="process large images in tiles (default: auto, by size)")
    parser.add_argument("--sampler", default=None, help=f"sampler (default: {DEFAULT_SAMPLER})")
    parser.add_argument("--save-lkpn", action="store_true", help="also write the LKPN-restored latent, decoded, as <name>_lkpn.png")
    parser.add_argument("--overwrite", action="store_true", help="replace existing files in OUT_DIR (inputs are never replaced)")
    parser.add_argument("--model", default=None, help="weights: folder, Hub repo id or official model.pth (default: $DEBLURDIFF_MODEL, else the authors' checkpoint, downloaded once)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer override (default: $DEBLURDIFF_TOKENIZER, else the one shipped with the package)")
    parser.add_argument("--no-download", action="store_true", help="never download the authors' checkpoint (also: DEBLURDIFF_NO_DOWNLOAD=1)")
    parser.add_argument("--device", default="auto", help="auto (default), cuda, cuda:N, mps or cpu")
    parser.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"), help="auto: fp16/bf16 on GPUs, fp32 on CPU")
    parser.add_argument(
        "--dev-random-weights",
        action="store_true",
        help="development only: untrained random weights (outputs are labelled UNTRAINED and are not deblurred)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return parser


def _error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    try:
        options = make_options(
            steps=args.steps, seed=args.seed, guidance_scale=args.guidance, prompt=args.prompt,
            negative_prompt=args.negative_prompt, color_fix=args.color_fix, tiling=args.tiled,
            sampler=args.sampler, return_lkpn_image=args.save_lkpn,
        )
    except InvalidInputError as exc:
        _error(str(exc))
        return EXIT_USAGE

    out_dir = Path(args.output_dir)
    problem = check_out_dir(out_dir, args.inputs)
    if problem:
        _error(problem)
        return EXIT_USAGE
    items, missing = collect_inputs(args.inputs)
    for _, message in missing:
        _error(message)
    if not items:
        _error("nothing to do: no input images")
        return EXIT_USAGE

    from .loading import MODEL_ENV, RANDOM_TINY, ModelUnavailableError, load_pipeline
    from .weights import OFFICIAL_LABEL

    model = RANDOM_TINY if args.dev_random_weights else args.model
    try:
        pipe = load_pipeline(
            model, tokenizer=args.tokenizer, device=args.device, dtype=args.dtype,
            allow_download=False if args.no_download else None,
        )
    except ModelUnavailableError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except (ValueError, RuntimeError) as exc:  # e.g. an unknown --device
        _error(f"could not set up the model: {exc}")
        return EXIT_USAGE
    untrained = is_untrained(pipe)
    if untrained:
        print(f"WARNING: {UNTRAINED_WARNING}", file=sys.stderr)
    if pipe.device.type == "cpu":
        from .cpu import choose_cpu_config, prepare_cpu_pipeline

        config = choose_cpu_config(dtype=pipe.unet.dtype)
        print(f"CPU configuration: {config.describe()}", file=sys.stderr)
        prepare_cpu_pipeline(pipe, config, progress=lambda message: print(message, file=sys.stderr), measure=False)

    out_dir.mkdir(parents=True, exist_ok=True)
    outputs = plan_outputs(items, out_dir, suffix=f"_{UNTRAINED_LABEL}" if untrained else "", overwrite=args.overwrite)
    model_name = RANDOM_TINY if untrained else (args.model or os.environ.get(MODEL_ENV) or OFFICIAL_LABEL)
    print(
        f"{len(items)} image(s), {options.steps} steps, seed {options.seed}, guidance {options.guidance_scale:g}, "
        f"device {pipe.device} → {out_dir}",
        file=sys.stderr,
    )

    from tqdm.auto import tqdm

    failures = len(missing)
    written = 0
    images_bar = tqdm(total=len(items), unit="image", disable=args.quiet or len(items) < 2, position=0)
    try:
        for item, target in zip(items, outputs):
            images_bar.set_description(item.path.name[:40])
            try:
                loaded = image_io.load_image_with_notes(item.path)
            except InvalidInputError as exc:
                images_bar.write(f"skipped {item.display}: {exc}", file=sys.stderr)
                failures += 1
                images_bar.update()
                continue
            for note in loaded.notes:
                images_bar.write(f"{item.display}: {note}", file=sys.stderr)
            steps_bar = tqdm(total=options.steps, unit="step", leave=False, disable=args.quiet, position=1 if len(items) > 1 else 0)

            def on_step(done, total, bar=steps_bar):
                bar.update(done - bar.n)

            try:
                result = restore(pipe, loaded.image, options, on_step=on_step)
            except InvalidInputError as exc:
                images_bar.write(f"skipped {item.display}: {exc}", file=sys.stderr)
                failures += 1
                continue
            except Exception as exc:  # out of memory and the like: report, go on with the next image
                images_bar.write(f"failed {item.display}: {type(exc).__name__}: {exc}", file=sys.stderr)
                failures += 1
                continue
            finally:
                steps_bar.close()
                images_bar.update()
            info = png_metadata(result, model=model_name, untrained=untrained, extra={"source": item.path.name})
            result.image.save(target, pnginfo=info)
            written += 1
            message = f"{item.display} → {target} ({result.seconds:.1f} s)"
            if result.lkpn_image is not None:
                lkpn_target = target.with_name(f"{target.stem}_lkpn.png")
                input_paths = {str(i.path.resolve()).casefold() for i in items}
                if str(lkpn_target.resolve()).casefold() not in input_paths and (args.overwrite or not lkpn_target.exists()):
                    result.lkpn_image.save(lkpn_target, pnginfo=info)
                    message += f", LKPN view → {lkpn_target.name}"
            if untrained:
                message += f" [{UNTRAINED_LABEL}]"
            images_bar.write(message, file=sys.stderr)
    except KeyboardInterrupt:
        images_bar.close()
        _error(f"interrupted; {written} image(s) written")
        return EXIT_INTERRUPTED
    images_bar.close()

    if failures:
        print(f"{written} image(s) written to {out_dir}; {failures} input(s) failed (see above).", file=sys.stderr)
        return EXIT_SOME_FAILED
    print(f"{written} image(s) written to {out_dir}.", file=sys.stderr)
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
