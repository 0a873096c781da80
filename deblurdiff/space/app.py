"""The DeblurDiff web app (Gradio): the Hugging Face Space, and ``python app.py`` locally."""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import multiprocessing
import os
import queue
import threading
import uuid
from pathlib import Path

import gradio as gr
import spaces
import torch

from ..pipeline import estimates, loading
from .. import image_io, service
from . import server_limits, zerogpu
from .aoti import compile_for_zerogpu
from ..cpu.tuning import choose_cpu_config, describe_cpu, prepare_cpu_pipeline
from ..pipeline.estimates import SpeedModel, format_steps
from ..pipeline.loading import MODEL_ENV, RANDOM_TINY, TOKENIZER_ENV, ModelUnavailableError, load_pipeline
from ..pipeline.pipeline_deblurdiff import DEFAULT_NEGATIVE_PROMPT, SAMPLERS
from ..service import UNTRAINED_LABEL, restore
from ..pipeline.weights import NO_DOWNLOAD_ENV, OFFICIAL_LABEL

logger = logging.getLogger(__name__)

#: GPU memory of a ZeroGPU slice ("large", the default: half an RTX Pro 6000 Blackwell; docs, August 2026).
ZERO_GPU_MEMORY_BYTES = 48 * 1024**3
#: The ahead-of-time compilation on ZeroGPU: "0" skips it (faster start, slower runs), "1"
#: runs it with the development weights too; by default it runs with real weights only.
AOTI_ENV = "DEBLURDIFF_AOTI"

#: The Space's weights when neither ``--model`` nor ``DEBLURDIFF_MODEL`` is set: a Hub repo id in
#: diffusers layout. ``None``: none published yet, so the app starts without a model and says so.
DEFAULT_SPACE_MODEL: str | None = None

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"

#: Gradio's ``delete_cache`` removes results and uploads older than this (checking every hour).
KEEP_RESULTS_SECONDS = 2 * 3600
#: Requests waiting in the queue (beyond that, new ones are turned away with a message).
QUEUE_SIZE = 32
#: Side of the square image used to measure the speed of the loaded model.
PROBE_SIDE = 256
#: Runs at once that can have a cancel flag (ZeroGPU runs at most ``zerogpu.CONCURRENCY``).
RUN_SLOTS = 64

#: What the model is for, shown under the title (the model card says the same).
SCOPE_TEXT = (
    "**Removes blur:** camera shake, motion blur and defocus (out-of-focus) blur. "
    "**Will not fix:** noise alone (a sharp but grainy photo comes back almost unchanged) or low "
    "resolution (it does not upscale; a small image stays small). A photo without blur shows little change."
)
#: The MCP tool's description; each parameter's range is in its input schema (``deblur``'s docstring).
TOOL_DESCRIPTION = (
    "Deblur a photo with DeblurDiff (a diffusion model): removes camera-shake, motion and defocus blur; "
    "it does not denoise or upscale. Input: an image as an http(s) URL or a base64 data URL ({formats}; "
    "at most {max_mp} megapixels and the server's upload limit, fetched with a time limit). "
    "Runs estimated to take too long are refused with what fits. Returns: the (input, deblurred) image pair, "
    "the full-resolution deblurred PNG, the LKPN view (or None), a Markdown summary and the seed used."
)

UNTRAINED_BANNER = (
    "### ⚠️ UNTRAINED development weights\n"
    "This app runs with **random, untrained weights** (`--dev-random-weights`): its output is "
    "**not** a deblurred image, it only exercises the interface. Every result is labelled "
    f"**{UNTRAINED_LABEL}**. Start the app with `--model` (or `{MODEL_ENV}`) to deblur for real."
)


def on_zero_gpu() -> bool:
    return bool(spaces.config.Config.zero_gpu)


def pass_raw(component):
    """The raw value, for the app's checks to explain (Gradio's are terse); an uploaded image as its
    untouched file, not opened by Pillow first. On the instance: a subclass would make Gradio write a stub."""

    def preprocess(payload):
        if not isinstance(component, gr.Image):
            return payload
        if payload is not None and payload.path and not (payload.url or "").startswith("data:"):
            return str(payload.path)
        return type(component).preprocess(component, payload)

    component.preprocess = preprocess


