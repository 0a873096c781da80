"""Command line: deblur image files and folders.

    python -m deblurdiff INPUT... -o OUT_DIR [options]

Each input (folders are searched recursively) is written to ``OUT_DIR/<name>.png``;
inputs are never overwritten, existing outputs kept unless ``--overwrite``. Unreadable
inputs are reported and skipped (exit status 1); missing weights or invalid options exit
with 2. Outputs are written under a temporary name, renamed when complete and keyed on
their input's bytes and settings, so rerunning a command computes only what is missing.
Under ``torchrun`` or ``accelerate launch`` each process takes a share of the images
(:mod:`deblurdiff.distributed`).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import sys
import threading
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

from . import distributed, image_io, service
from .image_io import InvalidInputError
from .parsing import DTYPES
from .service import (
    DEFAULT_SAMPLER,
    DEFAULT_TILING,
    TILING_CHOICES,
    UNTRAINED_LABEL,
    UNTRAINED_WARNING,
    is_untrained,
    make_options,
    png_metadata,
    restore_batch,
    safe_stem,
)

EXIT_OK = 0
EXIT_SOME_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
MAX_BATCH_SIZE = 256

#: File name extensions picked up when a folder is given (explicit files are always tried).
IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pnm"}
    | {".heic", ".heif", ".avif"}
)


# ------------------------------------------------------------------------------ inputs and outputs


@dataclass
class InputItem:
    path: Path
    display: str


def collect_inputs(arguments: Sequence[str]) -> tuple[list[InputItem], list[tuple[str, str]]]:
    """Files named directly plus images found recursively in folders (sorted, no duplicates),
    and ``(argument, message)`` for arguments that do not exist."""
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


def plan_outputs(
    items: Sequence[InputItem],
    out_dir: Path,
    *,
    suffix: str = "",
    overwrite: bool = False,
    keep: Callable[[InputItem, Path], bool] | None = None,
) -> list[Path]:
    """One ``OUT_DIR/<name>.png`` per input: unique, inside ``out_dir``, never an input file.
    An existing file gets a ``-1``, ``-2``… name beside it unless ``overwrite``, or unless
    ``keep(item, path)`` says it is this input's result already."""
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
            clash = (
                key in taken
                or str(candidate.resolve()).casefold() in inputs
                or (candidate.exists() and not overwrite and not (keep is not None and keep(item, candidate)))
            )
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


#: PNG text field holding :func:`resume_key`.
RESUME_KEY_FIELD = "deblurdiff:resume_key"


def resume_key(path: Path, options, *, model: str, seed_given: bool) -> str:
    """What makes an output this input's result: the input's bytes, the settings and the
    model (the seed only when it was chosen: without ``--seed`` each run draws one)."""
    from .single_file import file_sha256

    settings = asdict(options)
    if not seed_given:
        settings.pop("seed")
    settings["model"] = model
    text = file_sha256(path) + json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def stored_key(path: Path) -> str | None:
    """The resume key recorded in a PNG written by this command (from its header), else None."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.info.get(RESUME_KEY_FIELD) or None
    except Exception:
        return None


def is_complete(path: Path) -> bool:
    """Whether ``path`` is a whole image file: every chunk there, checksums right."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except Exception:
        return False


def temporary_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.{os.getpid()}.tmp")


def save_atomically(image, target: Path, pnginfo) -> None:
    """Write a PNG under a temporary name, then rename it: ``target`` is never half-written."""
    temporary = temporary_name(target)
    try:
        image.save(temporary, format="PNG", pnginfo=pnginfo)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def remove_stale_temporaries(out_dir: Path, targets: Sequence[Path]) -> None:
    """Temporary files left by a killed run for the outputs about to be computed."""
    prefixes = {f".{t.name}." for t in targets}
    for path in out_dir.iterdir():
        name = path.name
        if name.startswith(".") and name.endswith(".tmp") and name[: name.rfind(".", 0, -4) + 1] in prefixes:
            path.unlink(missing_ok=True)


