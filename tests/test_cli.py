"""The command line: ``python -m deblurdiff INPUT... -o OUT_DIR`` (tiny random weights)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deblurdiff import cli, service
from deblurdiff.cli import main, plan_outputs
from deblurdiff.service import safe_stem
from deblurdiff.pipeline.loading import MODEL_ENV

ROOT = Path(__file__).resolve().parent.parent


def noise_image(path, size, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    (folder / "day two").mkdir(parents=True)
    noise_image(folder / "beach.png", (80, 64))
    noise_image(folder / "day two" / "beach.jpg", (64, 96), seed=1)
    (folder / "notes.png").write_text("not an image")
    return folder


def test_folder_with_two_images_and_a_bad_file(photos, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    # A killed run's temporaries of these outputs go, even where the input then fails to load.
    for name in ("notes_UNTRAINED.png", "beach_UNTRAINED_lkpn.png", "notes_UNTRAINED.png.png"):
        (out / f".{name}.123.tmp").write_bytes(b"left by a killed run")
    code = main([str(photos), "-o", str(out), "--steps", "2", "--seed", "7", "--dev-random-weights", "--save-lkpn", "-q"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_SOME_FAILED
    assert "notes.png" in err and "not an image" in err and "1 input(s) failed" in err
    assert "UNTRAINED" in err
    assert "CPU configuration: " in err and ("bfloat16" in err or "float32" in err)  # the CPU's choice, said
    written = sorted(p.name for p in out.iterdir())
    assert written == [
        ".notes_UNTRAINED.png.png.123.tmp",  # another output's: not ours to remove
        "beach_UNTRAINED-1.png",
        "beach_UNTRAINED-1_lkpn.png",
        "beach_UNTRAINED.png",
        "beach_UNTRAINED_lkpn.png",
    ]
    # Sorted input order: photos/beach.png, then "photos/day two/beach.jpg".
    first, second = Image.open(out / "beach_UNTRAINED.png"), Image.open(out / "beach_UNTRAINED-1.png")
    assert first.size == (80, 64) and second.size == (64, 96)
    assert first.text["deblurdiff:seed"] == "7" and first.text["deblurdiff:steps"] == "2"
    assert "UNTRAINED" in first.text["deblurdiff:warning"] and first.text["deblurdiff:source"] == "beach.png"
    # Inputs untouched.
    assert sorted(p.name for p in photos.rglob("*") if p.is_file()) == ["beach.jpg", "beach.png", "notes.png"]


def test_folders_yield_heic_and_avif_photos(tmp_path):
    for name in ("IMG_0001.HEIC", "b.avif", "c.heif", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    items, problems = cli.collect_inputs([str(tmp_path)])
    assert sorted(item.name for item in items) == ["IMG_0001.HEIC", "b.avif", "c.heif"] and not problems


def test_all_good_inputs_exit_zero_and_keep_existing_outputs(photos, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "beach_UNTRAINED.png").write_bytes(b"an earlier result")
    code = main([str(photos / "beach.png"), "-o", str(out), "--steps", "1", "--seed", "1", "--dev-random-weights", "-q"])
    assert code == cli.EXIT_OK, capsys.readouterr().err
    assert (out / "beach_UNTRAINED.png").read_bytes() == b"an earlier result"
    assert Image.open(out / "beach_UNTRAINED-1.png").size == (80, 64)


def test_output_folder_that_is_an_input_is_refused(photos, capsys):
    assert main([str(photos), "-o", str(photos), "--dev-random-weights"]) == cli.EXIT_USAGE
    assert "inputs are never overwritten" in capsys.readouterr().err
    image = photos / "beach.png"
    assert main([str(image), "-o", str(image), "--dev-random-weights"]) == cli.EXIT_USAGE


def test_missing_weights_exit_2_with_the_reason(photos, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(MODEL_ENV, raising=False)
    assert main([str(photos), "-o", str(tmp_path / "out")]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "No DeblurDiff weights are configured" in err and "--model" in err
    assert main([str(photos), "-o", str(tmp_path / "out"), "--model", str(tmp_path / "nowhere")]) == cli.EXIT_USAGE
    assert "Model folder not found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "options, message",
    [
        (["--steps", "0"], "steps must be between 1 and 100"),
        (["--steps", "many"], "number of steps must be a number"),
        (["--seed", "-3"], "seed must be"),
        (["--guidance", "11"], "guidance scale must be between 1 and 10"),
        (["--prompt", "x" * 2000], "prompt is too long"),
    ],
)
def test_invalid_options_exit_2_before_loading_anything(photos, tmp_path, capsys, options, message):
    assert main([str(photos), "-o", str(tmp_path / "out"), *options]) == cli.EXIT_USAGE
    assert message in capsys.readouterr().err


def test_nothing_to_do(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), str(tmp_path / "missing.png"), "-o", str(tmp_path / "out")]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "no images found" in err and "does not exist" in err


def test_planned_outputs_are_unique_inside_out_dir_and_never_inputs(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    inputs = [folder / "x.png", folder / "x.jpg", folder / "X.tif", folder / "..png", folder / "a b?c.jpeg"]
    for p in inputs:
        p.write_bytes(b"")
    outputs = plan_outputs(inputs, folder)  # writing next to the inputs: never onto them
    names = [p.name for p in outputs]
    assert names == ["x-1.png", "x-2.png", "X-3.png", "png.png", "a_b_c.png"]
    assert all(p.parent == folder.resolve() for p in outputs)
    assert len({n.casefold() for n in names}) == len(names)


@pytest.mark.parametrize(
    "name, stem",
    [
        ("photo.jpg", "photo"),
        ("../../etc/passwd", "passwd"),
        ("..\\..\\windows\\evil.png", "evil"),
        (".hidden.png", "hidden"),
        ("", "image"),
        ("...", "image"),
        ("CON.png", "CON_image"),
        ("ünïcödé ok.png", "ünïcödé_ok"),
        ("a" * 300 + ".png", "a" * 100),
    ],
)
def test_safe_stem(name, stem):
    assert safe_stem(name) == stem


def test_module_entry_point_help():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-m", "deblurdiff", "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0
    assert "OUT_DIR" in done.stdout and "--dev-random-weights" in done.stdout and "--tiled" in done.stdout


@pytest.mark.slow
def test_a_rerun_keeps_finished_outputs_and_redoes_a_cut_short_one(photos, tmp_path, capsys):
    out = tmp_path / "out"
    command = [str(photos), "-o", str(out), "--steps", "1", "--dev-random-weights", "-q"]
    assert main(command) == cli.EXIT_SOME_FAILED  # notes.png
    capsys.readouterr()
    first, second = out / "beach_UNTRAINED.png", out / "beach_UNTRAINED-1.png"
    assert cli.stored_key(first) and cli.stored_key(first) != cli.stored_key(second)
    kept = first.stat().st_mtime_ns, first.read_bytes()
    # A cut-short file (as a writer without the temporary file would leave it) is not done.
    second.write_bytes(second.read_bytes()[:-300])
    assert not cli.is_complete(second)
    assert main(command) == cli.EXIT_SOME_FAILED  # no --seed: another seed, yet the same settings
    err = capsys.readouterr().err
    assert "1 image(s) already done by an earlier run" in err and "1 image(s) written" in err
    assert (first.stat().st_mtime_ns, first.read_bytes()) == kept
    assert cli.is_complete(second) and sorted(p.name for p in out.iterdir()) == sorted([first.name, second.name])
    # Other settings are another result: written next to the first ones.
    assert main([*command, "--steps", "2"]) == cli.EXIT_SOME_FAILED
    assert len(list(out.iterdir())) == 4


def test_an_output_is_never_half_written(tmp_path):
    class Failing:
        def save(self, path, **kwargs):
            Path(path).write_bytes(b"\x89PNG partial")
            raise OSError("disk full")

    target = tmp_path / "x.png"
    with pytest.raises(OSError, match="disk full"):
        cli.save_atomically(Failing(), target, None)
    assert list(tmp_path.iterdir()) == []


def test_batches_group_images_of_the_same_padded_size():
    jobs = [cli.Job(i, None, size) for i, size in enumerate([(64, 64), (128, 64), (64, 64), (64, 64), None])]
    assert [[j.path for j in b] for b in cli.batches(jobs, 2)] == [[4], [0, 2], [3], [1]]
    assert [[j.path for j in b] for b in cli.batches(jobs, 1)] == [[4], [0], [2], [3], [1]]


@pytest.mark.parametrize("value", ["0", "x", "1000"])
def test_invalid_batch_size_exits_2(photos, tmp_path, capsys, value):
    assert main([str(photos), "-o", str(tmp_path / "out"), "--batch-size", value, "--dev-random-weights"]) == cli.EXIT_USAGE
    assert "batch size must be" in capsys.readouterr().err


@pytest.mark.slow
def test_batched_results_equal_unbatched_ones(tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for i, size in enumerate([(64, 64), (80, 64), (64, 72), (64, 64), (128, 64)]):  # four pad to 128×64 or 64²
        noise_image(folder / f"p{i}.png", size, seed=i)
    common = ["--steps", "2", "--seed", "3", "--dtype", "fp32", "--dev-random-weights", "-q"]
    assert main([str(folder), "-o", str(tmp_path / "one"), "--batch-size", "1", *common]) == cli.EXIT_OK
    assert main([str(folder), "-o", str(tmp_path / "four"), "--batch-size", "4", *common]) == cli.EXIT_OK
    for i in range(5):
        one = np.asarray(Image.open(tmp_path / "one" / f"p{i}_UNTRAINED.png"), dtype=int)
        four = np.asarray(Image.open(tmp_path / "four" / f"p{i}_UNTRAINED.png"), dtype=int)
        # uint8 outputs: float rounding can move a value across a truncation step.
        assert one.shape == four.shape and np.abs(one - four).max() <= 1
        assert (one != four).mean() < 0.01


@pytest.fixture
def three_squares(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        noise_image(folder / f"p{i}.png", (64, 64), seed=i)
    return folder


def test_a_failing_batch_is_retried_one_image_at_a_time(three_squares, tmp_path, capsys, monkeypatch):
    folder = three_squares
    real = service.restore_batch

    def fails_for_batches_and_for_p1(pipe, images, options, **kwargs):
        if len(images) > 1:
            raise RuntimeError("out of memory")
        if np.array_equal(np.asarray(images[0]), np.asarray(Image.open(folder / "p1.png"))):
            raise RuntimeError("out of memory")
        return real(pipe, images, options, **kwargs)

    monkeypatch.setattr(service, "restore_batch", fails_for_batches_and_for_p1)
    code = main([str(folder), "-o", str(tmp_path / "out"), "--batch-size", "3", "--steps", "1", "--dev-random-weights", "-q"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_SOME_FAILED
    assert "a batch of 3 failed" in err and "failed " in err and "p1.png: RuntimeError: out of memory" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["p0_UNTRAINED.png", "p2_UNTRAINED.png"]


def test_an_output_that_cannot_be_written_is_reported_and_the_others_go_on(three_squares, tmp_path, capsys, monkeypatch):
    folder = three_squares
    real = cli.save_atomically

    def disk_full_for_p0(image, target, pnginfo):
        if target.name.startswith("p0"):
            raise OSError(28, "No space left on device")
        real(image, target, pnginfo)

    monkeypatch.setattr(cli, "save_atomically", disk_full_for_p0)
    assert main([str(folder), "-o", str(tmp_path / "out"), "--steps", "1", "--dev-random-weights", "-q"]) == cli.EXIT_SOME_FAILED
    err = capsys.readouterr().err
    assert "could not write" in err and "No space left on device" in err and "1 input(s) failed" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["p1_UNTRAINED.png", "p2_UNTRAINED.png"]