# On ZeroGPU it runs in a forked worker that inherits this module's globals, so only small
# picklable arguments cross the process boundary: the app's key in _APPS, not the app.

_APPS: dict[int, DeblurApp] = {}


def _gpu_duration(app_key: int, image, options: service.RestoreOptions, *rest) -> int:
    """Duration to give ``@spaces.GPU``, so that what ZeroGPU books is the estimate's."""
    speed = _APPS[app_key]._gpu_speed()
    return zerogpu.duration_for(speed.seconds(image.width, image.height, options.steps, options.guidance_scale, options.tiled))


@spaces.GPU(duration=_gpu_duration)
def run_on_device(app_key: int, image, options: service.RestoreOptions, slot: int, progress):
    """On ZeroGPU, in the forked worker, ``spaces`` relays ``progress`` to the app; the cancel flag is
    in shared memory, and the pipeline was placed on the GPU at start-up (nothing is moved here)."""
    app = _APPS[app_key]
    with app.lock:  # a cancelled run may still be finishing its current step
        return restore(app.pipe, image, options, should_stop=lambda: app.cancelled[slot],
                       on_step=lambda done, total: progress((done, total), desc="Denoising", unit="steps"))


def _user_error(message: str, title: str = "Error") -> gr.Error:
    return gr.Error(message, title=title, duration=None, print_exception=False)


def _as_user_error(exc: Exception) -> gr.Error:
    """What a visitor is told when a run fails (the details go to the server's log)."""
    if isinstance(exc, image_io.InvalidInputError):
        return _user_error(str(exc), "Invalid input")
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        logger.exception("out of memory")
        where = "GPU" if isinstance(exc, torch.OutOfMemoryError) else "server"
        advice = "Try a smaller image, or turn tiling on (Advanced)."
        return _user_error(f"The {where} ran out of memory on this image. {advice}", "Out of memory")
    logger.exception("deblurring failed")
    return _user_error(
        f"Something went wrong while deblurring ({type(exc).__name__}). The details were logged on the "
        "server. Please try again; a smaller image or fewer steps may help.",
        "Internal error",
    )


def banner_text(app: DeblurApp) -> str:
    """The model's status above the interface: missing, untrained, or what runs where."""
    if app.pipe is None:
        return (
            "### ⚠️ No model weights are loaded: this app cannot deblur images yet\n"
            f"{app.model_error}\n\n"
            "**How to provide them**\n"
            f"- Locally: `python app.py --model <folder | Hub repo id | model.pth>`, or set the environment variable `{MODEL_ENV}`.\n"
            f"- On a Hugging Face Space: set the Space variable `{MODEL_ENV}` (Settings → Variables and secrets), "
            "or `DEFAULT_SPACE_MODEL` in `deblurdiff/space/app.py`, then restart the Space.\n"
            "- To try the interface without weights: `python app.py --dev-random-weights` (output labelled UNTRAINED, not deblurred).\n"
        )
    if app.untrained:
        return UNTRAINED_BANNER
    dtype = str(app.pipe.dtype).replace("torch.", "")
    where = "ZeroGPU" if on_zero_gpu() else f"{app.pipe.device.type.upper()} ({dtype})"
    text = f"Model: `{app.model_ref or 'custom pipeline'}` · running on {where}."
    if app.pipe.device.type == "cpu":
        text += " On a CPU an image takes minutes; the estimated time appears when you choose one."
    return text


def limit_advice(app: DeblurApp, run: tuple) -> str | None:
    """What fits, when ``run`` (width, height, steps, guidance, tiled) books or takes more than allowed."""
    if on_zero_gpu():
        return zerogpu.limit_advice(app._gpu_speed(), *run)
    limit = estimates.max_run_seconds(app.speed.device, app.max_run_seconds)
    return estimates.run_cost_advice(app.speed, *run, limit)