def padded_size(path: Path) -> tuple[int, int] | None:
    """(height, width) padded to multiples of 64, from the file's header; None if unreadable."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as image:
                return _padded_of(image)
    except Exception:
        return None


def _padded_of(image) -> tuple[int, int]:
    from .tiling import padded

    width, height = image.size
    return padded(height), padded(width)


@dataclass
class Job:
    index: int
    item: InputItem
    target: Path
    size: tuple[int, int] | None  # padded (height, width) from the header


def batches(jobs: Sequence[Job], batch_size: int) -> list[list[Job]]:
    """Jobs of the same padded size, ``batch_size`` at a time (input order within a size)."""
    ordered = sorted(jobs, key=lambda j: (j.size or (0, 0), j.index))
    out = []
    for _, group in itertools.groupby(ordered, key=lambda j: j.size or (0, 0)):
        group = list(group)
        out += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
    return out


def combined_exit_status(statuses: Sequence[int]) -> int:
    """The exit status of several ranks: unusable options, then interrupted, then failures."""
    for status in (EXIT_USAGE, EXIT_INTERRUPTED, EXIT_SOME_FAILED):
        if status in statuses:
            return status
    return EXIT_OK


# ------------------------------------------------------------------------------ the command


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
            "options or weights. Rerun the same command after an interruption: finished outputs "
            "are kept, the missing ones computed. Several processes: torchrun --nproc_per_node N "
            "-m deblurdiff ... or accelerate launch -m deblurdiff ... (one GPU each)."
        ),
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files and/or folders")
    parser.add_argument("-o", "--output-dir", required=True, metavar="OUT_DIR", help="folder for the results (created if needed)")
    parser.add_argument("--steps", default=service.DEFAULT_STEPS,
                        help=f"denoising steps, {service.MIN_STEPS}-{service.MAX_STEPS} (default {service.DEFAULT_STEPS})")
    parser.add_argument("--seed", default=None, help=f"random seed, {service.MIN_SEED}-{service.MAX_SEED}; "
                        "default: a random one (printed, and stored in each PNG)")
    parser.add_argument("--guidance", default=service.DEFAULT_GUIDANCE,
                        help=f"classifier-free guidance scale, {service.MIN_GUIDANCE:g}-{service.MAX_GUIDANCE:g} "
                        f"(default {service.DEFAULT_GUIDANCE:g}: no guidance)")
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
    parser.add_argument("--dtype", default="auto", choices=("auto", *DTYPES), help="auto: fp16/bf16 on GPUs, fp32 on CPU")
    parser.add_argument("--dev-random-weights", action="store_true",
                        help="development only: untrained random weights (outputs are labelled UNTRAINED and are not deblurred)")
    parser.add_argument("--batch-size", default="1", metavar="B",
                        help=f"images of the same padded size run through the model B at a time, 1-{MAX_BATCH_SIZE} (default 1)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return parser


def _error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def _parse_batch_size(value) -> int:
    try:
        size = int(str(value).strip())
    except ValueError:
        raise InvalidInputError(f"The batch size must be a whole number; got {value!r}.") from None
    if not 1 <= size <= MAX_BATCH_SIZE:
        raise InvalidInputError(f"The batch size must be between 1 and {MAX_BATCH_SIZE}; got {size}.")
    return size


@dataclass
class _Inputs:
    """What rank 0 found, sent to every rank."""
    problem: str | None
    items: list
    missing: list
    seed: int


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    try:
        options = make_options(
            steps=args.steps, seed=args.seed, guidance_scale=args.guidance, prompt=args.prompt,
            negative_prompt=args.negative_prompt, color_fix=args.color_fix, tiling=args.tiled,
            sampler=args.sampler, return_lkpn_image=args.save_lkpn,
        )
        batch_size = _parse_batch_size(args.batch_size)
    except InvalidInputError as exc:
        _error(str(exc))
        return EXIT_USAGE

    try:
        processes = distributed.start(args.device)
    except (ValueError, RuntimeError) as exc:
        _error(f"could not join the other processes: {exc}")
        return EXIT_USAGE
    try:
        return _run(args, options, batch_size, processes)
    finally:
        processes.close()


def _run(args, options, batch_size: int, processes: distributed.Processes) -> int:
    main_rank = processes.is_main
    prefix = f"[rank {processes.rank}] " if processes.distributed else ""

    # Rank 0 reads the inputs and draws the seed; every rank works from its view.
    out_dir = Path(args.output_dir)
    found = None
    if main_rank:
        problem = check_out_dir(out_dir, args.inputs)
        items, missing = collect_inputs(args.inputs) if problem is None else ([], [])
        found = _Inputs(problem, items, missing, options.seed)
    found = processes.broadcast(found)
    options = replace(options, seed=found.seed)
    items, missing = found.items, found.missing
    if main_rank:
        for _, message in missing:
            _error(message)
        if found.problem:
            _error(found.problem)
        elif not items:
            _error("nothing to do: no input images")
    if found.problem or not items:
        return EXIT_USAGE

    from .loading import MODEL_ENV, RANDOM_TINY, ModelUnavailableError, load_pipeline
    from .weights import OFFICIAL_LABEL

    model = RANDOM_TINY if args.dev_random_weights else args.model
    pipe, setup_error = None, None
    try:
        pipe = load_pipeline(
            model, tokenizer=args.tokenizer, device=distributed.process_device(args.device, processes),
            dtype=args.dtype, allow_download=False if args.no_download else None,
        )
    except ModelUnavailableError as exc:
        setup_error = str(exc)
    except (ValueError, RuntimeError) as exc:  # e.g. an unknown --device
        setup_error = f"could not set up the model: {exc}"
    errors = processes.gather(setup_error)
    if any(errors):
        if setup_error and (main_rank or setup_error != errors[0]):
            _error(prefix + setup_error)
        return EXIT_USAGE
    untrained = is_untrained(pipe)
    if untrained and main_rank:
        print(f"WARNING: {UNTRAINED_WARNING}", file=sys.stderr)
    if pipe.device.type == "cpu":
        from .cpu import choose_cpu_config, prepare_cpu_pipeline

        config = choose_cpu_config(dtype=pipe.unet.dtype)
        if main_rank:
            print(f"CPU configuration: {config.describe()}", file=sys.stderr)
        progress = (lambda message: print(message, file=sys.stderr)) if main_rank else (lambda message: None)
        prepare_cpu_pipeline(pipe, config, progress=progress, measure=False)

    model_name = RANDOM_TINY if untrained else (args.model or os.environ.get(MODEL_ENV) or OFFICIAL_LABEL)
    seed_given = args.seed is not None

    def key_of(path: Path) -> str | None:
        try:
            return resume_key(path, options, model=model_name, seed_given=seed_given)
        except OSError:  # unreadable: it fails, and is reported, when it is loaded
            return None

    def ours(item: InputItem, path: Path) -> bool:
        key = stored_key(path)
        return key is not None and key == key_of(item.path)

    # Rank 0 plans the outputs, finds those done by an earlier run and splits the rest.
    plan = None
    if main_rank:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            outputs = plan_outputs(
                items, out_dir, suffix=f"_{UNTRAINED_LABEL}" if untrained else "", overwrite=args.overwrite, keep=ours
            )
            pending = [
                Job(i, item, target, padded_size(item.path))
                for i, (item, target) in enumerate(zip(items, outputs))
                if args.overwrite or not target.exists() or not is_complete(target)
            ]
            remove_stale_temporaries(out_dir, [job.target for job in pending])
        except OSError as exc:
            plan = (f"cannot use the output folder {str(out_dir)!r}: {exc}", 0, [])
        else:
            costs = [job.size[0] * job.size[1] if job.size else 0 for job in pending]
            shards = distributed.shard(costs, processes.world_size)
            plan = (None, len(items) - len(pending), [[pending[i] for i in s] for s in shards])
    plan_error, done_before, shards = processes.broadcast(plan)
    if plan_error:
        if main_rank:
            _error(plan_error)
        return EXIT_USAGE
    mine = shards[processes.rank]
    total = sum(len(s) for s in shards)
    if main_rank:
        where = f" on {processes.world_size} processes" if processes.distributed else f", device {pipe.device}"
        print(
            f"{len(items)} image(s), {options.steps} steps, seed {options.seed}, guidance {options.guidance_scale:g}, "
            f"batch size {batch_size}{where} → {out_dir}",
            file=sys.stderr,
        )
        if done_before:
            print(f"{done_before} image(s) already done by an earlier run with these settings: kept.", file=sys.stderr)

    from tqdm.auto import tqdm

    show_bars = main_rank and not args.quiet
    images_bar = tqdm(total=total, unit="image", disable=not show_bars or total < 2, position=0)
    bar_lock = threading.Lock()

    def refresh_bar():
        with bar_lock:
            images_bar.update(processes.finished_overall() - images_bar.n)

    def say(message: str) -> None:
        if main_rank:
            images_bar.write(message, file=sys.stderr)
        else:
            print(prefix + message, file=sys.stderr, flush=True)

    stop_polling = threading.Event()
    poller = None
    if main_rank and processes.distributed and not images_bar.disable:

        def poll():
            while not stop_polling.wait(0.5):
                refresh_bar()

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()

    input_paths = {str(i.path.resolve()).casefold() for i in items}
    counts = {"written": 0, "failed": 0}

    def finish(job: Job, result) -> None:
        key = key_of(job.item.path)
        extra = {"source": job.item.path.name, **({"resume_key": key} if key else {})}
        info = png_metadata(result, model=model_name, untrained=untrained, extra=extra)
        message = f"{job.item.display} → {job.target} ({result.seconds:.1f} s)"
        try:
            if result.lkpn_image is not None:  # written first: a complete output implies its companion
                lkpn_target = job.target.with_name(f"{job.target.stem}_lkpn.png")
                if str(lkpn_target.resolve()).casefold() not in input_paths and (
                    args.overwrite or not lkpn_target.exists() or stored_key(lkpn_target) == key
                ):
                    save_atomically(result.lkpn_image, lkpn_target, info)
                    message += f", LKPN view → {lkpn_target.name}"
            save_atomically(result.image, job.target, info)
        except OSError as exc:  # disk full, permissions: report, go on
            failed(job, "failed", f"could not write {job.target}: {exc}")
            return
        counts["written"] += 1
        if untrained:
            message += f" [{UNTRAINED_LABEL}]"
        say(message)

    def failed(job: Job, kind: str, detail: str) -> None:
        say(f"{kind} {job.item.display}: {detail}")
        counts["failed"] += 1

    def run_together(group: list[tuple[Job, object]]) -> None:
        steps_bar = tqdm(total=options.steps, unit="step", leave=False, disable=not show_bars, position=1 if total > 1 else 0)

        def on_step(done, steps, bar=steps_bar):
            bar.update(done - bar.n)

        try:
            results = restore_batch(pipe, [image for _, image in group], options, on_step=on_step)
        except Exception as exc:  # out of memory and the like: report, go on with the next image
            results, error = None, exc
        finally:
            steps_bar.close()
        if results is None:
            if len(group) > 1:
                say(f"a batch of {len(group)} failed ({type(error).__name__}: {error}); running its images one at a time")
                for pair in group:
                    run_together([pair])
                return
            job = group[0][0]
            kind = "skipped" if isinstance(error, InvalidInputError) else "failed"
            detail = str(error) if isinstance(error, InvalidInputError) else f"{type(error).__name__}: {error}"
            failed(job, kind, detail)
            processes.finished()
            return
        for (job, _), result in zip(group, results):
            finish(job, result)
            processes.finished()

    try:
        for batch in batches(mine, batch_size):
            loaded = []
            for job in batch:
                try:
                    image = image_io.load_image_with_notes(job.item.path)
                except InvalidInputError as exc:
                    failed(job, "skipped", str(exc))
                    processes.finished()
                    continue
                for note in image.notes:
                    say(f"{job.item.display}: {note}")
                loaded.append((job, image.image))
            # The header's size can differ from the decoded one (orientation, upscaling).
            by_size: dict = {}
            for job, image in loaded:
                by_size.setdefault(_padded_of(image), []).append((job, image))
            for group in by_size.values():
                run_together(group)
            if main_rank:
                refresh_bar()
    except KeyboardInterrupt:
        stop_polling.set()
        images_bar.close()
        _error(f"{prefix}interrupted; {counts['written']} image(s) written")
        return EXIT_INTERRUPTED

    status = EXIT_SOME_FAILED if counts["failed"] else EXIT_OK
    report = dict(rank=processes.rank, device=str(pipe.device), status=status, **counts)
    reports = processes.gather(report)
    stop_polling.set()
    if poller is not None:
        poller.join()
    if main_rank:
        refresh_bar()
    images_bar.close()

    written = sum(r["written"] for r in reports)
    failures = sum(r["failed"] for r in reports) + len(missing)
    status = combined_exit_status([r["status"] for r in reports] + ([EXIT_SOME_FAILED] if missing else []))
    if main_rank:
        if processes.distributed:
            for r in reports:
                print(f"rank {r['rank']} ({r['device']}): {r['written']} written, {r['failed']} failed", file=sys.stderr)
        kept = f" ({done_before} kept from an earlier run)" if done_before else ""
        if failures:
            print(f"{written} image(s) written to {out_dir}{kept}; {failures} input(s) failed (see above).", file=sys.stderr)
        else:
            print(f"{written} image(s) written to {out_dir}{kept}.", file=sys.stderr)
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
