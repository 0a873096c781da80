"""Command line: deblur image files and folders (``python -m deblurdiff --help``; README's
"Command line" section says how resuming, batches and several processes work)."""

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

from PIL import Image

from . import distributed, image_io, service
from .image_io import InvalidInputError
from .parsing import DTYPES
from .pipeline.tiling import padded

EXIT_OK = 0
EXIT_SOME_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
MAX_BATCH_SIZE = 256
#: PNG text field holding :func:`resume_key`.
RESUME_KEY_FIELD = "deblurdiff:resume_key"

#: File name extensions picked up when a folder is given (explicit files are always tried).
IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pnm"}
    | {".heic", ".heif", ".avif"}
)


def collect_inputs(arguments: Sequence[str]) -> tuple[list[Path], list[str]]:
    """Files named directly plus images found recursively in folders (sorted, no duplicates),
    and a message for each argument that does not exist or holds no image."""
    items: dict[Path, Path] = {}
    problems: list[str] = []
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
                problems.append(f"no images found in the folder {arg!r} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
            for p in found:
                items.setdefault(p.resolve(), p)
        elif path.exists():
            items.setdefault(path.resolve(), path)
        else:
            problems.append(f"{arg!r} does not exist")
    return list(items.values()), problems


def _casefolded(paths) -> set[str]:
    """Resolved paths without case: on case-insensitive file systems X.png is x.png."""
    return {str(Path(p).resolve()).casefold() for p in paths}


def plan_outputs(
    items: Sequence[Path],
    out_dir: Path,
    *,
    suffix: str = "",
    overwrite: bool = False,
    keep: Callable[[Path, Path], bool] | None = None,
) -> list[Path]:
    """One ``OUT_DIR/<name>.png`` per input: unique, inside ``out_dir``, never an input file.
    An existing file gets a ``-1``, ``-2``… name beside it unless ``overwrite``, or unless
    ``keep(input, path)`` says it is this input's result already."""
    out_root = out_dir.resolve()
    inputs = _casefolded(items)
    taken: set[str] = set()
    outputs = []
    for item in items:
        stem = service.safe_stem(item.name) + suffix
        for n in itertools.count():
            candidate = out_root / (f"{stem}.png" if n == 0 else f"{stem}-{n}.png")
            clash = (
                candidate.name.casefold() in taken
                or str(candidate.resolve()).casefold() in inputs
                or (candidate.exists() and not overwrite and not (keep is not None and keep(item, candidate)))
            )
            if not clash and candidate.resolve().parent == out_root:
                break
        taken.add(candidate.name.casefold())
        outputs.append(candidate)
    return outputs


def check_out_dir(out_dir: Path, arguments: Sequence[str]) -> str | None:
    """A message when ``out_dir`` cannot be used, else None."""
    for arg in arguments:
        if Path(arg).exists() and Path(arg).resolve() == out_dir.resolve():
            kind = "folder" if Path(arg).is_dir() else "file"
            return (
                f"The output folder {str(out_dir)!r} is the input {kind} {arg!r} itself; "
                "choose a separate output folder (inputs are never overwritten)."
            )
    if out_dir.exists() and not out_dir.is_dir():
        return f"The output path {str(out_dir)!r} exists and is not a folder."
    return None


def resume_key(path: Path, options, *, model: str, seed_given: bool) -> str:
    """What makes an output this input's result: the input's bytes, the settings and the
    model (the seed only when it was chosen: without ``--seed`` each run draws one)."""
    from .models.single_file import file_sha256

    settings = asdict(options)
    if not seed_given:
        settings.pop("seed")
    settings["model"] = model
    text = file_sha256(path) + json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def stored_key(path: Path) -> str | None:
    """The resume key recorded in a PNG written by this command (from its header), else None."""
    try:
        with Image.open(path) as image:
            return image.info.get(RESUME_KEY_FIELD) or None
    except Exception:
        return None


def is_complete(path: Path) -> bool:
    """Whether ``path`` is a whole image file: every chunk there, checksums right."""
    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except Exception:
        return False


def save_atomically(image, target: Path, pnginfo) -> None:
    """Write a PNG under a temporary name, then rename it: ``target`` is never half-written."""
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        image.save(temporary, format="PNG", pnginfo=pnginfo)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def padded_size(path: Path) -> tuple[int, int] | None:
    """(height, width) as loaded, padded to multiples of 64, from the file's header; None if unreadable."""
    try:
        (width, height), _ = image_io.read_header(path)
    except InvalidInputError:
        return None
    return padded(height), padded(width)


@dataclass
class Job:
    path: Path
    target: Path
    size: tuple[int, int] | None  # padded (height, width) from the header


def batches(jobs: Sequence[Job], batch_size: int) -> list[list[Job]]:
    """Jobs of the same padded size, ``batch_size`` at a time (input order within a size)."""
    ordered = sorted(jobs, key=lambda j: j.size or (0, 0))
    out = []
    for _, group in itertools.groupby(ordered, key=lambda j: j.size or (0, 0)):
        group = list(group)
        out += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
    return out



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m deblurdiff",
        description=(
            "Deblur photos with DeblurDiff. Each INPUT (an image file, or a folder searched "
            "recursively for images) is written to OUT_DIR/<name>.png."
        ),
        epilog=(
            "Exit status: 0 all images written, 1 some inputs failed (reported, the others are written), "
            "2 unusable options or weights. Rerun the same command after an interruption: finished outputs "
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
    parser.add_argument("--tiled", choices=service.TILING_CHOICES, default=service.DEFAULT_TILING,
                        help="process large images in tiles (default: auto, by size)")
    parser.add_argument("--sampler", default=None, help=f"sampler (default: {service.DEFAULT_SAMPLER})")
    parser.add_argument("--save-lkpn", action="store_true", help="also write the LKPN-restored latent, decoded, as <name>_lkpn.png")
    parser.add_argument("--overwrite", action="store_true", help="replace existing files in OUT_DIR (inputs are never replaced)")
    parser.add_argument("--model", default=None, help="weights: a diffusers folder, a Hub repo id or the official model.pth "
                        "(default: $DEBLURDIFF_MODEL, else the authors' checkpoint, downloaded and converted once)")
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        options = service.make_options(
            steps=args.steps, seed=args.seed, guidance_scale=args.guidance, prompt=args.prompt,
            negative_prompt=args.negative_prompt, color_fix=args.color_fix, tiling=args.tiled,
            sampler=args.sampler, return_lkpn_image=args.save_lkpn,
        )
        batch_size = service.in_range(args.batch_size, "The batch size", 1, MAX_BATCH_SIZE)
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
    from tqdm.auto import tqdm

    main_rank = processes.is_main
    prefix = f"[rank {processes.rank}] " if processes.distributed else ""

    def say(message: str) -> None:
        """Rank 0 writes above its progress bars; the other ranks say who they are."""
        if main_rank:
            tqdm.write(message, file=sys.stderr)
        else:
            print(prefix + message, file=sys.stderr, flush=True)

    # Rank 0 reads the inputs and draws the seed; every rank works from its view.
    out_dir = Path(args.output_dir)
    found = None
    if main_rank:
        problem = check_out_dir(out_dir, args.inputs)
        items, missing = collect_inputs(args.inputs) if problem is None else ([], [])
        for message in missing:
            _error(message)
        if problem or not items:
            _error(problem or "nothing to do: no input images")
            items = []
        found = (items, len(missing), options.seed)
    items, missing, seed = processes.broadcast(found)
    if not items:
        return EXIT_USAGE
    options = replace(options, seed=seed)

    from .pipeline.loading import MODEL_ENV, RANDOM_TINY, ModelUnavailableError, load_pipeline
    from .pipeline.weights import OFFICIAL_LABEL

    pipe, setup_error = None, None
    try:
        pipe = load_pipeline(
            RANDOM_TINY if args.dev_random_weights else args.model, tokenizer=args.tokenizer,
            device=distributed.process_device(args.device, processes), dtype=args.dtype,
            allow_download=False if args.no_download else None,
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
    untrained = service.is_untrained(pipe)
    if untrained and main_rank:
        say(f"WARNING: {service.UNTRAINED_WARNING}")
    if pipe.device.type == "cpu":
        from .cpu.tuning import choose_cpu_config, prepare_cpu_pipeline

        config = choose_cpu_config(dtype=pipe.unet.dtype)
        if main_rank:
            say(f"CPU configuration: {config.describe()}")
        prepare_cpu_pipeline(pipe, config, progress=say if main_rank else None, measure=False)

    model_name = RANDOM_TINY if untrained else (args.model or os.environ.get(MODEL_ENV) or OFFICIAL_LABEL)

    def key_of(path: Path) -> str | None:
        try:
            return resume_key(path, options, model=model_name, seed_given=args.seed is not None)
        except OSError:  # unreadable: it fails, and is reported, when it is loaded
            return None

    def ours(source: Path, path: Path) -> bool:
        key = stored_key(path)
        return key is not None and key == key_of(source)

    # Rank 0 plans the outputs, finds those done by an earlier run and splits the rest.
    plan = None
    if main_rank:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            suffix = f"_{service.UNTRAINED_LABEL}" if untrained else ""
            outputs = plan_outputs(items, out_dir, suffix=suffix, overwrite=args.overwrite, keep=ours)
            names = {name for target in outputs for name in (target.name, f"{target.stem}_lkpn.png")}
            for stale in out_dir.glob(".*.tmp"):  # save_atomically's temporaries, left by a killed run
                name, _, pid = stale.name[1:-4].rpartition(".")
                if pid.isdigit() and name in names:
                    stale.unlink(missing_ok=True)
            pending = [
                Job(item, target, padded_size(item))
                for item, target in zip(items, outputs)
                if args.overwrite or not is_complete(target)
            ]
        except OSError as exc:
            _error(f"cannot use the output folder {str(out_dir)!r}: {exc}")
        else:
            costs = [job.size[0] * job.size[1] if job.size else 0 for job in pending]
            plan = (len(items) - len(pending), distributed.shard(costs, processes.world_size), pending)
    plan = processes.broadcast(plan)
    if plan is None:
        return EXIT_USAGE
    done_before, shards, pending = plan
    mine = [pending[i] for i in shards[processes.rank]]
    if main_rank:
        where = f" on {processes.world_size} processes" if processes.distributed else f", device {pipe.device}"
        say(
            f"{len(items)} image(s), {options.steps} steps, seed {options.seed}, guidance {options.guidance_scale:g}, "
            f"batch size {batch_size}{where} → {out_dir}"
        )
        if done_before:
            say(f"{done_before} image(s) already done by an earlier run with these settings: kept.")

    # Rank 0 shows one bar for all ranks, from their shared count of finished images.
    show_bars = main_rank and not args.quiet
    images_bar = tqdm(total=len(pending), unit="image", disable=not show_bars or len(pending) < 2, position=0)
    stop_polling = threading.Event()

    def poll():  # until stopped, then once more
        stopped = False
        while not stopped:
            stopped = stop_polling.wait(0.5)
            images_bar.update(processes.finished_overall() - images_bar.n)

    poller = threading.Thread(target=poll, daemon=True)
    if not images_bar.disable:
        poller.start()

    input_paths = _casefolded(items)
    counts = {"written": 0, "failed": 0}

    def failed(job: Job, kind: str, detail: str) -> None:
        say(f"{kind} {job.path}: {detail}")
        counts["failed"] += 1
        processes.finished()

    def finish(job: Job, result) -> None:
        key = key_of(job.path)
        extra = {"source": job.path.name, "resume_key": key}
        info = service.png_metadata(result, model=model_name, untrained=untrained, extra=extra)
        message = f"{job.path} → {job.target} ({result.seconds:.1f} s)"
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
        say(message + (f" [{service.UNTRAINED_LABEL}]" if untrained else ""))
        processes.finished()

    def run_together(group: list[tuple[Job, object]]) -> None:
        steps_bar = tqdm(
            total=options.steps, unit="step", leave=False, disable=not show_bars, position=1 if len(pending) > 1 else 0
        )
        try:
            results = service.restore_batch(pipe, [image for _, image in group], options,
                                            on_step=lambda done, steps: steps_bar.update(done - steps_bar.n))
        except InvalidInputError as exc:
            results, kind, detail = None, "skipped", str(exc)
        except Exception as exc:  # out of memory and the like: report, go on with the next image
            results, kind, detail = None, "failed", f"{type(exc).__name__}: {exc}"
        finally:
            steps_bar.close()
        if results is not None:
            for (job, _), result in zip(group, results):
                finish(job, result)
        elif len(group) > 1:
            say(f"a batch of {len(group)} failed ({detail}); running its images one at a time")
            for pair in group:
                run_together([pair])
        else:
            failed(group[0][0], kind, detail)

    try:
        for batch in batches(mine, batch_size):
            group = []
            for job in batch:
                try:
                    loaded = image_io.load_image_with_notes(job.path)
                except InvalidInputError as exc:
                    failed(job, "skipped", str(exc))
                    continue
                for note in loaded.notes:
                    say(f"{job.path}: {note}")
                group.append((job, loaded.image))
            if group:  # should a decoded size differ from its header's, the batch fails and is run one by one
                run_together(group)
        reports = processes.gather(dict(rank=processes.rank, device=str(pipe.device), **counts))
    except KeyboardInterrupt:
        reports = None
    stop_polling.set()
    if poller.is_alive():
        poller.join()
    images_bar.close()
    if reports is None:
        _error(f"{prefix}interrupted; {counts['written']} image(s) written")
        return EXIT_INTERRUPTED

    written = sum(r["written"] for r in reports)
    failures = sum(r["failed"] for r in reports) + missing
    if main_rank:
        if processes.distributed:
            for r in reports:
                say(f"rank {r['rank']} ({r['device']}): {r['written']} written, {r['failed']} failed")
        kept = f" ({done_before} kept from an earlier run)" if done_before else ""
        failed_part = f"; {failures} input(s) failed (see above)" if failures else ""
        say(f"{written} image(s) written to {out_dir}{kept}{failed_part}.")
    return EXIT_SOME_FAILED if failures else EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