def estimate_text(app: DeblurApp, size, steps, guidance_scale, tiling) -> str:
    """The time a run of an image of ``size`` would take, and a warning when it cannot run."""
    try:
        options = service.make_options(steps=steps, guidance_scale=guidance_scale, tiling=tiling)
    except image_io.InvalidInputError:
        return ""
    run = (size[0], size[1], options.steps, options.guidance_scale, options.tiled)
    if on_zero_gpu():
        return zerogpu.estimate_text(app._gpu_speed(), *run)
    speed = app.speed
    seconds = speed.seconds(*run)
    device = {"cuda": "GPU", "mps": "Apple GPU", "cpu": "CPU"}.get(speed.device, speed.device)
    basis = "from this machine's measured speed" if speed.measured else "rough figure until the speed has been measured"
    text = (f"Estimated time: **about {estimates.format_seconds(seconds)}** on the {device} for "
            f"{format_steps(options.steps)} (an estimate, {basis}).")
    advice = limit_advice(app, run)
    if advice:
        return f"{text} ⚠️ {advice}"
    if seconds > 120 and speed.device != "cuda":
        text += " ⏳ That is long: fewer steps or a smaller image make it faster."
    return text


def save_results(app: DeblurApp, source, loaded, result: service.DeblurResult):
    """The files and summary a run returns, written where Gradio serves them without a copy and
    its ``delete_cache`` removes them."""
    folder = Path(gr.utils.get_upload_folder(), f"deblurdiff-{uuid.uuid4().hex}")
    folder.mkdir(parents=True)  # its own folder: the download keeps its name
    name = Path(str(source)).name
    stem = service.safe_stem(name)
    label = f"_{UNTRAINED_LABEL}" if app.untrained else ""
    meta = service.png_metadata(result, model=app.model_ref, untrained=app.untrained, extra={"source": name})
    after = folder / f"{stem}_deblurred{label}.png"
    result.image.save(after, pnginfo=meta)
    before = folder / f"{stem}_input.png"
    loaded.image.save(before, compress_level=1)
    lkpn = None
    if result.lkpn_image is not None:
        lkpn = folder / f"{stem}_lkpn{label}.png"
        result.lkpn_image.save(lkpn, pnginfo=meta)

    w, h = result.image.size
    options = result.options
    summary = []
    if app.untrained:
        summary.append(f"⚠️ **{UNTRAINED_LABEL}**: made with random development weights, not a deblurred image.")
    summary.append(
        f"Done in {result.seconds:.1f} s: {w}×{h} pixels, seed **{result.seed}**, {format_steps(result.steps)}, "
        f"guidance {result.guidance_scale:g}, colour fix {'on' if options.color_fix else 'off'}, "
        f"tiling {({None: 'auto', True: 'on', False: 'off'})[options.tiled]}."
    )
    summary += [f"- {note}" for note in loaded.notes]
    return (str(before), str(after)), str(after), str(lkpn) if lkpn else None, "\n".join(summary), result.seed


def probe_speed(app: DeblurApp) -> None:
    """Time the loaded model once at start, for the estimates (holding it, so requests wait)."""
    from PIL import Image

    try:
        with app.lock:
            if app.cpu_config is not None:
                timing = prepare_cpu_pipeline(app.pipe, app.cpu_config, progress=logger.info)
                app.speed = SpeedModel.measured_cpu(app.cpu_config, timing, app.should_tile)
            else:
                probe = Image.effect_noise((PROBE_SIDE, PROBE_SIDE), 64).convert("RGB")
                options = [service.RestoreOptions(steps=n, tiled=False) for n in (1, 1, 3)]
                # The first run warms up (kernel selection, memory pools) and is not timed.
                _, one, three = (restore(app.pipe, probe, o).seconds for o in options)
                mpx = estimates.processed_megapixels(PROBE_SIDE, PROBE_SIDE, tiled=False)
                step = max((three - one) / 2, 1e-4) / mpx
                fixed = max(one / mpx - step, 0.0)
                app.speed = SpeedModel(step, fixed, app.pipe.device.type, True, app.should_tile)  # measured
        speed = app.speed
        logger.info("measured speed on %s: %.3g s per step, %.3g s fixed, per megapixel at %.2f megapixels",
                    app.pipe.device, speed.step_s_per_mpx, speed.fixed_s_per_mpx, speed.at_mpx)
    except Exception:  # the estimate stays a rough default; running images may still work
        logger.exception("could not measure the model's speed")
    finally:
        app.speed_ready.set()


