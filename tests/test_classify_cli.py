"""``vidq classify`` run for real in a subprocess, as a user runs it: bad inputs,
limits, JSON output, weights loading. x3d_xs with random or test-written weights
keeps each run to a few seconds."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests import cli
from tests.media import Media
from vidq.sampling import Sampling, plan_windows
from worker.models import get_preset

MODEL = ["--model", "x3d_xs"]
ERROR = "vidq: error: "


def run_vidq(
    *args: str, env: dict[str, str] | None = None, home: Path
) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("VIDQ_")}
    environ["TORCH_HOME"] = str(home)  # an empty hub cache: nothing pretrained is found
    environ.update(env or {})
    return cli.run_vidq("classify", *args, env=environ, timeout=300, script=True)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(ERROR)]


def lines_naming(stderr: str, path: Path | str) -> list[str]:
    name = os.path.basename(str(path)) + ":"
    return [
        line for line in stderr.splitlines()
        if any(word == name or word.endswith("/" + name) for word in line.split(" "))
    ]


def json_results(stdout: str) -> dict[str, dict[str, Any]]:
    results = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    return {os.path.basename(r["path"]): r for r in results}


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("torch_home")


# -- bad input next to good input -----------------------------------------------------


@pytest.fixture(scope="module")
def mixed_run(
    media_files: Media, home: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """One command over good videos with every kind of bad input between them."""
    directory = tmp_path_factory.mktemp("a_directory")
    bad = {
        "empty": media_files.empty,
        "random_bytes": media_files.random_bytes,
        "audio_m4a": media_files.audio_m4a,
        "audio_wav": media_files.audio_wav,
        "corrupt": media_files.corrupt,
        "truncated_mp4": media_files.truncated_mp4,
        "truncated_faststart": media_files.truncated_faststart,
        "truncated_mkv": media_files.truncated_mkv,
        "missing": directory / "missing.mp4",
        "directory": directory,
    }
    good = [
        media_files.h264_30, media_files.portrait, media_files.vp9_webm, media_files.mpeg4_avi,
        media_files.short, media_files.vfr_mkv, media_files.h264_25_audio,
    ]
    order = [
        good[0], bad["empty"], bad["random_bytes"], good[1], bad["audio_m4a"], bad["audio_wav"],
        good[2], bad["corrupt"], bad["truncated_mp4"], good[3], bad["truncated_faststart"],
        bad["truncated_mkv"], good[4], bad["missing"], bad["directory"], good[5], good[6],
    ]
    proc = run_vidq(*map(str, order), *MODEL, "--weights", "random", "--strategy", "sliding",
                    "--json", home=home)
    return {"proc": proc, "bad": bad, "good": good, "order": order}


def test_bad_inputs_fail_but_the_good_videos_are_still_classified(
    mixed_run: dict[str, Any]
) -> None:
    proc = mixed_run["proc"]
    assert proc.returncode == 1, proc.stderr
    results = json_results(proc.stdout)
    assert list(results) == [p.name for p in mixed_run["good"]]  # argument order kept
    assert all(r["clips"] and r["top"] for r in results.values())


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("empty", "empty file"),
        ("random_bytes", "not a video FFmpeg can read"),
        ("audio_m4a", "no video stream (audio only)"),
        ("audio_wav", "no video stream (audio only)"),
        ("corrupt", "corrupt"),
        ("truncated_mp4", "cut short"),
        ("truncated_faststart", "truncated"),
        ("truncated_mkv", "truncated"),
        ("missing", "no such file"),
        ("directory", "is a directory"),
    ],
)
def test_each_bad_input_gets_one_clear_error_line_naming_it(
    mixed_run: dict[str, Any], name: str, says: str
) -> None:
    stderr = mixed_run["proc"].stderr
    path = mixed_run["bad"][name]
    lines = lines_naming(stderr, path)
    assert len(lines) == 1, stderr
    assert lines[0].startswith(ERROR) and says in lines[0], lines[0]


def test_no_traceback_and_nothing_but_one_line_per_problem(mixed_run: dict[str, Any]) -> None:
    stderr = mixed_run["proc"].stderr
    assert "Traceback" not in stderr
    assert len(error_lines(stderr)) == len(mixed_run["bad"])
    others = [
        line for line in stderr.splitlines()
        if not line.startswith(("vidq: error: ", "vidq: warning: "))
    ]
    assert len(others) == 1 and others[0].startswith("vidq: ") and "clips/s" in others[0], stderr


def test_json_fields(mixed_run: dict[str, Any], media_files: Media) -> None:
    results = json_results(mixed_run["proc"].stdout)
    preset = get_preset("x3d_xs")
    r = results["portrait.mp4"]
    assert r["path"] == str(media_files.portrait.resolve())
    assert (r["model"], r["weights_id"]) == ("x3d_xs", "random-init")
    if not torch.cuda.is_available():
        # precision auto keeps X3D in fp32 on CPU: its depthwise convolutions run
        # slower in bf16 (slow_r50 gets bf16 on AMX; see test_models/test_inference).
        assert not preset.cpu_bf16 and r["precision"] == "fp32"
    assert r["precision"] in ("fp32", "bf16", "fp16")
    info = r["info"]
    assert (info["width"], info["height"], info["fps"], info["frames"]) == (96, 160, 30.0, 60)
    assert info["codec"] == "h264" and info["has_audio"] is False
    assert info["duration_s"] == pytest.approx(2.0)
    assert results["h264_25_audio.mp4"]["info"]["has_audio"] is True
    assert r["sampling"]["strategy"] == "sliding"
    windows = plan_windows(Sampling(strategy="sliding"), info["duration_s"], preset.clip_duration)
    assert [(c["index"], c["start_sec"], c["end_sec"]) for c in r["clips"]] == [
        (w.index, round(w.start_sec, 4), round(w.end_sec, 4)) for w in windows
    ]
    for clip in r["clips"]:
        assert clip["source_frames"] == 48 or clip is r["clips"][-1]  # 1.6 s at 30 fps
        assert len(clip["top"]) == 5
    for entry in r["top"]:
        assert set(entry) == {"class_id", "label", "score"}
        assert 0 <= entry["class_id"] < 400 and entry["label"] and 0 < entry["score"] <= 1
    scores = [t["score"] for t in r["top"]]
    assert scores == sorted(scores, reverse=True)
    assert results["short.mp4"]["clips"][0]["source_frames"] == 30  # 1 s video, one clip


def test_random_weights_are_announced(mixed_run: dict[str, Any]) -> None:
    assert "vidq: warning: random weights" in mixed_run["proc"].stderr


def test_no_usable_input_at_all_exits_non_zero_without_loading_a_model(
    media_files: Media, home: Path
) -> None:
    proc = run_vidq(
        str(media_files.empty), "concat:a.mp4|b.mp4", *MODEL, "--weights", "random", home=home
    )
    assert proc.returncode == 1
    assert len(error_lines(proc.stderr)) == 2 and "FFmpeg protocol" in proc.stderr
    assert proc.stdout == "" and "warning" not in proc.stderr


# -- limits ---------------------------------------------------------------------------------


def test_limits_refuse_with_the_limit_named_and_other_videos_go_on(
    media_files: Media, home: Path
) -> None:
    big, long_, fine = media_files.h264_30, media_files.h264_24, media_files.short  # 3 s, 3 s, 1 s
    assert big.stat().st_size > long_.stat().st_size + 1
    env = {"VIDQ_MAX_DURATION_S": "2.5", "VIDQ_MAX_FILE_BYTES": str(long_.stat().st_size + 1)}
    proc = run_vidq(str(big), str(long_), str(fine), *MODEL, "--weights", "random", "--json",
                    env=env, home=home)
    assert proc.returncode == 1
    (bytes_line,) = lines_naming(proc.stderr, big)
    assert bytes_line.startswith(ERROR)
    assert f"VIDQ_MAX_FILE_BYTES={long_.stat().st_size + 1}" in bytes_line
    (duration_line,) = lines_naming(proc.stderr, long_)
    assert duration_line.startswith(ERROR) and "VIDQ_MAX_DURATION_S=2.5" in duration_line
    assert list(json_results(proc.stdout)) == ["short.mp4"]


# -- weights ------------------------------------------------------------------------------------


def x3d_xs_state_dict(favourite: int) -> dict[str, torch.Tensor]:
    """A random x3d_xs whose head always answers class ``favourite``."""
    torch.manual_seed(123)
    sd = get_preset("x3d_xs").build().state_dict()
    sd["blocks.5.proj.bias"] = torch.zeros(400)
    sd["blocks.5.proj.bias"][favourite] = 30.0
    return sd


def sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(("layout", "favourite"), [("hub_pyth", 42), ("plain_state_dict", 7)])
def test_a_local_checkpoint_is_loaded_and_identified_by_its_hash(
    media_files: Media, home: Path, tmp_path: Path, layout: str, favourite: int
) -> None:
    sd = x3d_xs_state_dict(favourite)
    checkpoint = tmp_path / ("X3D_XS.pyth" if layout == "hub_pyth" else "x3d_xs_state.pt")
    torch.save({"model_state": sd} if layout == "hub_pyth" else sd, checkpoint)
    proc = run_vidq(str(media_files.h264_30), *MODEL, "--weights", str(checkpoint), "--json",
                    "--strategy", "uniform", "--clips", "2", home=home)
    assert proc.returncode == 0, proc.stderr
    (result,) = json_results(proc.stdout).values()
    assert result["weights_id"] == sha256(checkpoint)
    assert result["top"][0]["class_id"] == favourite and result["top"][0]["score"] > 0.99
    assert all(c["top"][0]["class_id"] == favourite for c in result["clips"])
    assert "random weights" not in proc.stderr


def assert_one_line_failure(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(ERROR), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_a_checkpoint_for_another_architecture_is_one_line(
    media_files: Media, home: Path, tmp_path: Path
) -> None:
    sd = x3d_xs_state_dict(0)
    sd["blocks.5.proj.weight"] = torch.zeros(10, 2048)  # a 10-class head
    sd["blocks.5.proj.bias"] = torch.zeros(10)
    checkpoint = tmp_path / "other.pyth"
    torch.save({"model_state": sd}, checkpoint)
    proc = run_vidq(str(media_files.h264_30), *MODEL, "--weights", str(checkpoint), home=home)
    assert_one_line_failure(proc, str(checkpoint), "does not fit model x3d_xs")


def test_a_checkpoint_other_than_the_pinned_one_is_refused_in_one_line(
    media_files: Media, home: Path, tmp_path: Path
) -> None:
    """VIDQ_WEIGHTS_SHA256 pins the weights a fleet runs: the pinned file loads, any
    other is refused before it is read."""
    trusted, other = tmp_path / "trusted.pyth", tmp_path / "other.pyth"
    torch.save({"model_state": x3d_xs_state_dict(42)}, trusted)
    torch.save({"model_state": x3d_xs_state_dict(7)}, other)
    pin = sha256(trusted)
    ok = run_vidq(str(media_files.h264_30), *MODEL, "--weights", str(trusted), "--json",
                  env={"VIDQ_WEIGHTS_SHA256": pin.upper().replace("SHA256:", "")}, home=home)
    assert ok.returncode == 0, ok.stderr
    (result,) = json_results(ok.stdout).values()
    assert result["weights_id"] == pin and result["top"][0]["class_id"] == 42
    refused = run_vidq(str(media_files.h264_30), *MODEL, "--weights", str(other),
                       env={"VIDQ_WEIGHTS_SHA256": pin}, home=home)
    assert_one_line_failure(refused, str(other), sha256(other)[7:], pin[7:], "refusing it")
    malformed = run_vidq(str(media_files.h264_30), *MODEL, "--weights", str(trusted),
                         env={"VIDQ_WEIGHTS_SHA256": "abc"}, home=home)
    assert_one_line_failure(malformed, "VIDQ_WEIGHTS_SHA256='abc' is not a sha256")


@pytest.mark.parametrize("what", ["not_a_checkpoint", "missing"])
def test_an_unreadable_or_missing_checkpoint_is_one_line(
    media_files: Media, home: Path, tmp_path: Path, what: str
) -> None:
    checkpoint = tmp_path / "weights.pyth"
    if what == "not_a_checkpoint":
        checkpoint.write_bytes(os.urandom(4096))
    proc = run_vidq(str(media_files.h264_30), *MODEL, "--weights", str(checkpoint), home=home)
    line = assert_one_line_failure(proc, str(checkpoint))
    assert ("Cannot read checkpoint" if what == "not_a_checkpoint" else "does not exist") in line


@pytest.mark.timeout(180)
def test_pretrained_weights_offline_say_how_to_use_a_local_checkpoint(
    media_files: Media, tmp_path: Path
) -> None:
    # This machine has no internet: the hub download really fails.
    proc = run_vidq(str(media_files.h264_30), *MODEL, "--weights", "pretrained", home=tmp_path)
    line = assert_one_line_failure(
        proc, "X3D_XS.pyth", "VIDQ_WEIGHTS=/path/to/it", "--weights PATH"
    )
    assert str(tmp_path / "hub" / "checkpoints" / "X3D_XS.pyth") in line
    assert not (tmp_path / "hub" / "checkpoints" / "X3D_XS.pyth").exists()


# -- what imports torch ----------------------------------------------------------------------------


HEAVY = ("torch", "torchvision", "pytorchvideo", "av", "numpy")


def test_the_producer_side_imports_no_torch_and_runs_without_it(tmp_path: Path) -> None:
    """A producer host installs only the base package: importing the producer side
    and running every producer command must leave the heavy modules unloaded."""
    video = tmp_path / "clip.mp4"
    video.write_bytes(os.urandom(4096))  # the producer hashes it; it never decodes it
    commands = [
        ["submit", str(video), "--batch", "b", "--model", "x3d_xs"],  # broker down: recorded
        ["status"], ["status", "--batch", "b", "--json"], ["results", "--batch", "b"],
        ["show", "1"], ["reconcile", "--dry-run"], ["cancel", "--batch", "b"],
        ["retry", "--batch", "b"],
    ]
    code = (
        "import importlib, json, sys\n"
        "mods = ['vidq', 'vidq.cli', 'vidq.settings', 'vidq.media', 'vidq.errors', 'vidq.db',\n"
        "        'vidq.queue', 'vidq.reconcile', 'vidq.broker', 'vidq.sampling',\n"
        "        'producer', 'producer.submit', 'producer.query']\n"
        "for m in mods: importlib.import_module(m)\n"
        "from vidq.cli import main\n"
        "codes = []\n"
        f"for args in {commands!r}:\n"
        "    try:\n"
        "        main(args, standalone_mode=False); codes.append(0)\n"
        "    except SystemExit as exc:\n"
        "        codes.append(exc.code)\n"
        f"heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)\n"
        "print(json.dumps({'heavy': heavy, 'codes': codes}))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIDQ_")}
    env.update(VIDQ_DATABASE_URL=f"sqlite:///{tmp_path / 'vidq.db'}",
               VIDQ_BROKER_URL="redis://127.0.0.1:1/0")  # nothing listens there
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["heavy"] == [], f"the producer side imported {report['heavy']}"
    # The commands really ran: submit recorded the job (exit 1: broker down), the rest 0.
    assert report["codes"] == [1, 0, 0, 0, 0, 0, 0, 0], proc.stderr
    assert "1 jobs recorded" in proc.stderr and "1 jobs cancelled" in proc.stdout