class DeblurApp:
    """The state behind the interface, and its event handlers. ``pipe=None`` with ``model_error``: no weights."""

    def __init__(
        self,
        pipe=None,
        *,
        model_error: str | None = None,
        model_ref: str | None = None,
        examples_dir: Path | None = EXAMPLES_DIR,
        measure_speed: bool = True,
        max_run_seconds: float | None = None,
    ):
        self.pipe = pipe
        self.model_error = model_error or (loading.describe_missing_model() if pipe is None else None)
        self.untrained = pipe is not None and service.is_untrained(pipe)
        self.model_ref = RANDOM_TINY if self.untrained else model_ref
        self.examples_dir = examples_dir
        self.should_tile = pipe.should_tile if pipe is not None else None
        self.cpu_config = None
        if pipe is not None and pipe.device.type == "cpu":
            self.cpu_config = choose_cpu_config(dtype=pipe.unet.dtype)
            logger.info("CPU: %s; configuration: %s", describe_cpu(), self.cpu_config.describe())
        device_type = pipe.device.type if pipe is not None else "cpu"
        self.speed = SpeedModel.default(device_type, self.should_tile, cpu_config=self.cpu_config)
        self.lock = threading.Lock()
        # Cancel flags in shared memory, made before ZeroGPU forks its worker: a flag set here is
        # the one the worker reads (a Python object would be the worker's own copy).
        self.cancelled = multiprocessing.RawArray(ctypes.c_bool, RUN_SLOTS)
        self.free_slots = queue.SimpleQueue()  # a slot is reused only once its run has ended
        for slot in range(RUN_SLOTS):
            self.free_slots.put(slot)
        self.active_runs: dict[str, int] = {}  # session -> cancel-flag slot
        _APPS[id(self)] = self
        # ZeroGPU gives each call its own GPU slice; a local device runs one image at a time.
        self.concurrency_limit = zerogpu.CONCURRENCY if on_zero_gpu() else 1
        self.max_run_seconds = max_run_seconds  # None: $DEBLURDIFF_MAX_RUN_SECONDS, else the device's default
        self.clients = server_limits.ClientTracker()  # which sessions still listen (set up by launch)
        self.speed_ready = threading.Event()
        if pipe is not None and measure_speed and not on_zero_gpu():
            threading.Thread(target=probe_speed, args=(self,), name="deblurdiff-speed-probe", daemon=True).start()
        else:
            self.speed_ready.set()

    def _gpu_speed(self) -> SpeedModel:
        return self.speed if self.speed.device == "cuda" else SpeedModel.default("cuda", self.should_tile)

    def describe_input(self, image, steps, guidance_scale, tiling) -> str:
        """The image's size, notes and time estimate, from its header alone: this runs outside the queue."""
        if not image:
            return ""
        try:
            (w, h), notes = image_io.read_header(image)
        except image_io.InvalidInputError as exc:  # image_io says what is wrong with any file
            return f"⚠️ {exc}"
        except Exception:  # an unqueued public event: a message, never a stack trace
            logger.exception("could not read an image's header")
            return "⚠️ This file could not be read as an image."
        lines = [f"Input: {w}×{h} pixels ({w * h / 1e6:.2f} megapixels)."] + [f"- {note}" for note in notes]
        if self.pipe is not None:
            lines.append(estimate_text(self, (w, h), steps, guidance_scale, tiling))
        return "\n".join(line for line in lines if line)

    def deblur(
        self,
        image,
        steps=service.DEFAULT_STEPS,
        seed=0,
        randomize_seed=True,
        guidance_scale=service.DEFAULT_GUIDANCE,
        prompt="",
        negative_prompt=None,
        color_fix=True,
        tiling=service.DEFAULT_TILING,
        show_lkpn=False,
        sampler=service.DEFAULT_SAMPLER,
        request: gr.Request = None,
        progress=gr.Progress(),
    ):
        """Deblur one photo: removes camera-shake, motion and defocus blur (not noise, not low resolution).

        Args:
            image: the blurry photo (PNG, JPEG, HEIC, AVIF, WebP, BMP, TIFF or GIF).
            steps: denoising steps, 1 to 100 (default 50); fewer is faster.
            seed: random seed, 0 to 4294967295 (used when randomize_seed is false).
            randomize_seed: draw a new seed (true, the default) or use `seed`.
            guidance_scale: 1 to 10; 1 (the default) turns classifier-free guidance off, above 1 is twice as slow.
            prompt: optional description of the scene, at most 1000 characters.
            negative_prompt: used when guidance_scale > 1, at most 1000 characters.
            color_fix: match the result's colours to the input's (default true).
            tiling: "auto" (default), "on" or "off": tiles use less memory on large images.
            show_lkpn: also return the LKPN-restored latent, decoded (default false).
            sampler: the diffusion sampler (default "ddpm").

        Returns:
            The (input, deblurred) image pair, the full-resolution deblurred PNG, the LKPN view
            (None unless show_lkpn), a Markdown summary and the seed used.
        """
        try:
            if self.pipe is None:
                raise _user_error(self.model_error, "No model weights loaded")
            options = service.make_options(  # every setting is checked here, once
                steps=steps, seed=seed, randomize_seed=True if randomize_seed is None else randomize_seed,
                guidance_scale=guidance_scale, prompt=prompt, negative_prompt=negative_prompt,
                color_fix=color_fix, tiling=tiling, sampler=sampler, return_lkpn_image=show_lkpn,
            )
            return self._deblur(image, options, request, progress)
        except gr.Error:
            raise
        except Exception as exc:
            raise _as_user_error(exc) from None

    def run_example(self, image, request: gr.Request = None, progress=gr.Progress()):
        """An example with the default settings and seed 0 (its result is cached)."""
        return self.deblur(image, seed=0, randomize_seed=False, request=request, progress=progress)

    def _deblur(self, image, options: service.RestoreOptions, request, progress):
        session = getattr(request, "session_hash", None) or f"anonymous-{id(request)}"
        if self.clients.gone(session):
            raise _user_error("The client that sent this request is gone; it was not run.", "Dropped")
        loaded = image_io.load_image_with_notes(image)  # no image, or a bad one: a clear InvalidInputError
        run = (*loaded.size, options.steps, options.guidance_scale, options.tiled)
        advice = limit_advice(self, run)
        if advice:
            title = "Too long for one GPU run" if on_zero_gpu() else "Too long for this server"
            raise _user_error(advice, title)
        try:
            slot = self.free_slots.get_nowait()
        except queue.Empty:
            message = "The server is running as many images as it can; please try again in a minute."
            raise _user_error(message, "Busy") from None
        self.cancelled[slot] = False
        self.active_runs[session] = slot
        finished = threading.Event()

        def stop_if_gone():  # the pipeline stops after its current step
            while not finished.wait(0.1):
                if self.clients.gone(session):
                    self.cancelled[slot] = True

        watcher = threading.Thread(target=stop_if_gone, daemon=True)
        watcher.start()
        try:
            progress(0, desc="Starting")
            result = run_on_device(id(self), loaded.image, options, slot, progress)
            cancelled = result.interrupted or self.cancelled[slot]
        except gr.Error as exc:  # ZeroGPU's refusal, through `spaces`: say what fits instead
            refusal = on_zero_gpu() and zerogpu.quota_refusal(str(exc.message), self._gpu_speed(), *run)
            if refusal:
                raise _user_error(refusal, "Not enough ZeroGPU quota") from None
            raise
        finally:
            finished.set()
            watcher.join()  # it no longer writes the flag: the slot can go to another run
            if self.active_runs.get(session) == slot:  # a newer run of the session keeps its entry
                del self.active_runs[session]
            self.free_slots.put(slot)
        if cancelled:
            raise _user_error("The run was cancelled; no result.", "Cancelled")
        progress(1.0, desc="Saving")
        return save_results(self, image, loaded, result)

    def cancel(self, request: gr.Request = None):
        slot = self.active_runs.get(getattr(request, "session_hash", None))
        if slot is not None:
            self.cancelled[slot] = True
        return "Cancelled."


def build_ui(app: DeblurApp) -> gr.Blocks:
    """The interface around ``app``; results are removed by Gradio's ``delete_cache``."""
    untrained = f" ({UNTRAINED_LABEL})" if app.untrained else ""
    with gr.Blocks(title="DeblurDiff: real-world image deblurring", delete_cache=(3600, KEEP_RESULTS_SECONDS)) as demo:
        gr.Markdown(
            "# DeblurDiff: real-world image deblurring\n"
            "Upload a blurry photo and get a sharp one back. "
            "A diffusion model (Stable Diffusion 2.1 with a latent kernel prediction network) restores it; "
            "Kong et al., 2025 ([paper](https://arxiv.org/abs/2502.03810), "
            "[authors' code](https://github.com/kkkls/DeblurDiff)).\n\n" + SCOPE_TEXT,
            elem_id="scope",
        )
        banner_kind = "missing" if app.pipe is None else ("untrained" if app.untrained else "ok")
        gr.Markdown(banner_text(app), elem_id="model-status", elem_classes=[f"status-{banner_kind}"])
        with gr.Row():
            with gr.Column():
                image_in = gr.Image(
                    label="Blurry photo (upload, drag, paste or webcam)", type="filepath", image_mode=None,
                    sources=["upload", "webcam", "clipboard"], elem_id="input-image",
                )
                input_info = gr.Markdown(elem_id="input-info")
                with gr.Row():
                    run_btn = gr.Button("Deblur", variant="primary", elem_id="run-button")
                    cancel_btn = gr.Button("Cancel", variant="stop", elem_id="cancel-button")
                steps = gr.Slider(
                    service.MIN_STEPS, service.MAX_STEPS, value=service.DEFAULT_STEPS, step=1,
                    label="Steps", info="More steps: finer detail, longer run.", elem_id="steps",
                )
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, minimum=service.MIN_SEED, maximum=service.MAX_SEED, label="Seed")
                    randomize = gr.Checkbox(value=True, label="Randomize seed", info="The seed used is shown with the result.")
                guidance = gr.Slider(
                    service.MIN_GUIDANCE, service.MAX_GUIDANCE, value=service.DEFAULT_GUIDANCE, step=0.1,
                    label="Guidance scale", info="1 = no classifier-free guidance (the default); higher values follow the prompts more and take twice as long.",
                )
                with gr.Accordion("Advanced", open=False):
                    prompt = gr.Textbox(label="Prompt", value="", placeholder="optional, e.g. 'a photo of a cat'")
                    negative = gr.Textbox(
                        label="Negative prompt (used when guidance > 1)", value=DEFAULT_NEGATIVE_PROMPT
                    )
                    color_fix = gr.Checkbox(value=True, label="Colour fix (match the input's colours)")
                    tiling = gr.Radio(
                        list(service.TILING_CHOICES), value=service.DEFAULT_TILING, label="Tiling for large images",
                        info="auto: by image size; tiles use less memory.",
                    )
                    sampler = gr.Dropdown(list(SAMPLERS), value=service.DEFAULT_SAMPLER, label="Sampler")
                    show_lkpn = gr.Checkbox(value=False, label="Also show the LKPN-restored latent (decoded)")
            with gr.Column():
                slider = gr.ImageSlider(
                    label=f"Before / after{untrained}", type="filepath", elem_id="result", interactive=False,
                )
                result_info = gr.Markdown(label="Summary", elem_id="result-info")
                download = gr.File(label=f"Full-resolution PNG{untrained}", interactive=False, elem_id="download")
                lkpn_image = gr.Image(
                    label=f"LKPN-restored latent, decoded{untrained}", type="filepath", visible=False, interactive=False, elem_id="lkpn"
                )

        inputs = [image_in, steps, seed, randomize, guidance, prompt, negative, color_fix, tiling, show_lkpn, sampler]
        for component in (image_in, steps, seed, guidance, tiling, sampler):
            pass_raw(component)
        outputs = [slider, download, lkpn_image, result_info, seed]
        description = TOOL_DESCRIPTION.format(
            formats=image_io.SUPPORTED_FORMATS, max_mp=f"{image_io.DEFAULT_MAX_PIXELS / 1e6:.1f}")
        if app.untrained:
            description = f"[{UNTRAINED_LABEL} development weights: outputs are not deblurred] " + description
        run = dict(concurrency_limit=app.concurrency_limit, concurrency_id="model", show_progress_on=[slider])
        cancellable = [
            run_btn.click(app.deblur, inputs, outputs, api_name="deblur", api_description=description, **run)
        ]

        meta = app.examples_dir / "examples.json" if app.examples_dir else None
        entries = json.loads(meta.read_text()) if meta is not None and meta.is_file() else []
        example_files = [[str(app.examples_dir / entry["file"])] for entry in entries]
        names = " · ".join(entry["title"] for entry in entries)
        # Trained weights: computed once on first click, then served from the cache (visitors spend no
        # GPU time). Untrained or missing weights: never cached; a click loads the image and runs it.
        cached = not app.untrained and app.pipe is not None
        if example_files:
            note = "click one: results are computed once, then cached" if cached else "click one to run it"
            examples = gr.Examples(
                example_files, inputs=[image_in], outputs=outputs, fn=app.run_example, elem_id="examples",
                cache_examples=cached, cache_mode="lazy", label=f"Examples ({note}): {names}",
            )
        if example_files and not cached:
            run_example = examples.load_input_event.then(app.deblur, inputs, outputs, api_visibility="private", **run)
            cancellable.append(run_example)
        cancel_btn.click(app.cancel, None, result_info, cancels=cancellable, queue=False, api_visibility="private")

        private = dict(queue=False, api_visibility="private", show_progress="hidden")
        show_lkpn.change(lambda show: gr.update(visible=bool(show)), show_lkpn, lkpn_image, **private)
        for component in (image_in, steps, guidance, tiling):
            component.change(app.describe_input, [image_in, steps, guidance, tiling], input_info, **private)
    demo.deblurdiff_app = app
    return demo


CSS = """
#model-status.status-missing, #model-status.status-untrained {
  border: 2px solid #d97706; border-radius: 8px; padding: 0.5em 1em; background: rgba(217, 119, 6, 0.08);
}
"""


def resolve_model(model: str | None = None) -> str | None:
    return model or os.environ.get(MODEL_ENV) or DEFAULT_SPACE_MODEL


def prepare_for_zero_gpu(pipe) -> None:
    """Memory budget for the tiling decision (the main process has no GPU to ask), and the
    networks compiled ahead of time (ZeroGPU does not run ``torch.compile``)."""
    weights = sum(p.numel() * p.element_size() for m in pipe.components.values() if isinstance(m, torch.nn.Module) for p in m.parameters())
    pipe.memory_budget = ZERO_GPU_MEMORY_BYTES - weights
    aoti = os.environ.get(AOTI_ENV, "").strip()
    if aoti == "0" or (service.is_untrained(pipe) and aoti != "1"):
        return
    try:
        compile_for_zerogpu(pipe)
    except Exception:  # the eager networks still work, only slower
        logger.exception("ahead-of-time compilation failed; running the networks eagerly")


def load_app_model(model=None, *, tokenizer=None, device=None, dtype=None, dev_random_weights=False, allow_download=None):
    """``(pipe, None, reference)`` or ``(None, message, reference)``: the app starts either way.
    With no reference, the authors' checkpoint is fetched and converted once (``allow_download``)."""
    reference = RANDOM_TINY if dev_random_weights else resolve_model(model)
    if on_zero_gpu():
        # ZeroGPU: the model is placed on `cuda` here, at start-up, as its docs ask (CUDA is
        # emulated until a GPU function runs); the GPU function never moves it. Its GPUs
        # (RTX Pro 6000 Blackwell) run bf16 natively; choosing here avoids querying CUDA.
        device = "cuda" if device in (None, "auto") else device
        dtype = "bf16" if dtype in (None, "auto") else dtype
    try:
        logger.info("loading weights from %s", reference or OFFICIAL_LABEL)
        pipe = load_pipeline(reference, tokenizer=tokenizer, device=device, dtype=dtype, allow_download=allow_download)
        if on_zero_gpu():
            prepare_for_zero_gpu(pipe)
        return pipe, None, reference or OFFICIAL_LABEL
    except ModelUnavailableError as exc:
        logger.error("no model: %s", exc)
        return None, str(exc), reference
    except Exception as exc:  # a bad --device, a broken install, …: still start and say so
        logger.exception("could not load the model")
        return None, f"Could not load DeblurDiff weights from {reference!r}: {type(exc).__name__}: {exc}", reference


def build_demo(pipe=None, **kwargs) -> gr.Blocks:
    """The interface around ``pipe`` (None: the page saying what is missing)."""
    return build_ui(DeblurApp(pipe, **kwargs))


def launch(demo: gr.Blocks, *, max_file_size=None, mcp: bool = True, **kwargs):
    """``demo.queue(...).launch(...)`` with the app's queue, styling, file permissions, MCP server and
    the server's limits (``max_file_size`` defaults to ``$DEBLURDIFF_MAX_FILE_SIZE`` or 50 MB)."""
    app = demo.deblurdiff_app
    demo.queue(max_size=QUEUE_SIZE, default_concurrency_limit=1, api_open=False)
    allowed = [str(app.examples_dir)] if app.examples_dir else []
    kwargs = {"css": CSS, "allowed_paths": allowed, "mcp_server": mcp, **kwargs}
    kwargs = server_limits.protect(demo, app.clients, server_limits.max_file_size(max_file_size), kwargs)
    return demo.launch(**kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python app.py", description="The DeblurDiff web app.")
    parser.add_argument("--model", default=None, help=f"weights: folder, Hub repo id or official model.pth (default: ${MODEL_ENV}, then DEFAULT_SPACE_MODEL, then the authors' checkpoint, downloaded once)")
    parser.add_argument("--tokenizer", default=None, help=f"tokenizer override (default: ${TOKENIZER_ENV}, else the one shipped with the package)")
    parser.add_argument("--device", default="auto", help="auto (default), cuda, cuda:N, mps or cpu")
    parser.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"))
    parser.add_argument("--dev-random-weights", action="store_true", help="development only: untrained random weights, outputs labelled UNTRAINED")
    parser.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=None, help="port (default 7860 or the next free one)")
    parser.add_argument("--share", action="store_true", help="also create a temporary public gradio.live link")
    parser.add_argument("--no-download", action="store_true", help=f"never download the authors' checkpoint (also: {NO_DOWNLOAD_ENV}=1)")
    parser.add_argument("--no-examples", action="store_true", help="hide the example gallery")
    parser.add_argument("--no-mcp", action="store_true", help="turn off the MCP server (on by default: the deblur tool for agents, at /gradio_api/mcp/)")
    parser.add_argument("--max-file-size", default=None, help=f"largest upload, e.g. 50MB (default: ${server_limits.MAX_FILE_SIZE_ENV}, else 50MB)")
    parser.add_argument("--max-run-seconds", type=float, default=None, help="refuse runs estimated to take longer (default: $DEBLURDIFF_MAX_RUN_SECONDS, else 3600 on a CPU, 1800 on MPS, 600 on a GPU)")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        file_limit = server_limits.max_file_size(args.max_file_size)
    except ValueError as exc:
        parser.error(f"--max-file-size / ${server_limits.MAX_FILE_SIZE_ENV}: {exc}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server_limits.claim_temp_dir()  # before any component: Gradio reads its folder when they are made
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    pipe, error, reference = load_app_model(
        args.model, tokenizer=args.tokenizer, device=args.device, dtype=args.dtype, dev_random_weights=args.dev_random_weights,
        allow_download=False if args.no_download else None,
    )
    demo = build_demo(
        pipe, model_error=error, model_ref=reference, examples_dir=None if args.no_examples else EXAMPLES_DIR,
        max_run_seconds=args.max_run_seconds,
    )
    launch(demo, max_file_size=file_limit, mcp=not args.no_mcp, server_name=args.host, server_port=args.port, share=args.share or None)
